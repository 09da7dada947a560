"""The checks a run makes before any weights load or anything is written, and what they resolve.

A serial run (``pipeline.run_with_options``) and a Ray run (``scale.run_on_ray``) both start here: the
options, the dtype for the device, the classifier's labels and the classes asked for, the run folder (its
settings must match unless ``--overwrite``), the generator spec and the free disk space. Bad input is one
``DctAuditError`` line.
"""

from __future__ import annotations

import datetime as _dt
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import rundir
from .adapters import registry
from .adapters.classifier import Classifier, ClassifierSpec, describe_classifier, load_classifier
from .adapters.generator import Generator
from .adapters.generator_load import check_generator_spec, resolve_dtype
from .errors import DctAuditError
from .options import RunOptions
from .resolve import resolve_classes
from .tag import Tagger


def default_run_name(classifier: str) -> str:
    return f"{rundir.slugify(classifier.split('/')[-1].split(':')[-1])}-{_dt.date.today().isoformat()}"


def estimated_bytes(opts: RunOptions, n_classes: int) -> int:
    """What a run's images take on disk, roughly: PNGs of about 1.5 bytes per pixel."""
    size = opts.resolution
    if size is None:
        config = Path(opts.generator) / "unet" / "config.json"
        try:
            import json

            size = int(json.loads(config.read_text())["sample_size"]) * 8
        except (OSError, ValueError, KeyError, TypeError):
            size = 512
    per_image = int(size * size * 1.5) + 2048
    images = n_classes * (
        2 * len(opts.contexts) * opts.n_images + opts.max_updates // max(1, opts.snapshot_every) + 1
    )
    return images * per_image + 10 * 2**20


@dataclass
class Plan:
    """What the up-front checks resolved, before any weights load (a serial run and ``--ray`` share them)."""

    device: torch.device
    batch: int | str  # "auto": measured once the models are loaded
    clf_record: ClassifierSpec  # the classifier's record (the manifest's)
    targets: list  # ``ResolvedClass`` per class asked for
    root: Path
    settings: dict
    run_dir: rundir.RunDir
    previous: rundir.Manifest | None  # the manifest of an earlier run in the folder
    say: Callable[[str], None]
    classifier: Classifier | None = None  # already loaded: a model in memory, or a registered plugin's
    generator: Generator | None = None  # a pipeline given in memory
    tagger: Tagger | None = None  # a tagger given in memory


def plan_run(
    opts: RunOptions,
    classifier: Classifier | None = None,
    generator: Generator | None = None,
    tagger: Tagger | None = None,
) -> Plan:
    """Check the options, resolve the classes and check the run folder; one clear line on bad input, and
    nothing written and no weights loaded (except a registered plugin's classifier: only it knows its labels,
    so it is loaded here, once, and the run uses it). ``classifier``, ``generator``, ``tagger``: models given
    in memory (their names in ``opts`` are their records)."""
    # 1. Check inputs and resolve names
    opts.check()
    device = opts.resolved_device()
    resolve_dtype(opts.dtype, device)  # a dtype the device cannot run: one line, before anything loads
    batch = opts.default_batch(device)
    if classifier is None and registry.matches("classifier", opts.classifier):
        classifier = load_classifier(opts.classifier, opts.labels)
    if classifier is not None:
        clf_record, labels = classifier.spec, classifier.labels
    else:
        clf_record, labels = describe_classifier(opts.classifier, opts.labels)
    targets, notes = resolve_classes(opts.classes, labels)
    say = (lambda msg: None) if opts.quiet else (lambda msg: print(msg, file=sys.stderr))
    for note in notes:
        say(note)

    # 2. Check the run folder (refuses other settings unless --overwrite); nothing is written yet
    root = Path(opts.out) / (opts.name or default_run_name(opts.classifier))
    settings = opts.settings(batch)
    run_dir, previous = rundir.open_run_dir(root, settings, opts.overwrite, opts.ADDED_SETTINGS)
    if generator is None:
        check_generator_spec(opts.generator)  # a local folder or hub index that cannot work: before anything
    elif generator.device.type != device.type:
        raise DctAuditError(
            f"the generator given is on {generator.device} but the run's device is {device}; move it, or pass "
            f"device='{generator.device.type}'"
        )
    rundir.check_free_space(root, estimated_bytes(opts, len(targets)))
    return Plan(
        device,
        batch,
        clf_record,
        targets,
        root,
        settings,
        run_dir,
        previous,
        say,
        classifier,
        generator,
        tagger,
    )
