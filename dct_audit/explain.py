"""Where the classifier looks: captum attributions for a few token images per class, saved as overlays.

Integrated Gradients on the input works for every classifier we load (TorchScript included, where
layer hooks do not), through the same differentiable preprocessing as the inversion. Where an object
mask is known, the share of attribution mass outside the object says how much the decision rests on
context.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import rundir
from .adapters.classifier import Classifier


def attributions(
    classifier: Classifier, images: torch.Tensor, target: int, n_steps: int = 16
) -> torch.Tensor:
    """(B, H, W) non-negative attribution maps (summed |IG| over channels), each normalised to sum 1."""
    from captum.attr import IntegratedGradients

    images = images.to(classifier.device).float()
    ig = IntegratedGradients(lambda x: classifier(x))
    attr = ig.attribute(
        images,
        baselines=torch.zeros_like(images),
        target=target,
        n_steps=n_steps,
        internal_batch_size=max(1, len(images)),
    )  # (B, 3, H, W)
    maps = attr.abs().sum(1)  # (B, H, W)
    return (maps / maps.flatten(1).sum(-1).clamp_min(1e-12)[:, None, None]).detach().cpu()


def overlay(image: torch.Tensor, amap: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8: the image darkened, with the attribution map as a heat colour on top."""
    from matplotlib import colormaps

    img = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    a = amap.numpy()
    a = a / max(float(np.quantile(a, 0.99)), 1e-12)
    heat = colormaps["inferno"](np.clip(a, 0, 1))[..., :3]
    alpha = np.clip(a, 0, 1)[..., None] * 0.75
    out = img * (1 - alpha) + heat * alpha
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def explain_class(folder: Path, classifier: Classifier, images: torch.Tensor, target: int) -> None:
    """Integrated-gradients overlays of a few token images, and ``attribution.json``, in the class folder."""
    maps = attributions(classifier, images, target)
    paths = []
    for i, (image, amap) in enumerate(zip(images, maps, strict=True)):
        rel = f"{rundir.ATTRIBUTION_DIR}/token_{i}.png"
        rundir.write_png(folder / rel, overlay(image, amap))
        paths.append(rel)
    rundir.write_json(
        folder / rundir.ATTRIBUTION,
        {
            "method": "IntegratedGradients (captum), |attr| summed over channels",
            "overlays": paths,
            "outside_object": None,
            "note": "no object mask for generated images",
        },
    )
