"""``dct-audit compare``: where two classifiers have learned different concepts, class by class.

Two finished runs over the same classes, made with the same generator, seeds, contexts and tagger, give
for every class two sets of token images that pair up by (context, seed). Per class:

- attribute profiles A vs B with the same paired statistics as the findings (exact McNemar, BH over all
  class x attribute tests, paired difference with its interval): which context one classifier's token
  brings and the other's does not. A difference is *significant* when q < alpha and |difference| >=
  min_effect, and *flagged* when it is also explained: the run whose token brings the attribute more often
  has it as a finding that its counterfactual check confirmed (the classifier's confidence depends on it).
  A dependence that only one run's check confirmed is flagged too (``confirmed_in`` "a" or "b"), even when
  the two tokens do not differ on it: one classifier depends on the attribute, the other does not.
  Significant but unexplained differences (a token that moved and changed the images' style, with neither
  classifier depending on it) stay in ``attributes.csv`` with ``explained_by`` empty. Runs analysed without
  counterfactuals fall back to flagging every significant difference;
- cross-scoring: A's token images scored by B and B's by A, next to each classifier's own accuracy
  (needs both classifiers; skipped with ``cross_score=False``);
- a concept distance: 1 - cosine between the mean tagger embeddings of A's and B's token images, with a
  reference: the same distance between two halves (different seeds) of the shared baseline images, so a
  distance near the reference means "as different as two draws of the same prompt";
- the cosine between the two learned token embeddings.

Results: ``compare.json``, ``classes.csv`` (ranked by divergence), ``attributes.csv`` in the compare folder.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import rundir
from .check import confirmed
from .errors import DctAuditError
from .options import ALPHA, MIN_EFFECT, check_option
from .stats import benjamini_hochberg, paired_rates

# settings that must agree for two runs' images to pair up
MUST_MATCH = ("generator", "steps", "guidance", "n_images", "seed", "contexts", "tagger", "attributes")
RECORDED_IF_BOTH = (  # compared when both runs recorded them (older runs lack them)
    "vocabulary_sha256",
    "tagger_hub_revision",
    "generator_files_sha256",
    "generator_hub_revision",
)


@dataclass
class CompareResult:
    out_dir: Path
    classes: pd.DataFrame
    attributes: pd.DataFrame
    flagged: list[dict] = field(default_factory=list)


def _open(run: str | Path) -> tuple[rundir.RunDir, rundir.Manifest]:
    run_dir = rundir.RunDir(run)
    manifest = run_dir.read_manifest()
    if manifest is None:
        raise DctAuditError(
            f"'{run}' is not a dct-audit run folder (no manifest.json); give a folder made by dct-audit run"
        )
    return run_dir, manifest


def _pairing(m: rundir.Manifest) -> dict:
    """What two runs must share to be paired: their settings, and how they were tagged (the tagger and the
    vocabulary are recorded apart from the settings, under ``tagging``)."""
    tagging = m.tagging or {}
    values = dict(m.settings, tagger=tagging.get("tagger"), attributes=tagging.get("attributes_file"))
    if tagging.get("attributes_file") is None and tagging.get("attributes") is not None:
        values["attributes"] = f"shipped ({tagging['attributes']} attributes)"
    for key in ("vocabulary_sha256", "tagger_hub_revision"):
        if key in tagging:
            values[key] = tagging[key]
    generator = m.models.get("generator") or {}
    if generator.get("local_files_sha256") is not None:  # a local generator folder may hold other weights
        values["generator_files_sha256"] = generator["local_files_sha256"]
    if generator.get("hub_revision") is not None:  # a hub generator: the commit the cache held
        values["generator_hub_revision"] = generator["hub_revision"]
    return values


def check_comparable(
    ma: rundir.Manifest, mb: rundir.Manifest, name_a: str, name_b: str
) -> list[rundir.ManifestClass]:
    """The classes both runs list; a one-line error naming what differs otherwise."""
    sa, sb = _pairing(ma), _pairing(mb)
    recorded = [k for k in RECORDED_IF_BOTH if k in sa and k in sb]  # older runs lack them
    diffs = [k for k in (*MUST_MATCH, *recorded) if sa.get(k) != sb.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: {sa.get(k)!r} vs {sb.get(k)!r}" for k in diffs[:3])
        raise DctAuditError(
            f"runs '{name_a}' and '{name_b}' cannot be paired: {shown}; rerun one with the other's settings"
        )
    ca = {c.index: c for c in ma.classes}
    cb = {c.index: c for c in mb.classes}
    if set(ca) != set(cb):
        only_a = sorted(set(ca) - set(cb))[:5]
        only_b = sorted(set(cb) - set(ca))[:5]
        raise DctAuditError(
            f"runs '{name_a}' and '{name_b}' audit different classes (only in the first: {only_a}, only in the second: "
            f"{only_b}); run both over the same --classes"
        )
    from .resolve import normalise

    renamed = [i for i in sorted(ca) if normalise(ca[i].name) != normalise(cb[i].name)]
    if renamed:  # the same index is another class: pairing them would compare a cat with a dog
        i = renamed[0]
        raise DctAuditError(
            f"runs '{name_a}' and '{name_b}' name class {i} differently ('{ca[i].name}' vs '{cb[i].name}'"
            + (f", and {len(renamed) - 1} more" if len(renamed) > 1 else "")
            + "); their classifiers have other label lists, so their classes cannot be paired by index"
        )
    return [ca[i] for i in sorted(ca)]


def _confirmed_findings(root: Path) -> set[tuple[int, str]] | None:
    """(class, attribute) of a run's findings that its counterfactual check confirmed; None: not analysed."""
    file = Path(root) / rundir.FINDINGS
    if not file.is_file():
        return None
    data = rundir.read_json_file(file, "rerun the analysis: dct-audit finish RUN_DIR")
    try:
        return {
            (int(f["class_index"]), f["attribute"])
            for f in data
            if f.get("confirmed", confirmed(f.get("counterfactual")))  # older runs: the same rule
        }
    except (TypeError, KeyError, ValueError, AttributeError):
        raise DctAuditError(
            f"{file} is not a list of findings; rerun the analysis: dct-audit finish {root}"
        ) from None


