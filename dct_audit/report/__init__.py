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

``findings.json`` (run folder root), a list of findings (flagged by the token, or confirmed or left open
by the counterfactual check of every attribute); extra keys are ignored::

    [{"class_index": 122, "attribute": "plate", "effect": 0.62, "ci": [0.41, 0.80], "q": 0.001,
      "source": "token",                 # or "sweep": not flagged, confirmed or open (optional)
      "confirmed": true,                 # optional
      "open": false,                     # optional: the check could neither confirm nor rule it out
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

import os
from pathlib import Path

from .. import rundir
from ..errors import DctAuditError
from .data import read_class, read_run  # noqa: F401  (the package's API)
from .html import (  # noqa: F401
    ASSETS,
    Renderer,
    fmt_duration,
    fmt_num,
    fmt_pct,
    fmt_pp,
    fmt_sortkey,
    fmt_value,
    templates_dir,
)
from .plots import plot_enrichment, plot_training  # noqa: F401
from .readers import read_attribution, read_enrichment, read_findings, read_tags  # noqa: F401


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
    renderer = Renderer(out_dir, self_contained)
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


def render_index(report: dict, out_dir: str | os.PathLike, renderer: Renderer | None = None) -> Path:
    """Write ``index.html``, ``report.json`` and the assets for ``report`` (from :func:`read_run`)."""
    out_dir = Path(out_dir)
    renderer = renderer or Renderer(out_dir, self_contained=False)
    rundir.write_json(out_dir / "report.json", report)
    for name in ASSETS:
        rundir.write_text(out_dir / "assets" / name, (templates_dir() / name).read_text(encoding="utf-8"))
    return renderer.render(out_dir / "index.html", "index.html", run=report["run"], report=report)
