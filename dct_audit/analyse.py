"""Analysis: which attributes the learned token brings in far more often than the baseline prompt.

Per class and attribute, the token image and the baseline image of each (context, seed) form a pair.
The exact McNemar test on the discordant pairs gives a p-value, Benjamini-Hochberg over every
class x attribute test of the run gives q-values, and the paired difference of rates with its
Agresti-Min interval is the effect size. A finding is flagged when ``q < alpha`` and the effect is at
least ``min_effect`` (defaults 0.05 and 0.25: a context that appears in at least a quarter more of the
token's images than of the baseline's, at a 5% false discovery rate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import rundir
from .association import association_sweep, check_associations, subjects_for
from .check import check_class, class_specific, confirmed, counterfactual_sweep, is_open
from .generate import eval_seeds
from .options import ALPHA, MIN_EFFECT  # noqa: F401  (the defaults live with the options)
from .stats import benjamini_hochberg, paired_rates

if TYPE_CHECKING:
    from .pipeline import Models, RunOptions
    from .resolve import ResolvedClass
    from .tag import Vocabulary


# the columns class_enrichment gives; flag_findings adds q_value and flagged (``rundir.ENRICHMENT_COLUMNS``)
ENRICHMENT_COLUMNS = list(rundir.ENRICHMENT_COLUMNS[: rundir.ENRICHMENT_COLUMNS.index("p_value") + 1])


def paired_presence(tags: pd.DataFrame, attribute: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Presence of ``attribute`` in token and baseline images, aligned by (context_index, seed)."""
    wide = tags.pivot_table(
        index=["context_index", "seed"], columns="variant", values=attribute, aggfunc="first"
    )
    wide = wide.dropna()
    return (wide["token"].to_numpy() >= threshold), (wide["baseline"].to_numpy() >= threshold)


def class_enrichment(
    tags: pd.DataFrame,
    class_index: int,
    class_name: str,
    attributes: list[tuple[str, str]],
    thresholds: dict[str, float],
) -> pd.DataFrame:
    """One row per attribute: rates with the token and at baseline, paired difference, CI, exact p."""
    rows = []
    for name, group in attributes:
        a, b = paired_presence(tags, name, thresholds.get(name, rundir.PRESENCE_THRESHOLD))
        r = paired_rates(a, b)
        rows.append(
            {
                "class_index": class_index,
                "class_name": class_name,
                "attribute": name,
                "group": group,
                "n_pairs": r.n,
                "token_rate": r.rate_a,
                "baseline_rate": r.rate_b,
                "diff": r.diff,
                "ci_low": r.ci_low,
                "ci_high": r.ci_high,
                "p_value": r.p_value,
            }
        )
    return pd.DataFrame(rows, columns=ENRICHMENT_COLUMNS)


