"""Calibrate and measure the world tagger: per-attribute thresholds from labelled procedural scenes.

The world's scenes carry their true background and context, so the tagger's yes/no decisions can be
tuned (F1-optimal threshold per attribute on one half) and measured honestly (precision and recall on
the other half). The thresholds are written into the world's attribute file, which the demo uses.

    python -m dct_audit.world.calibrate [--n 3000] [--seed 777]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..tag import AttributeBank, load_tagger, load_vocabulary
from . import scenes as S
from .paths import ATTRIBUTES_FILE


def truth_table(batch: S.Scenes, names: list[str]) -> np.ndarray:
    """(N, A) booleans: does each scene show each world attribute."""
    cols = []
    for name in names:
        value = {"plain background": "plain", "alone": "none"}.get(name, name)
        if value in S.BACKGROUNDS:
            cols.append(np.array(batch.names("background")) == value)
        elif value in S.CONTEXTS:
            cols.append(np.array(batch.names("context")) == value)
        elif value in S.COLOURS:
            cols.append(np.array(batch.names("colour")) == value)
        else:
            raise ValueError(f"world attribute {name!r} is not a background, context or colour")
    return np.stack(cols, 1)


def measure(
    tagger_spec: str = "world",
    n: int = 3000,
    seed: int = 777,
    attributes: Path = ATTRIBUTES_FILE,
    write: bool = True,
) -> dict:
    """Calibrate on the first half of ``n`` held-out scenes, report precision/recall on the second half."""
    import torch

    vocab = load_vocabulary(attributes)
    tagger = load_tagger(tagger_spec)
    bank = AttributeBank.build(tagger, vocab)
    batch = S.sample_scenes(n, seed)
    images = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
    scores = bank.scores(tagger.image_features(images))
    truth = truth_table(batch, vocab.names)
    half = n // 2
    thresholds = calibrate_thresholds(scores[:half], truth[:half], vocab.names)
    thr = np.array([thresholds.get(a, 0.5) for a in vocab.names])
    precision, recall = precision_recall(scores[half:] >= thr, truth[half:])
    report = {
        a: {"threshold": round(float(t), 4), "precision": round(float(p), 4), "recall": round(float(r), 4)}
        for a, t, p, r in zip(vocab.names, thr, precision, recall, strict=True)
    }
    if write:
        data = json.loads(attributes.read_text())
        for a in data["attributes"]:
            a["threshold"] = report[a["name"]]["threshold"]
        data["calibration"] = {"tagger": tagger_spec, "scenes": n, "seed": seed, "held_out": report}
        attributes.write_text(json.dumps(data, indent=1) + "\n")
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--tagger", default="world")
    p.add_argument("--dry-run", action="store_true", help="measure without writing thresholds")
    args = p.parse_args(argv)
    report = measure(args.tagger, args.n, args.seed, write=not args.dry_run)
    print("| attribute | threshold | precision | recall |\n|---|---|---|---|")
    for name, r in report.items():
        print(f"| {name} | {r['threshold']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |")


if __name__ == "__main__":
    main()


def calibrate_thresholds(scores: np.ndarray, truth: np.ndarray, names: list[str]) -> dict[str, float]:
    """Per attribute, the threshold that maximises F1 on labelled images (scores and truth: (B, A))."""
    out = {}
    for j, name in enumerate(names):
        s, t = scores[:, j], truth[:, j].astype(bool)
        if t.all() or not t.any():
            continue
        candidates = np.unique(np.concatenate([s, [0.5]]))
        best, best_thr = -1.0, 0.5
        for thr in candidates:
            pred = s >= thr
            tp = np.sum(pred & t)
            f1 = 2 * tp / max(1, pred.sum() + t.sum())
            if f1 > best:
                best, best_thr = f1, float(thr)
        # put the threshold midway to the next lower score, for a margin on unseen images
        lower = s[s < best_thr]
        out[name] = float((best_thr + lower.max()) / 2) if lower.size else best_thr
    return out


def precision_recall(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column precision and recall of boolean (B, A) predictions."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    tp = (pred & truth).sum(0)
    precision = np.where(pred.sum(0) > 0, tp / np.maximum(1, pred.sum(0)), np.nan)
    recall = np.where(truth.sum(0) > 0, tp / np.maximum(1, truth.sum(0)), np.nan)
    return precision, recall
