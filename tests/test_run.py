"""``dct-audit run`` end to end on tiny local models: the run folder, resume, refusals, CLI errors."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import dct_audit.pipeline as pipeline
from dct_audit.cli import main
from dct_audit.errors import DctAuditError

FAST = [
    "--max-updates",
    "3",
    "--n-images",
    "2",
    "--context",
    "a photo of {}",
    "--context",
    "{} in the snow",
    "--lr",
    "0.2",
    "--snapshot-every",
    "2",
    "--quiet",
]


@pytest.fixture()
def run_args(tiny_run_command, tmp_path):
    return [*tiny_run_command, "--out", str(tmp_path), "--name", "r1", *FAST]


def test_run_writes_a_complete_run_folder(run_args, tmp_path, capsys):
    assert main([*run_args, "--classes", "lobster,horizontal_bar"]) == 0
    out = capsys.readouterr().out
    assert "run folder:" in out and "American lobster (0)" in out
    root = tmp_path / "r1"
    manifest = json.loads((root / "manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == ["American lobster", "spiny lobster", "horizontal bar"]
    assert manifest["models"]["generator"]["family"] == "sd-turbo"
    assert manifest["models"]["classifier"]["kind"] == "torchscript"
    assert manifest["versions"]["diffusers"] and manifest["settings"]["max_updates"] == 3
    assert set(manifest["class_runs"]) == {"0", "1", "2"}
    folder = root / "classes" / "0002-horizontal-bar"
    for name in (
        "DONE",
        "token.safetensors",
        "history.csv",
        "scores.csv",
        "class.json",
        "tags.csv",
        "attribution.json",
    ):
        assert (folder / name).is_file(), name
    scores = pd.read_csv(folder / "scores.csv")
    assert len(scores) == 2 * 2 * 2  # variants x contexts x seeds
    pairs = scores.pivot_table(
        index=["context_index", "seed"], columns="variant", values="file", aggfunc="count"
    )
    assert (pairs == 1).all().all()  # every token image has its baseline twin with the same seed
    assert all((folder / f).is_file() for f in scores["file"])
    summary = json.loads((folder / "class.json").read_text())
    token_prompts = scores.loc[scores.variant == "token", "prompt"]
    if summary["token_unchanged"]:  # validation kept the starting token: one grid, filed under both variants
        assert (
            token_prompts.to_numpy() == scores.loc[scores.variant == "baseline", "prompt"].to_numpy()
        ).all()
    else:
        assert token_prompts.str.contains("<dct-2> horizontal bar").all()
    history = pd.read_csv(folder / "history.csv")
    assert list(history.columns[:4]) == ["update", "loss", "target_prob", "accuracy"] and len(history) >= 1
    assert len(list((folder / "evolution").glob("*.png"))) >= 1
    assert not list(root.rglob("*.tmp"))  # no temporary file left behind
    tags = pd.read_csv(folder / "tags.csv")
    assert len(tags) == len(scores) and {"plate", "water", "athlete"} <= set(tags.columns)
    assert tags["plate"].between(0, 1).all()
    assert len(list((folder / "attribution").glob("token_*.png"))) == 4  # min(4, 2 contexts x 2 seeds)
    enrichment = pd.read_csv(root / "enrichment.csv")
    assert len(enrichment) == 3 * len(tags.columns[4:]) and enrichment["q_value"].between(0, 1).all()
    findings = json.loads((root / "findings.json").read_text())
    # every flagged attribute, plus every other the check confirmed or left open (source "sweep")
    assert isinstance(findings, list) and len(findings) == int(enrichment["flagged"].sum()) + sum(
        f["source"] == "sweep" and (f["confirmed"] or f["open"]) for f in findings
    )
    assert all(f["flagged"] or f["confirmed"] or f["open"] for f in findings)
    assert (root / "report" / "index.html").is_file() and "report:" in out


def test_resume_recomputes_nothing_finished_and_redoes_half_written(run_args, tmp_path, monkeypatch):
    real_score = pipeline.score_images

    def dies_in_second_class(classifier, images, target, k=5):
        if target == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while class 2 was being scored
        return real_score(classifier, images, target, k)

    monkeypatch.setattr(pipeline, "score_images", dies_in_second_class)
    assert main([*run_args, "--classes", "0,2"]) == 130
    root = tmp_path / "r1" / "classes"
    done, half = root / "0000-american-lobster", root / "0002-horizontal-bar"
    assert (done / "DONE").exists() and half.exists() and not (half / "DONE").exists()
    (half / "junk.png").write_bytes(b"half-written")
    stamp = {p: p.stat().st_mtime_ns for p in done.rglob("*")}

    inverted = []
    real_invert = pipeline.invert_class
    monkeypatch.setattr(pipeline, "score_images", real_score)
    monkeypatch.setattr(
        pipeline,
        "invert_class",
        lambda g, c, target, *a, **k: inverted.append(target) or real_invert(g, c, target, *a, **k),
    )
    assert main([*run_args, "--classes", "0,2"]) == 0
    assert inverted == [2]  # class 0 was not recomputed
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*")} == stamp
    assert (half / "DONE").exists() and not (half / "junk.png").exists()

    inverted.clear()
    assert main([*run_args, "--classes", "0,2"]) == 0  # a third run has nothing to do and loads nothing
    assert inverted == []


def test_other_settings_are_refused_unless_overwrite(run_args, tmp_path, capsys):
    assert main([*run_args, "--classes", "0"]) == 0
    capsys.readouterr()
    assert main([*run_args, "--classes", "0", "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings" in err and "seed" in err and "--overwrite" in err
    assert main([*run_args, "--classes", "0", "--seed", "5", "--overwrite"]) == 0
    assert json.loads((tmp_path / "r1" / "manifest.json").read_text())["settings"]["seed"] == 5


def test_python_api_matches_cli(tiny_pipelines, tiny_classifier, tmp_path):
    import dct_audit

    model, labels = tiny_classifier
    result = dct_audit.run(
        f"file:{model}",
        "plate",
        labels=labels,
        generator=tiny_pipelines["turbo"],
        out=str(tmp_path),
        name="api",
        max_updates=2,
        n_images=1,
        contexts=("a photo of {}",),
        tagger=None,
        explain_images=0,
        holdout_classifier=f"file:{model}",
        quiet=True,
    )
    assert result.run_dir == tmp_path / "api" and [c["index"] for c in result.classes] == [3]
    assert result.findings == [] and not (tmp_path / "api" / "findings.json").exists()
    summary = result.classes[0]
    # the summary's accuracy is the share of token images whose top-1 is the class, as scored on disk
    scores = pd.read_csv(next((tmp_path / "api" / "classes").iterdir()) / "scores.csv")
    token = scores[scores["variant"] == "token"]
    assert summary["token_accuracy"] == pytest.approx(float(token["correct"].mean()))
    # the held-out classifier here is the same model, so it must agree exactly
    assert summary["holdout_token_accuracy"] == summary["token_accuracy"]
    # the same audit through the CLI: the same token and the same scores
    argv = ["run", "--classifier", f"file:{model}", "--labels", labels, "--classes", "plate"]
    argv += ["--generator", tiny_pipelines["turbo"], "--out", str(tmp_path), "--name", "cli"]
    argv += ["--max-updates", "2", "--n-images", "1", "--context", "a photo of {}", "--tagger", "none"]
    argv += ["--explain-images", "0", "--holdout-classifier", f"file:{model}", "--quiet"]
    assert main(argv) == 0
    from dct_audit.invert import load_token

    api_dir, cli_dir = (next((tmp_path / n / "classes").iterdir()) for n in ("api", "cli"))
    assert torch.equal(
        load_token(api_dir / "token.safetensors")[1], load_token(cli_dir / "token.safetensors")[1]
    )
    pd.testing.assert_frame_equal(pd.read_csv(api_dir / "scores.csv"), pd.read_csv(cli_dir / "scores.csv"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--classifier": "resnet5"}, "unknown classifier 'resnet5'; did you mean"),
        ({"--classes": "lobstr"}, "no class matches 'lobstr'; closest"),
        ({"--generator": "./no/such/pipeline"}, "generator folder './no/such/pipeline' does not exist"),
        ({"--out": "FILE/sub"}, "is a file; choose another --out"),
        ({"--labels": "/no/labels.txt"}, "labels file '/no/labels.txt' does not exist"),
    ],
)
def test_cli_errors_are_one_line_exit_2_and_write_nothing(run_args, tmp_path, capsys, change, message):
    (tmp_path / "FILE").write_text("not a folder")
    args = [*run_args, "--classes", "0"]
    for flag, value in change.items():
        args[args.index(flag) + 1] = str(tmp_path / value) if value == "FILE/sub" else value
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and err.startswith("dct-audit: error: ")
        and message in err.replace(str(tmp_path) + "/", "")
    )
    assert not (tmp_path / "r1").exists()


def test_bad_flag_values_are_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "dct_audit.cli", "run", "--classifier", "x", "--classes", "1", "--batch", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--batch" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_finish_takes_the_run_flags_it_changes_from_the_one_source_and_leaves_the_rest_to_the_run():
    from dct_audit.cli import build_parser
    from dct_audit.options import ANALYSIS_OPTIONS

    parser = build_parser()
    given = parser.parse_args(["finish", "R", "--no-adjust", "--confirm-max-seeds", "32", "--alpha", "0.1"])
    assert (given.adjust, given.confirm_max_seeds, given.alpha) == (False, 32, 0.1)
    assert parser.parse_args(["finish", "R", "--adjust"]).adjust is True
    assert parser.parse_args(["finish", "R", "--gen-batch", "32"]).gen_batch == 32  # speed, e.g. after shards
    # a flag whose run form says "no" (--no-association) is both ways in finish, named by its true side
    assert parser.parse_args(["finish", "R", "--no-association"]).association is False
    assert parser.parse_args(["finish", "R", "--association"]).association is True
    run = ["run", "--classifier", "resnet50", "--classes", "lobster"]
    assert parser.parse_args([*run, "--no-association"]).association is False
    assert parser.parse_args(run).association is True
    # not given: None, so the run's own recorded value stands
    assert all(getattr(parser.parse_args(["finish", "R"]), k) is None for k in ANALYSIS_OPTIONS)
    # values are checked as for run, in one line
    with pytest.raises(SystemExit):
        parser.parse_args(["finish", "R", "--alpha", "2"])
    assert parser.parse_args(["compare", "A", "B"]).alpha == 0.05


def test_missing_hub_model_offline_names_download(tmp_path, monkeypatch, tiny_classifier):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    model, labels = tiny_classifier
    proc_args = [
        "run",
        "--generator",
        "someone/not-cached-model",
        "--classifier",
        f"file:{model}",
        "--labels",
        labels,
        "--classes",
        "0",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    from dct_audit.adapters.generator_load import load_generator
    from dct_audit.errors import DctAuditError

    with pytest.raises(DctAuditError, match=r"dct-audit download --generator someone/not-cached-model"):
        load_generator("someone/not-cached-model")
    assert main(proc_args) == 2


@pytest.mark.parametrize(
    "extra, attempts, expected",
    [
        ([], 1, "; the token did not learn the class (try --objective meanprob --attempts 2)"),
        (["--objective", "meanprob"], 1, "; the token did not learn the class (try --attempts 2)"),
        (["--objective", "meanprob", "--attempts", "2"], 2, "; the token did not learn the class\n"),
    ],
)
def test_run_names_a_token_that_did_not_learn_and_the_flags_left_to_try(
    run_args, monkeypatch, capsys, extra, attempts, expected
):
    """The printed line of a class whose token missed the stop and gained nothing over the plain prompt."""
    summary = {"name": "spiny lobster", "index": 1, "updates": 3, "attempts": attempts}
    summary |= {"token_accuracy": 0.0, "baseline_accuracy": 0.25, "timings": {"total_s": 1.0}}
    classes = [{**summary, "stop_reason": "max_updates"}, {**summary, "stop_reason": "accuracy"}]
    result = pipeline.RunResult(run_dir=Path("r1"), classes=classes, findings=[], report=None)
    monkeypatch.setattr(pipeline, "run_with_options", lambda options: result)
    assert main([*run_args, "--classes", "lobster", *extra]) == 0
    lines = capsys.readouterr().out.splitlines(keepends=True)
    assert lines[0].endswith("(max_updates), 1.0 s" + expected.rstrip("\n") + "\n")
    assert lines[1].endswith("(accuracy), 1.0 s\n")  # reached the stop: nothing to say


def test_download_offline_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "--generator", "stabilityai/sd-turbo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE=1" in err


def test_classes_command_lists_matches_without_weights(capsys):
    assert main(["classes", "--classifier", "resnet50", "lobster"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["122", "123"]
    assert main(["classes", "--classifier", "resnet50", "lobstr"]) == 2
    assert "closest: " in capsys.readouterr().err


def test_a_classifier_in_memory_audits_like_the_same_model_loaded_from_its_file(
    tiny_pipelines, tiny_classifier, tmp_path, quick_run_kwargs
):
    """A notebook's model (a torch module with its labels and preprocessing) gives the run the same token
    and scores as the same model named by its file; the manifest records it by class and weight hash, a
    resume with the same model keeps the finished class, and other weights are refused."""
    import dct_audit
    from dct_audit.adapters.classifier import load_classifier

    model, labels = tiny_classifier
    names = [line.strip() for line in open(labels, encoding="utf-8") if line.strip()]
    common = dict(quick_run_kwargs, generator=tiny_pipelines["turbo"])
    dct_audit.run(f"file:{model}", "plate", labels=labels, name="file", **common)
    paths = dict(common, generator=Path(common["generator"]), out=Path(common["out"]))  # a notebook's Paths
    again = dct_audit.run(f"file:{model}", "plate", labels=Path(labels), name="file", **paths)
    assert again.skipped == [again.classes[0]["index"]]  # the same settings as the strings
    loaded = load_classifier(f"file:{model}", labels)
    module, preprocess = loaded.model, loaded.preprocess
    mem = dct_audit.run(module, "plate", labels=names, preprocess=preprocess, name="mem", **common)
    from dct_audit.invert import load_token

    file_dir, mem_dir = (next((tmp_path / n / "classes").iterdir()) for n in ("file", "mem"))
    assert torch.equal(
        load_token(file_dir / "token.safetensors")[1], load_token(mem_dir / "token.safetensors")[1]
    )
    pd.testing.assert_frame_equal(pd.read_csv(file_dir / "scores.csv"), pd.read_csv(mem_dir / "scores.csv"))
    record = json.loads((tmp_path / "mem" / "manifest.json").read_text())["models"]["classifier"]
    assert record["kind"] == "in-memory" and record["weights"].startswith("sha256:")
    assert record["spec"].startswith("in-memory:") and record["model_id"].endswith(type(module).__qualname__)

    again = dct_audit.run(module, "plate", labels=names, preprocess=preprocess, name="mem", **common)
    assert again.skipped == [mem.classes[0]["index"]]
    changed = copy.deepcopy(module)
    with torch.no_grad():
        next(p for p in changed.parameters()).add_(1.0)
    with pytest.raises(DctAuditError, match="other settings"):
        dct_audit.run(changed, "plate", labels=names, preprocess=preprocess, name="mem", **common)
    # a module that carries no preprocessing (not a timm model) is refused with the fix
    with pytest.raises(DctAuditError, match="preprocess="):
        dct_audit.run(torch.nn.Linear(3, 4), "plate", labels=names, name="bad", **common)


def test_a_generator_and_tagger_in_memory_audit_like_the_same_models_named(
    tiny_pipelines, tiny_classifier, tiny_clip, tmp_path, quick_run_kwargs
):
    """A loaded diffusers pipeline and a loaded tagger give the run the same token, scores and tags as the
    same models named by folder; the manifest records the pipeline by class and weight hash; a second
    audit with the same pipeline reuses its token-free images and gets the same numbers; a resume keeps the
    finished class, and other weights are refused."""
    from diffusers import StableDiffusionPipeline

    import dct_audit
    from dct_audit.invert import load_token
    from dct_audit.tag import load_tagger

    model, labels = tiny_classifier
    common = dict(quick_run_kwargs, tagger=f"hf:{tiny_clip}", confirm="flagged", labels=labels)
    dct_audit.run(f"file:{model}", "plate", generator=tiny_pipelines["turbo"], name="named", **common)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines["turbo"], safety_checker=None)
    tagger = load_tagger(f"hf:{tiny_clip}")
    mem = dict(common, generator=pipe, tagger=tagger)
    dct_audit.run(f"file:{model}", "plate", name="mem", **mem)
    folders = {n: next((tmp_path / n / "classes").iterdir()) for n in ("named", "mem")}
    assert torch.equal(*(load_token(f / "token.safetensors")[1] for f in folders.values()))
    for table in ("scores.csv", "tags.csv"):
        pd.testing.assert_frame_equal(*(pd.read_csv(f / table) for f in folders.values()))
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    assert manifest["models"]["generator"]["spec"].startswith("in-memory:StableDiffusionPipeline@")
    assert manifest["tagging"]["tagger"] == f"hf:{tiny_clip}"

    # the same pipeline again: its baseline images come from its memo, and the numbers are the same
    memo = pipe._dct_audit_memo
    assert memo.hits == 0 and memo.batches
    dct_audit.run(f"file:{model}", "plate", name="again", **mem)
    assert memo.hits > 0
    again = next((tmp_path / "again" / "classes").iterdir())
    pd.testing.assert_frame_equal(
        pd.read_csv(folders["mem"] / "scores.csv"), pd.read_csv(again / "scores.csv")
    )

    assert dct_audit.run(f"file:{model}", "plate", name="mem", **mem).skipped == [3]
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1.0)
    with pytest.raises(DctAuditError, match="other settings"):
        dct_audit.run(f"file:{model}", "plate", name="mem", **mem)
    assert pipe._dct_audit_memo is not memo and not pipe._dct_audit_memo.batches  # stale images dropped
    with pytest.raises(DctAuditError, match="StableDiffusionPipeline"):
        dct_audit.run(f"file:{model}", "plate", name="bad", **dict(mem, generator=42))
    with pytest.raises(DctAuditError, match="passed in memory"):
        dct_audit.run(
            f"file:{model}",
            "plate",
            name="bad",
            **dict(mem, generator=manifest["models"]["generator"]["spec"]),
        )
