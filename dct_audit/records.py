"""The run's records: the manifest (settings, device, library versions, resolved models, classes), the
options a finished run was made with (read back from its manifest), and peak memory."""

from __future__ import annotations

import datetime as _dt
import platform
import resource
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__
from .generate import eval_seeds
from .options import RunOptions
from .rundir import Manifest, ManifestClass

if TYPE_CHECKING:
    from .adapters.generator import Generator


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "dct-audit": __version__}
    for pkg in (
        "torch",
        "torchvision",
        "diffusers",
        "transformers",
        "timm",
        "open_clip_torch",
        "captum",
        "safetensors",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def peak_memory_mb(device: torch.device) -> dict:
    out = {"process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def manifest_options(manifest: Manifest, overrides: dict | None = None) -> dict:
    """The ``RunOptions`` keyword arguments of a run, from its manifest (settings, tagger, vocabulary file,
    analysis options), with ``overrides`` on top; ``classes``, ``out`` and ``name`` are the caller's."""
    fields = set(RunOptions.__dataclass_fields__)
    settings = {k: v for k, v in manifest.settings.items() if k in fields}
    for key in ("templates", "contexts", "restart_words"):
        if key in settings:
            settings[key] = tuple(settings[key])
    tagging = manifest.tagging or {}
    analysis = manifest.analysis or {}
    return {
        "tagger": tagging.get("tagger"),
        "attributes": tagging.get("attributes_file"),
        **{k: analysis[k] for k in ("alpha", "min_effect", "confirm", "confirm_seeds") if k in analysis},
        **settings,
        **(overrides or {}),
    }


def build_manifest(
    old: Manifest | None,
    opts: RunOptions,
    settings: dict,
    device,
    clf_record,
    generator: Generator | None,
    targets,
) -> Manifest:
    """The run's manifest: ``old``'s (a resumed run's) with this call's settings, environment, models and
    classes (every class asked for; a class already listed keeps its record)."""
    m = replace(old) if old is not None else Manifest()
    m.created = m.created or _dt.datetime.now().isoformat(timespec="seconds")
    m.settings = settings
    m.command = sys.argv if sys.argv and "dct-audit" in Path(sys.argv[0]).name else None
    m.device = {
        "type": device.type,
        "name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    m.versions = package_versions()
    m.models = {**m.models, "classifier": clf_record.to_dict()}
    if generator is not None:
        m.models["generator"] = generator.spec.to_dict()
    known = {c.index: c for c in m.classes}
    for c in targets:
        known.setdefault(c.index, ManifestClass(c.index, c.name, c.query, placeholder_for(c.index)))
    m.classes = sorted(known.values(), key=lambda c: c.index)
    m.eval_seeds = eval_seeds(opts.seed, opts.n_images)
    return m


def placeholder_for(index: int) -> str:
    return f"<dct-{index}>"
