"""A run killed (SIGKILL, in a subprocess) at any point resumes to the same results as a run never stopped.

Points: during a class's inversion, between two classes, during the analysis (after enrichment.csv, before
findings.json) and during the report. After each, the same command again must give the same
``enrichment.csv`` and ``findings.json`` as an uninterrupted run, and recompute no class that had finished.
Tiny local models; nine subprocess runs, about three minutes on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import dct_audit.pipeline as P
    from dct_audit import rundir
    point = sys.argv[1]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "inversion":
        real_invert = P.invert_class
        def invert(g, c, target, name, placeholder, config, progress=None):
            def on_update(row):
                progress(row)
                if target == 2 and row["update"] == 1:
                    die()
            return real_invert(g, c, target, name, placeholder, config, progress=on_update)
        P.invert_class = invert
    elif point == "between":
        real_mark = rundir.RunDir.mark_done
        def mark(self, index, name):
            real_mark(self, index, name)
            if index == 0:
                die()
        rundir.RunDir.mark_done = mark
    elif point == "analysis":
        real_csv = rundir.write_csv
        def write_csv(path, frame):
            real_csv(path, frame)
            if str(path).endswith("enrichment.csv"):
                die()
        rundir.write_csv = write_csv
    elif point == "report":
        import dct_audit.report as R
        def render(*a, **k):
            die()
        R.render_report = render
    from dct_audit.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.fixture(scope="module")
def command(tiny_run_command):
    return [
        *tiny_run_command,
        "--classes",
        "0,2",  # two classes: the kill points need one finished class and one unfinished
        "--max-updates",
        "2",
        "--n-images",
        "3",
        "--context",
        "a photo of {}",
        "--lr",
        "0.2",
        "--explain-images",
        "0",
        "--quiet",
    ]


def _run(args, point="none"):
    return subprocess.run([sys.executable, "-c", KILLER, point, *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def uninterrupted(command, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    done = _run([*command, "--out", str(out), "--name", "r"])
    assert done.returncode == 0, done.stderr
    return out / "r"


@pytest.mark.parametrize("point", ["inversion", "between", "analysis", "report"])
def test_a_killed_run_resumes_to_the_same_results(point, command, uninterrupted, tmp_path):
    args = [*command, "--out", str(tmp_path), "--name", "r"]
    killed = _run(args, point)
    assert killed.returncode == -9, killed.stderr  # SIGKILL
    root = tmp_path / "r"
    finished = {p.parent.name: p.stat().st_mtime_ns for p in root.glob("classes/*/DONE")}
    again = _run(args)
    assert again.returncode == 0, again.stderr
    for name in ("enrichment.csv", "findings.json"):
        assert (root / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    for folder, stamp in finished.items():  # nothing finished before the kill was recomputed
        assert (root / "classes" / folder / "DONE").stat().st_mtime_ns == stamp, folder
    assert (root / "report" / "index.html").is_file()
    for clean in (uninterrupted / "classes").glob("*/scores.csv"):
        assert (root / "classes" / clean.parent.name / "scores.csv").read_bytes() == clean.read_bytes()
