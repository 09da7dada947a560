"""Reading a run folder's analysis files for the report: ``None`` when absent, a one-line error when malformed.

Also the small value parsers the pages share (CSV cells to numbers, ints, booleans) and ``relpath``.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from .. import rundir
from ..errors import DctAuditError

# the columns a report needs of enrichment.csv (class_name and n_pairs may be missing in older runs)
ENRICHMENT_REQUIRED = tuple(c for c in rundir.ENRICHMENT_COLUMNS if c not in ("class_name", "n_pairs"))


def read_enrichment(run_dir: str | os.PathLike) -> list[dict] | None:
    """Rows of ``enrichment.csv`` (see the module docstring), or ``None`` when the run has none."""
    path = Path(run_dir) / rundir.ENRICHMENT
    if not path.is_file():
        return None
    try:
        rows = read_csv(path, ENRICHMENT_REQUIRED)
    except DctAuditError as e:
        raise DctAuditError(f"{e}; {_refinish(run_dir)}") from None
    for r in rows:
        r["class_index"] = to_int(r["class_index"])
        for k in ("token_rate", "baseline_rate", "diff", "ci_low", "ci_high", "p_value", "q_value"):
            r[k] = to_number(r[k])
        r["flagged"] = bool(to_bool(r["flagged"]))
    return rows


def read_findings(run_dir: str | os.PathLike) -> list[dict] | None:
    """The list in ``findings.json`` (see the module docstring), or ``None`` when the run has none."""
    path = Path(run_dir) / rundir.FINDINGS
    if not path.is_file():
        return None
    data = rundir.read_json_file(path, _refinish(run_dir))
    if not isinstance(data, list) or not all(isinstance(f, dict) and "class_index" in f for f in data):
        raise DctAuditError(f"{path} must be a list of objects with a class_index; {_refinish(run_dir)}")
    return data


def _refinish(run_dir) -> str:
    return f"run `dct-audit finish {run_dir}` to write the analysis again"


def read_tags(class_dir: str | os.PathLike, thresholds: dict | None = None) -> dict[tuple, list[str]] | None:
    """``{(variant, context_index, seed): [present attributes]}`` from ``tags.csv``, or ``None``."""
    path = Path(class_dir) / rundir.TAGS
    if not path.is_file():
        return None
    thresholds = thresholds or {}
    out: dict[tuple, list[str]] = {}
    for r in read_csv(path, rundir.TAGS_KEYS[1:]):
        present = out.setdefault((r["variant"], to_int(r["context_index"]), to_int(r["seed"])), [])
        for attribute, score in r.items():
            if attribute in rundir.TAGS_KEYS or attribute is None:
                continue
            value = to_number(score)
            limit = to_number(thresholds.get(attribute))
            if value is not None and value >= (rundir.PRESENCE_THRESHOLD if limit is None else limit):
                present.append(attribute)
    return out


def read_attribution(class_dir: str | os.PathLike) -> dict | None:
    """``attribution.json`` of a class (overlay paths relative to the class folder), or ``None``."""
    path = Path(class_dir) / rundir.ATTRIBUTION
    if not path.is_file():
        return None
    data = rundir.read_json_file(path)
    if not isinstance(data, dict):
        raise DctAuditError(f"{path} must be a JSON object with overlays")
    return data


def read_csv(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DctAuditError(f"{path} lacks the column(s) {', '.join(missing)}")
            return list(reader)
    except FileNotFoundError:
        raise DctAuditError(f"{path} is missing; re-run the class to rewrite it") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise DctAuditError(f"{path} is not a readable CSV file ({e})") from None


def to_number(x) -> float | int | None:
    """A finite number from JSON or CSV text, else ``None`` (shown as a dash)."""
    if x is None or isinstance(x, bool) or x == "":
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):
        return None
    return int(v) if isinstance(x, int) else v


def to_int(x) -> int | None:
    v = to_number(x)
    return None if v is None else int(v)


def to_bool(x) -> bool | None:
    if isinstance(x, bool):
        return x
    text = str(x).strip().lower()
    if text in ("true", "1", "1.0", "yes"):
        return True
    return False if text in ("false", "0", "0.0", "no") else None


def pick(record, *keys: str) -> dict:
    """``record``'s ``keys`` (``None`` where missing): templates can rely on every key being there."""
    record = record if isinstance(record, dict) else {}
    return {k: record.get(k) for k in keys}


def mean_of(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def relpath(path: Path, start: Path) -> str:
    """``path`` relative to ``start``, with forward slashes (a URL path once quoted)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
