"""The HTML report: renders a run folder to static pages that open from disk, offline.

Compute, then render: :func:`read_run` and :func:`read_class` turn the run folder into plain data
(saved as ``report.json`` and ``classes/<folder>.json`` beside the pages), matplotlib draws the plots,
and the jinja2 templates (autoescaped: class names, labels and prompts are user input) only format
numbers. This module reads files only and never imports torch, so ``dct-audit report RUN_DIR``
re-renders without loading a model.

Output (``render_report(run_dir)``, default ``RUN_DIR/report/``)::

    index.html                    models, settings, run time, sortable table of classes
    report.json                   everything the index shows
    assets/report.css, report.js  styles and table sorting (no CDN, no network)
    classes/<folder>.html         one page per finished class
    classes/<folder>.json         everything that page shows
    classes/<folder>/training-<hash>.svg, enrichment-<hash>.svg   (named by a hash of their data, so
                                  a re-render redraws only what changed)

Images of the run are linked, not copied (``self_contained=True`` embeds them in one HTML file). Paths
in the JSON files are relative to the folder that holds ``report.json``.

Optional analysis files (each section of a class page appears only when its file exists):

``enrichment.csv`` (run folder root), one row per class x attribute; extra columns are kept::

    class_index (int), attribute (str), group (str), token_rate, baseline_rate (share of images with
    the attribute, 0-1), diff (token_rate - baseline_rate, paired by context and seed), ci_low,
    ci_high (interval of diff), p_value, q_value (Benjamini-Hochberg over the run), flagged (bool)

``findings.json`` (run folder root), a list of findings (flagged by the token, or confirmed by the
counterfactual check of every attribute); extra keys are ignored::

    [{"class_index": 122, "attribute": "plate", "effect": 0.62, "ci": [0.41, 0.80], "q": 0.001,
      "source": "token",                 # or "sweep": not flagged, confirmed by the check (optional)
      "confirmed": true,                 # optional
      "token_rate": 0.83, "baseline_rate": 0.21,            # optional
      "counterfactual": {"with_prob": 0.81, "without_prob": 0.42, "diff": 0.39,   # or null
                         "ci_low": 0.30, "ci_high": 0.48,
                         "with_prompt": "...", "without_prompt": "...", "depends": true},  # optional
      "attribution_outside_object": 0.35,      # share of attribution outside the object, or null
      "overlays": ["classes/0122-american-lobster/attribution/token_0.png"]}]

    effect, ci and q repeat the enrichment row (diff, [ci_low, ci_high], q_value); counterfactual diff
    is with_prob - without_prob of the classifier's target probability over the same seeds; without
    ``depends`` the report says the confidence depends on the attribute when the interval excludes 0.
    Overlay paths are relative to the run folder (paths relative to ``classes/`` are accepted too).

``classes/<folder>/tags.csv``, one row per generated image (the images' CLIP tags)::

    file, variant (token|baseline), context_index, seed, then one column per attribute: its presence
    score in [0, 1]; present when score >= manifest["tagging"]["thresholds"][attribute] (default 0.5)

``classes/<folder>/attribution.json`` (where the classifier looks)::

    {"method": "...", "overlays": ["attribution/token_0.png"],   # relative to the class folder
     "outside_object": 0.35 or null, "note": "..."}

``class.json`` may also carry ``holdout_token_accuracy`` and ``holdout_baseline_accuracy`` (a held-out
classifier on the same images); the index shows them when any class has them.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import hashlib
import json
import math
import os
import posixpath
import urllib.parse
from pathlib import Path

import jinja2
from markupsafe import Markup

from . import __version__, rundir
from .errors import DctAuditError

# the columns a report needs of enrichment.csv (class_name and n_pairs may be missing in older runs)
ENRICHMENT_REQUIRED = tuple(c for c in rundir.ENRICHMENT_COLUMNS if c not in ("class_name", "n_pairs"))
ASSETS = ("report.css", "report.js")
TOP_FLAGGED = 3  # flagged attributes shown per class in the index
PLOT_VERSION = 1  # bump when a plot's look changes: cached plot files are named by a hash of their data


def render_report(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, self_contained: bool = False
) -> Path:
    """Render ``run_dir`` to HTML in ``out_dir`` (default ``run_dir/report``); returns the index path.

    ``self_contained`` writes one HTML file (``<run name>.html``) with every image and plot embedded as
    a data URI, for sharing; otherwise ``index.html`` plus one page per class, linking the run's images.
    """
    # 1. Read the run folder (the index's data) and the optional analysis tables
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / rundir.REPORT_DIR
    report = read_run(run_dir, out_dir, self_contained)
    enrichment, findings = read_enrichment(run_dir), read_findings(run_dir)

    # 2. Each finished class: its page data and plots
    renderer = _Renderer(out_dir, self_contained)
    pages = []
    for row in report["classes"]:
        if row["status"] != "done":
            continue
        try:
            cls = read_class(run_dir, out_dir, row, report["run"], enrichment, findings)
        except DctAuditError as e:  # a damaged class is listed as such; the others still render
            row.update(status="broken", note=str(e), page=None)
            continue
        renderer.draw_plots(cls)
        pages.append(cls)

    # 3. Render: one file, or the index plus a page per class, each with its JSON beside it
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DctAuditError(
            f"cannot write the report to '{out_dir}' ({e.strerror or e}); choose another --out"
        ) from None
    for cls in pages:
        rundir.write_json(out_dir / rundir.CLASSES_DIR / f"{cls['folder']}.json", cls)
    if self_contained:
        rundir.write_json(out_dir / "report.json", report)
        path = out_dir / f"{rundir.slugify(report['run']['name'], 80)}.html"
        renderer.render(path, "single.html", run=report["run"], report=report, pages=pages)
        return path
    for cls in pages:
        renderer.render(out_dir / cls["page"], "class.html", run=report["run"], cls=cls)
    return render_index(report, out_dir, renderer)


def render_index(report: dict, out_dir: str | os.PathLike, renderer: _Renderer | None = None) -> Path:
    """Write ``index.html``, ``report.json`` and the assets for ``report`` (from :func:`read_run`)."""
    out_dir = Path(out_dir)
    renderer = renderer or _Renderer(out_dir, self_contained=False)
    rundir.write_json(out_dir / "report.json", report)
    for name in ASSETS:
        rundir.write_text(out_dir / "assets" / name, (_templates_dir() / name).read_text(encoding="utf-8"))
    return renderer.render(out_dir / "index.html", "index.html", run=report["run"], report=report)


# ----------------------------------------------------------------------------------------------------
# Compute: the run folder as plain data
# ----------------------------------------------------------------------------------------------------


def read_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, self_contained: bool = False) -> dict:
    """The index's data: the run (models, settings, device, times) and one summary row per class."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    manifest = _read_manifest(run_dir)
    enrichment = read_enrichment(run_dir)
    flagged = _top_flagged(enrichment)
    rows = [_class_row(run_dir, c, flagged, self_contained) for c in _listed_classes(run_dir, manifest)]
    runs = manifest.get("class_runs") or {}
    finished = sorted(r["finished"] for r in runs.values() if isinstance(r, dict) and r.get("finished"))
    done = [r for r in rows if r["status"] == "done"]
    settings = manifest.get("settings") or {}
    models = manifest.get("models") or {}
    run = {
        "name": run_dir.resolve().name,
        "path": str(run_dir),
        "created": manifest.get("created"),
        "last_finished": finished[-1] if finished else None,
        "compute_seconds": sum(r["seconds"] or 0.0 for r in done),
        "device": _pick(manifest.get("device"), "type", "name"),
        "versions": manifest.get("versions") or {},
        "classifier": _pick(models.get("classifier"), "spec", "kind", "model_id", "weights"),
        "generator": _pick(
            models.get("generator"),
            *(
                "spec",
                "model_id",
                "family",
                "scheduler",
                "resolution",
                "dtype",
                "default_steps",
                "default_guidance",
            ),
        ),
        "settings": settings,
        "tagging": _pick(manifest.get("tagging"), "tagger", "vocabulary", "attributes", "thresholds")
        if manifest.get("tagging")
        else None,
        "analysis": _pick(manifest.get("analysis"), "alpha", "min_effect", "findings")
        if manifest.get("analysis")
        else None,
        "command": " ".join(manifest["command"]) if manifest.get("command") else None,
        "n_classes": len(rows),
        "n_done": len(done),
        "mean": {k: _mean(r[k] for r in done) for k in _SUMMARY_KEYS},
        "has_holdout": any(r["holdout_token_accuracy"] is not None for r in rows),
        "has_findings": enrichment is not None,
    }
    return {
        "tool": "dct-audit",
        "version": __version__,
        "generated": _dt.datetime.now().isoformat(timespec="seconds"),
        "run_dir": _rel(run_dir, out_dir),
        "run": run,
        "classes": rows,
        "findings": _finding_rows(read_findings(run_dir), rows),
    }


