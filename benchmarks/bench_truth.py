"""Truth benchmark: does the audit find planted biases it was never tuned on?

Draws ``--worlds`` random planted sets (1-3 classes each; a background, a colour or a context object; strength
0.9 or 0.99; planted values never shown with the other classes), trains one biased world classifier per set
plus ``--controls`` unbiased ones, measures each classifier's reliance on its planted values
(``dct_audit.world.classifiers.measure_reliance``), audits every classifier as ``dct-audit demo --classifier
FOLDER`` does (the demo's settings with the thorough check, ``demo.THOROUGH``; ``--no-thorough``: the shipped
demo's 8-seed check) and scores the *confirmed* findings against the truth.

    python benchmarks/bench_truth.py --worlds 8 --seed 1 [--steps 200] [--controls 2] [--no-thorough] [--out DIR]

Reliance: a classifier relies on a planted value when adding the value to its own class's scenes raises the
class's probability by at least ``RELIES_MIN`` (0.2) on 300 paired procedural scenes (with and without the
value, no other planted value shown). A value it does not rely on gives the class token nothing to gain, so
recall is reported over all planted biases and over the relied-on ones.

Per planted bias it also reports what the generator drew, judged by the world's independent attribute
checker (a CNN trained on true labels, not the tagger): the share of the class's token and baseline images
that show the planted value, and the token images' accuracy. A missed bias whose value the token never
drew is a limit of the inversion (or of the generator); one drawn but not confirmed is a limit of the
analysis.

Writes ``OUT/worlds.csv`` (one row per planted bias and per control), ``OUT/summary.md`` (the tables below)
and prints them. Classifiers and runs are kept under OUT and reused when rerun with the same arguments
(finished classes are not redone), so a rerun only re-scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dct_audit.demo import DEMO_SETTINGS, THOROUGH, audit_world_classifier
from dct_audit.world.classifiers import ClassifierTrainConfig, remeasure, train_classifier
from dct_audit.world.truth import PlantedSet, random_planted_set


def train(folder: Path, planted: PlantedSet | None, seed: int, steps: int) -> dict:
    """Train (or reuse) one world classifier; returns its measured reliance."""
    spec = planted.spec() if planted else ""
    record = folder / "training.json"
    if record.is_file():
        old = json.loads(record.read_text())
        if old.get("spec", "") == spec and old["train"]["steps"] == steps and "reliance" in old:
            return old["reliance"]
    tc = ClassifierTrainConfig(planted=spec, seed=seed, data_seed=100_000 + seed, steps=steps)
    train_classifier(folder, tc, eval_n=0, log=lambda m: None)
    return remeasure(folder)


def audit(
    folder: Path, runs: Path, thorough: bool, overrides: dict, models: dict
) -> tuple[dict, float, Path]:
    t0 = time.perf_counter()
    result = audit_world_classifier(
        str(folder), str(runs), quiet=True, thorough=thorough, **overrides, **models
    )
    return result["truth"], time.perf_counter() - t0, Path(result["run"].run_dir)


@torch.no_grad()
def drawn(run_dir: Path, cls: str, attribute: str, value: str, checker) -> tuple[float, float, float]:
    """Judged by the independent attribute checker (not the tagger): the share of the class's token and
    baseline images that show the planted value, and the token images' accuracy for the class (the
    generator's response to the token)."""
    from PIL import Image

    folder = next((run_dir / "classes").glob(f"*-{cls}"))
    scores = pd.read_csv(folder / "scores.csv")
    images = np.stack([np.asarray(Image.open(folder / f).convert("RGB")) for f in scores["file"]])
    names = checker.predict_names(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    shows = np.array([n[attribute] == value for n in names])
    token = (scores["variant"] == "token").to_numpy()
    return float(shows[token].mean()), float(shows[~token].mean()), float(scores.loc[token, "correct"].mean())


def summarise(rows: pd.DataFrame, controls: pd.DataFrame) -> str:
    planted = rows
    relied = planted[planted["relies"]]
    lines = ["| measure | value |", "|---|---|"]

    def frac(a, b):
        return f"{a}/{b} = {a / b:.2f}" if b else "n/a"

    conf = int(planted.groupby("world")["n_confirmed"].first().sum())
    false = int(planted.groupby("world")["false_confirmations"].first().sum())
    conf_t = int(planted.groupby("world")["n_confirmed_token"].first().sum())
    false_t = int(planted.groupby("world")["false_confirmations_token"].first().sum())
    learned = int(planted.groupby("world")["learned_unplanted"].first().sum())
    lines += [
        f"| recall, planted biases the classifier relies on | {frac(int(relied['found'].sum()), len(relied))} |",
        "| recall, relied on, confirmed *and brought in by the token* (what `--confirm flagged` finds) | "
        f"{frac(int(relied['found_by_token'].sum()), len(relied))} |",
        f"| precision of those (`--confirm flagged`) | {frac(conf_t - false_t, conf_t)} |",
        f"| recall, all planted biases | {frac(int(planted['found'].sum()), len(planted))} |",
        f"| precision of confirmed findings (biased classifiers) | {frac(conf - false, conf)} |",
        "| precision, counting as true the unplanted cues the classifier relies on (reliance >= 0.2) | "
        f"{frac(conf - false + learned, conf)} |",
        f"| confirmed findings on unbiased controls | {int(controls['n_confirmed'].sum())} in {len(controls)} controls |",
    ]
    if "open" in planted:  # findings the check left open (neither confirmed nor ruled out)
        missed = relied[~relied["found"]]
        n_open = int(planted.groupby("world")["n_open"].first().sum())
        n_open_planted = int(planted.groupby("world")["n_open_planted"].first().sum())
        lines += [
            f"| relied-on biases missed, of them left open by the check | {int(missed['open'].sum())} of {len(missed)} |",
            f"| findings left open (biased classifiers), planted of them | {n_open_planted} of {n_open} |",
            f"| findings left open on unbiased controls | {int(controls['n_open'].sum())} in {len(controls)} controls |",
        ]
    if "specific" in planted:  # the association stage: a dependence of the class's own images only
        n_spec = int(planted.groupby("world")["n_specific"].first().sum())
        n_spec_planted = int(planted.groupby("world")["n_specific_planted"].first().sum())
        lines += [
            f"| relied-on biases the association stage did not confirm | {int(relied['specific'].sum())} of {len(relied)} |",
            f"| dependences of a class's own images only (biased classifiers), planted of them | {n_spec_planted} of {n_spec} |",
            f"| dependences of a class's own images only on unbiased controls | {int(controls['n_specific'].sum())} in {len(controls)} controls |",
        ]
    lines += [
        "",
        "| attribute type | planted | relied on | found (all) | found (relied on) |",
        "|---|---|---|---|---|",
    ]
    for attr, g in planted.groupby("attribute"):
        r = g[g["relies"]]
        lines.append(
            f"| {attr} | {len(g)} | {len(r)} | {frac(int(g['found'].sum()), len(g))} | "
            f"{frac(int(r['found'].sum()), len(r))} |"
        )
    lines += ["", "| reliance (class probability gain) | planted | found |", "|---|---|---|"]
    bins = [
        (-1, 0.2, "< 0.2 (does not rely)"),
        (0.2, 0.5, "0.2 - 0.5"),
        (0.5, 0.9, "0.5 - 0.9"),
        (0.9, 2, ">= 0.9"),
    ]
    for lo, hi, label in bins:
        g = planted[(planted["reliance"] >= lo) & (planted["reliance"] < hi)]
        lines.append(f"| {label} | {len(g)} | {frac(int(g['found'].sum()), len(g))} |")
    lines += [
        "",
        "| world | planted bias | reliance | token accuracy | drawn: token vs baseline | flagged | confirmed |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in planted.iterrows():
        lines.append(
            f"| {r['world']} | {r['planted']} | {r['reliance']:.2f} | {r['token_accuracy']:.2f} | "
            f"{r['drawn_token']:.2f} vs {r['drawn_baseline']:.2f} | {'yes' if r['flagged'] else 'no'} | "
            f"{('**yes**' if r['found_by_token'] else '**yes** (check only)') if r['found'] else 'open' if r.get('open') else 'no'} |"
        )
    lines += ["", "| world | confirmed findings (false) | audit s |", "|---|---|---|"]
    for w, g in planted.groupby("world", sort=True):
        lines.append(
            f"| {w} | {int(g['n_confirmed'].iloc[0])} ({int(g['false_confirmations'].iloc[0])}) | {g['audit_s'].iloc[0]:.0f} |"
        )
    for _, c in controls.iterrows():
        lines.append(
            f"| {c['world']} (unbiased control) | {int(c['n_confirmed'])} ({int(c['n_confirmed'])}) | {c['audit_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, default=8)
    p.add_argument("--seed", type=int, default=1, help="draws the planted sets and the classifiers' seeds")
    p.add_argument("--controls", type=int, default=2, help="unbiased classifiers audited as controls")
    p.add_argument("--steps", type=int, default=200, help="classifier training steps (shipped: 400)")
    p.add_argument("--out", default="bench-truth")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--override", default="{}", help="JSON of audit settings replacing the demo's")
    p.add_argument(
        "--no-thorough", action="store_true", help="the shipped demo's check (8 seeds, unadjusted)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.override)
    out = Path(args.out)
    rng = np.random.default_rng(args.seed)
    thorough = not args.no_thorough
    settings = {**DEMO_SETTINGS, **(THOROUGH if thorough else {}), **overrides}
    print(f"audit settings: {json.dumps(settings)}", flush=True)
    from dct_audit.world.checker import AttributeChecker

    checker = AttributeChecker.from_pretrained().eval()
    # one loaded generator and tagger for every audit: the generator's memo keeps the images of token-free
    # prompts (baseline grids, counterfactual prompts), the same for every classifier (README "Python API")
    from dct_audit.adapters.generator_load import load_generator
    from dct_audit.demo import world_models
    from dct_audit.tag import load_tagger

    models = {
        "generator": load_generator(world_models()["generator"], "cpu"),
        "tagger": load_tagger("world", "cpu"),
    }
    rows, controls = [], []
    jobs = [(f"w{args.seed}-{w}", random_planted_set(rng)) for w in range(args.worlds)]
    jobs += [(f"c{args.seed}-{k}", None) for k in range(args.controls)]
    for j, (name, planted) in enumerate(jobs):
        folder = out / "classifiers" / name
        t0 = time.perf_counter()
        train(folder, planted, seed=args.seed * 1000 + j, steps=args.steps)
        train_s = time.perf_counter() - t0
        score, audit_s, run_dir = audit(folder, out / "runs", thorough, overrides, models)
        if planted is None:
            controls.append(
                {
                    "world": name,
                    "n_confirmed": score["n_confirmed"],
                    "n_open": len(score.get("open") or []),
                    "n_specific": len(score.get("specific") or []),
                    "audit_s": audit_s,
                    "train_s": train_s,
                }
            )
            print(
                f"{name}: unbiased control, {score['n_confirmed']} confirmed finding(s) ({audit_s:.0f} s)",
                flush=True,
            )
            continue
        for r in score["planted"]:
            token_rate, baseline_rate, token_acc = drawn(
                run_dir, r["cls"], r["attribute"], r["value"], checker
            )
            rows.append(
                {
                    "world": name,
                    **{
                        k: r[k]
                        for k in (
                            "planted",
                            "cls",
                            "attribute",
                            "value",
                            "strength",
                            "reliance",
                            "relies",
                            "flagged",
                            "found",
                            "found_by_token",
                        )
                    },
                    "open": bool(r.get("open")),  # not confirmed, left open by the check
                    "n_open": len(score.get("open") or []),
                    "n_open_planted": sum(o["planted"] for o in score.get("open") or []),
                    # the class's own images only (the association stage): not confirmed
                    "specific": bool(r.get("specific")),
                    "n_specific": len(score.get("specific") or []),
                    "n_specific_planted": sum(o["planted"] for o in score.get("specific") or []),
                    "drawn_token": token_rate,
                    "drawn_baseline": baseline_rate,
                    "token_accuracy": token_acc,
                    "n_confirmed": score["n_confirmed"],
                    "false_confirmations": score["false_confirmations"],
                    "n_confirmed_token": score["n_confirmed_token"],
                    "false_confirmations_token": score["false_confirmations_token"],
                    # unplanted confirmations the classifier relies on all the same (measured by the audit)
                    "learned_unplanted": score.get("learned_unplanted") or 0,
                    "audit_s": audit_s,
                    "train_s": train_s,
                }
            )
        print(
            f"{name}: {planted.spec()}: found {score['found']}/{score['n_planted']}, "
            f"{score['n_confirmed']} confirmed ({score['false_confirmations']} false), "
            f"reliance {[round(r['reliance'], 2) for r in score['planted']]} ({audit_s:.0f} s)",
            flush=True,
        )
    table, ctrl = (
        pd.DataFrame(rows),
        pd.DataFrame(
            controls, columns=["world", "n_confirmed", "n_open", "n_specific", "audit_s", "train_s"]
        ),
    )
    pd.concat([table, ctrl.assign(planted="(control)")], ignore_index=True).to_csv(
        out / "worlds.csv", index=False
    )
    text = summarise(table, ctrl)
    (out / "summary.md").write_text(
        f"`python benchmarks/bench_truth.py --worlds {args.worlds} --seed {args.seed} --controls {args.controls} "
        f"--steps {args.steps}"
        + (" --no-thorough" if args.no_thorough else "")
        + (f" --override '{args.override}'" if overrides else "")
        + f"`\n\n{text}\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
