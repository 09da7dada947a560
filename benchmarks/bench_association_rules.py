"""Association rules re-decided on the truth benchmark's stored scores: how many of the attributes the check
would confirm each rule keeps, planted against unplanted.

The association stage (``dct_audit/association.py``) draws every attribute the check would confirm with five
other classes as subjects, with the attribute and with each replacement that removed it in the check, and
caches the classifier's probabilities (``counterfactual/association.json``), so another rule can be tried on
the same images without generating anything (seconds). Every rule asks the same of each effective
replacement, paired by subject and seed (40 pairs), and keeps the attribute when every replacement passes:

- ``probability``: the class's probability with the attribute minus with the replacement, 95% interval
  above 0 (the stage's rule, ``association.association_effect``);
- ``log-odds``: the same on the log-odds of the class (each pair's probabilities clipped to [1e-6, 1 - 1e-6]);
- ``Wilcoxon``: the signed-rank test of the paired probabilities, one-sided p < 0.025;
- ``sign``: the share of pairs where the attribute's image scores higher, binomial one-sided p < 0.025.

    python benchmarks/bench_association_rules.py BENCH_TRUTH_FOLDERS... [--out benchmarks/results/...md]

Truth per world comes from each folder's ``worlds.csv`` (planted value, and whether the classifier relies on
it). Writes the table to ``--out`` and every attribute's row next to it (``.csv``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from bench_confirm_seeds import runs_with_truth  # benchmarks/ is on the path of a script run from it
from scipy import stats

from dct_audit import rundir
from dct_audit.stats import mean_diff_ci
from dct_audit.tag import load_vocabulary
from dct_audit.world.paths import ATTRIBUTES_FILE


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


RULES = {
    "probability": lambda w, o: mean_diff_ci(w, o)[1] > 0,
    "log-odds": lambda w, o: mean_diff_ci(_logit(w), _logit(o))[1] > 0,
    "Wilcoxon": lambda w, o: (
        bool(np.any(w != o)) and stats.wilcoxon(w, o, alternative="greater").pvalue < 0.025
    ),
    "sign": lambda w, o: (
        bool(np.any(w != o))
        and stats.binomtest(int((w > o).sum()), int((w != o).sum()), 0.5, alternative="greater").pvalue
        < 0.025
    ),
}


def rows_of_run(run: Path, planted: dict, world: str, vocabulary) -> list[dict]:
    """One row per attribute the association stage ran for in ``run``, with each rule's verdict."""
    cache = rundir.read_json(run / rundir.COUNTERFACTUAL_DIR / rundir.ASSOCIATION)["prompts"]
    by_name = {a.name: a for a in vocabulary.attributes}
    rows = []
    for f in rundir.read_json(run / rundir.FINDINGS):
        cf = f.get("counterfactual") or {}
        assoc = cf.get("association")
        if not assoc:
            continue
        a, index = by_name[f["attribute"]], str(f["class_index"])

        def probs(template, subjects=assoc["subjects"], i=index):
            return np.concatenate([cache[template.format(s)]["probs"][i] for s in subjects])

        kept = {r["name"] for r in assoc["replacements"]}
        others = [probs(t) for n, t in vocabulary.replacements(a) if n in kept]
        w = probs(a.with_context)
        key = (f["class_name"], f["attribute"])
        row = {
            "world": world,
            "class": key[0],
            "attribute": key[1],
            "planted": key in planted,
            "relies": planted.get(key, False),
            "with_prob": round(float(w.mean()), 4),
            "stored": bool(assoc["associated"]),
        }
        for name, rule in RULES.items():
            row[name] = bool(others) and all(rule(w, o) for o in others)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="output folders of bench_truth.py")
    p.add_argument("--out", default="benchmarks/results/bench_association_rules.md")
    args = p.parse_args(argv)
    vocabulary = load_vocabulary(str(ATTRIBUTES_FILE))
    rows = []
    for label, run, planted, _ in runs_with_truth(args.folders, None):
        if (run / rundir.COUNTERFACTUAL_DIR / rundir.ASSOCIATION).is_file() and (
            run / rundir.FINDINGS
        ).is_file():
            rows += rows_of_run(run, planted, label, vocabulary)
    df = pd.DataFrame(rows)
    if df.empty:
        print("no run with an association stage in these folders", file=sys.stderr)
        return 1
    if not (df["probability"] == df["stored"]).all():  # the recomputation must agree with the stage
        print("warning: the probability rule differs from the stored verdicts", file=sys.stderr)
    n_planted, n_relied = int(df["planted"].sum()), int(df["relies"].sum())
    n_unplanted = int((~df["planted"]).sum())
    lines = [
        f"# Association rules on stored scores ({', '.join(Path(f).name for f in args.folders)})",
        "",
        f"`python benchmarks/bench_association_rules.py {' '.join(args.folders)}`",
        "",
        f"{df['world'].nunique()} runs, {len(df)} attributes the check would confirm: {n_planted} planted "
        f"({n_relied} relied on), {n_unplanted} unplanted.",
        "",
        "| rule | planted kept | relied-on kept | unplanted kept | precision |",
        "|---|---|---|---|---|",
    ]
    for name in RULES:
        c = df[name]
        tp, fp = int((c & df["planted"]).sum()), int((c & ~df["planted"]).sum())
        precision = tp / (tp + fp) if tp + fp else math.nan
        lines.append(
            f"| {name} | {tp}/{n_planted} | {int((c & df['relies']).sum())}/{n_relied} | "
            f"{fp}/{n_unplanted} | {precision:.3f} |"
        )
    lines += ["", "Attributes where the rules disagree, or that are unplanted:", ""]
    lines += ["| world | class | attribute | planted | relied on | " + " | ".join(RULES) + " |"]
    lines += ["|---" * (5 + len(RULES)) + "|"]
    split = df[~df["planted"] | (df[list(RULES)].nunique(axis=1) > 1)]
    for r in split.to_dict("records"):
        verdicts = " | ".join("kept" if r[n] else "no" for n in RULES)
        lines.append(
            f"| {r['world']} | {r['class']} | {r['attribute']} | {r['planted']} | {r['relies']} | {verdicts} |"
        )
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    df.to_csv(out.with_suffix(".csv"), index=False)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
