"""The run folder: the contract between stages, owned here. Every file name, the column lists other stages
rely on, the presence threshold default, atomic writes, completion markers, the manifest.

No other module spells a run-folder file name: they use the constants below. Layout of one run::

    reports/<name>/
      manifest.json                 MANIFEST: settings, resolved models, versions, device, per-class timings
      classes/<0122-american-lobster>/   CLASSES_DIR / class_folder(index, name)
        token.safetensors           TOKEN: {placeholder: vector}, loadable by diffusers' load_textual_inversion
        history.csv                 HISTORY: one row per update
        evolution/update_0000.png   EVOLUTION_DIR: snapshots of the first seed during inversion
        images/token/c0_s1000.png   IMAGES_DIR: paired images (same seeds) with the token ...
        images/baseline/c0_s1000.png  ... and with the baseline prompt (init word for the token)
        scores.csv                  SCORES: the classifier on every generated image
        tags.csv                    TAGS: TAGS_KEYS, then one column per attribute (tagger score in [0, 1])
        embeddings.npy              EMBEDDINGS: the tagger's image features (float16), rows as scores.csv
        attribution.json            ATTRIBUTION: captum overlays (ATTRIBUTION_DIR/*.png) and their summary
        class.json                  CLASS_SUMMARY: the class summary (``ClassSummary``)
        DONE                        MARKER, written last: JSON listing every file of the class with its size
                                    and SHA-256
      counterfactual/<class folder>.json   COUNTERFACTUAL_DIR: scored counterfactual prompts, by prompt and seed
      counterfactual/association.json      ASSOCIATION: other classes drawn with the attributes the check would
                                    confirm, every checked class's probability on them (``association.py``)
      enrichment.csv                ENRICHMENT: ENRICHMENT_COLUMNS, one row per class x attribute
      findings.json                 FINDINGS: flagged and confirmed attributes (``Finding``; ``write_findings``)
      discovered.csv                DISCOVERED: open-vocabulary discovery (``discover``), one row per tested concept
      truth.json                    TRUTH: only for world classifiers, the score against the planted truth
      report/                       REPORT_DIR: HTML (``dct-audit report``)

Every file goes to a temporary name in the same folder and is renamed into place, so a reader never
sees half a file; a class without ``DONE``, or whose files no longer match it, is removed and redone on
resume (``verify_class``; ``dct-audit verify RUN_DIR`` reports every class without loading a model).
The run-level analysis files are derived from the class folders and removed by ``--overwrite``.

Why it is over 450 lines: it is the whole run-folder contract in one place (every name, the layout, the
typed findings, atomic writes, DONE markers, the lock), which the redesign asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import DctAuditError, OtherSettings

MARKER = "DONE"
# run level
MANIFEST = "manifest.json"
CLASSES_DIR = "classes"
COUNTERFACTUAL_DIR = "counterfactual"
ASSOCIATION = "association.json"  # inside COUNTERFACTUAL_DIR
ENRICHMENT = "enrichment.csv"
FINDINGS = "findings.json"
DISCOVERED = "discovered.csv"
TRUTH = "truth.json"
REPORT_DIR = "report"
# class level
TOKEN = "token.safetensors"
TOKEN_SDXL = "token.sdxl.safetensors"  # SDXL runs: {"clip_l", "clip_g"}, for load_textual_inversion
HISTORY = "history.csv"
SCORES = "scores.csv"
TAGS = "tags.csv"
EMBEDDINGS = "embeddings.npy"
ATTRIBUTION = "attribution.json"
ATTRIBUTION_DIR = "attribution"
CLASS_SUMMARY = "class.json"
IMAGES_DIR = "images"
EVOLUTION_DIR = "evolution"

# tags.csv: these key columns, then one column per attribute
TAGS_KEYS = ("file", "variant", "context_index", "seed")
# an attribute is present in an image when its tag score is at least its threshold, this where none is set
PRESENCE_THRESHOLD = 0.5
# enrichment.csv as ``analyse`` writes it (``class_enrichment`` gives these up to p_value)
ENRICHMENT_COLUMNS = (
    "class_index",
    "class_name",
    "attribute",
    "group",
    "n_pairs",
    "token_rate",
    "baseline_rate",
    "diff",
    "ci_low",
    "ci_high",
    "p_value",
    "q_value",
    "flagged",
)


@dataclass
class Finding:
    """One entry of ``findings.json``: a flagged, confirmed or open attribute of a class (the report's docstring
    describes each field as the pages show it)."""

    class_index: int
    class_name: str
    attribute: str
    group: str
    source: str  # "token" (the token brings it in), "sweep" (confirmed or open only) or "discovered"
    flagged: bool
    token_rate: float | None  # None for a discovered concept (no presence tag)
    baseline_rate: float | None
    effect: float
    ci: list
    p: float
    q: float
    counterfactual: dict | None
    absence: bool
    confirmed: bool
    attribution_outside_object: float | None = None
    overlays: list = field(default_factory=list)
    discovered: dict | None = None  # discovery's own record (rank, wins, ...), for source "discovered"
    open: bool = False  # the check could neither confirm nor rule out a dependence (``check.is_open``)

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["discovered"] is None:
            del out["discovered"]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ClassSummary:
    """``class.json``: what a finished class's job measured (``pipeline.audit_class`` writes it)."""

    index: int
    name: str
    query: str
    placeholder: str
    token_file: str
    init_word: str
    updates: int
    token_unchanged: bool
    stop_reason: str
    restarts: int
    best_val_accuracy: float | None
    best_update: int
    best_loss: float
    initial: dict  # loss, target_prob, accuracy before the first update
    token_accuracy: float | None  # held-out seeds, by the audited classifier
    baseline_accuracy: float | None
    token_target_prob: float | None
    baseline_target_prob: float | None
    n_images: int
    timings: dict  # invert_s, generate_s, total_s, seconds_per_update
    memory: dict  # process_peak_rss_mb (and cuda_peak_allocated_mb)
    holdout_token_accuracy: float | None = None  # with --holdout-classifier only
    holdout_baseline_accuracy: float | None = None
    attempts: int | None = None  # inversion attempts run (None: written before --attempts)

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("holdout_token_accuracy", "holdout_baseline_accuracy"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ClassSummary:
        """Unknown keys are dropped; a key an older version did not write reads as None."""
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


MISSED_STOP = ("max_updates", "patience")  # stop reasons of an inversion that did not reach its stop


def token_not_learned(summary: dict) -> bool:
    """A class's ``class.json`` (as a dict) whose token did not reach the stop and makes the classifier call
    the evaluation images the class no more often than the plain prompt does: what such a token brings in is
    not evidence of what the classifier looks for."""
    token, baseline = summary.get("token_accuracy"), summary.get("baseline_accuracy")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (token, baseline))
    missed = summary.get("stop_reason") in MISSED_STOP
    return bool(numbers and missed and token <= baseline)


