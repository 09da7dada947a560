"""Training the world CLIP: contrastive on procedural scenes and their captions, plus two helper losses.

``python -m dct_audit.world.clip [--out DIR] [--steps N]`` (or ``python -m dct_audit.world.clip_train``)
retrains it. Each step draws fresh scenes (``training_batch``: groups that differ in one attribute, so the
batch has hard negatives), and the loss (``training_losses``) adds to the full-caption contrastive loss a
one-attribute-caption loss and supervised attribute heads used only in training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dct_audit.world import scenes as S
from dct_audit.world.clip import (
    EVAL_SEED,
    SHIPPED,
    WorldCLIP,
    WorldCLIPConfig,
    images_to_tensor,
    partial_captions,
    zero_shot_accuracy,
)
from dct_audit.world.trainloop import cosine_lr, decay_groups, run_record, train_loop


@dataclass
class TrainConfig:
    """Training settings (recorded in config.json)."""

    steps: int = 400
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 20
    seed: int = 0  # torch initialisation seed
    data_seed: int = 0  # scene stream of the training data
    minutes: float | None = None  # wall-clock cap; the cosine schedule still spans `steps`
    partial_weight: float = 1.0  # weight of the one-attribute-caption loss (see training_losses)
    label_weight: float = 1.0  # weight of the training-only supervised attribute heads
    text_dtype: str = "float16"  # storage dtype of the text tower's weights


HARD_WEIGHTS = {"shape": 0.4, "colour": 0.2, "background": 0.2, "context": 0.2}


def training_batch(step: int, batch: int, data_seed: int = 0, size: int = 32, group: int = 4) -> S.Scenes:
    """The scenes of training step ``step``: groups of ``group`` scenes that differ in one attribute only.

    In a batch of random scenes almost no two share colour, background and context, so once those are
    learned the contrastive loss barely asks for the shape (the first prototype stalled at 0.46 shape
    accuracy). Each group here shares three attribute values and takes distinct values of the fourth
    (shape 40% of groups, each other type 20%): hard negatives for every attribute type. Positions,
    sizes, shades and phrasings stay independent (scenes ``step*batch ..`` of stream ``data_seed``).
    """
    rng = np.random.default_rng([data_seed, step, 7])
    attrs = S.draw_attributes(batch, data_seed, start=step * batch)
    varied = rng.choice(len(S.ATTRIBUTES), size=-(-batch // group), p=[HARD_WEIGHTS[a] for a in S.ATTRIBUTES])
    for g, j in enumerate(varied):
        sl = slice(g * group, min((g + 1) * group, batch))
        for a in S.ATTRIBUTES:
            attrs[a][sl] = attrs[a][g * group]
        a = S.ATTRIBUTES[j]
        attrs[a][sl] = rng.permutation(len(S.VOCAB[a]))[: sl.stop - sl.start]
    return S.render_scenes(attrs, data_seed, start=step * batch, size=size)


def training_losses(
    model: WorldCLIP, scenes: S.Scenes, partial_variant: int | None = None, heads: nn.ModuleDict | None = None
) -> dict[str, torch.Tensor]:
    """The losses of one batch: ``full``, ``partial/<attribute>`` and ``label/<attribute>``.

    ``full``: symmetric InfoNCE between images and their full captions over the batch, scenes with identical
    attributes counting as positives of each other's captions. ``partial/<a>`` (unless ``partial_variant`` is
    None): each image against the one-attribute captions of every value of ``a`` (``partial_captions``,
    wording ``partial_variant``: "a photo of a circle" ... "a photo of a ring"), InfoNCE over the values; so
    every image has its full caption and four short ones, a direct signal for each attribute (full captions
    alone give little pressure on the shape once the rest is learned). ``label/<a>`` (if ``heads``, linear
    layers on the image tower's pooled features): cross-entropy on the true labels, a training aid that is
    not saved. ``label_acc/<a>`` is that head's batch accuracy, for the log.
    """
    feats = model.visual(images_to_tensor(scenes.images))
    zi = F.normalize(model.visual_projection(feats), dim=-1)
    labels = {a: torch.from_numpy(scenes.labels(a)) for a in S.ATTRIBUTES}
    zt = model.encode_text(model.tokenize(scenes.captions, pad_to_max=False))
    scale = model.logit_scale.clamp(max=math.log(100)).exp()
    keys = torch.stack(list(labels.values()), 1)
    same = (keys[:, None, :] == keys[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    logits = scale * zi @ zt.T
    out = {"full": (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2}
    for a in S.ATTRIBUTES:
        if partial_variant is not None:
            za = model.encode_text(
                [partial_captions(v, a)[partial_variant] for v in S.VOCAB[a]], pad_to_max=False
            )
            out[f"partial/{a}"] = F.cross_entropy(scale * zi @ za.T, labels[a])
        if heads is not None:
            head_logits = heads[a](feats)
            out[f"label/{a}"] = F.cross_entropy(head_logits, labels[a])
            out[f"label_acc/{a}"] = (head_logits.argmax(-1) == labels[a]).float().mean().detach()
    return out


LOSS_WEIGHTS = {"shape": 2.0, "colour": 1.0, "background": 1.0, "context": 1.5}  # the hard ones count more


def _weighted(losses: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Sum of ``prefix<attribute>`` losses weighted by ``LOSS_WEIGHTS``."""
    parts = [LOSS_WEIGHTS[a] * losses[prefix + a] for a in S.ATTRIBUTES if prefix + a in losses]
    return torch.stack(parts).sum() if parts else torch.zeros(())


def train_world_clip(
    out_dir: str | Path | None,
    train: TrainConfig | None = None,
    config: WorldCLIPConfig | None = None,
    *,
    eval_n: int = 1000,
    eval_every: int = 0,
    log: Callable[[str], None] = print,
) -> WorldCLIP:
    """Train a world CLIP on fresh procedural scenes and save it to ``out_dir`` (if given).

    Deterministic for a given (seed, data_seed, steps, batch) and thread count: step t uses scenes
    ``t*batch .. (t+1)*batch-1`` of stream ``data_seed``. AdamW with warmup and cosine decay over ``steps``;
    ``minutes`` caps the wall time (the schedule is not shortened, so prefer a step count); ``eval_every``
    logs the zero-shot accuracy on 300 held-out scenes every that many steps. The text weights
    are rounded to their storage dtype before the final evaluation, so the returned model, the reported
    accuracy and the saved folder agree exactly.
    """
    tc = train or TrainConfig()
    cfg = config or WorldCLIPConfig()
    torch.manual_seed(tc.seed)
    model = WorldCLIP(cfg)
    model.train()
    heads = nn.ModuleDict({a: nn.Linear(model.visual.out_dim, len(S.VOCAB[a])) for a in S.ATTRIBUTES})
    params = list(model.named_parameters()) + (list(heads.named_parameters()) if tc.label_weight else [])
    opt = torch.optim.AdamW(decay_groups(params, tc.weight_decay, skip="embedding"), lr=tc.lr)
    parts: dict[str, torch.Tensor] = {}

    def step(t: int) -> torch.Tensor:
        sc = training_batch(t, tc.batch, tc.data_seed, size=cfg.image_size)
        parts.clear()
        parts.update(
            training_losses(
                model, sc, t % 3 if tc.partial_weight else None, heads if tc.label_weight else None
            )
        )
        return (
            parts["full"]
            + tc.partial_weight * _weighted(parts, "partial/")
            + tc.label_weight * _weighted(parts, "label/")
        )

    def after(t: int, loss: float) -> None:
        if eval_every and (t + 1) % eval_every == 0:
            acc = zero_shot_accuracy(model, n=300)
            log(
                f"step {t + 1:4d}  zero-shot (300 scenes) " + " ".join(f"{a} {v:.2f}" for a, v in acc.items())
            )

    t0 = time.time()
    run = train_loop(
        opt,
        step,
        tc.steps,
        lambda t: cosine_lr(t, tc.steps, tc.lr, tc.warmup),
        minutes=tc.minutes,
        after=after,
        log_every=20,
        log_line=lambda t, loss: (
            f"step {t:4d}  loss {loss:.3f}  scale {model.logit_scale.exp().item():5.1f}"
            f"  {time.time() - t0:5.0f}s  " + " ".join(f"{k} {v.item():.2f}" for k, v in parts.items())
        ),
        log=log,
    )
    with torch.no_grad():  # the model as it will be stored
        for p in model.text_encoder.parameters():
            p.copy_(p.to(getattr(torch, tc.text_dtype)).float())
    model.eval()
    accuracy = zero_shot_accuracy(model, n=eval_n) if eval_n else {}
    model.info = {
        "train": {**asdict(tc), "steps_done": run.done, "final_loss": run.final_loss},
        **run_record(run.seconds),
        "zero_shot_accuracy": {"n": eval_n, "seed": EVAL_SEED, "prompts": "simple_prompts", **accuracy},
    }
    log(f"trained {run.done} steps in {run.seconds:.0f}s; zero-shot accuracy {accuracy}")
    if out_dir is not None:
        model.save_pretrained(out_dir, text_dtype=tc.text_dtype)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dct_audit.world.clip --out DIR [--steps N] [--batch B]``: retrain the world CLIP."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", default=str(SHIPPED))
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--eval-every", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tc = TrainConfig(
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        data_seed=args.data_seed,
        minutes=args.minutes,
    )
    train_world_clip(args.out, tc, eval_every=args.eval_every, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
