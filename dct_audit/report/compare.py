"""The HTML compare report: renders a compare folder (from :func:`dct_audit.compare.compare`) to static pages.

Reads only the compare folder (``compare.json``, ``attributes.csv``) and the two run folders it names
(manifests, each class's ``scores.csv``); never imports torch. Same guarantees as the single-run report
(:mod:`dct_audit.report`, whose environment, filters, macros, CSS and JS it reuses): autoescaped templates,
opens offline from disk, every link and image is a relative path that exists.

Output, in the compare folder::

    compare_index.html                      the two classifiers, sortable class table ranked by divergence
    compare_classes/<run-class-folder>.html side-by-side token grids of A and B, attribute differences
    assets/report.css, report.js            shared with the single-run report

Images of the runs are linked (relative paths), not copied.
"""

from __future__ import annotations

import os
import posixpath
import urllib.parse
from pathlib import Path

from .. import __version__, rundir
from ..errors import DctAuditError
from .data import listed_classes, read_manifest
from .html import ASSETS, Renderer, templates_dir
from .readers import read_csv, relpath, to_bool, to_int, to_number

COMPARE_FILE = "compare.json"
ATTRIBUTES_FILE = "attributes.csv"
INDEX = "compare_index.html"
PAGES = "compare_classes"
_CLASS_NUMBERS = (
    "accuracy_a",
    "accuracy_b",
    "token_cosine",
    "concept_distance",
    "reference_distance",
    "a_images_scored_by_b",
    "b_images_scored_by_a",
    "divergence",
)
_ATTR_NUMBERS = ("rate_a", "rate_b", "diff", "ci_low", "ci_high", "p_value", "q_value")


def render_compare(compare_dir: str | os.PathLike) -> Path:
    """Render the compare folder to ``compare_index.html`` plus one page per class; returns the index path."""
    # 1. The comparison and the two runs it names
    out_dir = Path(compare_dir)
    data = _read_compare(out_dir)
    sides = {key: _read_side(out_dir, data.get(f"run_{key}"), key) for key in ("a", "b")}
    attributes = _read_attributes(out_dir)

    # 2. One row (and page) per class, in the compare.json order (ranked by divergence)
    rows = []
    for i, c in enumerate(data.get("classes") or []):
        if not isinstance(c, dict):
            raise DctAuditError(f"{out_dir / COMPARE_FILE} has a class entry that is not an object: {c!r}")
        index = to_int(c.get("class_index"))
        folder = sides["a"]["folders"].get(index) or sides["b"]["folders"].get(index)
        row = {
            "rank": i + 1,
            "index": index,
            "name": str(c.get("class_name", "")),
            "folder": folder,
            "flagged_attributes": to_int(c.get("flagged_attributes")) or 0,
            # which ones: rate in A's token images minus B's, largest first
            "flagged_names": sorted(
                (
                    {"attribute": a["attribute"], "diff": a["diff"]}
                    for a in attributes
                    if a["class_index"] == index and a["flagged"]
                ),
                key=lambda a: (-abs(a["diff"] or 0.0), a["attribute"]),
            ),
            **{k: to_number(c.get(k)) for k in _CLASS_NUMBERS},
            "page": f"{PAGES}/{folder}.html" if folder else None,
        }
        rows.append(row)
    summary = {
        "name": f"{sides['a']['name']} vs {sides['b']['name']}",
        "path": str(out_dir),
        "created": data.get("created"),
        "alpha": to_number(data.get("alpha")),
        "min_effect": to_number(data.get("min_effect")),
        "n_flagged": len(data.get("flagged") or []),
        "has_cross": any(r["a_images_scored_by_b"] is not None for r in rows),
        "has_distance": any(r["concept_distance"] is not None for r in rows),
    }

    # 3. Render: pages, then the index and the assets
    renderer = _CompareRenderer(out_dir, self_contained=False)
    for row in rows:
        if row["page"] is None:
            continue
        cls = {
            **row,
            "grids": _grids(out_dir, sides, row["index"]),
            "attributes": sorted(
                (a for a in attributes if a["class_index"] == row["index"]),
                key=lambda a: (not a["flagged"], -abs(a["diff"] or 0.0), a["attribute"]),
            ),
        }
        renderer.render(
            out_dir / row["page"], "compare_class.html", run=summary, cmp=summary, sides=sides, cls=cls
        )
    for name in ASSETS:
        rundir.write_text(out_dir / "assets" / name, (templates_dir() / name).read_text(encoding="utf-8"))
    return renderer.render(
        out_dir / INDEX,
        "compare_index.html",
        run=summary,
        cmp=summary,
        sides=sides,
        rows=rows,
        version=__version__,
    )


# ----------------------------------------------------------------------------------------------------
# Read: the compare folder and the two runs as plain data
# ----------------------------------------------------------------------------------------------------


def _read_compare(out_dir: Path) -> dict:
    path = out_dir / COMPARE_FILE
    if not path.is_file():
        raise DctAuditError(
            f"'{out_dir}' is not a compare folder (no {COMPARE_FILE}); run dct-audit compare first"
        )
    data = rundir.read_json_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("classes", []), list):
        raise DctAuditError(f"{path} is not a dct-audit comparison (no list of classes)")
    return data