def _explained_by(row, confirmed_a: set | None, confirmed_b: set | None) -> str:
    """Which run's confirmed finding explains a significant difference: the run whose token brings the
    attribute more often must have it as a finding its counterfactual confirmed ("a", "b" or "")."""
    higher = confirmed_a if row.diff > 0 else confirmed_b
    key = (int(row.class_index), row.attribute)
    return ("a" if row.diff > 0 else "b") if higher is not None and key in higher else ""


def _confirmed_in(row, confirmed_a: set | None, confirmed_b: set | None) -> str:
    """Which run's counterfactual check confirmed the attribute for the class: "a", "b", "both" or ""."""
    key = (int(row.class_index), row.attribute)
    a, b = key in (confirmed_a or ()), key in (confirmed_b or ())
    return "both" if a and b else "a" if a else "b" if b else ""


def _class_folder(run_dir: rundir.RunDir, c: rundir.ManifestClass) -> Path:
    folder = run_dir.class_dir(c.index, c.name)
    state, detail = rundir.verify_folder(folder, quick=True)  # numbers hashed, images by size
    if state in ("missing", "incomplete"):
        raise DctAuditError(
            f"class {c.name} ({c.index}) is not finished in '{run_dir.root}'; resume that run first"
        )
    if state == "damaged":
        raise DctAuditError(
            f"class {c.name} ({c.index}) in '{run_dir.root}' is damaged ({detail}); run that run's "
            "`dct-audit run` command again to redo it"
        )
    return folder


