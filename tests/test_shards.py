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


@pytest.fixture(scope="module")
def serial(tiny_run_options, tiny_classifier, tmp_path_factory):
    """The 4-class tiny audit run serially in this process, and its options."""
    model = f"file:{tiny_classifier[0]}"
    common = {**tiny_run_options, "n_images": 2, "confirm": "flagged"}
    out = tmp_path_factory.mktemp("serial")
    return dct_audit.run(model, "0,1,2,3", name="serial", out=str(out), **common), model, common


def test_two_shards_then_finish_give_the_serial_results(serial, tmp_path):
    serial, model, common = serial
    common = {**common, "out": str(tmp_path)}
    for k in (2, 1):  # in any order, into the same folder
        part = dct_audit.run(model, "0,1,2,3", name="sharded", shard=f"{k}/2", **common)
        assert part.findings == [] and not (part.run_dir / "enrichment.csv").exists()
        assert len(part.classes) == 2
    manifest = rundir.read_json(tmp_path / "sharded" / "manifest.json")
    assert sorted(manifest["class_runs"]) == ["0", "1", "2", "3"]  # no shard dropped another's records
    assert {r["shard"] for r in manifest["class_runs"].values()} == {"1/2", "2/2"}
    assert {r["gen_batch"] for r in manifest["class_runs"].values()} == {common["gen_batch"]}
    finished = finish_run(tmp_path / "sharded", quiet=True)  # keeps the shards' --gen-batch
    assert (
        rundir.read_json(tmp_path / "sharded" / "manifest.json")["analysis"]["gen_batch"]
        == common["gen_batch"]
    )
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
    # a finished class whose files changed since: named as damaged, with the file
    [folder] = (tmp_path / "half" / "classes").glob("0000-*")
    (folder / "scores.csv").write_text("x")
    assert main(["finish", str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err
    assert "2 class(es)" in err and "(0, damaged: scores.csv has changed since the class finished)" in err
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


def test_a_local_ray_cluster_gives_the_serial_results(serial, tmp_path, monkeypatch):
    """Each class a Ray task on a local cluster of 2 CPUs, the analysis on the driver: the same files."""
    pytest.importorskip("ray", reason='needs Ray (pip install "dct-audit[ray]")')
    import dct_audit.pipeline as P
    from dct_audit.options import ANALYSIS_OPTIONS

    given = {}
    real_finish = P.finish_run  # what the driver calls (dct_audit.scale imports it when it runs)
    monkeypatch.setattr(P, "finish_run", lambda root, **kw: given.update(kw) or real_finish(root, **kw))
    serial, model, common = serial
    result = dct_audit.run(model, "0,1,2,3", name="ray", out=str(tmp_path), ray="local", ray_cpus=2, **common)
    assert [c["index"] for c in result.classes] == [0, 1, 2, 3]
    manifest = rundir.read_json(tmp_path / "ray" / "manifest.json")
    assert sorted(manifest["class_runs"]) == ["0", "1", "2", "3"]
    for name in ("enrichment.csv", "findings.json"):
        assert (serial.run_dir / name).read_bytes() == (result.run_dir / name).read_bytes(), name
    # everything finished: a second call starts no task and analyses again to the same files
    again = dct_audit.run(model, "0,1,2,3", name="ray", out=str(tmp_path), ray="local", ray_cpus=2, **common)
    assert again.skipped == [0, 1, 2, 3] and again.findings == result.findings
    # the driver's analysis gets every analysis option of the run (it once dropped --no-association)
    assert set(ANALYSIS_OPTIONS) <= set(given) and given["gen_batch"] == common["gen_batch"]


def test_ray_refuses_what_it_cannot_do(serial, tmp_path):
    serial, model, common = serial
    with pytest.raises(DctAuditError, match="--ray and --shard"):
        dct_audit.run(model, "0", out=str(tmp_path), ray="local", shard="1/2", **common)


def test_an_unreachable_ray_address_is_one_line_in_seconds_not_minutes_of_retries():
    import socket

    from dct_audit.scale import check_reachable

    with pytest.raises(DctAuditError, match="the port must be a number"):
        check_reachable("10.0.0.5:x")
    listener = socket.socket()  # a port that was free a moment ago: nothing listens there once closed
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with pytest.raises(DctAuditError, match="cannot reach a Ray cluster there"):
        check_reachable(f"127.0.0.1:{port}", timeout=1)  # before listen(): refused
    listener.listen()
    check_reachable(f"ray://127.0.0.1:{port}")  # something listens: left to Ray
    listener.close()
    check_reachable("auto")  # the machine's own cluster: Ray's to find
