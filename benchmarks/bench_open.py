"""The check's third verdict, *open*, measured on the truth benchmark's thorough runs.

A finding is open (``check.is_open``) when the check neither confirms it nor rules it out: every effective
replacement lowers the classifier's confidence, but the interval of the smallest change reaches below 0.10.
This script re-decides every class x (non-absence) attribute of ``bench_truth.py``'s runs with the thorough
check (8 seeds, then 32 for the open ones, adjusted: ``--confirm-max-seeds 32 --adjust``) from the runs'
own counterfactual caches, so it generates nothing and takes seconds, and counts confirmed and open
attributes against the planted truth: how many planted biases the open list holds, how many of the
relied-on ones the confirmation missed, and how long the list is per class.

    python benchmarks/bench_open.py BENCH_TRUTH_FOLDERS...

A folder whose runs were audited with the 8-seed check of an earlier version (its caches lack the 32-seed
prompts) is skipped and named. Writes ``benchmarks/results/bench_open.{md,csv}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from dct_audit.adapters.classifier import load_classifier
from dct_audit.adapters.generator_load import load_generator
from dct_audit.association import association_sweep, check_associations, subjects_for
from dct_audit.check import check_class, class_specific, confirmed, counterfactual_sweep, is_open
from dct_audit.generate import eval_seeds
from dct_audit.pipeline import Models
from dct_audit.resolve import ResolvedClass
from dct_audit.tag import load_vocabulary
from dct_audit.world import scenes as S
from dct_audit.world.paths import ATTRIBUTES_FILE, GENERATOR

ASSOCIATION_CACHE = Path("/tmp/bench_open_association")


class _PerImageMemo:
    """The generator, keeping every image by (prompt, seed): every world of the benchmark draws the same
    association prompts on the same seeds with the same generator, so each image is made once."""

    def __init__(self, generator):
        self._g, self._images = generator, {}

    def __getattr__(self, name):
        return getattr(self._g, name)

    def sample(self, prompts, seeds, steps, guidance, **kw):
        todo = [
            (p, s) for p, s in zip(prompts, seeds, strict=True) if (p, s, steps, guidance) not in self._images
        ]
        if todo:
            made = self._g.sample([p for p, _ in todo], [s for _, s in todo], steps, guidance, **kw)
            for (p, s), image in zip(todo, made, strict=True):
                self._images[(p, s, steps, guidance)] = image
        return torch.stack(
            [self._images[(p, s, steps, guidance)] for p, s in zip(prompts, seeds, strict=True)]
        )


class _NotCached(Exception):
    pass


def _no_models():
    raise _NotCached


CHECKS = {  # name: (seeds, more seeds, adjust)
    "thorough (8, then 32 seeds; adjusted)": (8, 32, True),
    "shipped demo's (8 seeds)": (8, 0, False),
}


def decide(folder: Path, vocabulary, checked, check: str, generator) -> list[dict] | None:
    """One row per run x class x attribute of a bench_truth folder; None when its caches lack seeds. The
    association stage (``association.py``) generates its images with ``generator`` (cached under
    ``ASSOCIATION_CACHE``, not in the benchmark's folders)."""
    first, most, adjust = CHECKS[check]
    opts = SimpleNamespace(steps=6, guidance=None, adjust=adjust, gen_batch=64)  # the demo's
    worlds = pd.read_csv(folder / "worlds.csv")
    targets = [ResolvedClass(i, cls, cls) for i, cls in enumerate(S.SHAPES)]
    rows = []
    for world, g in worlds.groupby("world"):
        planted = {
            (r.cls, r.value): (bool(r.relies), r.reliance) for r in g.itertuples() if isinstance(r.cls, str)
        }
        run = folder / "runs" / f"demo-{world}"
        checks, candidates = {}, {}
        for c in targets:
            cache = run / "counterfactual" / f"{c.index:04d}-{c.name}.json"

            def sweep_on(prompts, seeds, cache=cache, c=c):
                return counterfactual_sweep(_no_models, cache, c, prompts, seeds, opts, 8)

            try:
                more = eval_seeds(0, most) if most else None
                checks[c.index] = check_class(
                    checked, vocabulary, c.name, sweep_on, eval_seeds(0, first), more, adjust
                )
            except _NotCached:
                return None
            before = {a.name: confirmed(checks[c.index][a.name]) for a in checked}
            checks[c.index] = {k: {**v, "confirmed_by_check": before[k]} for k, v in checks[c.index].items()}
            if found := [a for a in checked if before[a.name]]:
                candidates[c.index] = found
        models: dict = {}

        def ensure(world=world, models=models):
            if not models:
                clf = load_classifier(str(folder / "classifiers" / world), None, torch.device("cpu"))
                models["m"] = Models(generator=generator, classifier=clf)
            return models["m"]

        subjects = {i: subjects_for(targets[i], targets, lambda: list(S.SHAPES)) for i in candidates}
        cache = ASSOCIATION_CACHE / folder.name / f"{world}-{first}.json"
        check_associations(
            candidates,
            checks,
            vocabulary,
            subjects,
            lambda texts, idx, c=cache, s=subjects: association_sweep(
                ensure, c, texts, eval_seeds(0, first), idx, opts, 64, s
            ),
        )
        for c in targets:
            for a in checked:
                cf = checks[c.index][a.name]
                relies, reliance = planted.get((c.name, a.name), (False, None))
                rows.append(
                    {
                        "check": check,
                        "run": f"{folder.name}/{world}",
                        "control": not planted,
                        "cls": c.name,
                        "attribute": a.name,
                        "planted": (c.name, a.name) in planted,
                        "relies": relies,
                        "reliance": reliance,
                        "confirmed": confirmed(cf),
                        "confirmed_by_check": cf["confirmed_by_check"],
                        "specific": class_specific(cf),
                        "open": is_open(cf),
                        "change": round(cf["diff"], 3),
                        "low": round(cf["ci_low"], 3),
                        "high": round(cf["ci_high"], 3),
                        "seeds": cf["n"],
                        "association": None
                        if "association" not in cf
                        else round(cf["association"]["diff"], 3),
                        "association_low": None
                        if "association" not in cf
                        else round(cf["association"]["ci_low"], 3),
                    }
                )
    return rows


def table(df: pd.DataFrame, check: str, used: list[str], skipped: list[str]) -> list[str]:
    """The markdown section of one check."""
    relied, planted, unplanted, control = df["relies"], df["planted"], ~df["planted"], df["control"]
    weak = planted & ~relied
    classes = df.groupby(["run", "cls"]).ngroups
    biased_classes = df[~control].groupby(["run", "cls"]).ngroups
    lines = [f"## The {check} check ({', '.join(used)})", ""]
    if skipped:
        lines += [f"Skipped (caches without these seeds, from an earlier version): {', '.join(skipped)}.", ""]
    lines += [
        f"{df['run'].nunique()} runs ({int(df[control]['run'].nunique())} unbiased controls), {classes} classes, "
        f"{len(df)} class x attribute checks; {int(relied.sum())} planted biases the classifier relies on "
        f"(reliance >= 0.2), {int(weak.sum())} planted ones it barely uses.",
        "",
        "| verdict | relied-on plants | weak plants (reliance < 0.2) | unplanted | of them on controls | per class |",
        "|---|---|---|---|---|---|",
    ]
    ruled_out = ~df["confirmed"] & ~df["open"] & ~df["specific"]
    verdicts = (
        ("confirmed by the check alone (before the association stage)", df["confirmed_by_check"]),
        ("confirmed (check and association)", df["confirmed"]),
        ("this class's images only (association failed)", df["specific"]),
        ("open", df["open"]),
        ("ruled out", ruled_out),
    )
    for name, c in verdicts:
        lines.append(
            f"| {name} | {int((c & relied).sum())}/{int(relied.sum())} | {int((c & weak).sum())}/{int(weak.sum())} | "
            f"{int((c & unplanted).sum())} | {int((c & control).sum())} | {c.sum() / classes:.2f} |"
        )
    is_open_ = df["open"]
    for name, c in verdicts[:2]:
        n, good = int(c.sum()), int((c & planted).sum())
        lines.append(f"\nPrecision, {name}: {good}/{n} = {good / max(1, n):.3f} planted.")
    lines += [
        "",
        "Failed the association stage:",
        "",
        "| run | class/attribute | planted | reliance | check's smallest change | with other classes | interval from |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in df[df["specific"]].itertuples():
        rel = "" if pd.isna(r.reliance) else f"{r.reliance:.2f}"
        lines.append(
            f"| {r.run} | {r.cls}/{r.attribute} | {'yes' if r.planted else 'no'} | {rel} | {r.change:.2f} | "
            f"{r.association:.2f} | {r.association_low:.2f} |"
        )
    lines += [
        "",
        f"Of the open findings, {int((is_open_ & planted).sum())} of {int(is_open_.sum())} were planted "
        f"({(is_open_ & planted).sum() / max(1, is_open_.sum()):.0%}); on the biased classifiers' classes "
        f"{int((is_open_ & ~control).sum()) / max(1, biased_classes):.2f} open findings per class, on the controls' "
        f"{int((is_open_ & control).sum()) / max(1, classes - biased_classes):.2f}.",
        "",
        "Planted biases left open:",
        "",
        "| run | class/attribute | reliance | smallest change | interval | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for r in df[is_open_ & planted].itertuples():
        lines.append(
            f"| {r.run} | {r.cls}/{r.attribute} | {r.reliance:.2f} | {r.change:.2f} | {r.low:.2f} to {r.high:.2f} | {r.seeds} |"
        )
    return [*lines, ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="output folders of bench_truth.py (thorough runs)")
    p.add_argument("--out", default="benchmarks/results/bench_open")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    vocabulary = load_vocabulary(str(ATTRIBUTES_FILE))
    checked = [a for a in vocabulary.attributes if not a.absence]
    generator = _PerImageMemo(load_generator(str(GENERATOR), torch.device("cpu"), torch.float32, None, None))
    rows, lines = [], []
    for check in CHECKS:
        used, skipped, got_rows = [], [], []
        for folder in map(Path, args.folders):
            got = decide(folder, vocabulary, checked, check, generator)
            (skipped if got is None else used).append(folder.name)
            got_rows += got or []
        rows += got_rows
        lines += table(pd.DataFrame(got_rows), check, used, skipped)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    lines = [
        f"# The open verdict of the counterfactual check ({time.perf_counter() - t0:.0f} s)",
        "",
        f"`python benchmarks/bench_open.py {' '.join(args.folders)}`",
        "",
        *lines,
    ]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
