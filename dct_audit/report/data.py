"""The run folder as plain data: what the index and each class page show (reads files only)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
from dataclasses import asdict
from pathlib import Path

from .. import __version__, rundir
from ..check import class_specific
from ..errors import DctAuditError
from ..stats import seed_stages
from .readers import (
    mean_of,
    pick,
    read_attribution,
    read_csv,
    read_enrichment,
    read_findings,
    read_tags,
    relpath,
    to_bool,
    to_int,
    to_number,
)

TOP_FLAGGED = 3  # flagged attributes shown per class in the index

# ----------------------------------------------------------------------------------------------------
# Compute: the run folder as plain data
# ----------------------------------------------------------------------------------------------------


def read_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, self_contained: bool = False) -> dict:
    """The index's data: the run (models, settings, device, times) and one summary row per class."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    manifest = read_manifest(run_dir)
    enrichment = read_enrichment(run_dir)
    flagged = _top_flagged(enrichment)
    rows = [
        _class_row(run_dir, c, flagged, self_contained, manifest.settings or {})
        for c in listed_classes(run_dir, manifest)
    ]
    runs = manifest.class_runs
    finished = sorted(r["finished"] for r in runs.values() if isinstance(r, dict) and r.get("finished"))
    done = [r for r in rows if r["status"] == "done"]
    settings, models = manifest.settings, manifest.models
    run = {
        "name": run_dir.resolve().name,
        "path": str(run_dir),
        "created": manifest.created,
        "last_finished": finished[-1] if finished else None,
        "compute_seconds": sum(r["seconds"] or 0.0 for r in done),
        "device": pick(manifest.device, "type", "name"),
        "versions": manifest.versions or {},
        "classifier": pick(models.get("classifier"), "spec", "kind", "model_id", "weights"),
        "generator": pick(
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
        "tagging": pick(manifest.tagging, "tagger", "vocabulary", "attributes", "thresholds")
        if manifest.tagging
        else None,
        "analysis": _analysis(manifest.analysis) if manifest.analysis else None,
        "command": " ".join(manifest.command) if manifest.command else None,
        "n_classes": len(rows),
        "n_done": len(done),
        "mean": {k: mean_of(r[k] for r in done) for k in _SUMMARY_KEYS},
        "has_holdout": any(r["holdout_token_accuracy"] is not None for r in rows),
        "has_findings": enrichment is not None,
    }
    return {
        "tool": "dct-audit",
        "version": __version__,
        "generated": _dt.datetime.now().isoformat(timespec="seconds"),
        "run_dir": relpath(run_dir, out_dir),
        "run": run,
        "classes": rows,
        "findings": _finding_rows(read_findings(run_dir), rows),
    }


def _analysis(analysis: dict) -> dict:
    """The analysis settings the index names, with the check's later stages (``[32, 128]``: seeds of each)."""
    out = pick(
        analysis,
        "alpha",
        "min_effect",
        "findings",
        "confirm",
        "confirm_seeds",
        "confirm_max_seeds",
        "adjust",
        "association",
        "association_subjects",
    )
    first, most = out.get("confirm_seeds"), out.get("confirm_max_seeds")
    ok = isinstance(first, int) and isinstance(most, int) and first > 0
    out["more_seeds"] = seed_stages(first, most)[1:] if ok else []
    return out


def _finding_rows(findings: list | None, rows: list[dict]) -> dict | None:
    """What the index says first: confirmed findings, then those the check left open, then flags it ruled
    out (or absences)."""
    if findings is None:
        return None
    pages = {r["index"]: r.get("page") for r in rows}
    confirmed, undecided, unconfirmed = [], [], []
    for f in findings:
        if not isinstance(f, dict):
            continue
        cf = f.get("counterfactual") or {}
        item = {
            "class_name": str(f.get("class_name", "")),
            "page": pages.get(f.get("class_index")),
            "attribute": str(f.get("attribute", "")),
            "source": f.get("source") if f.get("source") in ("sweep", "discovered") else "token",
            "discovered": {k: to_int((f.get("discovered") or {}).get(k)) for k in ("rank", "wins", "n_pairs")}
            if f.get("source") == "discovered" and isinstance(f.get("discovered"), dict)
            else None,
            "token_rate": to_number(f.get("token_rate")),
            "baseline_rate": to_number(f.get("baseline_rate")),
            "with_prob": to_number(cf.get("with_prob")),
            "diff": to_number(cf.get("diff")),
            "ci_low": to_number(cf.get("ci_low")),
            "ci_high": to_number(cf.get("ci_high")),
            "n": to_int(cf.get("n")),
            "worst": cf.get("worst_replacement"),
            "absence": bool(f.get("absence")),
            "specific": class_specific(cf),
            "association_diff": to_number((cf.get("association") or {}).get("diff")),
        }
        group = confirmed if f.get("confirmed") else undecided if f.get("open") else unconfirmed
        group.append(item)
    return {"confirmed": confirmed, "open": undecided, "unconfirmed": unconfirmed}


_SUMMARY_KEYS = ("token_accuracy", "baseline_accuracy", "token_target_prob", "baseline_target_prob")


def read_manifest(run_dir: Path) -> rundir.Manifest:
    if not run_dir.is_dir():
        raise DctAuditError(f"no run folder at '{run_dir}'; give the folder that `dct-audit run` wrote")
    manifest = rundir.RunDir(run_dir).read_manifest()
    if manifest is None:
        raise DctAuditError(f"'{run_dir}' is not a dct-audit run folder (no manifest.json)")
    return manifest


def listed_classes(run_dir: Path, manifest: rundir.Manifest) -> list[dict]:
    """Classes of the manifest, with their folder, plus any class folder the manifest does not list."""
    out, seen = [], set()
    for c in manifest.classes:
        known = manifest.class_runs.get(str(c.index)) or {}
        folder = known.get("folder") or rundir.RunDir(run_dir).class_dir(c.index, c.name).name
        out.append({**asdict(c), "folder": folder})
        seen.add(folder)
    classes_dir = run_dir / "classes"
    folders = sorted(classes_dir.iterdir()) if classes_dir.is_dir() else []
    for p in (p for p in folders if p.is_dir() and p.name not in seen):
        head = p.name.split("-", 1)[0]
        out.append({"index": int(head) if head.isdigit() else None, "name": p.name, "folder": p.name})
    return out


def _class_row(run_dir: Path, c: dict, flagged: dict, self_contained: bool, settings: dict) -> dict:
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
        **{k: None for k in ("updates", "stop_reason", "best_update", "seconds", "attempts")},
        "top_flagged": flagged.get(c["index"], []),
        "not_learned": False,
        "retry": None,
    }
    state, detail = rundir.verify_folder(folder, quick=True)  # against its DONE marker, as verify checks
    if state in ("missing", "incomplete"):
        row["status"] = "unfinished"
        row["note"] = "interrupted: no DONE marker" if folder.is_dir() else "not started"
        return row
    if state == "damaged":
        row.update(status="broken", note=f"{detail}: run the same `dct-audit run` command to redo the class")
        return row
    try:
        summary = rundir.read_json(folder / rundir.CLASS_SUMMARY)
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        row.update(status="broken", note=f"class.json unreadable ({type(e).__name__})")
        return row
    for key in (*_SUMMARY_KEYS, "holdout_token_accuracy", "holdout_baseline_accuracy", "best_update"):
        row[key] = to_number(summary.get(key))
    row["updates"] = to_number(summary.get("updates"))
    row["stop_reason"] = summary.get("stop_reason")
    row["attempts"] = to_number(summary.get("attempts"))
    row["not_learned"] = rundir.token_not_learned(summary)
    row["retry"] = rundir.retry_flags(summary, settings)
    row["seconds"] = to_number((summary.get("timings") or {}).get("total_s"))
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
    base = relpath(folder, out_dir)  # the class folder as seen from the report folder
    tags = read_tags(folder, (run.get("tagging") or {}).get("thresholds"))

    # paired grids: one block per context, token and baseline in the same seed order
    by_key: dict[tuple, dict] = {}
    contexts: dict[int, dict] = {}
    for r in read_csv(folder / rundir.SCORES):
        ci, seed = to_int(r.get("context_index")), to_int(r.get("seed"))
        ctx = contexts.setdefault(
            ci, {"index": ci, "context": r.get("context", ""), "prompts": {}, "seeds": []}
        )
        ctx["prompts"].setdefault(r["variant"], r.get("prompt", ""))
        if seed not in ctx["seeds"]:
            ctx["seeds"].append(seed)
        by_key[(r["variant"], ci, seed)] = {
            "file": posixpath.join(base, r["file"]),
            "target_prob": to_number(r.get("target_prob")),
            "pred_name": r.get("pred_name", ""),
            "correct": to_bool(r.get("correct")),
            "tags": tags.get((r["variant"], ci, seed)) if tags is not None else None,
        }
    grids = []
    for ci in sorted(contexts):
        ctx = contexts[ci]
        pairs = [
            {"seed": s, **{v: by_key.get((v, ci, s)) for v in ("token", "baseline")}}
            for s in sorted(ctx["seeds"])
        ]
        acc = {v: mean_of(p[v]["correct"] for p in pairs if p[v]) for v in ("token", "baseline")}
        prompts = {v: ctx["prompts"].get(v, "") for v in ("token", "baseline")}
        grids.append(
            {**ctx, "prompts": prompts, "pairs": pairs, "accuracy": acc, "columns": min(4, len(pairs))}
        )

    history = [
        {k: to_number(h.get(k)) for k in ("update", "loss", "target_prob", "accuracy")}
        for h in read_csv(folder / rundir.HISTORY)
    ]
    evolution = []
    for p in sorted((folder / rundir.EVOLUTION_DIR).glob("update_*.png")):
        parts = p.stem.split("_")  # update_0005_s0
        seed = parts[2][1:] if len(parts) > 2 else ""
        evolution.append(
            {
                "update": to_int(parts[1]),
                "seed": to_int(seed),
                "file": posixpath.join(base, rundir.EVOLUTION_DIR, p.name),
            }
        )

    attribution = read_attribution(folder)
    if attribution is not None:
        overlays = [o for o in attribution.get("overlays") or [] if (folder / o).is_file()]
        attribution = {
            "method": attribution.get("method"),
            "note": attribution.get("note"),
            "outside_object": to_number(attribution.get("outside_object")),
            "overlays": [posixpath.join(base, o) for o in overlays],
        }
    mine = [f for f in findings or [] if f.get("class_index") == row["index"]]
    rows = [e for e in enrichment or [] if e["class_index"] == row["index"]]
    return {
        **row,
        "query": summary.get("query"),
        "init_word": summary.get("init_word"),
        "best_loss": to_number(summary.get("best_loss")),
        "initial": pick(summary.get("initial"), "loss", "target_prob", "accuracy"),
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
    steps = to_int(settings.get("steps")) or to_int(gen["default_steps"]) or 30
    guidance = to_number(settings.get("guidance"))
    guidance = (to_number(gen["default_guidance"]) or 0.0) if guidance is None else guidance
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


def _association(a) -> dict | None:
    """The association stage's numbers for the class page (``association.association_effect``)."""
    if not isinstance(a, dict):
        return None
    return {
        **{k: to_number(a.get(k)) for k in ("with_prob", "diff", "ci_low", "ci_high")},
        "n": to_int(a.get("n")),
        "subjects": [str(x) for x in a.get("subjects") or []],
        "associated": bool(a.get("associated")),
        "replacements": [
            {
                "name": str(r.get("name", "")),
                **{k: to_number(r.get(k)) for k in ("prob", "diff", "ci_low", "ci_high")},
            }
            for r in a.get("replacements") or []
            if isinstance(r, dict)
        ],
    }


def _finding(f: dict, run_dir: Path, out_dir: Path) -> dict:
    cf = f.get("counterfactual") or None
    if cf:
        numbers = {
            k: to_number(cf.get(k)) for k in ("with_prob", "without_prob", "diff", "ci_low", "ci_high")
        }
        low, high = numbers["ci_low"], numbers["ci_high"]
        depends = cf.get("depends")
        if not isinstance(depends, bool):
            depends = low is not None and high is not None and (low > 0 or high < 0)
        replacements = [
            {
                "name": str(r.get("name", "")),
                "prompt": r.get("prompt"),
                **{k: to_number(r.get(k)) for k in ("prob", "diff", "ci_low", "ci_high", "explained")},
                "confounders": {
                    str(k): to_number(v)
                    for k, v in (r.get("confounders") or {}).items()
                    if to_number(v) is not None
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
        cf["open"] = bool(f.get("open"))
        cf["replacements"] = replacements
        cf["adjusted"] = any(r["explained"] is not None for r in replacements)
        cf["association"] = _association(f["counterfactual"].get("association"))
    ci = f.get("ci") if isinstance(f.get("ci"), list) and len(f["ci"]) == 2 else [None, None]
    overlays = []
    for o in f.get("overlays") or []:
        path = next((p for p in (run_dir / o, run_dir / rundir.CLASSES_DIR / o) if p.is_file()), None)
        if path is not None:
            overlays.append(relpath(path, out_dir))
    return {
        "attribute": str(f.get("attribute", "")),
        "effect": to_number(f.get("effect")),
        "ci": [to_number(ci[0]), to_number(ci[1])],
        "q": to_number(f.get("q")),
        "token_rate": to_number(f.get("token_rate")),
        "baseline_rate": to_number(f.get("baseline_rate")),
        "counterfactual": cf,
        "source": f.get("source") if f.get("source") in ("sweep", "discovered") else "token",
        "discovered": {k: to_int((f.get("discovered") or {}).get(k)) for k in ("rank", "wins", "n_pairs")}
        if f.get("source") == "discovered" and isinstance(f.get("discovered"), dict)
        else None,
        "confirmed": bool(f.get("confirmed")),
        "open": bool(f.get("open")) and not f.get("confirmed"),
        "absence": bool(f.get("absence")),
        "attribution_outside_object": to_number(f.get("attribution_outside_object")),
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