def retry_flags(summary: dict, settings: dict) -> str | None:
    """The flags of ``run`` that learn a class's token again when it did not reach the stop (``class.json``
    as a dict, the manifest's settings): ``--objective meanprob`` and ``--attempts 2``, each unless the run
    already used it (README "Hard tokens"); None when the token reached the stop or both were used."""
    if summary.get("stop_reason") not in MISSED_STOP:
        return None
    flags = [] if settings.get("objective") == "meanprob" else ["--objective meanprob"]
    attempts = summary.get("attempts")  # None: written before --attempts; anything else but a number: damaged
    if not (isinstance(attempts, int | float) and attempts >= 2):
        flags.append("--attempts 2")
    return " ".join(flags) or None


@dataclass
class ManifestClass:
    """One class of a run as the manifest lists it (every class asked for, finished or not)."""

    index: int
    name: str
    query: str | None = None  # what the user typed
    placeholder: str | None = None  # the learned token's text


_SECTIONS = ("batch_auto", "tagging", "analysis", "discovery")  # written once their stage has run


@dataclass
class Manifest:
    """``manifest.json``: the run's settings (a resume must match them), resolved models, environment,
    classes, one record per finished class, and one per run-level stage. Keys this version does not know
    are kept in ``extra`` and written back as they were."""

    settings: dict = field(default_factory=dict)  # ``RunOptions.settings``: every option that changes results
    created: str | None = None
    tool: str = "dct-audit"
    command: list[str] | None = None  # the command line, when run from the CLI
    device: dict | None = None  # type, name, torch_threads
    versions: dict | None = None  # python and package versions
    models: dict = field(default_factory=dict)  # classifier and generator records (their ``to_dict``)
    classes: list[ManifestClass] = field(default_factory=list)
    class_runs: dict[str, dict] = field(
        default_factory=dict
    )  # str(index) -> folder, seconds, memory, finished
    eval_seeds: list[int] | None = None  # the seeds of the image grids
    batch_auto: dict | None = None  # ``--batch auto``: the measurement that chose the batch
    tagging: dict | None = None  # tagger, vocabulary, presence thresholds
    analysis: dict | None = None  # alpha, min_effect, confirm settings, number of findings
    discovery: dict | None = None  # ``dct-audit discover``: concepts and settings
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["classes"] = [asdict(c) for c in self.classes]
        for key in _SECTIONS:
            if out[key] is None:
                del out[key]
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, data, source: str | os.PathLike = MANIFEST) -> Manifest:
        """A manifest from its JSON; anything that is not one is one ``DctAuditError`` line naming the fix."""
        fix = "start the run again with `dct-audit run ... --overwrite`"
        if not isinstance(data, dict) or not isinstance(data.get("settings", {}), dict):
            raise DctAuditError(f"{source} is not a dct-audit manifest; {fix}")
        classes = data.get("classes") or []
        if not isinstance(classes, list) or not all(
            isinstance(c, dict) and isinstance(c.get("index"), int) and isinstance(c.get("name"), str)
            for c in classes
        ):
            raise DctAuditError(f"{source} lists a class without an index and a name; {fix}")
        known = {f.name for f in fields(cls)} - {"extra", "classes"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            classes=[
                ManifestClass(**{k: c.get(k) for k in ("index", "name", "query", "placeholder")})
                for c in classes
            ],
            extra={k: v for k, v in data.items() if k not in known and k != "classes"},
        )


