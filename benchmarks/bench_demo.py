"""Wall time of ``dct-audit demo`` (the whole offline audit of the planted-bias world), stage by stage.

Runs the demo into a fresh temporary folder (so nothing is resumed) and prints one table: per classifier
run the model loading, each class's inversion and image generation (from its ``class.json``), the
analysis + report, then the comparison, and the total. The target is under 3 minutes on a 2-core CPU.

    python benchmarks/bench_demo.py [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--keep", default=None, help="write the demo here and keep it (default: a temp folder)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from dct_audit.demo import DEMO_SETTINGS, demo

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_demo_"))
    if args.keep and out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    result = demo(str(out), quiet=True)
    total = time.perf_counter() - t0

    rows = []
    for name in ("biased", "unbiased"):
        run = result.get(name)
        if run is None:
            continue
        for c in run.classes:
            t = c["timings"]
            rows.append((f"{name}: {c['name']}", c["updates"], t["invert_s"], t["generate_s"], t["total_s"]))
        rows.append((f"{name}: whole run", "", "", "", result["seconds"][f"{name} run"]))
    if "compare" in result["seconds"]:
        rows.append(("compare (incl. cross-scoring)", "", "", "", result["seconds"]["compare"]))
    print(
        f"dct-audit demo on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"settings: {DEMO_SETTINGS}")
    print()
    print(f"| {'stage':<28} | updates | invert s | images s | total s |")
    print(f"|{'-' * 30}|---------|----------|----------|---------|")
    for stage, updates, inv, gen, tot in rows:
        f = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
        print(f"| {stage:<28} | {f(updates):>7} | {f(inv):>8} | {f(gen):>8} | {f(tot):>7} |")
    print(f"| {'demo, end to end':<28} |         |          |          | {total:>7.1f} |")
    print()
    print(
        f"findings (biased): {len(result['biased'].findings)}; "
        f"(unbiased): {len(result['unbiased'].findings) if 'unbiased' in result else '-'}"
    )
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
