"""A classifier given in memory (a notebook's ``nn.Module``, a timm model or a ``Classifier``) as the audit's
``Classifier``, recorded by its class and a hash of its weights, labels and preprocessing."""

from __future__ import annotations

import os
from dataclasses import asdict

import torch
from torch import nn

from ..errors import DctAuditError
from .classifier import (
    IN_MEMORY,
    Classifier,
    ClassifierSpec,
    LabelSet,
    Preprocess,
    checked_outputs,
    labels_from_timm_cfg,
    read_labels_file,
)


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes and values), in state-dict order."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def wrap_classifier(
    model: nn.Module,
    labels: LabelSet | list[str] | str | os.PathLike | None = None,
    preprocess: Preprocess | None = None,
    device: str | torch.device | None = None,
) -> Classifier:
    """A classifier given in memory (a notebook's model) as the audit's :class:`Classifier`.

    ``model`` maps normalised images to logits: any ``nn.Module`` (a timm model carries its own
    preprocessing and, for ImageNet weights, its labels), or a :class:`Classifier` already. ``labels``: a
    ``LabelSet``, a list of class names or a labels file; ``preprocess``: a :class:`Preprocess` (resize, crop,
    normalise) for modules that do not carry one. The record names the module's class and the SHA-256 of
    its weights (``in-memory:ResNet@3f2a...``), so a resumed run can tell whether it is the same model.
    """
    if isinstance(model, Classifier):
        labels = labels if labels is not None else model.labels
        preprocess = preprocess or model.preprocess
        model = model.model
    if not isinstance(model, nn.Module):
        raise DctAuditError(
            f"a classifier given in memory must be a torch nn.Module, not {type(model).__name__}; "
            "or pass a name (resnet50, tv:NAME, hf:ORG/MODEL, file:PATH)"
        )
    cfg = getattr(model, "pretrained_cfg", None)
    name = type(model).__name__
    if preprocess is None:
        if not isinstance(cfg, dict):
            raise DctAuditError(
                f"the in-memory classifier {name} carries no preprocessing (not a timm model); pass "
                "preprocess=dct_audit.adapters.classifier.Preprocess(crop=(224, 224), resize=256, mean=..., std=...)"
            )
        from timm.data import resolve_data_config

        preprocess = Preprocess.from_timm(resolve_data_config({}, model=model))
    if labels is None:
        if not isinstance(cfg, dict):
            raise DctAuditError(
                f"the in-memory classifier {name} needs labels= (a list of class names or a file)"
            )
        labels = labels_from_timm_cfg(cfg, cfg.get("architecture") or name)
    elif isinstance(labels, (str, os.PathLike)):
        labels = read_labels_file(labels)
    elif not isinstance(labels, LabelSet):
        names = [str(x) for x in labels]
        if not names:
            raise DctAuditError("labels= is empty; give one class name per output of the classifier")
        labels = LabelSet.from_lines(names, f"in-memory list ({len(names)} names)")
    digest = weights_hash(model)
    import hashlib
    import json

    # the run's settings key: the same weights, labels and preprocessing give the same name
    key = hashlib.sha256(
        json.dumps([digest, list(labels.names), asdict(preprocess)], default=str).encode()
    ).hexdigest()
    rec = ClassifierSpec(
        f"{IN_MEMORY}{name}@{key[:16]}",
        "in-memory",
        f"{type(model).__module__}.{type(model).__qualname__}",
        weights=f"sha256:{digest}",
        labels_source=labels.source,
        extra={"preprocess": asdict(preprocess)},
    )
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return checked_outputs(
        Classifier(model, preprocess, labels, rec).to(device), f"the in-memory classifier {name}", "labels="
    )
