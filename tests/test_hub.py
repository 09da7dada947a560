"""Models that are not cached and cannot be downloaded now: one line, in seconds, naming every one of them and
the one `dct-audit download` command that fetches them (the hub's client retries an unreachable host for over
a minute per file, then a run named only the first model it failed on). Nothing here reaches the network."""

import socket

import pytest

from dct_audit.adapters import hub
from dct_audit.cli import build_parser, main
from dct_audit.errors import DctAuditError
from dct_audit.records import not_cached


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches, and no HF_HUB_OFFLINE or proxy from the environment."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *hub._PROXIES):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def no_network(monkeypatch):
    """Every host unreachable, as on this machine, without asking the network."""
    asked = []
    monkeypatch.setattr(hub, "_unreachable_host", lambda host, port: asked.append(host) or "unknown host")
    return asked


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_says_why_a_host_does_not_answer():
    assert hub.probe("127.0.0.1", _closed_port(), timeout=2) == "connection refused"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub.probe("127.0.0.1", server.getsockname()[1], timeout=2) is None


def test_unreachable_names_the_host_offline_mode_and_leaves_proxies_to_the_libraries(
    monkeypatch, empty_caches
):
    port = _closed_port()
    assert hub.unreachable(f"http://127.0.0.1:{port}/x") == "127.0.0.1: connection refused"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub.unreachable(f"http://127.0.0.1:{port}/x") is None  # only the libraries know the way through
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.unreachable() == "HF_HUB_OFFLINE=1 is set"


def test_not_cached_lists_hub_and_torchvision_models_and_leaves_local_ones(empty_caches, tiny_classifier):
    model, _ = tiny_classifier
    missing = not_cached(
        {
            "--classifier": "resnet18.a1_in1k",
            "--holdout-classifier": "tv:resnet18",
            "--generator": "someone/some-pipeline",
            "--tagger": "ViT-B-32/laion2b_s34b_b79k",
        }
    )
    assert [(flag, spec) for flag, spec, _ in missing] == [
        ("--classifier", "resnet18.a1_in1k"),
        ("--holdout-classifier", "tv:resnet18"),
        ("--generator", "someone/some-pipeline"),
        ("--tagger", "ViT-B-32/laion2b_s34b_b79k"),
    ]
    assert missing[1][2].startswith("https://download.pytorch.org/")
    assert {url for _, _, url in missing[::2]} == {hub.hub_url()}
    assert not_cached({"--classifier": f"file:{model}", "--tagger": "world", "--generator": None}) == []


def test_a_model_in_the_cache_is_not_missing(empty_caches):
    snapshot = empty_caches / "hf" / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    torch_file = empty_caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    torch_file.parent.mkdir(parents=True)
    torch_file.write_bytes(b"weights")
    assert not_cached({"--classifier": "resnet18.a1_in1k", "--holdout-classifier": "tv:resnet18"}) == []


def test_run_names_every_model_it_cannot_have_in_one_line_before_loading_any(
    empty_caches, no_network, tiny_run_command, tmp_path, monkeypatch, capsys
):
    from dct_audit import pipeline

    loaded = []
    monkeypatch.setattr(pipeline, "load_classifier", lambda *a, **k: loaded.append(a))
    args = list(tiny_run_command)
    args[args.index("--classifier") + 1 : args.index("--classifier") + 2] = ["resnet18.a1_in1k"]
    args[args.index("--generator") + 1] = "someone/some-pipeline"
    args[args.index("--tagger") + 1] = "ViT-B-32/laion2b_s34b_b79k"
    labels = args.index("--labels")
    del args[labels : labels + 2]
    code = main(
        [*args, "--holdout-classifier", "tv:resnet18", "--classes", "0", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and loaded == [] and not (tmp_path / "o").exists()
    assert len(err) == 1, err
    assert (
        "cannot be downloaded now (huggingface.co: unknown host; download.pytorch.org: unknown host)"
        in err[0]
    )
    assert (
        "`dct-audit download --classifier resnet18.a1_in1k --classifier tv:resnet18 --generator "
        "someone/some-pipeline --tagger ViT-B-32/laion2b_s34b_b79k`" in err[0]
    )
    assert set(no_network) == {"huggingface.co", "download.pytorch.org"}


def test_download_refuses_at_once_without_a_network_and_takes_two_classifiers(
    empty_caches, no_network, monkeypatch, capsys
):
    assert build_parser().parse_args(["download", "--classifier", "a", "--classifier", "b"]).classifier == [
        "a",
        "b",
    ]
    assert main(["download", "--classifier", "resnet18.a1_in1k", "--classifier", "tv:resnet18"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "dct-audit: error: cannot download (huggingface.co: unknown host; download.pytorch.org: unknown host); run "
        "`dct-audit download` on a machine that reaches it, then copy its HF_HOME / TORCH_HOME caches here"
    ]


def test_hub_models_load_from_the_cache_only_when_the_hub_cannot_be_reached(
    monkeypatch, empty_caches, no_network
):
    assert hub.hf_kwargs("someone/model") == {"local_files_only": True}
    monkeypatch.setattr(hub, "_unreachable_host", lambda host, port: None)
    assert hub.hf_kwargs("someone/model") == {}


def test_a_failed_load_names_why_the_hub_is_out_of_reach_else_the_libraries_error(monkeypatch, empty_caches):
    line = hub._first_line(RuntimeError("word " * 60))
    assert len(line) <= 164 and line.endswith("word ...")  # cut at a word
    monkeypatch.setattr(hub, "_unreachable_host", lambda host, port: None)
    with pytest.raises(DctAuditError, match=r"the download failed \(short\)"):
        with hub.missing_model_guard("classifier", "--classifier x"):
            raise OSError("short")
    monkeypatch.setattr(hub, "_unreachable_host", lambda host, port: "unknown host")
    with pytest.raises(DctAuditError, match=r"cannot be downloaded now \(huggingface.co: unknown host\);"):
        with hub.missing_model_guard("classifier", "--classifier x"):
            raise OSError("short")


def test_compare_of_two_classifiers_checks_both_before_auditing_the_first(
    empty_caches, no_network, tiny_pipelines, monkeypatch, capsys
):
    from dct_audit import api

    audited = []
    monkeypatch.setattr(api, "run", lambda *a, **k: audited.append(a))
    base = ["compare", "--classes", "0", "--generator", tiny_pipelines["turbo"], "--tagger", "none"]
    assert main([*base, "--classifiers", "resnet18.a1_in1k,tv:resnet18"]) == 2
    err = capsys.readouterr().err
    assert "--classifier resnet18.a1_in1k, --classifier tv:resnet18;" in err
    assert "`dct-audit download --classifier resnet18.a1_in1k --classifier tv:resnet18`" in err
    assert main([*base, "--classifiers", "resnet18.a1_in1k,resnet5"]) == 2  # B misspelt
    assert "unknown classifier 'resnet5'" in capsys.readouterr().err
    assert audited == []


def test_compare_of_two_classifiers_refuses_classes_they_name_differently_before_any_audit(
    monkeypatch, capsys
):
    from dct_audit import api

    audited = []
    monkeypatch.setattr(api, "run", lambda *a, **k: audited.append(a))
    names = "resnet18.a1_in1k,vit_base_patch16_224.augreg_in21k"  # ImageNet-1k vs ImageNet-21k labels
    assert main(["compare", "--classifiers", names, "--classes", "American lobster"]) == 2
    err = capsys.readouterr().err
    assert "names other classes in resnet18.a1_in1k ([(122, 'American lobster')]) than in" in err
    assert "([(1856, 'American lobster')])" in err and audited == []
