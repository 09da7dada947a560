"""Time for 8 classes vs Ray workers, on tiny models and a local Ray cluster; the measured efficiency.

Each row audits the same 8 classes of a tiny classifier into a fresh run folder: ``serial`` in this
process, then ``--ray`` on a local cluster of W CPUs with one CPU (and one torch thread) per class task.
Efficiency = T(1 worker) / (W x T(W workers)). Tiny models make the per-class work small, so Ray's task
start-up (a worker imports torch and loads the models) weighs more than it would on real models, where
a class takes seconds to minutes; the numbers are the overhead-heavy end.

    python benchmarks/bench_scale.py [--workers 1,2] [--updates 4] [--out benchmarks/results/bench_scale.md]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import dct_audit
from dct_audit.testing import make_tiny_classifier, make_tiny_clip, make_tiny_pipeline

LABELS = [f"class {i}" for i in range(8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated worker counts (CPUs of the local cluster)"
    )
    parser.add_argument("--updates", type=int, default=4, help="inversion updates per class")
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    model, labels = make_tiny_classifier(tmp / "clf", LABELS)
    common = dict(
        labels=str(labels),
        generator=str(make_tiny_pipeline(tmp / "gen", kind="turbo")),
        tagger=f"hf:{make_tiny_clip(tmp / 'clip')}",
        max_updates=args.updates,
        n_images=4,
        contexts=("a photo of {}",),
        explain_images=0,
        report=False,
        quiet=True,
        confirm="flagged",
        out=str(tmp / "runs"),
    )
    classes = ",".join(str(i) for i in range(len(LABELS)))
    rows = []
    start = time.perf_counter()
    dct_audit.run(f"file:{model}", classes, name="serial", **common)
    rows.append(("serial (this process)", 1, time.perf_counter() - start))
    for w in workers:
        start = time.perf_counter()
        dct_audit.run(f"file:{model}", classes, name=f"ray-{w}", ray="local", ray_cpus=w, **common)
        rows.append((f"ray, local cluster of {w} CPU(s)", w, time.perf_counter() - start))
    base = next(t for name, w, t in rows if name.startswith("ray") and w == 1) if 1 in workers else None
    lines = [
        f"`python benchmarks/bench_scale.py --workers {args.workers} --updates {args.updates}` "
        f"({os.cpu_count()} CPUs here; 8 tiny classes, {args.updates} updates each)",
        "",
        "| how | workers | seconds for 8 classes | seconds per class | efficiency vs 1 Ray worker |",
        "|---|---|---|---|---|",
    ]
    for name, w, t in rows:
        eff = f"{base / (w * t):.2f}" if base is not None and name.startswith("ray") else "–"
        lines.append(f"| {name} | {w} | {t:.1f} | {t / len(LABELS):.1f} | {eff} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
