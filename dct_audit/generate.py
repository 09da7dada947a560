"""Paired generation: the same seeds and contexts with the learned token and with the baseline prompt."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import rundir
from .adapters.generator import Generator
from .options import DEFAULT_CONTEXTS  # noqa: F401  (the defaults live with the options)

VARIANTS = ("token", "baseline")


@dataclass(frozen=True)
class Job:
    """One image to make: which variant, which context, which seed, and its prompt."""

    variant: str  # "token" | "baseline"
    context_index: int
    context: str
    seed: int
    prompt: str

    @property
    def filename(self) -> str:
        return f"{rundir.IMAGES_DIR}/{self.variant}/c{self.context_index}_s{self.seed}.png"


def twin(job: Job, variant: str) -> Job:
    """The same (context, seed) image in another variant (used when both variants' prompts embed equally)."""
    return Job(variant, job.context_index, job.context, job.seed, job.prompt)


def nograd_batch(opts, batch: int) -> int:
    """Images per generator call without gradient (grids, counterfactual prompts): ``--gen-batch``, else the
    inversion batch, at least 4."""
    return getattr(opts, "gen_batch", None) or max(batch, 4)


def eval_seeds(seed: int, n: int) -> list[int]:
    """Seeds of the generated grids: disjoint from the inversion's seeds (which start at ``seed``)."""
    return [seed + 1000 + i for i in range(n)]


def plan_jobs(
    placeholder: str, class_name: str, contexts: tuple[str, ...], seeds: list[int], init_word: str = "a"
) -> list[Job]:
    """Every (variant, context, seed) combination; token and baseline share seeds, so they pair up.

    The baseline is the token's starting point: the same prompt with the init word in the token's place
    ("a photo of a <tok> cross" vs "a photo of a a cross"). Its tokens and embeddings equal the token
    prompt's before the first update, so an unchanged token gives identical images and every difference
    between the grids is learned, not an artefact of adding a word to the prompt.
    """
    jobs = []
    for variant in VARIANTS:
        subject = f"{placeholder if variant == 'token' else init_word} {class_name}".strip()
        for ci, ctx in enumerate(contexts):
            for s in seeds:
                jobs.append(Job(variant, ci, ctx, s, ctx.format(subject)))
    return jobs


def generate(
    generator: Generator, jobs: list[Job], batch: int, steps: int | None, guidance: float | None
) -> Iterator[tuple[list[Job], torch.Tensor]]:
    """Yield ``(jobs, images (b, 3, H, W))`` in batches, without autograd. Batches of token-free prompts
    come from the generator's memo when it keeps one and made them before (``SampleMemo``)."""
    uncond = None
    g = generator.spec.default_guidance if guidance is None else guidance
    with torch.no_grad():
        if generator.use_cfg(g):
            uncond = generator.encode([""])
        for i in range(0, len(jobs), batch):
            chunk = jobs[i : i + batch]
            prompts, seeds = [j.prompt for j in chunk], [j.seed for j in chunk]
            memo = (
                generator.memo
                if generator.memo is not None and not generator.has_added_token(prompts)
                else None
            )
            key = (tuple(prompts), tuple(seeds), steps, guidance)
            images = memo.get(key) if memo is not None else None
            if images is None:
                images = generator.sample(prompts, seeds, steps, guidance, uncond=uncond).float()
                if memo is not None:
                    memo.put(key, images)
            yield chunk, images.to(generator.device)