def _finding_rows(findings: list | None, rows: list[dict]) -> dict | None:
    """What the index says first: confirmed findings, then flags the check did not confirm."""
    if findings is None:
        return None
    pages = {r["index"]: r.get("page") for r in rows}
    confirmed, unconfirmed = [], []
    for f in findings:
        if not isinstance(f, dict):
            continue
        cf = f.get("counterfactual") or {}
        item = {
            "class_name": str(f.get("class_name", "")),
            "page": pages.get(f.get("class_index")),
            "attribute": str(f.get("attribute", "")),
            "source": f.get("source") if f.get("source") in ("sweep", "discovered") else "token",
        "discovered": {
            k: _int((f.get("discovered") or {}).get(k)) for k in ("rank", "wins", "n_pairs")
        }
        if f.get("source") == "discovered" and isinstance(f.get("discovered"), dict)
        else None,
            "token_rate": _number(f.get("token_rate")),
            "baseline_rate": _number(f.get("baseline_rate")),
            "with_prob": _number(cf.get("with_prob")),
            "diff": _number(cf.get("diff")),
            "ci_low": _number(cf.get("ci_low")),
            "worst": cf.get("worst_replacement"),
            "absence": bool(f.get("absence")),
        }
        (confirmed if f.get("confirmed") else unconfirmed).append(item)
    return {"confirmed": confirmed, "unconfirmed": unconfirmed}


