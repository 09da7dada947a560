"""Reliance on *generated* images: does each planted bias of the truth benchmark change the classifier's
confidence on images the generator makes, and does that explain what the audit could find?

The truth benchmark's reliance is measured on procedural scenes (the classifier's training
distribution). The audit can only confirm a dependence it sees on images the generator makes from prompts.
For every planted bias of the benchmark's worlds this script scores the plain class prompt with the planted
value ("a photo of a ring on snow") and with each of its replacements (every other member of its set, or
its ``without`` prompts), the prompts of the counterfactual check, on 32 *fresh* seeds (disjoint from the
check's 8 and the inversion's), and reports:

- ``gen``: the mean target probability with the value minus the mean over the replacements (pooled), with
  its 95% interval over seeds;
- ``gen_worst``: the same against the replacement that keeps the probability highest (what the check's
  rule uses), with its interval;

then recall of the audit's confirmed findings by both reliance definitions.

    python benchmarks/bench_generated_reliance.py BENCH_TRUTH_FOLDERS... [--seeds 32]

Reads ``worlds.csv`` and ``classifiers/<world>`` of each folder (``bench_truth.py``'s output). Nothing in
the audit is changed by it: a measurement, written to ``benchmarks/results/bench_generated_reliance.{md,csv}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dct_audit.adapters.classifier import load_classifier
from dct_audit.adapters.generator_load import load_generator
from dct_audit.adapters.in_memory import wrap_generator
from dct_audit.generate import Job, generate
from dct_audit.score import score_images
from dct_audit.stats import mean_diff_ci
from dct_audit.tag import load_vocabulary
from dct_audit.world.paths import ATTRIBUTES_FILE, GENERATOR
from dct_audit.world.scenes import SHAPES

SEEDS_FROM = 7000  # the check uses seed + 1000.., the inversion seed..; these are neither
STEPS = 6  # the demo's


def probabilities(generator, classifier, cls: str, templates: list[str], seeds: list[int]) -> dict:
    """Target probability of ``cls`` per template and seed on plain class prompts (no token)."""
    jobs = [Job(t, 0, t, s, t.format(cls)) for t in templates for s in seeds]
    out: dict[str, list[float]] = {t: [] for t in templates}
    for chunk, images in generate(generator, jobs, 16, STEPS, None):
        for job, score in zip(chunk, score_images(classifier, images, SHAPES.index(cls)), strict=True):
            out[job.variant].append(score["target_prob"])
    return {t: np.array(v) for t, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="output folders of bench_truth.py")
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--min", type=float, default=0.2, help="relies at or above this (both definitions)")
    p.add_argument("--out", default="benchmarks/results/bench_generated_reliance")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    vocabulary = load_vocabulary(str(ATTRIBUTES_FILE))
    by_name = {a.name: a for a in vocabulary.attributes}
    # one generator for every world: the images of a prompt are the same for every classifier (its memo)
    generator = wrap_generator(load_generator(str(GENERATOR), "cpu"))
    seeds = [SEEDS_FROM + i for i in range(args.seeds)]
    rows = []
    t0 = time.perf_counter()
    for folder in map(Path, args.folders):
        worlds = pd.read_csv(folder / "worlds.csv")
        classifiers: dict = {}
        for r in worlds.itertuples():
            if not isinstance(r.cls, str):
                continue  # an unbiased control
            a = by_name[r.value]
            if r.world not in classifiers:  # a world may plant several biases: one load per world
                classifiers[r.world] = load_classifier(str(folder / "classifiers" / r.world), None, "cpu")
            classifier = classifiers[r.world]
            reps = vocabulary.replacements(a)
            probs = probabilities(
                generator, classifier, r.cls, [a.with_context, *(t for _, t in reps)], seeds
            )
            with_p = probs[a.with_context]
            rep_means = {n: float(probs[t].mean()) for n, t in reps}
            worst_name = max(rep_means, key=rep_means.get)
            worst_t = dict(reps)[worst_name]
            pooled = np.mean([probs[t] for _, t in reps], axis=0)
            gen, gen_low, gen_high = mean_diff_ci(with_p, pooled)
            worst, worst_low, _ = mean_diff_ci(with_p, probs[worst_t])
            rows.append(
                {
                    "folder": folder.name,
                    "world": r.world,
                    "cls": r.cls,
                    "attribute": r.attribute,
                    "value": r.value,
                    "reliance": round(float(r.reliance), 3),
                    "gen": round(gen, 3),
                    "gen_low": round(gen_low, 3),
                    "gen_high": round(gen_high, 3),
                    "p_with": round(float(with_p.mean()), 3),
                    "worst_replacement": worst_name,
                    "p_worst": round(rep_means[worst_name], 3),
                    "gen_worst": round(worst, 3),
                    "gen_worst_low": round(worst_low, 3),
                    "found": bool(r.found),
                }
            )
            print(
                f"{folder.name}/{r.world} {r.cls}/{r.value}: procedural {r.reliance:.2f}, generated "
                f"{gen:.2f} [{gen_low:.2f}, {gen_high:.2f}], found {bool(r.found)}",
                flush=True,
            )
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)

    proc = df["reliance"] >= args.min
    gen = df["gen"] >= args.min
    every = df["gen_worst_low"] >= 0.10  # the check's own rule, on 32 fresh seeds instead of 8
    both = proc & every

    def recall(mask) -> str:
        return f"{int((df['found'] & mask).sum())}/{int(mask.sum())}"

    lines = [
        f"# Reliance on generated images ({', '.join(Path(f).name for f in args.folders)}; "
        f"{args.seeds} fresh seeds per prompt, {time.perf_counter() - t0:.0f} s)",
        "",
        f"{len(df)} planted biases. Procedural reliance: the truth benchmark's (scenes of the training "
        "distribution). On generated images (plain class prompts): the mean target probability with the "
        "value minus the mean over its replacements (pooled), and the change against the replacement that "
        "keeps the probability highest (every replacement).",
        "",
        "| relied on by | planted | confirmed by the audit |",
        "|---|---|---|",
        f"| procedural scenes, reliance >= {args.min} | {int(proc.sum())} | {recall(proc)} |",
        f"| generated images, pooled change >= {args.min} | {int(gen.sum())} | {recall(gen)} |",
        f"| generated images, every replacement (smallest change's interval from >= 0.10) | {int(every.sum())} "
        f"| {recall(every)} |",
        f"| procedural scenes and generated images (every replacement) | {int(both.sum())} | {recall(both)} |",
        f"| procedural scenes only | {int((proc & ~every).sum())} | {recall(proc & ~every)} |",
        "",
        "Every planted bias the audit missed, and every one relied on by one definition only:",
        "",
        "| run | class/value | procedural | generated, pooled [95% interval] | with | worst replacement | "
        "change against it (interval from) | found |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in df[~df["found"] | (proc != every)].itertuples():
        lines.append(
            f"| {r.folder}/{r.world} | {r.cls}/{r.value} | {r.reliance:.2f} | {r.gen:.2f} "
            f"[{r.gen_low:.2f}, {r.gen_high:.2f}] | {r.p_with:.2f} | {r.worst_replacement} {r.p_worst:.2f} | "
            f"{r.gen_worst:.2f} ({r.gen_worst_low:.2f}) | {'yes' if r.found else 'no'} |"
        )
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
