"""The run's records: the manifest (settings, device, library versions, resolved models, classes), the
options a finished run was made with (read back from its manifest), peak memory, and what a resume must
match beyond the settings (the tagger and vocabulary, the files of local models, the revisions of hub models)."""

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
from .errors import DctAuditError
from .generate import eval_seeds
from .options import ANALYSIS_OPTIONS, RunOptions
from .rundir import Manifest, ManifestClass

if TYPE_CHECKING:
    from .adapters.generator import Generator
    from .tag import Vocabulary


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
    analysis = dict(manifest.analysis or {})
    shards = {
        r.get("gen_batch") for r in manifest.class_runs.values() if isinstance(r, dict) and "shard" in r
    }
    if "gen_batch" not in analysis and len(shards) == 1:  # never analysed: the shards' own --gen-batch
        analysis["gen_batch"] = shards.pop()
    return {
        "tagger": tagging.get("tagger"),
        "attributes": tagging.get("attributes_file"),
        **{k: analysis[k] for k in ANALYSIS_OPTIONS if k in analysis},
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
    fingerprints: dict[str, dict[str, str]] | None = None,
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
    for key, record in (fingerprints or {}).items():  # local files' hash, or a hub model's cached commit
        m.models[key] = {**(m.models.get(key) or {}), **record}
    known = {c.index: c for c in m.classes}
    for c in targets:
        known.setdefault(c.index, ManifestClass(c.index, c.name, c.query, placeholder_for(c.index)))
    m.classes = sorted(known.values(), key=lambda c: c.index)
    m.eval_seeds = eval_seeds(opts.seed, opts.n_images)
    return m


# A local model is recorded by a fingerprint of its files, so that a resume can tell a model retrained or
# replaced at the same path (its finished classes were audited with the old one). Files up to this size are
# hashed whole; larger ones (a Stable Diffusion UNet) by their size and first and last 16 MiB: retraining
# changes every tensor, so their first bytes differ, and a resume does not read gigabytes.
WHOLE_HASH_MAX = 64 * 2**20
PART = 16 * 2**20


def local_model_paths(spec: str | None, labels: str | None = None) -> list[Path]:
    """The files on this machine a model spec names (``file:PATH`` and its ``PATH.json``, a folder, a
    ``local-dir:``/``hf:`` folder) and a labels file; empty for hub names and models in memory."""
    paths = []
    if spec:
        for prefix in ("file:", "local-dir:", "hf:"):
            if spec.startswith(prefix):
                spec = spec[len(prefix) :]
                break
        p = Path(spec).expanduser()
        if p.exists():
            paths += [p, p.with_name(p.name + ".json")] if p.is_file() else [p]
    if labels and Path(labels).is_file():
        paths.append(Path(labels))
    return [p for p in paths if p.exists()]


def files_fingerprint(paths: list[Path]) -> str | None:
    """SHA-256 over every file under ``paths`` (name, size and contents, see ``WHOLE_HASH_MAX``); None if none."""
    import hashlib

    if not paths:
        return None
    h = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
        for f in files:
            rel = f.relative_to(root) if f != root else Path(f.name)
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            size = f.stat().st_size
            h.update(f"{rel.as_posix()}\0{size}\0".encode())
            with open(f, "rb") as fh:
                if size <= WHOLE_HASH_MAX:
                    h.update(fh.read())
                else:
                    h.update(fh.read(PART))
                    fh.seek(size - PART)
                    h.update(fh.read(PART))
    return h.hexdigest()


def hub_repo(spec: str | None, role: str) -> tuple[str, tuple[str, ...]] | None:
    """The Hugging Face repo a model spec loads from, and the files that show its revision in the cache; None
    for local files, models in memory, plugins and torchvision weights (their file names carry a hash)."""
    from .adapters import hub, registry
    from .adapters.classifier import IN_MEMORY, parse_spec

    if not spec or spec.startswith(IN_MEMORY) or registry.find(role, spec) is not None:
        return None
    if role == "generator":
        return None if hub.looks_like_path(spec) else (spec, hub.REVISION_FILES["generator"])

    try:
        kind, model_id = parse_spec(spec)
    except DctAuditError:
        return None
    if kind == "transformers" and not hub.looks_like_path(model_id):
        return model_id, hub.REVISION_FILES["transformers"]
    if kind != "timm" or model_id.startswith("local-dir:"):
        return None
    if model_id.startswith("hf-hub:"):
        return model_id[len("hf-hub:") :], hub.REVISION_FILES["timm"]
    try:
        from timm.models import get_pretrained_cfg

        repo = getattr(get_pretrained_cfg(model_id), "hf_hub_id", None)
    except Exception:  # a name timm does not know: its loader says so, in one line
        repo = None
    return (repo.rstrip("/"), hub.REVISION_FILES["timm"]) if repo else None


def tagger_repo(spec: str | None) -> tuple[str, tuple[str, ...]] | None:
    """The Hugging Face repo a hub tagger (open_clip ``ARCH/TAG``, ``hf:ORG/MODEL``) loads from, and the files
    that show its revision in the cache; None for plugins (the world) and local folders."""
    from .adapters import hub, registry

    if not spec or registry.matches("tagger", spec):
        return None
    if spec.startswith("hf:"):
        model_id = spec[3:]
        return None if hub.looks_like_path(model_id) else (model_id, hub.REVISION_FILES["transformers"])
    arch, _, tag = spec.partition("/")
    try:
        import open_clip

        repo = ((open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub") or "").strip("/") if tag else ""
    except Exception:  # an unknown architecture: the tagger's own check says so
        repo = ""
    return (repo, hub.REVISION_FILES["open_clip"]) if repo else None


def tagger_revision(spec: str | None) -> str | None:
    """The commit of a hub tagger in the local cache, else None."""
    from .adapters import hub

    repo = tagger_repo(spec)
    return hub.cached_revision(*repo) if repo else None


def _torchvision_file(spec: str) -> tuple[Path, str] | None:
    """Where ``torch.hub`` keeps a ``tv:`` classifier's weights and their URL; None for any other spec."""
    from .adapters.classifier import parse_spec, torchvision_checkpoint

    try:
        kind, model_id = parse_spec(spec)
        return torchvision_checkpoint(model_id) if kind == "torchvision" else None
    except DctAuditError:  # a bad name: its loader says so, in one line
        return None


def not_cached(models) -> list[tuple[str, str, str]]:
    """Of ``{flag: spec}`` or ``[(flag, spec), ...]`` (flags ``--classifier``, ``--holdout-classifier``,
    ``--generator``, ``--tagger``), the hub and torchvision models that the local caches do not hold, as
    ``(flag, spec, url they download from)`` for :func:`dct_audit.adapters.hub.require_downloadable`. Local
    files, plugins and names no library knows are left to their loaders."""
    from .adapters import hub

    missing = []
    for flag, spec in models.items() if isinstance(models, dict) else models:
        if not spec:
            continue
        role = {"--tagger": "tagger", "--generator": "generator"}.get(flag, "classifier")
        repo = tagger_repo(spec) if role == "tagger" else hub_repo(spec, role)
        if repo is not None and hub.cached_revision(*repo) is None:
            missing.append((flag, spec, hub.hub_url()))
        elif (
            repo is None and role == "classifier" and (tv := _torchvision_file(spec)) and not tv[0].is_file()
        ):
            missing.append((flag, spec, tv[1]))
    return missing


def require_downloadable(models, opts: RunOptions) -> None:
    """One line naming every model of ``opts`` that ``models`` (a ``pipeline.Models``) does not hold yet and
    that is neither cached nor downloadable now; nothing when they can all be had."""
    from .adapters import hub

    named = {
        "--classifier": (models.classifier, opts.classifier),
        "--holdout-classifier": (models.holdout, opts.holdout_classifier),
        "--generator": (models.generator, opts.generator),
        "--tagger": (models.tagger or models.bank, opts.tagger),
    }
    hub.require_downloadable(not_cached({flag: spec for flag, (held, spec) in named.items() if held is None}))


def model_fingerprints(opts: RunOptions, local: bool = True) -> dict[str, dict[str, str]]:
    """What identifies each of the run's models beyond its name: ``{"classifier": {"local_files_sha256": sha}}``
    for local files, ``{"generator": {"hub_revision": commit}}`` for a hub model in the local cache (the
    commit its ``main`` resolved to: a repo updated upstream and downloaded again is another model)."""
    from .adapters import hub

    out: dict[str, dict[str, str]] = {}
    for key, spec, role, labels in (
        ("classifier", opts.classifier, "classifier", opts.labels),
        ("holdout_classifier", opts.holdout_classifier, "classifier", opts.labels),
        ("generator", opts.generator, "generator", None),
    ):
        paths = local_model_paths(spec, labels)
        if paths:
            if local and (fp := files_fingerprint(paths)) is not None:
                out[key] = {"local_files_sha256": fp}
        elif (repo := hub_repo(spec, role)) is not None and (rev := hub.cached_revision(*repo)) is not None:
            out[key] = {"hub_revision": rev}
    return out


def check_resume(
    previous: Manifest | None, opts: RunOptions, vocabulary: Vocabulary | None, fingerprints: dict, root: Path
) -> None:
    """What a resume with finished classes must match beyond the settings (serial, shard and Ray runs)."""
    check_same_tagging(previous, opts, vocabulary, root)
    check_same_models(previous, fingerprints, root)


def check_same_models(previous: Manifest | None, now: dict[str, dict[str, str]], root: Path) -> None:
    """A resume must use the same local model files, and the same hub revisions, as its finished classes (one
    line naming the model). A record only one side has (an older run, a model not cached) is not compared."""
    before = (previous.models if previous is not None else None) or {}
    for key, record in now.items():
        name = key.replace("_", " ")
        for field, value in record.items():
            old = (before.get(key) or {}).get(field)
            if old is None or old == value:
                continue
            why = (
                f"other files of its {name} (changed at the same path since: retrained, replaced, or other labels)"
                if field == "local_files_sha256"
                else f"revision {old[:12]} of its {name}, and the local cache now holds {value[:12]} (updated "
                "on the hub and downloaded again)"
            )
            raise DctAuditError(
                f"'{root}' holds classes audited with {why}; pass --overwrite to redo every class, or --name to "
                "start a new run"
            )


def check_same_tagging(
    previous: Manifest | None, opts: RunOptions, vocabulary: Vocabulary | None, root: Path
) -> None:
    """A resume tags its new classes as the finished ones were tagged (same tagger, same vocabulary), or the
    analysis would read tags of two taggers as one (or miss the columns of new attributes): one line."""
    old = (previous.tagging if previous is not None else None) or {}
    was = old.get("tagger") or "no tagger"
    now = opts.tagger or "no tagger"
    if was != now:
        why = f"tagged with {was}, not {now}"
    elif (
        old.get("tagger_hub_revision") is not None
        and (rev := tagger_revision(opts.tagger)) is not None
        and rev != old["tagger_hub_revision"]
    ):
        why = f"tagged with revision {old['tagger_hub_revision'][:12]} of {was}, and the local cache now holds {rev[:12]}"
    elif vocabulary is None:
        return
    elif "vocabulary_sha256" in old:
        if old["vocabulary_sha256"] == vocabulary.fingerprint():
            return
        why = "tagged with another attribute vocabulary (its file or its contents differ)"
    elif old.get("attributes_file") == opts.attributes and old.get("attributes") == len(vocabulary):
        return  # a run from before vocabularies were fingerprinted: the same file and size
    else:
        why = f"tagged with the vocabulary {old.get('attributes_file') or 'shipped'}, not {opts.attributes or 'the shipped one'}"
    raise DctAuditError(
        f"'{root}' holds finished classes {why}; resume with the run's --tagger and --attributes, pass "
        "--overwrite to redo every class, or --name to start a new run"
    )


def placeholder_for(index: int) -> str:
    return f"<dct-{index}>"
