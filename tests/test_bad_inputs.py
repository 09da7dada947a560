"""Bad input gets one clear line and a non-zero exit: no traceback, nothing written.

Each case is one row: the command line (``{MODEL}``, ``{LABELS}``, ``{GEN}``, ``{TMP}`` are filled in), the
exit code, and a phrase the one error line must contain. Cases that need a file set it up in ``SETUP``.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from dct_audit.cli import main

RUN = "run --classifier file:{MODEL} --labels {LABELS} --generator {GEN} --tagger none --classes 0 --out {TMP}/out --quiet"

CASES = [
    # numeric flags of run
    ("run-max-updates-0", RUN + " --max-updates 0", 2, "must be at least 1"),
    ("run-lr-negative", RUN + " --lr -1", 2, "--lr must be > 0"),
    ("run-lr-nan", RUN + " --lr nan", 2, "must be a finite number"),
    ("run-lr-inf", RUN + " --lr inf", 2, "must be a finite number"),
    ("run-lr-text", RUN + " --lr fast", 2, "'fast' is not a number"),
    ("run-stop-accuracy-1.5", RUN + " --stop-accuracy 1.5", 2, "must be in (0, 1]"),
    ("run-alpha-0", RUN + " --alpha 0", 2, "must be in (0, 1), not 0.0"),
    ("run-alpha-1", RUN + " --alpha 1", 2, "must be in (0, 1), not 1.0"),
    ("run-min-effect-2", RUN + " --min-effect 2", 2, "must be in (0, 1]"),
    ("run-n-images-0", RUN + " --n-images 0", 2, "must be at least 1"),
    ("run-batch-0", RUN + " --batch 0", 2, "must be at least 1"),
    ("run-gen-batch-0", RUN + " --gen-batch 0", 2, "must be at least 1"),
    ("run-confirm-max-seeds-not-more", RUN + " --confirm-max-seeds 8", 2, "more than --confirm-seeds (8)"),
    ("run-steps-negative", RUN + " --steps -3", 2, "must be at least 1"),
    ("run-grad-steps-0", RUN + " --grad-steps 0", 2, "must be at least 1"),
    ("run-patience-negative", RUN + " --patience -1", 2, "must be at least 0"),
    ("run-val-seeds-text", RUN + " --val-seeds x", 2, "is not a whole number"),
    ("run-eval-every-0", RUN + " --eval-every 0", 2, "must be at least 1"),
    ("run-resolution-30", RUN + " --resolution 30", 2, "--resolution must be a multiple of 8"),
    ("run-guidance-text", RUN + " --guidance strong", 2, "is not a number"),
    ("run-device-tpu", RUN + " --device tpu", 2, "is not a torch device"),
    ("run-dtype-bf16-on-cpu", RUN + " --dtype bf16 --device cpu", 2, "needs a CUDA device"),
    ("run-val-seeds-negative", RUN + " --val-seeds -1", 2, "must be at least 0"),
    ("run-context-without-braces", RUN + " --context 'a photo'", 2, "must contain '{}' exactly once"),
    # files: labels, attributes, models, manifest
    ("run-labels-missing", RUN.replace("{LABELS}", "{TMP}/nolabels.txt"), 2, "does not exist"),
    ("run-labels-empty", RUN.replace("{LABELS}", "{TMP}/empty.txt"), 2, "empty"),
    # a blank line inside would shift every later class to the wrong index if skipped
    ("run-labels-blank-line", RUN.replace("{LABELS}", "{TMP}/blank-line.txt"), 2, "has an empty line 2"),
    ("run-labels-not-text", RUN.replace("{LABELS}", "{TMP}/binary.txt"), 2, "is not UTF-8 text"),
    (
        "run-attributes-not-json",
        RUN.replace("--tagger none", "--tagger world") + " --attributes {TMP}/bad.json",
        2,
        "is not valid JSON",
    ),
    (
        "run-attributes-truncated",
        RUN.replace("--tagger none", "--tagger world") + " --attributes {TMP}/trunc.json",
        2,
        "expected an object with an 'attributes' list",
    ),
    (
        "run-attributes-hostile",
        RUN.replace("--tagger none", "--tagger world") + " --attributes {TMP}/hostile.json",
        2,
        "exactly once",
    ),
    (
        "run-classifier-not-torchscript",
        RUN.replace("{MODEL}", "{TMP}/junk.pt"),
        2,
        "is not a TorchScript archive",
    ),
    (
        "run-classifier-preprocess-0-255",  # mmcv-style mean/std: every score would be silently wrong
        RUN.replace("{MODEL}", "{TMP}/scaled.pt"),
        2,
        "are on the 0-255 pixel scale; the images dct-audit scores are in [0, 1]: divide both by 255",
    ),
    (
        "run-classifier-takes-one-channel",  # a grayscale model: refused at load, before any folder is made
        RUN.replace("file:{MODEL}", "file:{TMP}/gray.pt"),
        2,
        "fails on 2 RGB images of 224x224 (RuntimeError: Given groups=1",
    ),
    (
        "run-classifier-file-without-prefix",
        RUN.replace("file:{MODEL}", "{MODEL}"),
        2,
        "is a file, not a model folder or name; a TorchScript file takes the file: prefix",
    ),
    ("run-classifier-folder-missing", RUN.replace("file:{MODEL}", "{TMP}/nomodel/"), 2, "does not exist"),
    (
        "run-classifier-config-not-json",
        RUN.replace("file:{MODEL}", "{TMP}/badclf"),
        2,
        "config.json is not a valid JSON object",
    ),
    (
        "run-classifier-uncached-offline",
        RUN.replace("file:{MODEL} --labels {LABELS}", "resnet18.a1_in1k"),
        2,
        "dct-audit download --classifier resnet18.a1_in1k",
    ),
    ("run-generator-no-index", RUN.replace("{GEN}", "{TMP}/empty-dir"), 2, "no model_index.json"),
    (
        "run-generator-index-not-json",
        RUN.replace("{GEN}", "{TMP}/badgen"),
        2,
        "model_index.json is not valid JSON",
    ),
    (
        "run-generator-sdxl-incomplete",
        RUN.replace("{GEN}", "{TMP}/sdxl"),
        2,
        "SDXL pipeline whose model_index.json lists no",
    ),
    ("run-name-outside-out", RUN + " --name ../escape", 2, "must be a plain folder name"),
    ("run-init-word-two-tokens", RUN + " --init-word 'hello world'", 2, "is 2 tokens"),
    ("run-discover-without-tagger", RUN + " --discover", 2, "--discover needs a tagger"),
    ("run-adjust-without-tagger", RUN + " --adjust", 2, "--adjust needs a tagger"),
    (
        "run-adjust-with-confirm-flagged",
        RUN.replace("--tagger none", "--tagger world") + " --adjust --confirm flagged",
        2,
        "--adjust needs --confirm all",
    ),
    (
        "run-discover-too-few-seeds",
        RUN.replace("--tagger none", "--tagger world") + " --discover --n-images 2",
        2,
        "at least 4 seeds per class",
    ),
    (
        "run-classifier-weights-corrupt",
        RUN.replace("file:{MODEL} --labels {LABELS}", "{TMP}/corrupt-timm"),
        2,
        "could not be loaded (Error while deserializing header",
    ),
    (
        "run-tagger-folder-not-a-model",
        RUN.replace("--tagger none", "--tagger hf:{TMP}/empty-dir"),
        2,
        "must be a complete model folder",
    ),
    ("run-class-no-match", RUN.replace("--classes 0", "--classes zebra"), 2, "zebra"),
    ("run-out-is-a-file", RUN.replace("{TMP}/out", "{TMP}/empty.txt/run"), 2, "is a file"),
    (
        "run-manifest-damaged",
        RUN.replace("{TMP}/out", "{TMP}/runs") + " --name damaged",
        2,
        "is not valid JSON",
    ),
    (
        "run-tagger-unknown",
        RUN.replace("--tagger none", "--tagger NoSuchNet/x"),
        2,
        "unknown tagger architecture",
    ),
    (
        "run-tagger-unknown-tag",
        RUN.replace("--tagger none", "--tagger ViT-B-32/nope"),
        2,
        "has no pretrained tag",
    ),
    # classes
    ("classes-no-match", "classes --classifier file:{MODEL} --labels {LABELS} zebra", 2, "zebra"),
    ("classes-file-without-labels", "classes --classifier file:{MODEL} lobster", 2, "needs --labels"),
    # compare
    ("compare-one-run", "compare {TMP}/runs/damaged", 2, "needs two run folders"),
    ("compare-not-runs", "compare {TMP}/empty-dir {TMP}/empty-dir", 2, "manifest"),
    # report and verify
    ("report-not-a-run", "report {TMP}/empty-dir", 2, "manifest"),
    ("verify-not-a-run", "verify {TMP}/empty-dir", 2, "not a dct-audit run folder"),
    ("verify-damaged-manifest", "verify {TMP}/runs/damaged", 2, "is not valid JSON"),
    # demo
    (
        "demo-classifier-not-a-folder",
        "demo --classifier {TMP}/empty-dir --out {TMP}/demo",
        2,
        "is not a world classifier folder",
    ),
    (
        "demo-training-json-damaged",
        "demo --classifier {TMP}/worldclf --out {TMP}/demo",
        2,
        "is not readable JSON",
    ),
    (
        "demo-classifier-without-training-json",
        "demo --classifier {TMP}/badclf --out {TMP}/demo",
        2,
        "is not a world classifier folder (no training.json)",
    ),
    (  # a run of an earlier version (or of --thorough) in --out: the demo names its runs, so no --name
        "demo-other-settings",
        "demo --out {TMP}/olddemo --no-compare",
        2,
        "pass --overwrite to replace it, or another --out",  # the demo's own fix, not run's --name
    ),
    ("demo-attempts-0", "demo --out {TMP}/demo --attempts 0", 2, "must be at least 1"),
    ("demo-objective-unknown", "demo --out {TMP}/demo --objective mse", 2, "invalid choice: 'mse'"),
    # download
    ("download-local-file", "download --classifier file:{MODEL}", 2, "there is nothing to download"),
    (
        "download-offline",
        "download --tagger world",
        2,
        "HF_HUB_OFFLINE=1 is set, so nothing can be downloaded",
    ),
]


@pytest.fixture()
def files(tmp_path, tiny_classifier, tiny_pipelines):
    model, labels = tiny_classifier
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank-line.txt").write_text("cat\n\ndog\nbird\n")
    (tmp_path / "binary.txt").write_bytes(b"\x8e\xff\x00labels")
    (tmp_path / "bad.json").write_text("{attributes: [")
    (tmp_path / "trunc.json").write_text(json.dumps({"attributes": "plate"}))
    (tmp_path / "hostile.json").write_text(
        json.dumps({"attributes": [{"name": "<script>alert(1)</script>", "with": "{} {} {}"}]})
    )
    (tmp_path / "junk.pt").write_bytes(b"\x00not torchscript")
    n_labels = len([line for line in open(labels).read().splitlines() if line.strip()])
    gray = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(1), torch.nn.LazyLinear(n_labels))
    gray(torch.rand(1, 1, 224, 224))  # materialise the lazy layer
    torch.jit.trace(gray.eval(), torch.rand(1, 1, 224, 224)).save(str(tmp_path / "gray.pt"))
    shutil.copy(model, tmp_path / "scaled.pt")
    (tmp_path / "scaled.pt.json").write_text(
        json.dumps({"mean": [123.675, 116.28, 103.53], "std": [58.4] * 3})
    )
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "badgen").mkdir()
    (tmp_path / "badgen" / "model_index.json").write_text('{"_class_name": "StableDiff')
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline"})
    )
    (tmp_path / "runs" / "damaged").mkdir(parents=True)
    (tmp_path / "runs" / "damaged" / "manifest.json").write_text('{"settings": {')
    (tmp_path / "badclf").mkdir()
    (tmp_path / "badclf" / "config.json").write_text("{trunc")
    (tmp_path / "corrupt-timm").mkdir()  # a timm folder whose weights are not a safetensors file
    config = {"architecture": "resnet18", "num_classes": 4, "label_names": ["a", "b", "c", "d"]}
    (tmp_path / "corrupt-timm" / "config.json").write_text(json.dumps(config))
    (tmp_path / "corrupt-timm" / "model.safetensors").write_bytes(b"\xff" * 4000)
    (tmp_path / "olddemo" / "demo-biased").mkdir(parents=True)
    (tmp_path / "olddemo" / "demo-biased" / "manifest.json").write_text(
        json.dumps({"settings": {"objective": "ce"}})
    )
    (tmp_path / "worldclf").mkdir()
    (tmp_path / "worldclf" / "config.json").write_text("{}")
    (tmp_path / "worldclf" / "training.json").write_text("{trunc")
    return {"{MODEL}": model, "{LABELS}": labels, "{GEN}": tiny_pipelines["turbo"], "{TMP}": str(tmp_path)}


def _argv(template: str, files: dict) -> list[str]:
    import shlex

    for key, value in files.items():
        template = template.replace(key, value)
    return shlex.split(template)


@pytest.mark.parametrize("name, command, code, phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(name, command, code, phrase, files, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach the network, and nothing is cached
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import (earlier tests imported it): without this the
    # library would try the unreachable hub and time out (46 s measured) before giving the same error
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", os.path.join(files["{TMP}"], "..", "empty-hf-cache"))
    before = sorted(os.listdir(files["{TMP}"]))
    try:
        got = main(_argv(command, files))
    except SystemExit as e:  # argparse
        got = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert phrase in lines[0], lines[0]
    assert sorted(os.listdir(files["{TMP}"])) == before  # nothing written beside the inputs
    assert not os.path.exists(os.path.join(files["{TMP}"], "out"))


def test_the_suite_covers_every_command():
    commands = {c[1].split()[0] for c in CASES}
    assert commands >= {"run", "classes", "compare", "report", "demo", "download", "verify"}
    assert len(CASES) >= 35


def test_demo_overwrite_reaches_the_runs(monkeypatch, capsys, tmp_path):
    """`demo --overwrite` (the fix the line above names) replaces the demo's runs: it reaches ``run``."""
    import dct_audit.demo

    seen = {}

    def fake_demo(out, compare_unbiased=True, quiet=False, **overrides):
        seen.update(overrides, out=out)
        raise dct_audit.demo.DctAuditError("stop here")

    monkeypatch.setattr(dct_audit.demo, "demo", fake_demo)
    assert main(["demo", "--out", str(tmp_path), "--overwrite", "--thorough"]) == 2
    assert seen["overwrite"] is True and seen["attempts"] == 2 and seen["out"] == str(tmp_path)
    assert main(["demo", "--out", str(tmp_path)]) == 2 and seen["overwrite"] is False


def test_demo_takes_the_retry_flags_a_class_page_names(monkeypatch, tmp_path):
    """A demo class whose token missed the stop names `--objective` / `--attempts` (``rundir.retry_flags``):
    `demo` accepts them, over the demo's settings and over --thorough's second attempt."""
    import dct_audit.demo

    seen = {}

    def fake(*args, **overrides):
        seen.clear()
        seen.update(overrides)
        raise dct_audit.demo.DctAuditError("stop here")

    monkeypatch.setattr(dct_audit.demo, "demo", fake)
    monkeypatch.setattr(dct_audit.demo, "audit_world_classifier", fake)
    assert main(["demo", "--out", str(tmp_path), "--thorough", "--attempts", "3", "--objective", "ce"]) == 2
    assert seen["attempts"] == 3 and seen["objective"] == "ce" and seen["confirm_max_seeds"] == 32
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "attempts" not in seen and "objective" not in seen  # not given: the demo's own settings
    assert main(["demo", "--classifier", str(tmp_path), "--attempts", "2"]) == 2
    assert seen["attempts"] == 2 and seen["thorough"] is True
