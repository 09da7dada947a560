"""More seeds for the counterfactual check: how many more planted biases would it confirm, and what else?

The check scores the plain class prompt with each attribute and with each of its replacements on
``--confirm-seeds`` seeds (8) and confirms when the smallest change's interval starts at >= 0.10. The weak
plants the truth benchmark misses look like a question of power. This script re-runs the check of every
class x (non-absence) attribute of the truth benchmark's runs (and of the shipped demo's runs) on 32 seeds
(the first 8 are the audit's own, so the 8-seed numbers are the audit's), and decides with the first 8, 16,
24 and 32 seeds, and adaptively as the audit does with ``--confirm-max-seeds 32`` (8 seeds, then 32 for the
attributes the 8 leave open: ``check.check_class``), each also adjusted for what else the generator drew (``check.class_response``, ``--adjust``), and with looser bars on the
adjusted change. Every confirmation of
an attribute that was not planted is then measured on procedural scenes (``measure_reliance``: the class's
probability with the value minus without it, 300 paired scenes): near 0 means the classifier does not rely
on it in its own world, so the dependence on generated images comes from what the generator draws with it.

Every run uses the same generator, class names, prompts and seeds, so the images are made once (the
generator's memo) and only the classifiers differ: about 3 minutes on 2 cores for 42 runs, plus the
reliance measurements.

    python benchmarks/bench_confirm_seeds.py BENCH_TRUTH_FOLDERS... [--shipped DEMO_DIR]

``DEMO_DIR``: the ``--out`` of ``dct-audit demo`` (its ``demo-biased`` run is scored against the shipped
truth, ``demo-unbiased`` as a control). Writes ``benchmarks/results/bench_confirm_seeds.{md,csv}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from dct_audit.adapters.classifier import load_classifier
from dct_audit.adapters.generator_load import load_generator
from dct_audit.adapters.in_memory import wrap_generator
from dct_audit.check import (
    attribute_effect,
    check_class,
    class_response,
    confirmed,
    counterfactual_sweep,
    on_seeds,
)
from dct_audit.generate import eval_seeds
from dct_audit.pipeline import Models
from dct_audit.resolve import ResolvedClass
from dct_audit.tag import AttributeBank, load_tagger, load_vocabulary
from dct_audit.world import scenes as S
from dct_audit.world import truth as T
from dct_audit.world.classifiers import measure_reliance
from dct_audit.world.paths import ATTRIBUTES_FILE, GENERATOR

SEEDS = (8, 16, 24, 32)


def runs_with_truth(folders: list[str], shipped: str | None) -> list[tuple[str, Path, dict, bool]]:
    """(label, run folder, {(class, value): relies}, is a control) of every benchmark run."""
    out = []
    for folder in map(Path, folders):
        worlds = pd.read_csv(folder / "worlds.csv")
        for world, g in worlds.groupby("world"):
            planted = {(r.cls, r.value): bool(r.relies) for r in g.itertuples() if isinstance(r.cls, str)}
            out.append((f"{folder.name}/{world}", folder / "runs" / f"demo-{world}", planted, not planted))
    if shipped:
        out.append(
            (
                "shipped/biased",
                Path(shipped) / "demo-biased",
                {(b.cls, b.value): True for b in T.PLANTED},
                False,
            )
        )
        out.append(("shipped/unbiased", Path(shipped) / "demo-unbiased", {}, True))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="output folders of bench_truth.py")
    p.add_argument("--shipped", default=None, help="the --out folder of `dct-audit demo`")
    p.add_argument("--out", default="benchmarks/results/bench_confirm_seeds")
    p.add_argument(
        "--max-seeds",
        type=int,
        default=32,
        help="also decide as --confirm-max-seeds N does (8, 32, then 4x per stage up to N) where N > 32",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    vocabulary = load_vocabulary(str(ATTRIBUTES_FILE))
    checked = [a for a in vocabulary.attributes if not a.absence]
    prompts: dict[str, str] = {}
    for a in checked:
        prompts.setdefault(a.with_context, a.name)
        for name, template in vocabulary.replacements(a):
            prompts.setdefault(template, name)
    generator = wrap_generator(load_generator(str(GENERATOR), "cpu"))
    generator.memo.max_bytes = 4 << 30  # every run's images (64 px) fit
    bank = AttributeBank.build(load_tagger("world", "cpu"), vocabulary)
    opts = SimpleNamespace(steps=6, guidance=None)  # the demo's
    seeds = eval_seeds(0, max(SEEDS))
    most = eval_seeds(0, args.max_seeds) if args.max_seeds > max(SEEDS) else None
    rows, cost = [], []  # cost: share of a class's prompts the adjusted adaptive check took to 32 seeds
    with tempfile.TemporaryDirectory() as tmp:
        for label, run, planted, control in runs_with_truth(args.folders, args.shipped):
            manifest = json.loads((run / "manifest.json").read_text())
            clf = load_classifier(manifest["settings"]["classifier"], None, "cpu")
            models = Models(classifier=clf, generator=generator, bank=bank)
            for i, cls in enumerate(S.SHAPES):
                cache = Path(tmp) / f"{label.replace('/', '-')}-{cls}.json"
                sweep = counterfactual_sweep(
                    lambda m=models: m, cache, ResolvedClass(i, cls, cls), prompts, seeds, opts, 8
                )
                cuts = {n: {t: on_seeds(e, seeds[:n]) for t, e in sweep.items()} for n in SEEDS}
                responses = {n: class_response(cuts[n], vocabulary.names) for n in SEEDS}
                # the audit's own adaptive check (--confirm-max-seeds 32), on the same images
                extended: set[str] = set()

                def sweep_on(
                    ps, at, sweep=sweep, extended=extended, models=models, cache=cache, i=i, cls=cls
                ):
                    if len(at) > SEEDS[0]:
                        extended.update(ps)
                    if len(at) > len(seeds):  # a later stage of --max-seeds: generated as the audit would
                        return counterfactual_sweep(
                            lambda: models, cache, ResolvedClass(i, cls, cls), ps, at, opts, 8
                        )
                    return {t: on_seeds(sweep[t], at) for t in ps}

                adaptive = {}
                for adj in (False, True):
                    extended.clear()
                    adaptive[adj] = check_class(checked, vocabulary, cls, sweep_on, seeds[:8], seeds, adj)
                cost.append(len(extended) / len(prompts))
                if most:
                    for adj in (False, True):
                        adaptive[("most", adj)] = check_class(
                            checked, vocabulary, cls, sweep_on, seeds[:8], most, adj
                        )
                for a in checked:
                    row = {
                        "run": label,
                        "classifier": manifest["settings"]["classifier"],
                        "control": control,
                        "cls": cls,
                        "attribute": a.name,
                        "planted": (cls, a.name) in planted,
                        "relies": planted.get((cls, a.name), False),
                    }
                    for n in SEEDS:
                        e = attribute_effect(a, vocabulary, cuts[n], cls)
                        row[f"confirmed_{n}"] = confirmed(e)
                        row[f"change_{n}"] = round(e["diff"], 3)
                        row[f"low_{n}"] = round(e["ci_low"], 3)
                        row[f"high_{n}"] = round(e["ci_high"], 3)
                        # the same check adjusted for what the other groups' attributes explain
                        e = attribute_effect(a, vocabulary, cuts[n], cls, responses[n])
                        row[f"adj_confirmed_{n}"] = confirmed(e)
                        row[f"adj_depends_{n}"] = bool(e["depends"])
                        row[f"adj_change_{n}"] = round(e["diff"], 3)
                        row[f"adj_low_{n}"] = round(e["ci_low"], 3)
                    row["adaptive"] = confirmed(adaptive[False][a.name])
                    row["adj_adaptive"] = confirmed(adaptive[True][a.name])
                    if most:
                        e = adaptive[("most", True)][a.name]
                        row["adaptive_most"] = confirmed(adaptive[("most", False)][a.name])
                        row["adj_adaptive_most"] = confirmed(e)
                        row["adj_most_change"], row["adj_most_low"] = (
                            round(e["diff"], 3),
                            round(e["ci_low"], 3),
                        )
                        row["adj_most_n"] = e["n"]
                    rows.append(row)
            print(f"{label}: {time.perf_counter() - t0:.0f} s", flush=True)
    df = pd.DataFrame(rows)
    rules = {f"{n} seeds": df[f"confirmed_{n}"] for n in SEEDS}
    rules["8 seeds, then 32 for the open ones (--confirm-max-seeds 32)"] = df["adaptive"]
    for n in SEEDS:
        rules[f"{n} seeds, adjusted (class_response)"] = df[f"adj_confirmed_{n}"]
    share = sum(cost) / max(1, len(cost))
    rules[
        f"8 seeds, then 32 for the open ones, adjusted (--thorough; {share:.0%} of prompts on 32 seeds)"
    ] = df["adj_adaptive"]
    if most:
        rules[
            f"8, 32, then {args.max_seeds} seeds for the open ones (--confirm-max-seeds {args.max_seeds})"
        ] = df["adaptive_most"]
        rules[f"8, 32, then {args.max_seeds} seeds for the open ones, adjusted"] = df["adj_adaptive_most"]
    for n in (8, 16):
        d = df[f"adj_depends_{n}"]
        rules[f"{n} seeds, adjusted, interval from 0.05"] = d & (df[f"adj_low_{n}"] >= 0.05)
        rules[f"{n} seeds, adjusted, point estimate >= 0.10"] = d & (df[f"adj_change_{n}"] >= 0.10)

    # procedural reliance of every unplanted confirmation (by any rule)
    attribute_of = {v: k for k, values in S.VOCAB.items() if k != "shape" for v in values}
    df["procedural_reliance"] = None
    any_rule = pd.concat(list(rules.values()), axis=1).any(axis=1)
    for k in df.index[any_rule & ~df["planted"]]:
        r = df.loc[k]
        planted = T.PlantedSet.parse(f"{r.cls}:{attribute_of[r.attribute]}:{r.attribute}@0.9")
        rel = measure_reliance(load_classifier(r.classifier, None, "cpu"), planted, n=300)
        df.loc[k, "procedural_reliance"] = round(rel[r.cls]["reliance"], 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)

    relied, unplanted = df["relies"], ~df["planted"]
    shipped = df["run"] == "shipped/biased"
    lines = [
        f"# Seeds of the counterfactual check ({', '.join(Path(f).name for f in args.folders)}"
        + (", shipped" if args.shipped else "")
        + f"; {time.perf_counter() - t0:.0f} s)",
        "",
        f"{df['run'].nunique()} runs, {len(df)} class x attribute checks, {int(relied.sum())} relied-on planted "
        "biases. Rule: every effective replacement lowers the probability and the smallest change's interval "
        "starts at >= 0.10 (the audit's).",
        "",
        "| seeds per prompt | relied-on confirmed | unplanted confirmed | of them on the shipped world | on controls |",
        "|---|---|---|---|---|",
    ]
    for name, c in rules.items():
        lines.append(
            f"| {name} | {int((c & relied).sum())}/{int(relied.sum())} | {int((c & unplanted).sum())} | "
            f"{int((c & unplanted & shipped).sum())} | {int((c & unplanted & df['control']).sum())} |"
        )
    lines += [
        "",
        "Unplanted confirmations, with the classifier's reliance on them on procedural scenes:",
        "",
        "| run | class/attribute | change at 8 / 32 seeds (interval from) | adjusted | adjusted, staged "
        "(seeds) | confirmed at | procedural reliance |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in df[any_rule & unplanted].itertuples():
        at = ", ".join(str(n) for n in SEEDS if getattr(r, f"confirmed_{n}"))
        if most and r.adj_adaptive_most:
            at = f"{at}, staged" if at else "staged"
        staged = f"{r.adj_most_change:.2f} ({r.adj_most_low:.2f}; {r.adj_most_n})" if most else "-"
        lines.append(
            f"| {r.run} | {r.cls}/{r.attribute} | {r.change_8:.2f} ({r.low_8:.2f}) / {r.change_32:.2f} "
            f"({r.low_32:.2f}) | {r.adj_change_8:.2f} ({r.adj_low_8:.2f}) / {r.adj_change_32:.2f} "
            f"({r.adj_low_32:.2f}) | {staged} | {at or 'another rule'} | {r.procedural_reliance:.2f} |"
        )
    lines += [
        "",
        "Relied-on planted biases, unadjusted and adjusted (change, interval from; 8 / 32 seeds):",
        "",
        "| run | class/attribute | unadjusted | adjusted | adjusted, staged up to --max-seeds (seeds) |",
        "|---|---|---|---|---|",
    ]
    for r in df[relied].itertuples():
        staged = f"{r.adj_most_change:.2f} ({r.adj_most_low:.2f}; {r.adj_most_n})" if most else "-"
        lines.append(
            f"| {r.run} | {r.cls}/{r.attribute} | {r.change_8:.2f} ({r.low_8:.2f}) / {r.change_32:.2f} "
            f"({r.low_32:.2f}) | {r.adj_change_8:.2f} ({r.adj_low_8:.2f}) / {r.adj_change_32:.2f} "
            f"({r.adj_low_32:.2f}) | {staged} |"
        )
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