_SUMMARY_KEYS = ("token_accuracy", "baseline_accuracy", "token_target_prob", "baseline_target_prob")


def _read_manifest(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise DctAuditError(f"no run folder at '{run_dir}'; give the folder that `dct-audit run` wrote")
    path = run_dir / rundir.MANIFEST
    if not path.is_file():
        raise DctAuditError(f"'{run_dir}' is not a dct-audit run folder (no manifest.json)")
    manifest = rundir.read_json_file(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("classes", []), list):
        raise DctAuditError(f"{path} is not a dct-audit manifest (no list of classes)")
    return manifest


def _listed_classes(run_dir: Path, manifest: dict) -> list[dict]:
    """Classes of the manifest, with their folder, plus any class folder the manifest does not list."""
    runs = manifest.get("class_runs") or {}
    out, seen = [], set()
    for c in manifest.get("classes", []):
        if not isinstance(c, dict) or "index" not in c or "name" not in c:
            raise DctAuditError(f"{run_dir / 'manifest.json'} lists a class without index and name: {c!r}")
        known = runs.get(str(c["index"])) or {}
        folder = known.get("folder") or rundir.RunDir(run_dir).class_dir(c["index"], c["name"]).name
        out.append({**c, "folder": folder})
        seen.add(folder)
    classes_dir = run_dir / "classes"
    folders = sorted(classes_dir.iterdir()) if classes_dir.is_dir() else []
    for p in (p for p in folders if p.is_dir() and p.name not in seen):
        head = p.name.split("-", 1)[0]
        out.append({"index": int(head) if head.isdigit() else None, "name": p.name, "folder": p.name})
    return out


def _class_row(run_dir: Path, c: dict, flagged: dict, self_contained: bool) -> dict:
    """One index row: status and summary numbers from ``class.json`` (status only if unfinished)."""
    folder = run_dir / rundir.CLASSES_DIR / c["folder"]
    row = {
        "index": c["index"],
        "name": c["name"],
        "folder": c["folder"],
        "placeholder": c.get("placeholder"),
        "status": "done",
        "note": None,
        "page": None,
        **{k: None for k in (*_SUMMARY_KEYS, "holdout_token_accuracy", "holdout_baseline_accuracy")},
        **{k: None for k in ("updates", "stop_reason", "best_update", "seconds")},
        "top_flagged": flagged.get(c["index"], []),
    }
    if not (folder / rundir.MARKER).is_file():
        row["status"] = "unfinished"
        row["note"] = "interrupted: no DONE marker" if folder.is_dir() else "not started"
        return row
    try:
        summary = rundir.read_json(folder / rundir.CLASS_SUMMARY)
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        row.update(status="broken", note=f"class.json unreadable ({type(e).__name__})")
        return row
    for key in (*_SUMMARY_KEYS, "holdout_token_accuracy", "holdout_baseline_accuracy", "best_update"):
        row[key] = _number(summary.get(key))
    row["updates"] = _number(summary.get("updates"))
    row["stop_reason"] = summary.get("stop_reason")
    row["seconds"] = _number((summary.get("timings") or {}).get("total_s"))
    row["placeholder"] = summary.get("placeholder", row["placeholder"])
    row["name"] = str(summary.get("name", row["name"]))
    row["page"] = f"#class-{c['folder']}" if self_contained else f"classes/{c['folder']}.html"
    return row


def read_class(
    run_dir: Path, out_dir: Path, row: dict, run: dict, enrichment: list | None, findings: list | None
) -> dict:
    """A class page's data: paired image grids per context, evolution, history, token, analysis."""
    folder = run_dir / rundir.CLASSES_DIR / row["folder"]
    summary = rundir.read_json(folder / rundir.CLASS_SUMMARY)
    base = _rel(folder, out_dir)  # the class folder as seen from the report folder
    tags = read_tags(folder, (run.get("tagging") or {}).get("thresholds"))

    # paired grids: one block per context, token and baseline in the same seed order
    by_key: dict[tuple, dict] = {}
    contexts: dict[int, dict] = {}
    for r in _read_csv(folder / rundir.SCORES):
        ci, seed = _int(r.get("context_index")), _int(r.get("seed"))
        ctx = contexts.setdefault(
            ci, {"index": ci, "context": r.get("context", ""), "prompts": {}, "seeds": []}
        )
        ctx["prompts"].setdefault(r["variant"], r.get("prompt", ""))
        if seed not in ctx["seeds"]:
            ctx["seeds"].append(seed)
        by_key[(r["variant"], ci, seed)] = {
            "file": posixpath.join(base, r["file"]),
            "target_prob": _number(r.get("target_prob")),
            "pred_name": r.get("pred_name", ""),
            "correct": _bool(r.get("correct")),
            "tags": tags.get((r["variant"], ci, seed)) if tags is not None else None,
        }
    grids = []
    for ci in sorted(contexts):
        ctx = contexts[ci]
        pairs = [
            {"seed": s, **{v: by_key.get((v, ci, s)) for v in ("token", "baseline")}}
            for s in sorted(ctx["seeds"])
        ]
        acc = {v: _mean(p[v]["correct"] for p in pairs if p[v]) for v in ("token", "baseline")}
        prompts = {v: ctx["prompts"].get(v, "") for v in ("token", "baseline")}
        grids.append(
            {**ctx, "prompts": prompts, "pairs": pairs, "accuracy": acc, "columns": min(4, len(pairs))}
        )

    history = [
        {k: _number(h.get(k)) for k in ("update", "loss", "target_prob", "accuracy")}
        for h in _read_csv(folder / rundir.HISTORY)
    ]
    evolution = []
    for p in sorted((folder / "evolution").glob("update_*.png")):
        parts = p.stem.split("_")  # update_0005_s0
        seed = parts[2][1:] if len(parts) > 2 else ""
        evolution.append(
            {"update": _int(parts[1]), "seed": _int(seed), "file": posixpath.join(base, "evolution", p.name)}
        )

    attribution = read_attribution(folder)
    if attribution is not None:
        overlays = [o for o in attribution.get("overlays") or [] if (folder / o).is_file()]
        attribution = {
            "method": attribution.get("method"),
            "note": attribution.get("note"),
            "outside_object": _number(attribution.get("outside_object")),
            "overlays": [posixpath.join(base, o) for o in overlays],
        }
    mine = [f for f in findings or [] if f.get("class_index") == row["index"]]
    rows = [e for e in enrichment or [] if e["class_index"] == row["index"]]
    return {
        **row,
        "query": summary.get("query"),
        "init_word": summary.get("init_word"),
        "best_loss": _number(summary.get("best_loss")),
        "initial": _pick(summary.get("initial"), "loss", "target_prob", "accuracy"),
        "timings": summary.get("timings") or {},
        "memory": summary.get("memory") or {},
        "n_images": summary.get("n_images"),
        "grids": grids,
        "evolution": evolution,
        "history": history,
        "token": _token(run_dir, folder, base, summary, run, grids),
        "enrichment": None
        if enrichment is None
        else sorted(rows, key=lambda e: (-(e["diff"] or 0.0), e["attribute"])),
        "findings": [_finding(f, run_dir, out_dir) for f in mine] if findings is not None else None,
        "attribution": attribution,
        "plots": {},
    }


def _token(run_dir: Path, folder: Path, base: str, summary: dict, run: dict, grids: list) -> dict:
    """The token file and three lines that load it into diffusers and reproduce a token image."""
    name = summary.get("token_file", rundir.TOKEN)
    placeholder = summary.get("placeholder") or ""
    gen, settings = run["generator"], run["settings"]
    steps = _int(settings.get("steps")) or _int(gen["default_steps"]) or 30
    guidance = _number(settings.get("guidance"))
    guidance = (_number(gen["default_guidance"]) or 0.0) if guidance is None else guidance
    model = gen["model_id"] or settings.get("generator") or "stabilityai/sd-turbo"
    prompt = next((g["prompts"]["token"] for g in grids if g["prompts"]["token"]), placeholder)
    token_path = run_dir / rundir.CLASSES_DIR / folder.name / name
    snippet = "\n".join(
        [
            f"pipe = StableDiffusionPipeline.from_pretrained({_py_str(model)})",
            f"pipe.load_textual_inversion({_py_str(token_path)}, token={_py_str(placeholder)})",
            f"image = pipe({_py_str(prompt)}, num_inference_steps={steps}, guidance_scale={guidance}).images[0]",
        ]
    )
    exists = (folder / name).is_file()
    return {
        "file": posixpath.join(base, name) if exists else None,
        "placeholder": placeholder,
        "snippet": snippet,
    }


def _py_str(text) -> str:
    """A Python string literal for ``text`` (JSON's escapes are valid Python)."""
    return json.dumps(str(text), ensure_ascii=False)


def _finding(f: dict, run_dir: Path, out_dir: Path) -> dict:
    cf = f.get("counterfactual") or None
    if cf:
        numbers = {k: _number(cf.get(k)) for k in ("with_prob", "without_prob", "diff", "ci_low", "ci_high")}
        low, high = numbers["ci_low"], numbers["ci_high"]
        depends = cf.get("depends")
        if not isinstance(depends, bool):
            depends = low is not None and high is not None and (low > 0 or high < 0)
        replacements = [
            {
                "name": str(r.get("name", "")),
                "prompt": r.get("prompt"),
                **{k: _number(r.get(k)) for k in ("prob", "diff", "ci_low", "ci_high")},
                "confounders": {
                    str(k): _number(v)
                    for k, v in (r.get("confounders") or {}).items()
                    if _number(v) is not None
                }
                if isinstance(r.get("confounders"), dict)
                else {},
            }
            for r in cf.get("replacements") or []
            if isinstance(r, dict)
        ]
        cf = {
            **numbers,
            "depends": depends,
            **{k: cf.get(k) for k in ("with_prompt", "without_prompt", "n", "unconfounded_replacements")},
        }
        cf["confirmed"] = f.get("confirmed")
        cf["replacements"] = replacements
    ci = f.get("ci") if isinstance(f.get("ci"), list) and len(f["ci"]) == 2 else [None, None]
    overlays = []
    for o in f.get("overlays") or []:
        path = next((p for p in (run_dir / o, run_dir / rundir.CLASSES_DIR / o) if p.is_file()), None)
        if path is not None:
            overlays.append(_rel(path, out_dir))
    return {
        "attribute": str(f.get("attribute", "")),
        "effect": _number(f.get("effect")),
        "ci": [_number(ci[0]), _number(ci[1])],
        "q": _number(f.get("q")),
        "token_rate": _number(f.get("token_rate")),
        "baseline_rate": _number(f.get("baseline_rate")),
        "counterfactual": cf,
        "source": f.get("source") if f.get("source") in ("sweep", "discovered") else "token",
        "discovered": {
            k: _int((f.get("discovered") or {}).get(k)) for k in ("rank", "wins", "n_pairs")
        }
        if f.get("source") == "discovered" and isinstance(f.get("discovered"), dict)
        else None,
        "confirmed": bool(f.get("confirmed")),
        "absence": bool(f.get("absence")),
        "attribution_outside_object": _number(f.get("attribution_outside_object")),
        "overlays": overlays,
    }


def _top_flagged(enrichment: list | None) -> dict[int, list]:
    out: dict[int, list] = {}
    for e in sorted(enrichment or [], key=lambda e: -(e["diff"] or 0.0)):
        if e["flagged"] and len(out.setdefault(e["class_index"], [])) < TOP_FLAGGED:
            out[e["class_index"]].append(
                {"attribute": e["attribute"], "diff": e["diff"], "q_value": e["q_value"]}
            )
    return out


# ----------------------------------------------------------------------------------------------------
# Optional analysis files: None when absent, a one-line error when malformed
# ----------------------------------------------------------------------------------------------------


def read_enrichment(run_dir: str | os.PathLike) -> list[dict] | None:
    """Rows of ``enrichment.csv`` (see the module docstring), or ``None`` when the run has none."""
    path = Path(run_dir) / rundir.ENRICHMENT
    if not path.is_file():
        return None
    rows = _read_csv(path, ENRICHMENT_REQUIRED)
    for r in rows:
        r["class_index"] = _int(r["class_index"])
        for k in ("token_rate", "baseline_rate", "diff", "ci_low", "ci_high", "p_value", "q_value"):
            r[k] = _number(r[k])
        r["flagged"] = bool(_bool(r["flagged"]))
    return rows


def read_findings(run_dir: str | os.PathLike) -> list[dict] | None:
    """The list in ``findings.json`` (see the module docstring), or ``None`` when the run has none."""
    path = Path(run_dir) / rundir.FINDINGS
    if not path.is_file():
        return None
    data = rundir.read_json_file(path)
    if not isinstance(data, list) or not all(isinstance(f, dict) and "class_index" in f for f in data):
        raise DctAuditError(f"{path} must be a list of objects with a class_index")
    return data


def read_tags(class_dir: str | os.PathLike, thresholds: dict | None = None) -> dict[tuple, list[str]] | None:
    """``{(variant, context_index, seed): [present attributes]}`` from ``tags.csv``, or ``None``."""
    path = Path(class_dir) / rundir.TAGS
    if not path.is_file():
        return None
    thresholds = thresholds or {}
    out: dict[tuple, list[str]] = {}
    for r in _read_csv(path, rundir.TAGS_KEYS[1:]):
        present = out.setdefault((r["variant"], _int(r["context_index"]), _int(r["seed"])), [])
        for attribute, score in r.items():
            if attribute in rundir.TAGS_KEYS or attribute is None:
                continue
            value = _number(score)
            limit = _number(thresholds.get(attribute))
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


def _read_csv(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
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


def _number(x) -> float | int | None:
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


def _int(x) -> int | None:
    v = _number(x)
    return None if v is None else int(v)


def _bool(x) -> bool | None:
    if isinstance(x, bool):
        return x
    text = str(x).strip().lower()
    if text in ("true", "1", "1.0", "yes"):
        return True
    return False if text in ("false", "0", "0.0", "no") else None


def _pick(record, *keys: str) -> dict:
    """``record``'s ``keys`` (``None`` where missing): templates can rely on every key being there."""
    record = record if isinstance(record, dict) else {}
    return {k: record.get(k) for k in keys}


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _rel(path: Path, start: Path) -> str:
    """``path`` relative to ``start``, with forward slashes (a URL path once quoted)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


# ----------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)
# ----------------------------------------------------------------------------------------------------


def _plot_style():
    import matplotlib

    matplotlib.use("Agg", force=False)
    return matplotlib.rc_context(
        {
            "text.parse_math": False,  # a "$" in an attribute name is text, not math
            "svg.hashsalt": "dct-audit",  # same input, same file
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )


def _svg(fig, tight: bool = False) -> bytes:
    import io
    import warnings

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(buf, format="svg", bbox_inches="tight" if tight else None, metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue()


def plot_training(history: list[dict], best_update: int | None) -> bytes:
    """Loss, and target probability with batch accuracy, over updates; the kept update dashed."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = [h["update"] for h in history]
    with _plot_style():
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.6))
        a.plot(x, [h["loss"] for h in history], marker=".", color="#b5413b")
        a.set(title="loss", xlabel="update")
        b.plot(
            x, [h["target_prob"] for h in history], marker=".", label="target probability", color="#2c6cb0"
        )
        b.plot(
            x, [h["accuracy"] for h in history], marker=".", label="batch accuracy", color="#8aa1b8", ls=":"
        )
        b.set(title="classifier on the batch", xlabel="update", ylim=(-0.02, 1.02))
        b.legend(frameon=False, loc="best")
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.18, top=0.88, wspace=0.25)
        for ax in (a, b):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if best_update is not None:
                ax.axvline(best_update, color="#888", ls="--", lw=0.8)
        return _svg(fig)