def flag_findings(
    enrichment: pd.DataFrame, alpha: float = ALPHA, min_effect: float = MIN_EFFECT
) -> pd.DataFrame:
    """Add ``q_value`` (BH over all rows) and ``flagged``; rows sorted by class, then effect."""
    out = enrichment.copy()
    out["q_value"] = benjamini_hochberg(out["p_value"].to_numpy())
    out["flagged"] = (out["q_value"] < alpha) & (out["diff"] >= min_effect)
    return out.sort_values(["class_index", "diff"], ascending=[True, False]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------
# The run's analysis: enrichment over every class, then the counterfactual check (``check.py``)
# ----------------------------------------------------------------------------------------------------


def analyse_run(
    run_dir: rundir.RunDir,
    targets: list[ResolvedClass],
    vocabulary: Vocabulary,
    ensure_models: Callable[[], Models],
    opts: RunOptions,
    batch: int,
) -> list[dict]:
    """Enrichment of every class x attribute, BH over all of them, then the counterfactual check.

    The check compares the plain class prompt with an attribute against the same prompt with each of its
    replacements, on the same seeds (``counterfactual_sweep``). With ``opts.confirm == "all"`` every
    non-absence attribute of the vocabulary is checked, so a bias the token did not bring in is still
    confirmed (such findings carry ``source: "sweep"``); with ``"flagged"`` only the token's flagged ones.
    A finding is every flagged attribute plus every confirmed or open one (``check.is_open``: the check
    could neither confirm nor rule out a dependence). Writes ``enrichment.csv`` and
    ``findings.json`` at the run's root. The prompts' scores are cached per class at the run's root
    (``counterfactual/<class folder>.json``; a finished class folder is never written again), so a
    resumed run only generates what is missing.
    """
    thresholds = vocabulary.presence_thresholds()
    attrs = [(a.name, a.group) for a in vocabulary.attributes]
    tables = []
    for c in targets:
        tags = pd.read_csv(run_dir.class_dir(c.index, c.name) / rundir.TAGS)
        tables.append(class_enrichment(tags, c.index, c.name, attrs, thresholds))
    enrichment = flag_findings(pd.concat(tables, ignore_index=True), opts.alpha, opts.min_effect)
    rundir.write_csv(run_dir.root / rundir.ENRICHMENT, enrichment)

    seeds = eval_seeds(opts.seed, opts.confirm_seeds)
    more = eval_seeds(opts.seed, opts.confirm_max_seeds) if opts.confirm_max_seeds else None
    # 1. The check of every class; 2. the association stage of what it would confirm, one sweep for all
    checks, candidates = {}, {}
    for cls in targets:
        rows = enrichment[enrichment["class_index"] == cls.index]
        flagged = set(rows.loc[rows["flagged"], "attribute"])
        checked = [
            a for a in vocabulary.attributes if not a.absence and (opts.confirm == "all" or a.name in flagged)
        ]
        folder = run_dir.class_dir(cls.index, cls.name)
        cache = run_dir.root / rundir.COUNTERFACTUAL_DIR / f"{folder.name}.json"

        def sweep_on(prompts, at, cls=cls, cache=cache):
            return counterfactual_sweep(ensure_models, cache, cls, prompts, at, opts, batch)

        checks[cls.index] = check_class(checked, vocabulary, cls.name, sweep_on, seeds, more, opts.adjust)
        if found := [a for a in checked if confirmed(checks[cls.index][a.name])]:
            candidates[cls.index] = found
    if not opts.association:
        candidates = {}
    association_cache = run_dir.root / rundir.COUNTERFACTUAL_DIR / rundir.ASSOCIATION
    subjects = {
        c.index: subjects_for(c, targets, lambda: ensure_models().classifier.labels.names, association_cache)
        for c in targets
        if c.index in candidates
    }

    def associate_on(texts, indices):
        return association_sweep(
            ensure_models, association_cache, texts, seeds, indices, opts, batch, subjects
        )

    check_associations(candidates, checks, vocabulary, subjects, associate_on)

    # 3. The findings: every flagged attribute, and every one the check confirms, leaves open or finds specific
    findings = []
    for cls in targets:
        rows = enrichment[enrichment["class_index"] == cls.index]
        cfs = checks[cls.index]
        folder = run_dir.class_dir(cls.index, cls.name)
        attribution = (
            rundir.read_json(folder / rundir.ATTRIBUTION) if (folder / rundir.ATTRIBUTION).is_file() else {}
        )
        for row in rows.itertuples():
            attribute = vocabulary.attributes[vocabulary.names.index(row.attribute)]
            cf = cfs.get(row.attribute)
            is_confirmed = confirmed(cf, attribute.absence)
            undecided = is_open(cf, attribute.absence)
            if not (row.flagged or is_confirmed or undecided or class_specific(cf)):
                continue
            findings.append(
                rundir.Finding(
                    class_index=cls.index,
                    class_name=cls.name,
                    attribute=row.attribute,
                    group=row.group,
                    # "token": the token brings it in (flagged); "sweep": not flagged, but the counterfactual
                    # check of every attribute found that the classifier depends on it (or could not rule it out)
                    source="token" if row.flagged else "sweep",
                    flagged=bool(row.flagged),
                    token_rate=row.token_rate,
                    baseline_rate=row.baseline_rate,
                    effect=row.diff,
                    ci=[row.ci_low, row.ci_high],
                    p=row.p_value,
                    q=row.q_value,
                    counterfactual=cf,
                    # an absence attribute ("plain background") says the token removes other contexts
                    absence=attribute.absence,
                    # the classifier's confidence depends on the attribute against every replacement, with
                    # the interval of the smallest change at or above CONFIRM_MIN_CHANGE
                    confirmed=is_confirmed,
                    # every replacement lowers the confidence, but the seeds leave it open whether by 0.10
                    open=undecided,
                    attribution_outside_object=attribution.get("outside_object"),
                    overlays=[f"classes/{folder.name}/{p}" for p in attribution.get("overlays", [])],
                )
            )
    rundir.write_findings(run_dir.root, findings)
    return [f.to_dict() for f in findings]