def _run_path(out_dir: Path, recorded) -> Path | None:
    """The run folder as recorded (absolute, or relative to the working directory or the compare folder)."""
    if not recorded:
        return None
    for p in (Path(recorded), out_dir / recorded):
        if (p / rundir.MANIFEST).is_file():
            return p
    return None


def _read_side(out_dir: Path, side, key: str) -> dict:
    """One run of the comparison: its name, classifier, and the class folders by class index."""
    side = side if isinstance(side, dict) else {}
    root = _run_path(out_dir, side.get("path"))
    if root is None:
        raise DctAuditError(
            f"run {key.upper()} of the comparison ('{side.get('path')}') is not a run folder any more; "
            "rerun dct-audit compare with the runs where they are now"
        )
    manifest = read_manifest(root)
    folders = {c["index"]: c["folder"] for c in listed_classes(root, manifest) if c["index"] is not None}
    return {
        "key": key.upper(),
        "name": root.resolve().name,
        "root": root,
        "path": str(side.get("path")),
        "classifier": side.get("classifier"),
        "folders": folders,
    }


def _read_attributes(out_dir: Path) -> list[dict]:
    """Rows of ``attributes.csv`` (none when the runs had no tags)."""
    path = out_dir / ATTRIBUTES_FILE
    if not path.is_file() or not path.read_text(encoding="utf-8").strip():
        return []
    rows = read_csv(path, ("class_index", "attribute", "diff"))
    for r in rows:
        r["class_index"] = to_int(r["class_index"])
        r["n_pairs"] = to_int(r.get("n_pairs"))
        for k in _ATTR_NUMBERS:
            r[k] = to_number(r.get(k))
        r["flagged"] = bool(to_bool(r.get("flagged")))
        r["significant"] = (
            bool(to_bool(r.get("significant"))) if r.get("significant") is not None else r["flagged"]
        )
        r["explained_by"] = (r.get("explained_by") or "").strip().upper()
    return rows


def _grids(out_dir: Path, sides: dict, index: int) -> list[dict]:
    """Per context: A's and B's token images paired by seed (``None`` where one run lacks the image)."""
    images: dict[str, dict] = {}
    contexts: dict[int, dict] = {}
    for key, side in sides.items():
        folder = side["folders"].get(index)
        class_dir = side["root"] / rundir.CLASSES_DIR / folder if folder else None
        if class_dir is None or not (class_dir / rundir.SCORES).is_file():
            images[key] = {}
            continue
        base = relpath(class_dir, out_dir)
        found = {}
        for r in read_csv(class_dir / rundir.SCORES):
            if r.get("variant") != "token":
                continue
            ci, seed = to_int(r.get("context_index")), to_int(r.get("seed"))
            ctx = contexts.setdefault(
                ci, {"index": ci, "context": r.get("context", ""), "seeds": [], "prompts": {}}
            )
            ctx["prompts"].setdefault(key, r.get("prompt", ""))
            if seed not in ctx["seeds"]:
                ctx["seeds"].append(seed)
            if not (class_dir / r["file"]).is_file():
                continue
            found[(ci, seed)] = {
                "file": posixpath.join(base, r["file"]),
                "target_prob": to_number(r.get("target_prob")),
                "pred_name": r.get("pred_name", ""),
                "correct": to_bool(r.get("correct")),
                "tags": None,
            }
        images[key] = found
    grids = []
    for ci in sorted(contexts, key=lambda c: (c is None, c)):
        ctx = contexts[ci]
        seeds = sorted(ctx["seeds"], key=lambda s: (s is None, s))
        pairs = [{k: images[k].get((ci, s)) for k in sides} for s in seeds]
        accuracy = {}
        for k in sides:
            hits = [p[k]["correct"] for p in pairs if p[k] is not None and p[k]["correct"] is not None]
            accuracy[k] = sum(hits) / len(hits) if hits else None
        grids.append(
            {
                "context": ctx["context"],
                "prompts": {k: ctx["prompts"].get(k, "") for k in sides},
                "pairs": pairs,
                "columns": max(1, min(4, len(seeds))),
                "accuracy": accuracy,
            }
        )
    return grids


class _CompareRenderer(Renderer):
    """The run report's renderer, with two changes to its URLs.

    ``base.html``'s home link (``index.html``) goes to the compare index; and the relative path is
    computed between absolute paths, because the runs' images sit outside the compare folder and
    ``posixpath.relpath`` on two relative paths anchors them at the working directory, which drops
    ``..`` steps once they climb above its root.
    """

    def url_for(self, page_dir: str):
        root = self.out_dir.resolve().as_posix()
        here = posixpath.join(root, page_dir or ".")

        def url(path: str) -> str:
            path = INDEX if path == "index.html" else path
            target = posixpath.normpath(posixpath.join(root, path))
            return urllib.parse.quote(posixpath.relpath(target, here))

        return url