def plot_enrichment(rows: list[dict], limit: int = 25) -> bytes:
    """Token rate minus baseline rate per attribute with its interval; flagged ones in colour."""
    import matplotlib.pyplot as plt

    top = sorted(rows, key=lambda e: (-abs(e["diff"] or 0.0), e["attribute"]))[:limit]
    top.sort(key=lambda e: e["diff"] or 0.0)
    y = list(range(len(top)))
    with _plot_style():
        fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.26 * max(1, len(top))))
        for i, e in zip(y, top, strict=True):
            d = e["diff"] or 0.0
            low = d - e["ci_low"] if e["ci_low"] is not None else 0.0
            high = e["ci_high"] - d if e["ci_high"] is not None else 0.0
            color = "#b5413b" if e["flagged"] else "#7d8790"
            ax.errorbar(d, i, xerr=[[max(low, 0)], [max(high, 0)]], fmt="o", color=color, ms=4, capsize=2)
        ax.axvline(0, color="#333", lw=0.8)
        ax.set_yticks(y, [_label(e["attribute"]) for e in top])
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("share of token images minus share of baseline images (paired, with interval)")
        return _svg(fig, tight=True)  # room for the attribute names, whatever their length


def _label(text: str, n: int = 40) -> str:
    """Plot-safe text: no control characters (they break SVG), at most ``n`` characters."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return clean if len(clean) <= n else clean[: n - 1] + "…"


# ----------------------------------------------------------------------------------------------------
# Render (jinja2, autoescaped)
# ----------------------------------------------------------------------------------------------------


def _templates_dir() -> Path:
    """The templates, CSS and JS ship inside the package (``dct_audit/templates``), in a checkout and a wheel."""
    return Path(__file__).parent / "templates"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_templates_dir()),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True, default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        pct=fmt_pct, num=fmt_num, pp=fmt_pp, duration=fmt_duration, sortkey=fmt_sortkey, value=fmt_value
    )
    return env


def fmt_pct(x, digits: int = 1) -> str:
    """0.734 -> '73.4%'; missing -> a dash."""
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def fmt_num(x, digits: int = 3) -> str:
    """A number with ``digits`` decimals (whole numbers as they are); missing -> a dash."""
    if x is None:
        return "–"
    if isinstance(x, int) or digits == 0:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def fmt_pp(x, digits: int = 0) -> str:
    """A difference of two rates in percentage points: 0.62 -> '+62 pp'."""
    return "–" if x is None else f"{100 * x:+.{digits}f} pp"


def fmt_duration(seconds) -> str:
    """7.8 -> '7.8 s', 192 -> '3 min 12 s', 7500 -> '2 h 05 min'."""
    if seconds is None:
        return "–"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_value(x) -> str:
    """A setting as a person reads it: text as is, lists and numbers as JSON, missing as a dash."""
    if x is None:
        return "–"
    return x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)


def fmt_sortkey(x) -> str:
    """The value a sortable table cell sorts by: a plain number, or empty (sorted last)."""
    return "" if x is None else repr(float(x))


class _Renderer:
    """Turns run-relative paths into URLs (or data URIs), writes plots, renders templates to files."""

    def __init__(self, out_dir: Path, self_contained: bool):
        self.out_dir = Path(out_dir)
        self.self_contained = self_contained
        self.env = _environment()
        self.inline: dict[str, bytes] = {}  # plots kept in memory for a self-contained file

    def draw_plots(self, cls: dict) -> None:
        """Draw the class's plots; a plot whose data has not changed since the last render is reused."""
        wanted = {}
        if cls["history"]:
            wanted["training"] = (plot_training, (cls["history"], cls["best_update"]))
        if cls["enrichment"]:
            wanted["enrichment"] = (plot_enrichment, (cls["enrichment"],))
        for name, (draw, args) in wanted.items():
            key = json.dumps([__version__, PLOT_VERSION, args], sort_keys=True, default=str)
            path = f"classes/{cls['folder']}/{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.svg"
            cls["plots"][name] = path
            if self.self_contained:
                self.inline[path] = draw(*args)
            elif not (self.out_dir / path).is_file():
                svg = draw(*args)
                for old in (self.out_dir / path).parent.glob(f"{name}-*.svg"):
                    old.unlink()
                rundir.atomic_write(self.out_dir / path, lambda p, svg=svg: p.write_bytes(svg))

    def url_for(self, page_dir: str):
        """A function for templates: report-relative path -> URL as seen from ``page_dir``."""

        def url(path: str) -> str:
            if self.self_contained:
                return self._data_uri(path)
            return urllib.parse.quote(posixpath.relpath(path, page_dir or "."))

        return url

    def _data_uri(self, path: str) -> str:
        data = self.inline.get(path)
        if data is None:
            data = (self.out_dir / path).read_bytes()
        kind = {".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg"}.get(
            posixpath.splitext(path)[1].lower(), "application/octet-stream"
        )
        return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"

    def render(self, path: Path, template: str, **context) -> Path:
        page_dir = posixpath.dirname(Path(path).relative_to(self.out_dir).as_posix())
        assets = {
            name: Markup((_templates_dir() / name).read_text(encoding="utf-8"))
            if self.self_contained
            else None
            for name in ASSETS
        }
        tpl = self.env.get_template(template)
        url = self.url_for(page_dir)
        context.update(url=url, assets=assets, self_contained=self.self_contained)
        return rundir.atomic_write(path, lambda p: tpl.stream(**context).dump(str(p), encoding="utf-8"))
