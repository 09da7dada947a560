"""Hard tokens: does an inversion setting learn the token of a class that relies on its planted value?

A class whose classifier relies on a planted value (say, crosses are red) is the case the token exists for:
the plain prompt rarely draws the value, so the classifier rarely calls its images the class, and the token
must learn to draw it. This script re-learns the token of every relied-on planted class of
``bench_truth.py``'s runs under each setting named by ``--variant`` (JSON overrides of the runs' own
inversion settings), and scores each kept token on 32 evaluation seeds (those of the audit's grids, never
seen by the inversion):

- *accuracy*: the share of the token's images the classifier calls the class;
- *drawn*: the share that show the planted value, judged by the world's independent attribute checker;
- *learned*: accuracy >= 0.5 and drawn >= 0.5 (the token draws the bias);
- updates used and the kept token's norm (in vocabulary mean norms).

The setting ``run`` is the token the audit itself kept (read from the run folder, not re-learned).

    python benchmarks/bench_hard_tokens.py BENCH_TRUTH_FOLDERS... \\
        --variant '{"max_norm": 1.0}' --variant '{"attempts": 2}' [--seeds 0,1] [--only w123-0:cross,...] \\
        [--out benchmarks/results/bench_hard_tokens]

``--seeds`` learns each setting once per inversion seed (new training and validation seeds; the evaluation
images stay the same); ``run`` is scored for seed 0 only. Measured results: README "Hard tokens".

Writes ``OUT.csv`` (one row per class and setting) and ``OUT.md`` (the table), and prints them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import pandas as pd
import torch

from dct_audit.adapters.classifier import load_classifier
from dct_audit.adapters.generator_load import load_generator
from dct_audit.generate import eval_seeds
from dct_audit.invert import InvertConfig, invert_class, load_token, token_prompts
from dct_audit.world.paths import GENERATOR

N_EVAL = 32


def relied_on(folders: list[Path], max_init: float = 1.0) -> list[dict]:
    """Every relied-on planted class of the runs whose initial token's validation accuracy (the run's first
    update) is at most ``max_init``, with its run folder and inversion settings."""
    jobs = []
    for folder in folders:
        for truth_file in sorted((folder / "runs").glob("*/truth.json")):
            run = truth_file.parent
            settings = json.loads((run / "manifest.json").read_text())["settings"]
            for p in json.loads(truth_file.read_text())["planted"]:
                cls_dir = next((run / "classes").glob(f"*-{p['cls']}"))
                init = pd.read_csv(cls_dir / "history.csv")["val_accuracy"].iloc[0]
                if p["relies"] and init <= max_init:
                    jobs.append({"run": run, "class_dir": cls_dir, "settings": settings, "init": init, **p})
    return jobs


def invert_settings(settings: dict, variant: dict) -> InvertConfig:
    names = {f.name for f in fields(InvertConfig)}
    values = {k: v for k, v in settings.items() if k in names}
    values.update(templates=tuple(settings["templates"]), restart_words=tuple(settings["restart_words"]))
    values.update(variant)
    return InvertConfig(**values)


@torch.no_grad()
def score_token(generator, classifier, checker, placeholder, job, config) -> dict:
    prompts = token_prompts(config.templates, placeholder, job["cls"], N_EVAL)
    seeds = eval_seeds(0, N_EVAL)  # the same images for every inversion seed
    target = classifier.labels.names.index(job["cls"])
    hits, shows = [], []
    for i in range(0, N_EVAL, 16):
        images = generator.sample(prompts[i : i + 16], seeds[i : i + 16], config.steps, config.guidance)
        hits += (classifier(images).argmax(-1) == target).tolist()
        shows += [n[job["attribute"]] == job["value"] for n in checker.predict_names(images)]
    accuracy, drawn = sum(hits) / N_EVAL, sum(shows) / N_EVAL
    return {"accuracy": accuracy, "drawn": drawn, "learned": accuracy >= 0.5 and drawn >= 0.5}


def markdown(df: pd.DataFrame) -> str:
    cells = [
        [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="bench_truth.py output folders")
    p.add_argument("--variant", action="append", default=[], help="JSON overrides of the inversion settings")
    p.add_argument(
        "--seeds",
        default="0",
        help="inversion seeds, comma-separated (each setting is learned once per seed)",
    )
    p.add_argument(
        "--max-init",
        type=float,
        default=1.0,
        help="only classes whose initial validation accuracy is at most this",
    )
    p.add_argument("--only", default="", help="only these classes, as WORLD:CLASS,... (e.g. w123-0:cross)")
    p.add_argument("--out", default="benchmarks/results/bench_hard_tokens")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dct_audit.world.checker import AttributeChecker

    checker = AttributeChecker.from_pretrained().eval()
    generator = load_generator(str(GENERATOR), "cpu")
    vocab_norm = generator.vocab_norm()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [("run", None, 0)] if 0 in seeds else []
    variants += [(v, json.loads(v), seed) for v in args.variant for seed in seeds]
    rows = []
    jobs = relied_on(args.folders, args.max_init)
    if args.only:
        only = set(args.only.split(","))
        jobs = [j for j in jobs if f"{j['run'].name.removeprefix('demo-')}:{j['cls']}" in only]
    for k, job in enumerate(jobs):
        classifier = load_classifier(job["settings"]["classifier"], None, "cpu")
        target = classifier.labels.names.index(job["cls"])
        base = {
            "world": job["run"].name.removeprefix("demo-"),
            "planted": job["planted"],
            "init": job["init"],
        }
        for name, variant, seed in variants:
            config = invert_settings(job["settings"], {**(variant or {}), "seed": seed})
            placeholder = f"<hard-{k}-{len(rows)}>"
            t0 = time.perf_counter()
            if variant is None:
                info = json.loads((job["class_dir"] / "class.json").read_text())
                _, vector = load_token(job["class_dir"] / "token.safetensors")
                generator.set_token(placeholder, vector)
                updates = info["updates"]
            else:
                result = invert_class(generator, classifier, target, job["cls"], placeholder, config)
                vector, updates = result.vector, len(result.history)
            row = {
                **base,
                "setting": name,
                "seed": seed,
                "updates": updates,
                "norm": float(vector.norm()) / vocab_norm,
            }
            row.update(score_token(generator, classifier, checker, placeholder, job, config))
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(
                f"{base['world']} {job['planted']} [{name}, seed {seed}]: accuracy {row['accuracy']:.2f}, drawn "
                f"{row['drawn']:.2f}, {updates} updates, norm {row['norm']:.2f} ({row['seconds']:.0f} s)",
                flush=True,
            )
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    table = df.groupby("setting", sort=False).agg(
        classes=("learned", "size"),
        learned=("learned", "sum"),
        mean_accuracy=("accuracy", "mean"),
        mean_drawn=("drawn", "mean"),
        mean_updates=("updates", "mean"),
    )
    text = f"`python benchmarks/bench_hard_tokens.py {' '.join(sys.argv[1:])}`\n\n"
    text += markdown(table.reset_index()) + "\n\n" + markdown(df.drop(columns=["seconds", "norm"]))
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
