"""Regression tests for the failures an outside check and a read of the real-model path found: each is named
after what broke. Tiny local models only; nothing here downloads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import dct_audit.pipeline as pipeline
from dct_audit import check, rundir
from dct_audit.adapters.classifier import load_classifier, load_notes
from dct_audit.adapters.generator_load import check_generator_spec, load_generator, resolve_dtype
from dct_audit.cli import main
from dct_audit.errors import DctAuditError
from dct_audit.generate import eval_seeds
from dct_audit.invert import SEED_STREAM, train_seed, val_seed_list

FAST = ["--max-updates", "2", "--n-images", "2", "--context", "a photo of {}", "--lr", "0.2", "--quiet"]


@pytest.fixture()
def run_args(tiny_run_command, tmp_path):
    return [*tiny_run_command, "--out", str(tmp_path), "--name", "r", *FAST]


def test_a_classifier_file_that_is_not_torchscript_is_one_line(tmp_path, tiny_classifier):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(DctAuditError, match="is not a TorchScript archive"):
        load_classifier(f"file:{junk}", tiny_classifier[1])


class _Tuple(torch.nn.Module):  # logits and features, as some models return
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.base(x)
        return y, y * 0


class _Dict(_Tuple):
    def forward(self, x) -> dict[str, torch.Tensor]:
        return {"logits": self.base(x)}


class _Map(_Tuple):  # a segmentation-like output: not logits per image
    def forward(self, x) -> torch.Tensor:
        return self.base(x)[:, :, None, None].expand(-1, -1, 2, 2)


def test_a_classifier_returning_a_tuple_or_dict_is_read_and_one_without_logits_is_one_line(
    tmp_path, tiny_classifier
):
    model, labels = tiny_classifier
    base = torch.jit.load(model)
    ref = load_classifier(f"file:{model}", labels)
    images = torch.rand(2, 3, 32, 32)
    for wrapper in (_Tuple, _Dict, _Map):
        path = tmp_path / f"{wrapper.__name__}.pt"
        torch.jit.save(torch.jit.script(wrapper(base)), path)
        shutil.copy(f"{model}.json", f"{path}.json")  # the same preprocessing
        if wrapper is _Map:
            with pytest.raises(DctAuditError, match="returned a 4-d tensor, not logits"):
                load_classifier(f"file:{path}", labels)
        else:
            assert torch.equal(load_classifier(f"file:{path}", labels)(images), ref(images))


class _Softmax(_Tuple):  # a model exported with its softmax
    def forward(self, x) -> torch.Tensor:
        return torch.softmax(self.base(x), dim=-1)


class _LogSoftmax(_Tuple):  # log-probabilities are logits already
    def forward(self, x) -> torch.Tensor:
        return torch.log_softmax(self.base(x), dim=-1)


def test_a_classifier_ending_in_softmax_is_scored_by_its_own_probabilities_not_a_softmax_of_them(
    tmp_path, tiny_classifier
):
    from dct_audit.adapters.in_memory import wrap_classifier

    model, labels = tiny_classifier
    base = torch.jit.load(model)
    ref = load_classifier(f"file:{model}", labels)
    images = torch.rand(3, 3, 32, 32)
    want = torch.softmax(ref(images), -1)
    assert not ref.outputs_probabilities and "outputs" not in ref.spec.extra
    for wrapper, marked in ((_Softmax, True), (_LogSoftmax, False)):
        path = tmp_path / f"{wrapper.__name__}.pt"
        torch.jit.save(torch.jit.script(wrapper(base)), path)
        shutil.copy(f"{model}.json", f"{path}.json")
        clf = load_classifier(f"file:{path}", labels)
        assert clf.outputs_probabilities is marked
        assert any("returns probabilities" in n for n in load_notes(clf)) is marked
        torch.testing.assert_close(torch.softmax(clf(images), -1), want, atol=1e-5, rtol=1e-4)
    # without the fix the softmax of probabilities squeezed every class towards 1/C
    squeezed = torch.softmax(_Softmax(base)(ref.preprocess(images)), -1)
    assert (squeezed.max(-1).values - want.max(-1).values).abs().max() > 0.1
    mem = wrap_classifier(_Softmax(base), labels, ref.preprocess)  # a module in memory alike
    assert mem.outputs_probabilities and mem.spec.extra["outputs"] == "probabilities"
    torch.testing.assert_close(torch.softmax(mem(images), -1), want, atol=1e-5, rtol=1e-4)
    shutil.copy(model, tmp_path / "bare.pt")  # no preprocessing file beside it: the default is said
    assert "ImageNet preprocessing assumed" in " ".join(
        load_notes(load_classifier(f"file:{tmp_path}/bare.pt", labels))
    )
    assert load_notes(ref) == []
    x = images.clone().requires_grad_(True)  # the loss still has a gradient through the log
    torch.nn.functional.cross_entropy(mem(x), torch.tensor([0, 1, 2])).backward()
    assert x.grad.abs().sum() > 0


def test_a_half_precision_module_in_memory_gets_inputs_of_its_dtype_and_gives_float32_logits():
    import copy

    from dct_audit.adapters.classifier import Preprocess
    from dct_audit.adapters.in_memory import wrap_classifier

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    pre, names = Preprocess(crop=(32, 32), resize=None), ["a", "b", "c", "d"]
    x = torch.rand(2, 3, 32, 32)
    want = wrap_classifier(base, names, pre)(x)
    for dtype in (
        torch.bfloat16,
        torch.float16,
    ):  # was: "Input type (float) and bias type ... should be the same"
        clf = wrap_classifier(copy.deepcopy(base).to(dtype), names, pre)
        images = x.clone().requires_grad_(True)
        got = clf(images)
        assert got.dtype == torch.float32 and clf.dtype == dtype
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)
        got.sum().backward()  # the gradient reaches the float32 image through the cast
        assert images.grad.abs().sum() > 0


def test_a_generator_whose_model_index_is_not_json_is_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text("{broken")
    with pytest.raises(DctAuditError, match="model_index.json is not valid JSON"):
        check_generator_spec(str(tmp_path))


def test_an_incomplete_sdxl_pipeline_is_refused_before_anything_is_written(tmp_path, tiny_classifier):
    """SDXL is supported; an SDXL index that lists no UNet, VAE, tokenizers or scheduler is refused up front."""
    gen = tmp_path / "sdxl"
    gen.mkdir()
    (gen / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionXLPipeline",
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            }
        )
    )
    with pytest.raises(DctAuditError, match="SDXL pipeline whose model_index.json lists no unet, vae"):
        check_generator_spec(str(gen))
    other = tmp_path / "sd3"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(DctAuditError, match="is a StableDiffusion3Pipeline; dct-audit supports"):
        check_generator_spec(str(other))
    model, labels = tiny_classifier
    code = main(
        [
            "run",
            "--generator",
            str(gen),
            "--classifier",
            f"file:{model}",
            "--labels",
            labels,
            "--classes",
            "0",
            "--out",
            str(tmp_path / "out"),
            "--tagger",
            "none",
            "--quiet",
        ]
    )
    assert code == 2 and not (tmp_path / "out").exists()


def test_an_uncached_tagger_offline_is_one_line_before_any_model_loads(
    monkeypatch, tmp_path, run_args, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    loaded = []
    monkeypatch.setattr(pipeline, "load_classifier", lambda *a, **k: loaded.append(a) or None)
    args = [a if a != run_args[2] else "ViT-B-32/laion2b_s34b_b79k" for a in run_args]
    assert main([*args, "--classes", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dct-audit download --tagger ViT-B-32/laion2b_s34b_b79k" in err[0]
    assert loaded == []


def test_download_of_a_world_tagger_does_not_split_its_name(capsys):
    from dct_audit.download import download

    assert download(tagger="world") == ["world"]


def test_a_local_sd_turbo_copy_is_recognised_by_its_config_not_its_name(tiny_pipelines, tmp_path):
    copy = tmp_path / "my-model"  # no "turbo" in the name, no marker file
    shutil.copytree(tiny_pipelines["turbo"], copy)
    (copy / "dct_audit_family.txt").unlink()
    gen = load_generator(str(copy))
    assert (gen.spec.family, gen.spec.default_steps, gen.spec.default_guidance) == ("sd-turbo", 1, 0.0)
    assert load_generator(str(copy), family="sd1").spec.default_steps == 30  # --family overrides
    assert load_generator(str(copy), resolution=32).spec.resolution == 32  # --resolution overrides


def test_dtype_choices_are_checked_against_the_device():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("fp32", cpu) == torch.float32
    with pytest.raises(DctAuditError, match="needs a CUDA device"):
        resolve_dtype("bf16", cpu)


def test_inversion_validation_and_evaluation_seed_streams_are_disjoint():
    for seed in (0, 7, 123):
        train = {train_seed(seed, k) for k in range(50 * 64 * 3)}  # 50 updates x 64 images x 3 starts
        val = set(val_seed_list(seed, 64))
        evals = set(eval_seeds(seed, 5000))
        assert not (train & val) and not (train & evals) and not (val & evals)
    assert min(train) - max(val) > 0 and max(evals) < min(val) and len(val_seed_list(0, SEED_STREAM - 1)) > 0


def test_a_damaged_finished_class_is_redone_and_verify_reports_it(run_args, tmp_path, capsys):
    assert main([*run_args, "--classes", "0"]) == 0
    root = tmp_path / "r"
    folder = root / "classes" / "0000-american-lobster"
    assert json.loads((folder / "DONE").read_text())["files"]["token.safetensors"]["size"] > 2
    capsys.readouterr()
    assert main(["verify", str(root)]) == 0
    assert "1/1 classes finished and intact" in capsys.readouterr().out
    (folder / "token.safetensors").write_bytes(b"xx")  # the damage the outside check made
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "damaged" in out and "token.safetensors has changed" in out
    args = [a for a in run_args if a != "--quiet"]
    assert main([*args, "--classes", "0"]) == 0
    assert (
        "is damaged (token.safetensors has changed since the class finished): redoing it"
        in capsys.readouterr().err
    )
    assert (folder / "token.safetensors").stat().st_size > 2 and main(["verify", str(root)]) == 0
    (root / "findings.json").write_text('{"x":')  # the classes are intact, the analysis is not
    capsys.readouterr()
    assert main(["verify", str(root)]) == 1
    assert "broken     findings.json" in capsys.readouterr().out
    (root / "findings.json").unlink()
    (root / "enrichment.csv").write_text("\x00garbage{")  # read as the report reads it, not only found
    assert main(["verify", str(root)]) == 1
    assert "broken     enrichment.csv" in capsys.readouterr().out
    assert main(["report", str(root)]) == 2
    assert f"run `dct-audit finish {root}` to write the analysis again" in capsys.readouterr().err


def test_a_resume_with_another_tagger_or_vocabulary_is_refused_before_anything_loads(
    run_args, tmp_path, capsys
):
    """Finished classes keep the tags of the tagger and vocabulary they were audited with; a resume that tags
    new classes otherwise would make the analysis read two taggers as one (or miss new attributes' columns)."""
    assert main([*run_args, "--classes", "0"]) == 0
    root = tmp_path / "r"
    manifest = json.loads((root / "manifest.json").read_text())
    assert len(manifest["tagging"]["vocabulary_sha256"]) == 64
    extra = tmp_path / "more.json"
    extra.write_text(json.dumps({"mode": "extend", "attributes": [{"name": "lab coat"}]}))
    no_tagger = [a for a in run_args if not a.startswith("hf:")]
    no_tagger[no_tagger.index("--tagger") + 1 : no_tagger.index("--tagger") + 1] = ["none"]
    for args, phrase in (
        ([*run_args, "--attributes", str(extra)], "tagged with another attribute vocabulary"),
        (no_tagger, ", not no tagger;"),
    ):
        capsys.readouterr()
        assert main([*args, "--classes", "0,1"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and phrase in err[0] and "--overwrite" in err[0], err
        assert not any((root / "classes").glob("0001-*"))
        assert json.loads((root / "manifest.json").read_text()) == manifest  # nothing written


def test_a_resume_after_the_local_classifier_was_retrained_at_the_same_path_is_refused(
    tiny_run_command, tiny_classifier, tmp_path, capsys
):
    """The finished classes were audited with the old weights; keeping them beside classes of the new model
    would mix two classifiers in one run, silently."""
    from dct_audit.testing import make_tiny_classifier

    names = [line.strip() for line in open(tiny_classifier[1], encoding="utf-8") if line.strip()]
    model, labels = make_tiny_classifier(tmp_path / "clf", names, seed=0)
    args = list(tiny_run_command)
    args[args.index("--classifier") + 1] = f"file:{model}"
    args[args.index("--labels") + 1] = str(labels)
    args += ["--tagger", "none", "--out", str(tmp_path), "--name", "r", *FAST]
    assert main([*args, "--classes", "0"]) == 0
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert {len(manifest["models"][k]["local_files_sha256"]) for k in ("classifier", "generator")} == {64}
    make_tiny_classifier(tmp_path / "clf", names, seed=1)  # retrained in place
    capsys.readouterr()
    assert main([*args, "--classes", "0,1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "audited with other files of its classifier" in err[0], err
    assert json.loads((tmp_path / "r" / "manifest.json").read_text()) == manifest  # nothing written
    assert main([*args, "--classes", "0,1", "--overwrite"]) == 0  # the fix the line names


def test_two_runs_into_one_folder_at_once_are_refused(run_args, tmp_path, capsys):
    root = tmp_path / "r"
    with rundir.run_lock(root):
        assert main([*run_args, "--classes", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"dct-audit: error: another dct-audit process is writing into '{root}'; wait for it to finish or choose another --name"
    ]
    assert main([*run_args, "--classes", "0"]) == 0  # the lock is released with the run


def test_a_run_that_does_not_fit_on_disk_is_refused_before_writing(tmp_path):
    with pytest.raises(DctAuditError, match="not enough free disk"):
        rundir.check_free_space(tmp_path / "run", 10**18)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a /proc file system")
def test_an_out_folder_that_holds_no_files_is_named_not_reported_as_a_full_disk():
    with pytest.raises(DctAuditError, match="'/proc' is not on a disk"):
        rundir.check_free_space(Path("/proc/nowhere/run"), 1)


def test_a_disk_that_fills_mid_run_is_one_line_and_the_same_command_resumes(
    run_args, tmp_path, capsys, monkeypatch
):
    import errno

    real = rundir.write_png

    def full_disk(path, image):  # the disk fills while the second class writes its images
        if "0001-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, image)

    monkeypatch.setattr(rundir, "write_png", full_disk)
    assert main([*run_args, "--classes", "0,1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("dct-audit: error: No space left on device '"), err
    assert "then run the same command again (finished classes are kept)" in err[0]
    root = tmp_path / "r"
    assert (root / "classes" / "0000-american-lobster" / "DONE").is_file()
    done = (root / "classes" / "0000-american-lobster" / "DONE").read_bytes()
    monkeypatch.setattr(rundir, "write_png", real)
    assert main([*run_args, "--classes", "0,1"]) == 0  # resumes: class 0 is kept, class 1 is redone
    assert (root / "classes" / "0000-american-lobster" / "DONE").read_bytes() == done
    assert main(["verify", str(root)]) == 0
    shutil.rmtree(root / "report")  # a file where the report folder goes
    (root / "report").write_text("not a folder")
    capsys.readouterr()
    assert main(["report", str(root)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "a file stands where a folder should be" in err[0], err


def test_the_counterfactual_sweep_uses_the_plain_prompt_and_a_resume_generates_only_what_is_missing(
    tiny_pipelines, tiny_classifier, tmp_path
):
    """The check asks whether the classifier depends on the attribute itself: no token in its prompts.
    Scores are cached per class; a resumed analysis reuses them (same seeds) and adds only new prompts."""
    gen = load_generator(tiny_pipelines["turbo"])
    clf = load_classifier(f"file:{tiny_classifier[0]}", tiny_classifier[1])
    models = pipeline.Models(generator=gen, classifier=clf)
    prompts_seen = []
    real = gen.sample

    def spy(prompts, seeds, *a, **k):
        prompts_seen.extend(prompts)
        return real(prompts, seeds, *a, **k)

    gen.sample = spy
    cls = pipeline.ResolvedClass(0, "plate", "plate")
    opts = pipeline.RunOptions(classifier="x", classes="0", steps=1, guidance=0.0)
    cache = tmp_path / "counterfactual" / "sweep.json"
    first = {"{} on a plate": "plate", "{} on a bare table": "without plate"}
    out = check.counterfactual_sweep(lambda: models, cache, cls, first, [1, 2], opts, 2)
    assert sorted(prompts_seen) == sorted(["plate on a plate"] * 2 + ["plate on a bare table"] * 2)
    assert set(out) == set(first) and all(len(e["probs"]) == 2 for e in out.values())
    assert not any("<dct" in p for p in prompts_seen)

    prompts_seen.clear()
    more = {**first, "{} in the snow": "snow"}
    again = check.counterfactual_sweep(lambda: models, cache, cls, more, [1, 2], opts, 2)
    assert prompts_seen == ["plate in the snow"] * 2  # the cached prompts were not generated again
    assert again["{} on a plate"]["probs"] == out["{} on a plate"]["probs"]

    prompts_seen.clear()  # more seeds (--confirm-max-seeds): only the new seed is generated
    longer = check.counterfactual_sweep(lambda: models, cache, cls, first, [1, 2, 3], opts, 2)
    assert sorted(prompts_seen) == ["plate on a bare table", "plate on a plate"]
    assert longer["{} on a plate"]["probs"][:2] == out["{} on a plate"]["probs"]
    assert longer["{} on a plate"]["seeds"] == [1, 2, 3]

    prompts_seen.clear()  # fewer seeds: served from the cache, in the order asked
    fewer = check.counterfactual_sweep(lambda: models, cache, cls, first, [2], opts, 2)
    assert prompts_seen == [] and fewer["{} on a plate"]["probs"] == out["{} on a plate"]["probs"][1:]


def test_a_half_precision_hf_classifier_is_scored_in_float32(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"},
        label2id={"a": 0, "b": 1, "c": 2},
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).half().save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    clf = load_classifier(f"hf:{tmp_path / 'vit'}")
    assert all(p.dtype == torch.float32 for p in clf.model.parameters())
    logits = clf(torch.rand(2, 3, 48, 48))
    assert logits.shape == (2, 3) and logits.dtype == torch.float32


def test_download_fetches_no_root_single_file_checkpoint(monkeypatch):
    """SD-Turbo's repository holds a several-GB single-file checkpoint at its root that nothing loads."""
    import fnmatch

    import huggingface_hub

    from dct_audit.download import download

    seen = {}

    def fake(repo, allow_patterns, ignore_patterns):
        seen.update(allow=allow_patterns, ignore=ignore_patterns)
        return "/cache/" + repo

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from dct_audit.adapters import hub

    monkeypatch.setattr(hub, "_unreachable_host", lambda host, port: None)  # as if the hub answered
    download(generator="stabilityai/sd-turbo", say=lambda m: None)

    def fetched(path):
        return any(fnmatch.fnmatch(path, p) for p in seen["allow"]) and not any(
            fnmatch.fnmatch(path, p) for p in seen["ignore"]
        )

    assert not fetched("sd_turbo.safetensors")
    assert all(
        fetched(p)
        for p in (
            "model_index.json",
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
            "tokenizer/vocab.json",
            "scheduler/scheduler_config.json",
        )
    )


def test_python_api_arguments_are_checked_like_command_line_flags(tmp_path, tiny_pipelines):
    import dct_audit
    from dct_audit.adapters.classifier import Preprocess

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    ok = dict(labels=["cat", "dog", "car", "plate"], preprocess=Preprocess(crop=(32, 32), resize=None))
    common = dict(generator=tiny_pipelines["turbo"], tagger=None, out=str(tmp_path), quiet=True)
    cases = [
        (dict(max_update=3), "unknown argument max_update=; did you mean max_updates=?"),
        (dict(n_images="many"), "n_images= must be int, not 'many'"),
        (dict(contexts="a photo of {}"), "contexts= must be tuple"),
        (dict(preprocess={"crop": 32}), "preprocess= must be a dct_audit.adapters.classifier.Preprocess"),
        (dict(preprocess=Preprocess(crop=(-32, -32), resize=None)), "crop must be (height, width)"),
        (
            dict(preprocess=Preprocess(crop=(32, 32), resize=None, std=(0, 0, 0))),
            "std must be three positive",
        ),
        (dict(labels=["cat", None, 3, "plate"]), "labels= must be a list of class names"),
        # out-of-range values: refused by the same argparse types and choices as the flags
        (dict(explain_images=-1), "--explain-images: must be at least 0, not -1"),
        (dict(snapshot_every=0), "--snapshot-every: must be at least 1, not 0"),
        (dict(ray_task_cpus=0), "--ray-task-cpus: must be at least 1, not 0"),
        (dict(stop_prob=1.0), "--stop-prob: must be in [0, 1) (0: off), not 1.0"),
        (dict(batch="big"), "--batch: 'big' is not a whole number"),
        (dict(dtype="fp64"), "--dtype must be one of auto, bf16, fp16, fp32, not 'fp64'"),
    ]
    for bad, phrase in cases:
        with pytest.raises(DctAuditError) as e:
            dct_audit.run(model, "0", **{**common, **ok, **bad})
        assert phrase in str(e.value)
    with pytest.raises(DctAuditError, match="classes= must be a string"):
        dct_audit.run(model, 0, **common, **ok)
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_world_classifier_trainer_refuses_bad_numbers_and_a_file_as_out(tmp_path, capsys):
    from dct_audit.world.classifiers import main as train

    (tmp_path / "afile").write_text("")
    threads = torch.get_num_threads()
    for argv, phrase in (
        (["--steps", "0"], "--steps: must be at least 1, not 0"),
        (["--threads", "0"], "--threads: must be at least 1, not 0"),
        (["--out", str(tmp_path / "afile")], "is a file; give a folder"),
    ):
        with pytest.raises(SystemExit) as e:
            train(["--planted", "star:background:water", "--out", str(tmp_path / "clf"), *argv])
        assert e.value.code == 2 and phrase in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --measure on a folder with no trained classifier
        train(["--measure", "--out", str(tmp_path / "nothing")])
    assert e.value.code == 2 and "--measure: no trained classifier (training.json)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert torch.get_num_threads() == threads  # a refused command leaves the process as it was


def test_output_piped_into_a_reader_that_stops_is_not_an_error():
    """`dct-audit classes ... | head`: a closed pipe is a BrokenPipeError, a kind of OSError; it was caught as
    a disk error ("Broken pipe; fix it and run the same command again") with exit 2."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "dct_audit.cli", "classes", "--classifier", "resnet50", ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and err == ""


def test_a_hub_model_is_recorded_by_its_cached_revision_and_a_resume_after_an_update_is_refused(
    tmp_path, monkeypatch
):
    """A hub name is not a model: ``main`` moves. The commit the local cache holds is recorded; a resume (or a
    comparison) across an update downloaded in between would mix two models under one name."""
    import huggingface_hub.constants

    from dct_audit import records
    from dct_audit.compare import check_comparable
    from dct_audit.options import RunOptions

    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def snapshot(repo: str, filename: str, commit: str) -> None:  # what hf_hub_download leaves in the cache
        base = cache / ("models--" + repo.replace("/", "--"))
        (base / "snapshots" / commit).mkdir(parents=True)
        (base / "snapshots" / commit / filename).write_text("{}")
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(commit)

    opts = RunOptions(classifier="resnet50", classes="0", generator="stabilityai/sd-turbo")
    assert records.model_fingerprints(opts) == {}  # nothing cached yet: nothing to record
    snapshot("stabilityai/sd-turbo", "model_index.json", "a" * 40)
    snapshot("timm/resnet50.a1_in1k", "model.safetensors", "b" * 40)  # timm's hub repo for "resnet50"
    now = records.model_fingerprints(opts)
    assert now == {"classifier": {"hub_revision": "b" * 40}, "generator": {"hub_revision": "a" * 40}}
    before = rundir.Manifest(models={"generator": {"spec": "stabilityai/sd-turbo", **now["generator"]}})
    records.check_same_models(before, now, tmp_path)  # the same commit: a resume goes on
    records.check_same_models(
        rundir.Manifest(), now, tmp_path
    )  # an older run without the record: not compared

    snapshot("stabilityai/sd-turbo", "model_index.json", "c" * 40)  # updated upstream, downloaded again
    with pytest.raises(
        DctAuditError,
        match="revision aaaaaaaaaaaa of its generator, and the local cache now holds cccccccccccc",
    ):
        records.check_same_models(before, records.model_fingerprints(opts), tmp_path)

    settings = {"generator": "stabilityai/sd-turbo", "steps": 1}
    a = rundir.Manifest(settings=settings, models={"generator": {"hub_revision": "a" * 40}})
    b = rundir.Manifest(settings=settings, models={"generator": {"hub_revision": "c" * 40}})
    with pytest.raises(DctAuditError, match="generator_hub_revision"):
        check_comparable(a, b, "run-a", "run-b")
    # the tagger: open_clip ARCH/TAG resolves to its hub repo; a resume or comparison across an update is refused
    tagger = "ViT-B-32/laion2b_s34b_b79k"
    snapshot("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors", "d" * 40)
    assert records.tagger_revision(tagger) == "d" * 40
    assert records.tagger_revision("world") is None and records.tagger_revision(None) is None
    tagged = rundir.Manifest(tagging={"tagger": tagger, "tagger_hub_revision": "e" * 40})
    topts = RunOptions(classifier="resnet50", classes="0", tagger=tagger)
    with pytest.raises(
        DctAuditError, match="tagged with revision eeeeeeeeeeee of ViT-B-32/laion2b_s34b_b79k"
    ):
        records.check_same_tagging(tagged, topts, None, tmp_path)
    a.tagging, b.tagging = {"tagger_hub_revision": "d" * 40}, {"tagger_hub_revision": "e" * 40}
    b.models = a.models
    with pytest.raises(DctAuditError, match="tagger_hub_revision"):
        check_comparable(a, b, "run-a", "run-b")
    # local files, torchvision weights (named by hash) and in-memory models are not hub revisions
    for spec in ("tv:resnet50", "in-memory:ResNet@3f2a", str(tmp_path)):
        assert records.hub_repo(spec, "classifier") is None


def test_a_run_recorded_before_a_setting_existed_resumes_at_its_old_value(tmp_path):
    """A manifest written before --attempts existed lacks the key: resuming at the value those runs used
    (1) is not a change of settings; asking for another value is."""
    from dct_audit.options import RunOptions

    old = {"seed": 0, "lr": 0.01}
    rundir.RunDir(tmp_path).write_manifest(rundir.Manifest(settings=old))
    added = RunOptions.ADDED_SETTINGS
    assert added == {"attempts": 1, "objective": "ce"}
    rundir.open_run_dir(tmp_path, {**old, "attempts": 1, "objective": "ce"}, False, added)
    with pytest.raises(DctAuditError, match="objective: 'ce' -> 'meanprob'"):
        rundir.open_run_dir(tmp_path, {**old, "attempts": 1, "objective": "meanprob"}, False, added)
    with pytest.raises(DctAuditError, match="attempts: 1 -> 2"):
        rundir.open_run_dir(tmp_path, {**old, "attempts": 2}, False, added)
    with pytest.raises(DctAuditError, match="attempts: None -> 1"):
        rundir.open_run_dir(tmp_path, {**old, "attempts": 1}, False)  # without the table: a change