def _paired(
    tags_a: pd.DataFrame, tags_b: pd.DataFrame, column: str, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    a = tags_a[tags_a.variant == "token"].set_index(["context_index", "seed"])[column]
    b = tags_b[tags_b.variant == "token"].set_index(["context_index", "seed"])[column]
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner")
    return joined["a"].to_numpy() >= threshold, joined["b"].to_numpy() >= threshold


def concept_distance(emb_a: np.ndarray, emb_b: np.ndarray) -> float:
    """1 - cosine of the two sets' mean (normalised) embeddings."""
    ma, mb = emb_a.mean(0), emb_b.mean(0)
    return float(1 - ma @ mb / (np.linalg.norm(ma) * np.linalg.norm(mb) + 1e-12))


def _embeddings(folder: Path, scores: pd.DataFrame, variant: str) -> np.ndarray | None:
    path = folder / rundir.EMBEDDINGS
    if not path.is_file():
        return None
    emb = np.load(path).astype(np.float32)
    return emb[(scores["variant"] == variant).to_numpy()]


def _token_cosine(fa: Path, fb: Path) -> float:
    from safetensors.numpy import load_file

    va = next(iter(load_file(str(fa / rundir.TOKEN)).values())).astype(np.float64)
    vb = next(iter(load_file(str(fb / rundir.TOKEN)).values())).astype(np.float64)
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb) + 1e-12))


def _cross_scores(folder: Path, scores: pd.DataFrame, target: int, classifier) -> float:
    """Accuracy of another classifier on this run's token images (read back from the PNGs)."""
    import torch
    from PIL import Image

    from .score import score_images

    files = scores.loc[scores.variant == "token", "file"].tolist()
    hits = []
    for i in range(0, len(files), 16):
        batch = [
            np.asarray(Image.open(folder / f).convert("RGB"), dtype=np.float32) / 255
            for f in files[i : i + 16]
        ]
        images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
        hits += [r["correct"] for r in score_images(classifier, images, target)]
    return float(np.mean(hits))


