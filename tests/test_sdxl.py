"""SDXL and SDXL-Turbo: our sampler is diffusers' StableDiffusionXLPipeline, the token is two vectors (one per
text encoder), inversion learns only them, and the saved token loads into a plain pipeline."""

from __future__ import annotations

import pytest
import torch

from dct_audit.adapters.classifier import load_classifier
from dct_audit.adapters.generator_load import load_generator
from dct_audit.invert import InvertConfig, invert_class
from dct_audit.testing import make_tiny_sdxl_pipeline

PROMPTS, SEEDS = ["a photo of a lobster", "a plate on a table"], [11, 12]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {kind: str(make_tiny_sdxl_pipeline(root / kind, kind)) for kind in ("turbo", "base")}


def _reference(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("kind", "steps", "guidance"), [("turbo", 1, 0.0), ("base", 3, 5.0)])
def test_sampler_matches_diffusers_sdxl_call(sdxl, kind, steps, guidance):
    gen = load_generator(sdxl[kind])
    assert gen.spec.family == {"turbo": "sdxl-turbo", "base": "sdxl"}[kind]
    with torch.no_grad():
        ours = gen.sample(PROMPTS, SEEDS, steps, guidance)
    gens = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    theirs = _reference(sdxl[kind])(
        PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt"
    ).images
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ours.std() > 0.01


def test_family_defaults_come_from_the_config(sdxl):
    turbo, base = load_generator(sdxl["turbo"]).spec, load_generator(sdxl["base"]).spec
    assert (turbo.family, turbo.default_steps, turbo.default_guidance) == ("sdxl-turbo", 1, 0.0)
    assert (base.family, base.default_steps, base.default_guidance) == ("sdxl", 30, 7.0)
    assert load_generator(sdxl["turbo"], resolution=64).spec.resolution == 64


def test_pooling_finds_the_end_of_the_text_with_a_placeholder(sdxl):
    """The placeholder's id is above the vocabulary: argmax pooling would pick it; ours takes the first
    end-of-text token, so a token set to a word's vectors encodes exactly as the word."""
    gen = load_generator(sdxl["turbo"])
    gen.set_token("<t>", gen.word_vector("a"))
    with torch.no_grad():
        h1, p1 = gen.encode(["a photo of <t> lobster"])
        h2, p2 = gen.encode(["a photo of a lobster"])
    assert gen.embedding_dim == 64 and h1.shape == (1, 77, 64) and p1.shape == (1, 32)
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(p1, p2)


def test_inversion_learns_only_the_two_vectors_and_they_load_into_a_plain_pipeline(
    sdxl, tiny_classifier, tmp_path
):
    from safetensors.torch import load_file

    from dct_audit.adapters.sdxl import save_sdxl_token

    gen = load_generator(sdxl["turbo"])
    clf = load_classifier(f"file:{tiny_classifier[0]}", tiny_classifier[1])
    modules = (gen.unet, gen.vae, *gen.text_encoders, clf.model)
    before = {f"{i}.{n}": p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}
    result = invert_class(
        gen,
        clf,
        2,
        "horizontal bar",
        "<dct-2>",
        InvertConfig(lr=0.2, max_updates=10, stop_accuracy=1.0, val_seeds=0, fresh_seeds=False),
    )
    hist = result.history
    assert result.vector.shape == (64,) and not torch.equal(result.vector[:32], result.init_vector[:32])
    assert not torch.equal(result.vector[32:], result.init_vector[32:])  # both encoders' parts learn
    assert max(h["target_prob"] for h in hist) > 1.02 * hist[0]["target_prob"]
    after = {f"{i}.{n}": p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in before)

    path = tmp_path / "token.sdxl.safetensors"
    save_sdxl_token(path, result.vector, gen.dims)
    state = load_file(str(path))
    assert state["clip_l"].shape == (1, 32) and state["clip_g"].shape == (1, 32)
    prompt = "a photo of <dct-2> horizontal bar"
    with torch.no_grad():
        ours = gen.sample([prompt], [1234])
    pipe = _reference(sdxl["turbo"])
    pipe.load_textual_inversion(
        state["clip_l"], token="<dct-2>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token="<dct-2>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    theirs = pipe(
        prompt,
        num_inference_steps=1,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(1234),
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_run_with_sdxl_turbo_writes_both_token_files_and_resumes(sdxl, tiny_classifier, tmp_path):
    import dct_audit
    from dct_audit.invert import load_token

    model, labels = tiny_classifier
    kwargs = dict(
        labels=labels,
        generator=sdxl["turbo"],
        tagger=None,
        max_updates=2,
        n_images=1,
        contexts=("a photo of {}",),
        explain_images=0,
        out=str(tmp_path),
        name="xl",
        quiet=True,
        report=False,
    )
    first = dct_audit.run(f"file:{model}", "plate", **kwargs)
    folder = next((tmp_path / "xl" / "classes").iterdir())
    assert (folder / "token.sdxl.safetensors").is_file() and load_token(folder / "token.safetensors")[
        1
    ].shape == (64,)
    manifest = (tmp_path / "xl" / "manifest.json").read_text()
    assert '"family": "sdxl-turbo"' in manifest
    again = dct_audit.run(f"file:{model}", "plate", **kwargs)
    assert again.skipped == [first.classes[0]["index"]]
