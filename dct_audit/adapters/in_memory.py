"""Models given in memory (a notebook's) as the audit's adapters, each recorded so a resume can tell whether
it is the same model:

- a classifier (an ``nn.Module``, a timm model or a ``Classifier``): by its class and a hash of its weights,
  labels and preprocessing (``wrap_classifier``);
- a generator (a loaded diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``, or a
  ``Generator``): by the pipeline's class and a hash of its weights and scheduler (``wrap_generator``);
- a tagger (a ``dct_audit.tag.Tagger``, what ``load_tagger`` returns): by its name (``wrap_tagger``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import DctAuditError
from ..tag import Tagger
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
from .generator import Generator, SampleMemo


def weights_hash(model: nn.Module, h=None) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes and values), in state-dict order.
    A text encoder's token-injecting embedding (added by a ``Generator``) hashes as the embedding it wraps."""
    import hashlib

    from .generator import TokenInjectingEmbedding

    h = h or hashlib.sha256()
    wrapped = [n for n, m in model.named_modules() if isinstance(m, TokenInjectingEmbedding)]
    for name, t in model.state_dict().items():
        for w in wrapped:
            name = name.replace(f"{w}.base.", f"{w}.", 1) if name.startswith(f"{w}.base.") else name
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
    check_preprocess(preprocess)
    if labels is None:
        if not isinstance(cfg, dict):
            raise DctAuditError(
                f"the in-memory classifier {name} needs labels= (a list of class names or a file)"
            )
        labels = labels_from_timm_cfg(cfg, cfg.get("architecture") or name)
    elif isinstance(labels, (str, os.PathLike)):
        labels = read_labels_file(labels)
    elif not isinstance(labels, LabelSet):
        if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in labels):
            raise DctAuditError(
                "labels= must be a list of class names (non-empty strings), a labels file or a LabelSet"
            )
        names = [str(x) for x in labels]
        if not names:
            raise DctAuditError("labels= is empty; give one class name per output of the classifier")
        labels = LabelSet.from_lines(names, f"in-memory list ({len(names)} names)")
    digest = weights_hash(model)
    import hashlib
    import json

    # the run's settings key: the same weights, labels and preprocessing give the same name
    key = hashlib.sha256(
        json.dumps([digest, list(labels.names), preprocess.identity()], default=str).encode()
    ).hexdigest()
    rec = ClassifierSpec(
        f"{IN_MEMORY}{name}@{key[:16]}",
        "in-memory",
        f"{type(model).__module__}.{type(model).__qualname__}",
        weights=f"sha256:{digest}",
        labels_source=labels.source,
        extra={"preprocess": preprocess.identity()},
    )
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return checked_outputs(
        Classifier(model, preprocess, labels, rec).to(device), f"the in-memory classifier {name}", "labels="
    )


def models_in_memory(kwargs: dict) -> tuple[Generator | None, Tagger | None]:
    """Take a generator or tagger given in memory out of ``kwargs``, leaving its record name there."""
    generator = tagger = None
    if kwargs.get("generator") is not None and not isinstance(kwargs["generator"], str):
        generator = wrap_generator(kwargs["generator"])
        kwargs["generator"] = generator.spec.spec
    if kwargs.get("tagger") is not None and not isinstance(kwargs["tagger"], str):
        tagger = wrap_tagger(kwargs["tagger"])
        kwargs["tagger"] = tagger.spec
    return generator, tagger


def check_preprocess(pre) -> None:
    """A ``preprocess=`` given in memory: one line naming what is wrong, before any image is made."""
    if not isinstance(pre, Preprocess):
        raise DctAuditError(
            f"preprocess= must be a dct_audit.adapters.classifier.Preprocess, not {type(pre).__name__}; e.g. "
            "Preprocess(crop=(224, 224), resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))"
        )
    pre.check("Preprocess")


PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def pipeline_hash(pipe) -> str:
    """SHA-256 of a pipeline's scheduler config and its UNet, VAE and text encoders' weights."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode())
    for part in PIPELINE_PARTS:
        module = getattr(pipe, part, None)
        if module is not None:
            h.update(part.encode())
            weights_hash(module, h)
    return h.hexdigest()


def wrap_generator(pipe, resolution: int | None = None, family: str | None = None) -> Generator:
    """A generator given in memory as the audit's :class:`Generator`.

    ``pipe``: a loaded diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (used in place,
    on the device it is on: its models are frozen, and its text encoder's input embedding gets the
    pass-through wrapper that injects learned tokens), or a ``Generator`` (one from ``load_generator``
    keeps the name it was loaded by). A pipeline is recorded as ``in-memory:CLASS@HASH`` (``pipeline_hash``),
    so a resume with other weights is refused like other settings. The run checks that it is on the run's
    device (``plan.plan_run``).

    The pipeline keeps the images of token-free prompts (baseline grids, counterfactual prompts; up to
    1 GiB on the CPU), so the next audit with it reuses them (``SampleMemo``); they are dropped when its
    weights have changed since (the hash is taken at every call).
    """
    if isinstance(pipe, Generator):
        generator = pipe
        digest = pipeline_hash(generator.pipe)
    else:
        name = type(pipe).__name__
        if not all(hasattr(pipe, part) for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
            raise DctAuditError(
                f"a generator given in memory must be a diffusers StableDiffusionPipeline or "
                f"StableDiffusionXLPipeline (or a dct_audit Generator), not {name}; or pass a hub id or folder"
            )
        from .generator_load import adapt_pipeline

        digest = pipeline_hash(pipe)
        spec = f"{IN_MEMORY}{name}@{digest[:16]}"
        generator = adapt_pipeline(pipe, spec, pipe.unet.device, pipe.unet.dtype, resolution, family)
    memo = getattr(generator.pipe, "_dct_audit_memo", None)
    if memo is None or memo.digest != digest:  # new, or the weights changed: earlier images are stale
        memo = SampleMemo(digest)
        generator.pipe._dct_audit_memo = memo
    generator.memo = memo
    return generator


def wrap_tagger(tagger) -> Tagger:
    """A tagger given in memory: a ``dct_audit.tag.Tagger`` (what ``load_tagger`` returns, or one built
    around any CLIP-like model's image and text encoders). It is recorded by its ``spec``."""
    if not isinstance(tagger, Tagger):
        raise DctAuditError(
            f"a tagger given in memory must be a dct_audit.tag.Tagger (see dct_audit.tag.load_tagger), not "
            f"{type(tagger).__name__}; or pass a name (open_clip ARCH/TAG, hf:ORG/MODEL, world)"
        )
    return tagger
