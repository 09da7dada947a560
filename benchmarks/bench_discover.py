"""Open-vocabulary discovery measured on random planted worlds (the truth benchmark's run folders).

For every planted bias of ``bench_truth.py``'s worlds whose token drew the planted value (the world's
independent checker saw it in at least half of the token's images and in under half of the baseline's), it
asks where discovery ranks the value among a concept list of the world's 14 context words plus
``--distractors`` WordNet concepts (timm's list, a seeded sample), and whether it comes out significant
(held-out half, Benjamini-Hochberg over every class x tested concept of the run). It also counts the
significant concepts per class on the biased worlds and on the unbiased controls. No image is generated:
discovery reads the stored image features (``embeddings.npy``), so this takes about a minute.

    python benchmarks/bench_truth.py --worlds 8 --seed 11 --out bench-truth-11     # first, once per seed
    python benchmarks/bench_discover.py bench-truth-11 bench-truth-13 bench-truth-17 [--distractors 200]

Two rankings are compared: the mean paired difference (the default of ``dct-audit discover``) and the paired
t statistic. Writes ``--out`` (markdown) and prints it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dct_audit import discover as D
from dct_audit import rundir
from dct_audit.stats import benjamini_hochberg
from dct_audit.tag import load_tagger

WORLD_WORDS = "water grass snow stripes brick plate person frame red green blue yellow purple orange".split()


def concept_list(n_distractors: int, seed: int = 0) -> list[D.Concept]:
    """The world's context words, then ``n_distractors`` WordNet concepts (first lemma, no definition)."""
    wordnet = D.wordnet_concepts("{}")
    rng = np.random.default_rng(seed)
    taken = {w.lower() for w in WORLD_WORDS}
    out = [D.Concept(w, f"world:{w}", (w,), "", w) for w in WORLD_WORDS]
    for i in rng.permutation(len(wordnet)):
        c = wordnet[int(i)]
        if len(out) >= len(WORLD_WORDS) + n_distractors:
            break
        if c.name.lower() not in taken and not (set(map(str.lower, c.lemmas)) & taken):
            taken.add(c.name.lower())
            out.append(D.Concept(c.name, c.lemma_id, c.lemmas, "", c.name))
    return out


def rank_of(order: np.ndarray, index: int) -> int:
    return int(np.where(order == index)[0][0]) + 1


def measure_run(run: Path, concepts, feats, world_idx) -> tuple[pd.DataFrame, dict]:
    """Per class: the ranking statistics on the ranking half, and the tested rows (with q) of the run."""
    per_class, tested = {}, []
    for folder in sorted((run / rundir.CLASSES_DIR).iterdir()):
        name = folder.name.split("-", 1)[1]
        scores = pd.read_csv(folder / rundir.SCORES)
        emb = np.load(folder / rundir.EMBEDDINGS)
        seeds, d = D.paired_differences(scores, emb, feats)
        rows, _ = D.discover_class(seeds, d, concepts, feats, D.TOP_K)
        tested += [{"cls": name, **r} for r in rows]
        half = np.isin(seeds, np.unique(seeds)[0::2])
        x = d[half]
        sd = x.std(0, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(sd > 0, x.mean(0) / (sd / np.sqrt(len(x))), 0.0)
        per_class[name] = {"mean": x.mean(0), "t": t, "world_mean": x.mean(0)[world_idx]}
    table = pd.DataFrame(tested)
    table["q"] = benjamini_hochberg(table["p_value"].to_numpy())
    table["significant"] = (table["q"] < 0.05) & (table["effect"] > 0)
    return table, per_class


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="output folders of bench_truth.py (worlds.csv, runs/)")
    p.add_argument("--distractors", type=int, default=200)
    p.add_argument("--distractor-seed", type=int, default=0, help="which WordNet concepts are drawn")
    p.add_argument("--out", default="benchmarks/results/bench_discover.md")
    args = p.parse_args(argv)
    concepts = concept_list(args.distractors, args.distractor_seed)
    names = [c.name for c in concepts]
    world_idx = np.arange(len(WORLD_WORDS))
    tagger = load_tagger("world")
    feats = D.concept_features(tagger, concepts)
    cases, sig_rows = [], []
    for folder in map(Path, args.folders):
        worlds = pd.read_csv(folder / "worlds.csv")
        for world, g in worlds.groupby("world"):
            run = folder / "runs" / f"demo-{world}"
            if not (run / rundir.CLASSES_DIR).is_dir():
                continue
            table, per_class = measure_run(run, concepts, feats, world_idx)
            planted = {(r.cls, r.value) for r in g.itertuples() if isinstance(r.cls, str)}
            control = not planted
            for cls, part in table.groupby("cls"):
                sig = part[part["significant"]]
                sig_rows.append(
                    {
                        "control": control,
                        "planted_class": any(c == cls for c, _ in planted),
                        "significant": len(sig),
                        "significant_distractors": int((~sig["concept"].isin(WORLD_WORDS)).sum()),
                    }
                )
            for r in g.itertuples():
                if not isinstance(r.cls, str) or not (r.drawn_token >= 0.5 and r.drawn_baseline < 0.5):
                    continue
                stats = per_class[r.cls]
                i = names.index(r.value)
                hit = table[(table["cls"] == r.cls) & (table["concept"] == r.value)]
                cases.append(
                    {
                        "benchmark": folder.name,
                        "world": world,
                        "class": r.cls,
                        "value": r.value,
                        "reliance": round(float(r.reliance), 2),
                        "rank (mean)": rank_of(np.argsort(-stats["mean"]), i),
                        "rank (t)": rank_of(np.argsort(-stats["t"]), i),
                        "rank among world words": rank_of(np.argsort(-stats["world_mean"]), i),
                        "significant": bool(hit["significant"].any()),
                    }
                )
    df = pd.DataFrame(cases)
    sig = pd.DataFrame(sig_rows)
    n = len(df)
    lines = [
        f"# Discovery on the truth benchmark's worlds ({', '.join(Path(f).name for f in args.folders)})",
        "",
        f"Concepts: {len(WORLD_WORDS)} world words + {len(concepts) - len(WORLD_WORDS)} WordNet distractors "
        f"(draw {args.distractor_seed}). "
        f"Planted biases whose token drew the value: {n}.",
        "",
        "| measure | count |",
        "|---|---|",
        f"| planted value ranked first (mean effect, the default) | {int((df['rank (mean)'] == 1).sum())}/{n} |",
        f"| ranked in the top 3 (mean effect) | {int((df['rank (mean)'] <= 3).sum())}/{n} |",
        f"| ranked first (t statistic) | {int((df['rank (t)'] == 1).sum())}/{n} |",
        f"| ranked first among the 14 world words only | {int((df['rank among world words'] == 1).sum())}/{n} |",
        f"| significant (held-out half, BH) | {int(df['significant'].sum())}/{n} |",
    ]
    for label, part in (
        ("classes with a planted bias", sig[sig["planted_class"]]),
        ("other classes of biased worlds", sig[~sig["planted_class"] & ~sig["control"]]),
        ("classes of unbiased controls", sig[sig["control"]]),
    ):
        if len(part):
            lines.append(
                f"| {label}: significant concepts per class (distractors) | "
                f"{part['significant'].mean():.1f} ({part['significant_distractors'].mean():.1f}) "
                f"over {len(part)} classes |"
            )
    lines += ["", "| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    lines.append("")
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