def write_class_summary(folder: str | os.PathLike, summary: ClassSummary) -> None:
    write_json(Path(folder) / CLASS_SUMMARY, summary.to_dict())


def read_class_summary(folder: str | os.PathLike) -> ClassSummary:
    """A class's ``class.json``; a broken or incomplete one is one ``DctAuditError`` line."""
    path = Path(folder) / CLASS_SUMMARY
    fix = "redo the class: dct-audit run with the same settings"
    data = read_json_file(path, fix)
    if not isinstance(data, dict):
        raise DctAuditError(f"{path} is not a class summary; {fix}")
    return ClassSummary.from_dict(data)


def write_findings(root: str | os.PathLike, findings: list[Finding]) -> None:
    """``findings.json`` at the run root, atomically."""
    write_json(Path(root) / FINDINGS, [f.to_dict() for f in findings])


def read_findings(root: str | os.PathLike) -> list[Finding]:
    """``findings.json`` of a run (empty when it has none); a broken file is one ``DctAuditError`` line."""
    path = Path(root) / FINDINGS
    if not path.is_file():
        return []
    data = read_json_file(path, "rerun the analysis: dct-audit finish or run again")
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise DctAuditError(f"{path} is not a list of findings; rerun the analysis")
    try:
        return [Finding.from_dict(d) for d in data]
    except TypeError as e:
        raise DctAuditError(f"{path}: a finding lacks a field ({e}); rerun the analysis") from None


def attribute_columns(columns) -> list[str]:
    """The attribute columns of a ``tags.csv`` header."""
    return [c for c in columns if c not in TAGS_KEYS]


def read_json_file(path: str | os.PathLike, fix: str = "") -> Any:
    """``read_json`` that turns a broken file into one clear ``DctAuditError`` line."""
    try:
        return read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DctAuditError(f"{path} is not valid JSON ({e})" + (f"; {fix}" if fix else "")) from None


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result to ``path``."""
    path = Path(path)
    with _atomic_path(path) as tmp:
        writer(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: str | os.PathLike, frame) -> Path:
    return atomic_write(path, lambda p: frame.to_csv(p, index=False))


def write_npy(path: str | os.PathLike, array) -> Path:
    import numpy as np

    def save(p: Path) -> None:
        with p.open("wb") as f:  # a file object: np.save would append ".npy" to a temporary name
            np.save(f, array)

    return atomic_write(path, save)


def write_png(path: str | os.PathLike, image) -> Path:
    """Save a PIL image, or a (3, H, W) float tensor / (H, W, 3) uint8 array, as PNG."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = to_pil(image)
    return atomic_write(path, lambda p: image.save(p, format="PNG"))


