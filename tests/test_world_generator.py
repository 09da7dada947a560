"""The world generator's trainers: 2 steps on tiny settings save folders the core's loader opens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dct_audit.adapters.generator_load import load_generator
from dct_audit.world import captions as CAP
from dct_audit.world import clip as C
from dct_audit.world import diffusion as D
from dct_audit.world import fidelity as FI
from dct_audit.world import scenes as S
from dct_audit.world import unet as U
from dct_audit.world import vae as V

TINY_VAE = V.VAEConfig(block_out_channels=(8, 16), norm_num_groups=4)
TINY_UNET = U.UNetConfig(
    block_out_channels=(8, 16), cross_attention=(False, True), heads=2, norm_num_groups=4
)
TINY_CLIP = C.WorldCLIPConfig(text_layers=1, text_intermediate=64, text_hidden=32, image_channels=(8, 16))
QUIET = {"log": lambda s: None}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("world_generator")
    torch.manual_seed(321)  # the trainers must not depend on the global state left by others
    C.WorldCLIP(TINY_CLIP).save_pretrained(root / "clip")  # untrained: only its text tower is used
    V.train_vae(root / "vae", V.VAETrainConfig(steps=2, batch=4, pool=16), TINY_VAE, eval_n=8, **QUIET)
    kw = dict(vae=root / "vae", clip=root / "clip", **QUIET)

    def steps(n):
        return D.GeneratorTrainConfig(steps=n, batch=4, pool=16)

    D.train_generator(root / "gen", steps(2), TINY_UNET, resume=root / "state.pt", **kw)  # saves at step 2
    D.train_generator(root / "resumed", steps(3), TINY_UNET, resume=root / "state.pt", **kw)  # continues
    D.train_generator(root / "straight", steps(3), TINY_UNET, **kw)
    return root


def test_vae_folder_records_training_and_scaling(folders):
    vae = V.load_vae(folders / "vae")
    record = vae.training_record
    assert record["train"]["steps_done"] == 2 and record["train"]["data_seed"] == 0
    assert vae.config.scaling_factor == pytest.approx(1 / record["heldout"]["latent_std"], rel=1e-3)
    assert np.isfinite(record["heldout"]["psnr_db"])
    for folder in ("vae", "gen"):  # safetensors only (the resume state is a training-time file)
        assert not list((folders / folder).rglob("*.bin")) and not list((folders / folder).rglob("*.pt"))


def test_pipeline_folder_layout(folders):
    gen = folders / "gen"
    names = {p.name for p in gen.iterdir()}
    assert {
        "unet",
        "vae",
        "scheduler",
        "model_index.json",
        "training.json",
    } <= names
    assert not {"text_encoder", "tokenizer"} & names  # shared with the world CLIP, not copied
    shared = json.loads((gen / D.SHARED_FILE).read_text())
    for part in ("text_encoder", "tokenizer"):
        assert (gen / shared[part]).resolve() == (folders / "clip" / part).resolve()
    record = json.loads((gen / "training.json").read_text())
    assert (
        record["steps_done"] == 2 and record["train"]["data_seed"] == 0 and 0 < record["wall_time_s"] < 3600
    )
    assert json.loads((gen / D.DEFAULTS_FILE).read_text()) == {"steps": 20, "guidance": 3.0}
    with safe_open(str(gen / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(f.keys()[0]).dtype == torch.float16  # stored small
    sched = json.loads((gen / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["timestep_spacing"] == "trailing"
    assert sched["rescale_betas_zero_snr"] is True


def test_training_is_deterministic_and_resumes_exactly(folders):
    a, b = (
        folders / name / "unet" / "diffusion_pytorch_model.safetensors" for name in ("resumed", "straight")
    )
    assert a.read_bytes() == b.read_bytes()
    assert json.loads((folders / "resumed" / "training.json").read_text())["steps_done"] == 3


def test_core_loader_opens_and_samples(folders):
    gen = load_generator(str(folders / "gen"))
    assert gen.spec.prediction_type == "v_prediction" and gen.spec.resolution == 32
    assert gen.tokenizer.model_max_length == TINY_CLIP.max_length
    gen.set_token("<x>", gen.word_vector("a"))
    with torch.no_grad():
        images = gen.sample(["a red star on water", "a photo of <x> ring"], [0, 1], steps=2, guidance=3.0)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_measure_fidelity_runs_on_any_judge(folders):
    def judge(images):
        return {a: np.zeros(len(images), np.int64) for a in S.ATTRIBUTES}

    result = FI.measure_fidelity(folders / "gen", judge, n=4, steps=2, batch=4)
    assert set(result["plain"]) == {*S.ATTRIBUTES, "all_four"} and 0 <= result["token"]["shape"] <= 1
    assert sum(result["shape_only"]["background_distribution"].values()) == pytest.approx(1.0, abs=0.01)


def test_captions_state_what_they_mean():
    rng = np.random.default_rng(0)
    names = {"shape": "star", "colour": "orange", "background": "snow", "context": "none"}
    for _ in range(50):
        full = CAP.full_caption(names, rng)
        assert "star" in full and "orange" in full and ("alone" in full)
        short = CAP.describe(names, rng, keep=1.0, token="<x>")
        assert "<x> orange star" in short and "alone" in short and "snow" in short
    partial = [CAP.describe(names, rng, keep=0.0) for _ in range(20)]
    assert all("orange" not in p and "snow" not in p and "star" in p for p in partial)


def test_shipped_generator_loads_through_the_core_loader_with_the_world_clip_text_tower():
    gen = load_generator(str(D.SHIPPED))
    assert (
        gen.spec.family == "sd1" and gen.spec.resolution == 32 and gen.spec.prediction_type == "v_prediction"
    )
    assert (gen.spec.default_steps, gen.spec.default_guidance) == (20, 3.0)
    clip = C.WorldCLIP.from_pretrained()
    ids = clip.tokenizer(["a red star on water"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():  # the generator's text encoder is the world CLIP's text tower
        assert torch.equal(gen.text_encoder(ids)[0], clip.text_encoder(ids)[0])
    record = json.loads((Path(D.SHIPPED) / "training.json").read_text())
    fid = record["fidelity"]
    assert fid["judge"] == "checker" and fid["n"] >= 96
    for variant in ("plain", "token"):  # the bar, as measured when the weights were made
        assert min(fid[variant]["background"], fid[variant]["context"]) >= 0.9
        assert fid[variant]["shape"] >= 0.8


def test_a_missing_shared_component_is_one_clear_error(tmp_path):
    import shutil

    from dct_audit.adapters.generator_load import check_generator_spec
    from dct_audit.errors import DctAuditError

    folder = shutil.copytree(D.SHIPPED, tmp_path / "generator")  # the references now point nowhere
    with pytest.raises(DctAuditError, match="shares its text_encoder from .* which does not exist"):
        check_generator_spec(str(folder))
    (folder / D.SHARED_FILE).write_text("{not json")
    with pytest.raises(DctAuditError, match="is not valid JSON"):
        check_generator_spec(str(folder))
