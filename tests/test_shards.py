"""Job-array sharding: ``run --shard K/N`` audits disjoint class subsets into one run folder, ``finish``
analyses them; the results must not depend on how the work was spread."""

from __future__ import annotations

import json

import pytest

import dct_audit
from dct_audit import rundir
from dct_audit.cli import main
from dct_audit.errors import DctAuditError
from dct_audit.pipeline import finish_run, parse_shard, shard_classes
from dct_audit.resolve import ResolvedClass

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_shards_are_disjoint_and_cover_every_class():
    targets = [ResolvedClass(i, f"c{i}", f"c{i}") for i in (7, 2, 5, 0, 9)]
    parts = [shard_classes(targets, f"{k}/3") for k in (1, 2, 3)]
    indices = [c.index for part in parts for c in part]
    assert sorted(indices) == [0, 2, 5, 7, 9] and len(set(indices)) == 5
    assert [c.index for c in parts[0]] == [0, 7]  # by label index, round robin
    for bad in ("0/2", "3/2", "2", "a/b", "1/0"):
        with pytest.raises(DctAuditError, match="--shard"):
            parse_shard(bad)


def test_two_shards_then_finish_give_the_serial_results(tiny_run_options, tiny_classifier, tmp_path):
    model = f"file:{tiny_classifier[0]}"
    common = {**tiny_run_options, "n_images": 2, "confirm": "flagged", "out": str(tmp_path)}
    serial = dct_audit.run(model, "0,1,2,3", name="serial", **common)
    for k in (2, 1):  # in any order, into the same folder
        part = dct_audit.run(model, "0,1,2,3", name="sharded", shard=f"{k}/2", **common)
        assert part.findings == [] and not (part.run_dir / "enrichment.csv").exists()
        assert len(part.classes) == 2
    manifest = rundir.read_json(tmp_path / "sharded" / "manifest.json")
    assert sorted(manifest["class_runs"]) == ["0", "1", "2", "3"]  # no shard dropped another's records
    assert {r["shard"] for r in manifest["class_runs"].values()} == {"1/2", "2/2"}
    finished = finish_run(tmp_path / "sharded", quiet=True)
    assert finished.skipped == [0, 1, 2, 3]  # nothing audited again
    for name in ("enrichment.csv", "findings.json"):
        assert (serial.run_dir / name).read_bytes() == (finished.run_dir / name).read_bytes(), name
    assert json.loads((finished.run_dir / "findings.json").read_text()) == serial.findings


def test_finish_refuses_a_run_with_unfinished_classes(tiny_run_options, tiny_classifier, tmp_path, capsys):
    model = f"file:{tiny_classifier[0]}"
    dct_audit.run(model, "0,1,2", name="half", shard="1/2", out=str(tmp_path), **tiny_run_options)
    assert main(["finish", str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 class(es)" in err[0] and "not finished" in err[0]
    assert main(["finish", str(tmp_path / "nothing")]) == 2


def test_overwrite_with_a_shard_is_refused(tiny_run_options, tiny_classifier, tmp_path):
    with pytest.raises(DctAuditError, match="--overwrite cannot be combined with --shard"):
        dct_audit.run(
            f"file:{tiny_classifier[0]}",
            "0",
            shard="1/2",
            overwrite=True,
            out=str(tmp_path),
            **tiny_run_options,
        )