def to_pil(image):
    import numpy as np
    from PIL import Image

    if hasattr(image, "detach"):  # torch (3, H, W) in [0, 1]
        arr = (
            (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        )
    else:
        arr = np.asarray(image)
    return Image.fromarray(arr)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def slugify(text: str, max_len: int = 40) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()
    return text[:max_len].strip("-") or "class"


class RunDir:
    """A run folder: where each class lives, whether it is finished, and the manifest."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def class_dir(self, index: int, name: str) -> Path:
        return self.root / CLASSES_DIR / f"{index:04d}-{slugify(name)}"

    def is_done(self, index: int, name: str) -> bool:
        """Finished and intact (see ``verify_class``)."""
        return self.verify_class(index, name)[0] == "done"

    def mark_done(self, index: int, name: str) -> None:
        """Write the marker last: every file of the class with its size and hash."""
        folder = self.class_dir(index, name)
        files = {
            p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp")
        }
        write_json(folder / MARKER, {"dct_audit_marker": 1, "files": files})

    def verify_class(self, index: int, name: str) -> tuple[str, str]:
        """``(state, detail)`` of a class (see :func:`verify_folder`)."""
        return verify_folder(self.class_dir(index, name))

    def clear_class(self, index: int, name: str) -> None:
        """Remove a half-finished class so it is redone from scratch."""
        folder = self.class_dir(index, name)
        if folder.exists():
            shutil.rmtree(folder)

    def read_manifest(self) -> Manifest | None:
        """The run's manifest (None when there is none); a broken one is one ``DctAuditError`` line."""
        if not self.manifest_path.is_file():
            return None
        data = read_json_file(
            self.manifest_path, fix="start the run again with `dct-audit run ... --overwrite`"
        )
        return Manifest.from_dict(data, self.manifest_path)

    def write_manifest(self, manifest: Manifest) -> None:
        write_json(self.manifest_path, manifest.to_dict())

    def update_manifest(
        self, base: Manifest | None = None, class_runs: dict | None = None, **sections
    ) -> Manifest:
        """Merge into the manifest on disk under a short file lock, and return what was written.

        ``base`` replaces the disk's manifest except its creation time, the stages ``base`` has not
        recorded, and ``class_runs``, which is the union (``base``'s, then the disk's, then ``class_runs``, later ones winning): shards of one run finish
        classes concurrently, and none may drop another's records. ``sections`` set single fields
        (``analysis=...``).
        """
        import fcntl

        with open(self.root / ".manifest.lock", "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                disk = self.read_manifest() or Manifest()
                merged = replace(base) if base is not None else disk
                merged.class_runs = {
                    **(base.class_runs if base is not None else {}),
                    **disk.class_runs,
                    **(class_runs or {}),
                }
                merged.created = disk.created or merged.created
                for key in _SECTIONS:  # a stage another process recorded meanwhile is kept
                    if getattr(merged, key) is None:
                        setattr(merged, key, getattr(disk, key))
                merged.extra = {**disk.extra, **merged.extra}
                for key, value in sections.items():
                    setattr(merged, key, value)
                self.write_manifest(merged)
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return merged


def verify_folder(folder: str | os.PathLike, quick: bool = False) -> tuple[str, str]:
    """``(state, detail)`` of a class folder: "done", "missing" (never started), "incomplete" (no marker:
    interrupted) or "damaged" (a listed file is missing or changed, or the marker is unreadable).

    ``quick`` (the report): images are checked by size, every other file (the numbers) by its hash."""
    folder = Path(folder)
    marker = folder / MARKER
    if not folder.is_dir():
        return "missing", "not started"
    if not marker.is_file():
        return "incomplete", "interrupted before it finished (no DONE marker)"
    text = marker.read_text(encoding="utf-8", errors="replace")
    if text.strip() == "ok":  # runs of dct-audit 0.1 wrote a bare marker: trusted, not verifiable
        return "done", "finished (an older marker without file hashes)"
    try:
        files = json.loads(text)["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        return "damaged", "its DONE marker is unreadable"
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            return "damaged", f"{rel} is missing"
        if path.stat().st_size != meta.get("size") or (
            not (quick and path.suffix == ".png") and _sha256(path) != meta.get("sha256")
        ):
            return "damaged", f"{rel} has changed since the class finished"
    return "done", f"finished, {len(files)} files verified"


def check_writable(root: Path) -> None:
    """Fail early, before any model loads, if ``root`` cannot be created or written."""
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DctAuditError(
            f"cannot write to output folder '{root}': '{probe}' is a file; choose another --out"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DctAuditError(
            f"cannot write to output folder '{root}': no write permission on '{probe}'; choose another --out"
        )


@contextlib.contextmanager
def run_lock(root: Path, name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive lock on the run folder (``name`` inside it, ``.lock`` by default) while a run
    writes there.

    A second process that targets the same folder is refused with one line. The lock is an OS file lock
    (``flock``), so a run that was killed leaves no stale lock behind. Shards of one run (``--shard K/N``)
    each lock their own ``.lock-shard-K-of-N``: they write disjoint class folders and merge the manifest
    under :func:`RunDir.update_manifest`.
    """
    import fcntl

    created = []  # folders this lock creates, deepest last: removed again if the run writes nothing
    probe = root
    while not probe.exists():
        created.insert(0, probe)
        probe = probe.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / name, "a+")  # noqa: SIM115 - held for the whole run
    except OSError as e:
        raise DctAuditError(
            f"cannot write to output folder '{root}' ({e.strerror or e}); choose another --out"
        ) from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DctAuditError(
            f"another dct-audit process is writing into '{root}'; wait for it to finish or choose another --name"
        ) from None
    try:
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
        if created and [p.name for p in root.iterdir()] == [name]:  # failed before writing anything
            (root / name).unlink(missing_ok=True)
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def check_free_space(root: Path, needed_bytes: int) -> None:
    """Refuse a run whose images would not fit on the output folder's disk (with a 20% margin)."""
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise DctAuditError(
            f"cannot write the run folder '{root}': '{probe}' is not a folder you can write to; choose another --out"
        )
    usage = shutil.disk_usage(probe)
    if usage.total == 0:  # /proc, /sys: folders that hold no files
        raise DctAuditError(
            f"cannot write the run folder '{root}': '{probe}' is not on a disk (a system folder); choose another --out"
        )
    free = usage.free
    if free < needed_bytes * 1.2:
        raise DctAuditError(
            f"not enough free disk for the run in '{root}': about {needed_bytes * 1.2 / 2**20:.0f} MiB needed, "
            f"{free / 2**20:.0f} MiB free; free some space, choose another --out, or lower --n-images"
        )


def open_run_dir(
    root: Path, settings: dict, overwrite: bool, added: dict | None = None
) -> tuple[RunDir, Manifest | None]:
    """Check a run folder without writing anything: settings must match unless ``overwrite``. A setting in
    ``added`` that an older run did not record counts as recorded at the value given there.

    Returns the run dir and the previous manifest (``None`` for a fresh or overwritten run).
    """
    check_writable(root)
    run = RunDir(root)
    if overwrite:
        return run, None
    previous = run.read_manifest()
    if previous is not None:
        old = {**{k: v for k, v in (added or {}).items() if k in settings}, **previous.settings}
        diffs = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diffs:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diffs[:3])
            more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise OtherSettings(root, shown + more)
    return run, previous


def create_run_dir(run: RunDir, overwrite: bool) -> None:
    """Create the folder for real (after the models loaded); ``overwrite`` clears an old run first."""
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for sub in (CLASSES_DIR, MANIFEST, COUNTERFACTUAL_DIR, ENRICHMENT, FINDINGS, DISCOVERED):
                target = run.root / sub
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    except OSError as e:
        raise DctAuditError(
            f"cannot write to output folder '{run.root}' ({e.strerror or e}); choose another --out"
        ) from None
