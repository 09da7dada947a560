"""Confirmation rules re-decided on the truth benchmark's stored scores: how many planted biases each finds,
and how many unplanted attributes it confirms.

The counterfactual check scores the plain class prompt with every attribute and every replacement on the
same seeds and caches the scores (``counterfactual/<class folder>.json`` at each run's root), so another
rule can be tried on the same images without generating anything (seconds). Rules compared:

- ``current``: every effective replacement lowers the target probability (interval above 0), one is not
  confounded, and the interval of the smallest change starts at or above 0.10 (``check.confirmed``);
- ``current, or brought in by the token and dependent``: a flagged attribute needs only the dependence
  (every interval above 0); tried on seeds 41 and 43, not adopted (README);
- ``all but one``: the same dependence, and the interval of the second-smallest change starts at or above
  0.20 (one close alternative may stand in for the value; tried after seed 31, not adopted: README);
- the same dependence, with the 0.10 test on the point estimate of the smallest change instead;
- the same dependence, with the smallest change's interval starting at or above 0.05;
- the same dependence, with the 0.10 / 0.20 test on the change against the mean of the effective
  replacements (pooled) instead of the smallest one;
- the same dependence, with the second-smallest change's interval from 0.10 or 0.30.

    python benchmarks/bench_confirm_rules.py bench-truth-11 bench-truth-13 bench-truth-17 [--shipped RUN_DIR]

``--shipped`` adds a demo run of the shipped biased classifier (its truth: ``world.truth.PLANTED``).
Truth per world comes from ``worlds.csv`` (planted value, and whether the classifier relies on it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from bench_confirm_seeds import runs_with_truth  # benchmarks/ is on the path of a script run from it

from dct_audit import rundir
from dct_audit.check import attribute_effect, confirmed
from dct_audit.stats import mean_diff_ci
from dct_audit.tag import load_vocabulary
from dct_audit.world import truth as T
from dct_audit.world.paths import ATTRIBUTES_FILE


def rows_of_run(run: Path, planted: dict, world: str, vocabulary) -> list[dict]:
    rows = []
    enrichment = pd.read_csv(run / rundir.ENRICHMENT)
    f = enrichment[enrichment["flagged"]]
    flagged = set(zip(f["class_name"], f["attribute"], strict=True))
    for file in sorted((run / rundir.COUNTERFACTUAL_DIR).glob("*.json")):
        if file.name == rundir.ASSOCIATION:  # the association stage's cache, not a class's check
            continue
        cls = file.stem.split("-", 1)[1]
        sweep = json.loads(file.read_text())["prompts"]
        for a in vocabulary.attributes:
            if a.absence or a.with_context not in sweep:
                continue
            e = attribute_effect(a, vocabulary, sweep, cls)
            effective = {r["name"] for r in e["replacements"] if r["effective"]}
            reps = [np.array(sweep[t]["probs"]) for n, t in vocabulary.replacements(a) if n in effective]
            with_probs = np.array(sweep[a.with_context]["probs"])
            pooled, pooled_low, _ = mean_diff_ci(with_probs, np.mean(reps, 0)) if reps else (np.nan,) * 3
            rows.append(
                {
                    "world": world,
                    "control": not planted,
                    "class": cls,
                    "attribute": a.name,
                    "planted": (cls, a.name) in planted,
                    "relies": planted.get((cls, a.name), False),
                    "depends": e["depends"],
                    "flagged": (cls, a.name) in flagged,
                    "worst": e["diff"],
                    "worst_low": e["ci_low"],
                    "pooled_low": pooled_low,
                    "current": confirmed(e),
                    "second_low": (
                        sorted(r["ci_low"] for r in e["replacements"] if r["effective"]) + [np.nan] * 2
                    )[1],
                }
            )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="output folders of bench_truth.py")
    p.add_argument("--shipped", default=None, help="a demo run of the shipped biased classifier")
    p.add_argument("--out", default="benchmarks/results/bench_confirm_rules.md")
    args = p.parse_args(argv)
    vocabulary = load_vocabulary(str(ATTRIBUTES_FILE))
    rows = []
    for label, run, planted, _ in runs_with_truth(args.folders, None):
        if (run / rundir.COUNTERFACTUAL_DIR).is_dir():
            rows += rows_of_run(run, planted, label, vocabulary)
    if args.shipped:
        planted = {(b.cls, b.value): True for b in T.PLANTED}
        rows += rows_of_run(Path(args.shipped), planted, "shipped", vocabulary)
    df = pd.DataFrame(rows)
    d = df["depends"]
    rules = {
        "current: smallest change, interval from 0.10": df["current"],
        "current, or brought in by the token and dependent (every interval above 0)": df["current"]
        | (df["flagged"] & d),
        "all but one: second-smallest change, interval from 0.20": d & (df["second_low"] >= 0.20),
        "smallest change, point estimate >= 0.10": d & (df["worst"] >= 0.10),
        "smallest change, interval from 0.05": d & (df["worst_low"] >= 0.05),
        "pooled change, interval from 0.10": d & (df["pooled_low"] >= 0.10),
        "pooled change, interval from 0.20": d & (df["pooled_low"] >= 0.20),
        "second-smallest change, interval from 0.10": d & (df["second_low"] >= 0.10),
        "second-smallest change, interval from 0.30": d & (df["second_low"] >= 0.30),
    }
    relied = df["relies"]
    lines = [
        f"# Confirmation rules on stored scores ({', '.join(Path(f).name for f in args.folders)}"
        + (", shipped" if args.shipped else "")
        + ")",
        "",
        f"{df['world'].nunique()} runs, {len(df)} class x attribute checks, {int(relied.sum())} relied-on "
        "planted biases with stored scores.",
        "",
        "| rule | relied-on found | unplanted confirmed (on controls) |",
        "|---|---|---|",
    ]
    for name, c in rules.items():
        false = c & ~df["planted"]
        lines.append(
            f"| {name} | {int((c & relied).sum())}/{int(relied.sum())} | "
            f"{int(false.sum())} ({int((false & df['control']).sum())}) |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
