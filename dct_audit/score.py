"""Scoring: the classifier on every generated image (target probability, prediction, top 5)."""

from __future__ import annotations

import json

import pandas as pd
import torch

from .adapters.classifier import Classifier


def score_images(classifier: Classifier, images: torch.Tensor, target: int, k: int = 5) -> list[dict]:
    """One row per image: the target's probability, whether it is the top-1 class, and the top ``k``."""
    with torch.no_grad():
        probs = classifier(images.to(classifier.device)).float().softmax(-1)  # (B, C)
    top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)
    names = classifier.labels.names
    rows = []
    for b in range(probs.shape[0]):
        pred = int(top_i[b, 0])
        rows.append(
            {
                "target_prob": float(probs[b, target]),
                "pred_index": pred,
                "pred_name": names[pred],
                "correct": pred == target,
                "top5": json.dumps([int(i) for i in top_i[b]]),
                "top5_probs": json.dumps([round(float(p), 6) for p in top_p[b]]),
            }
        )
    return rows


def holdout_accuracy(scores: pd.DataFrame) -> dict:
    """Token and baseline accuracy by the held-out classifier, when it scored the images."""
    if "holdout_correct" not in scores:
        return {}
    acc = scores.groupby("variant")["holdout_correct"].mean().to_dict()
    return {"holdout_token_accuracy": acc.get("token"), "holdout_baseline_accuracy": acc.get("baseline")}