def compare(
    run_a: str | Path,
    run_b: str | Path,
    out: str | Path | None = None,
    alpha: float = ALPHA,
    min_effect: float = MIN_EFFECT,
    cross_score: bool = True,
    device: str = "cpu",
    classifiers: tuple | None = None,
) -> CompareResult:
    """Compare two finished runs; writes the tables and JSON to ``out`` (default beside run A).

    ``classifiers``: the two models in memory ``(a, b)`` for cross-scoring (needed when a run was audited
    with a model in memory; either may be None to load that run's classifier by its name)."""
    # 1. Check that the runs pair up
    for run in (run_a, run_b, *([out] if out is not None else [])):
        if not isinstance(run, (str, os.PathLike)):
            raise DctAuditError(f"compare() takes run folders (paths), not {run!r}")
    check_option("alpha", alpha)
    check_option("min_effect", min_effect)
    if classifiers is not None and not (isinstance(classifiers, (tuple, list)) and len(classifiers) == 2):
        raise DctAuditError("classifiers= must be a pair (a, b) of models in memory (either may be None)")
    ra, ma = _open(run_a)
    rb, mb = _open(run_b)
    classes = check_comparable(ma, mb, str(run_a), str(run_b))
    out_dir = Path(out) if out else ra.root.parent / f"compare-{ra.root.name}-vs-{rb.root.name}"
    thresholds = (ma.tagging or {}).get("thresholds", {})

    confirmed_a, confirmed_b = _confirmed_findings(ra.root), _confirmed_findings(rb.root)

    # 2. Optional cross-scoring models
    clf_a = clf_b = None
    if cross_score:
        from .adapters.classifier import load_classifier
        from .adapters.in_memory import wrap_classifier

        given = tuple(classifiers) if classifiers is not None else (None, None)
        clf_a, clf_b = (
            wrap_classifier(g, device=device)
            if g is not None
            else load_classifier(m.settings["classifier"], m.settings.get("labels"), device)
            for g, m in zip(given, (ma, mb), strict=True)
        )

    # 3. Per class: profiles, distances, cross-scores
    attr_rows, class_rows = [], []
    for c in classes:
        fa, fb = _class_folder(ra, c), _class_folder(rb, c)
        sa, sb = pd.read_csv(fa / rundir.SCORES), pd.read_csv(fb / rundir.SCORES)
        ta = pd.read_csv(fa / rundir.TAGS) if (fa / rundir.TAGS).is_file() else None
        tb = pd.read_csv(fb / rundir.TAGS) if (fb / rundir.TAGS).is_file() else None
        if ta is not None and tb is not None:
            for attr in [col for col in rundir.attribute_columns(ta.columns) if col in tb.columns]:
                a, b = _paired(ta, tb, attr, thresholds.get(attr, rundir.PRESENCE_THRESHOLD))
                r = paired_rates(a, b)
                attr_rows.append(
                    {
                        "class_index": c.index,
                        "class_name": c.name,
                        "attribute": attr,
                        "n_pairs": r.n,
                        "rate_a": r.rate_a,
                        "rate_b": r.rate_b,
                        "diff": r.diff,
                        "ci_low": r.ci_low,
                        "ci_high": r.ci_high,
                        "p_value": r.p_value,
                    }
                )
        ea, eb = _embeddings(fa, sa, "token"), _embeddings(fb, sb, "token")
        base = _embeddings(fa, sa, "baseline")
        row = {
            "class_index": c.index,
            "class_name": c.name,
            "accuracy_a": float(sa.loc[sa.variant == "token", "correct"].mean()),
            "accuracy_b": float(sb.loc[sb.variant == "token", "correct"].mean()),
            "token_cosine": _token_cosine(fa, fb),
        }
        if ea is not None and eb is not None and base is not None and len(base) >= 2:
            half = len(base) // 2
            row["concept_distance"] = concept_distance(ea, eb)
            row["reference_distance"] = concept_distance(base[:half], base[half:])
        if clf_a is not None:
            row["a_images_scored_by_b"] = _cross_scores(fa, sa, c.index, clf_b)
            row["b_images_scored_by_a"] = _cross_scores(fb, sb, c.index, clf_a)
        class_rows.append(row)

    # 4. FDR over all class x attribute tests, flags in either direction, ranking by divergence
    attributes = pd.DataFrame(attr_rows)
    flagged = []
    if len(attributes):
        attributes["q_value"] = benjamini_hochberg(attributes["p_value"].to_numpy())
        attributes["significant"] = (attributes["q_value"] < alpha) & (attributes["diff"].abs() >= min_effect)
        attributes["explained_by"] = [
            _explained_by(row, confirmed_a, confirmed_b) if row.significant else ""
            for row in attributes.itertuples()
        ]
        attributes["confirmed_in"] = [
            _confirmed_in(row, confirmed_a, confirmed_b) for row in attributes.itertuples()
        ]
        if confirmed_a is None and confirmed_b is None:  # neither run has counterfactual evidence
            attributes["flagged"] = attributes["significant"]
        else:
            # a difference of the tokens explained by a confirmed finding, or a dependence only one of the
            # two classifiers has (its counterfactual check confirms it, the other's does not), whether or not
            # the tokens happened to differ on it
            only = attributes["confirmed_in"].isin(["a", "b"])
            attributes.loc[only & (attributes["explained_by"] == ""), "explained_by"] = attributes[
                "confirmed_in"
            ]
            attributes["flagged"] = attributes["explained_by"] != ""
        flagged = attributes[attributes["flagged"]].to_dict("records")
    table = pd.DataFrame(class_rows)
    n_flags = {i: sum(1 for f in flagged if f["class_index"] == i) for i in table["class_index"]}
    table["flagged_attributes"] = table["class_index"].map(n_flags)
    if "concept_distance" in table:
        table["divergence"] = table["concept_distance"] / table["reference_distance"].clip(lower=1e-6)
    else:
        table["divergence"] = 1 - table["token_cosine"]
    table = table.sort_values(["flagged_attributes", "divergence"], ascending=False).reset_index(drop=True)

    # 5. Write
    rundir.write_csv(out_dir / "classes.csv", table)
    rundir.write_csv(out_dir / "attributes.csv", attributes)
    rundir.write_json(
        out_dir / "compare.json",
        {
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "run_a": {"path": str(ra.root), "classifier": ma.settings["classifier"]},
            "run_b": {"path": str(rb.root), "classifier": mb.settings["classifier"]},
            "alpha": alpha,
            "min_effect": min_effect,
            "flagged": flagged,
            "classes": table.to_dict("records"),
        },
    )
    from .report.compare import render_compare

    render_compare(out_dir)
    return CompareResult(out_dir, table, attributes, flagged)
