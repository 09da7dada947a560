"""The world CLIP: a 2-step training run saves a folder that loads back to the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTokenizer

from dct_audit.world import clip as C
from dct_audit.world import clip_train as CT
from dct_audit.world import scenes as S

TINY = C.WorldCLIPConfig(text_layers=1, text_intermediate=128, image_channels=(8, 16))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_clip")
    torch.manual_seed(123)  # the trainer must not depend on the global state left by others
    model = CT.train_world_clip(out, CT.TrainConfig(steps=2, batch=8), TINY, eval_n=20, log=lambda s: None)
    return out, model


def test_saved_folder_layout_and_records(trained):
    out, model = trained
    assert {p.name for p in out.iterdir()} >= {"text_encoder", "tokenizer", "clip.safetensors", "config.json"}
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # safetensors only
    record = json.loads((out / "config.json").read_text())
    assert record["train"]["steps_done"] == 2 and record["train"]["data_seed"] == 0
    assert 0 < record["wall_time_s"] < 3600 and set(record["zero_shot_accuracy"]) >= set(S.ATTRIBUTES)
    with safe_open(str(out / "text_encoder" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f.keys()[0]).dtype == torch.float16  # stored small


def test_folder_loads_back_to_the_same_embeddings(trained):
    out, model = trained
    loaded = C.WorldCLIP.from_pretrained(out)
    scenes = S.sample_scenes(4, seed=5)
    images = C.images_to_tensor(scenes.images)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            loaded.encode_text(scenes.captions), model.encode_text(scenes.captions), rtol=0, atol=1e-6
        )
    assert loaded.info["train"]["steps_done"] == 2


def test_text_encoder_is_a_plain_clip_text_model(trained):
    out, _ = trained
    te = CLIPTextModel.from_pretrained(out / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert te.dtype == torch.float32
    ids = tok(
        ["a red star on water"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
    )
    assert ids.input_ids.shape == (1, TINY.max_length)
    assert ids.input_ids[0, 0] == C.BOS_ID and ids.input_ids[0, -1] == C.EOS_ID
    hidden = te(ids.input_ids)[0]
    assert hidden.shape == (1, TINY.max_length, TINY.text_hidden)


def test_training_is_deterministic(trained):
    _, model = trained
    again = CT.train_world_clip(None, CT.TrainConfig(steps=2, batch=8), TINY, eval_n=0, log=lambda s: None)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_padding_to_the_longest_text_gives_the_same_embedding(trained):
    _, model = trained
    texts = ["a photo of a star", "a red ring on a brick wall next to a person"]
    with torch.no_grad():
        full = model.encode_text(model.tokenize(texts))
        short = model.encode_text(model.tokenize(texts, pad_to_max=False))
    torch.testing.assert_close(full, short, rtol=0, atol=1e-5)


def test_prompts_cover_every_attribute_value():
    for prompts in (C.simple_prompts(), C.ensemble_prompts(n=3)):
        for a in S.ATTRIBUTES:
            assert list(prompts[a]) == list(S.VOCAB[a])


@pytest.mark.skipif(not (C.SHIPPED / "config.json").exists(), reason="world CLIP weights not trained yet")
def test_shipped_world_clip_is_small_safetensors_and_tags_held_out_scenes():
    files = [p for p in C.SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25e6
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert CLIPTextModel.from_pretrained(C.SHIPPED / "text_encoder").dtype == torch.float32
    model = C.WorldCLIP.from_pretrained()
    recorded = model.info["zero_shot_accuracy"]
    assert all(recorded[a] >= 0.95 for a in S.ATTRIBUTES), recorded
    accuracy = C.zero_shot_accuracy(model, n=200)
    assert all(v >= 0.95 for v in accuracy.values()), accuracy
