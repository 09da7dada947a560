"""Our sampler against diffusers' own ``StableDiffusionPipeline.__call__``, and the token injection."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dct_audit.adapters.generator_load import load_generator

SETTINGS = {"epsilon": (4, 5.0), "v": (4, 5.0), "turbo": (1, 0.0)}
PROMPTS = ["a photo of an American lobster", "a gymnast on a horizontal bar"]
SEEDS = [3, 7]


@pytest.mark.parametrize("kind", ["epsilon", "v", "turbo"])
def test_sampler_matches_diffusers_call(tiny_pipelines, kind):
    steps, guidance = SETTINGS[kind]
    gen = load_generator(tiny_pipelines[kind])
    with torch.no_grad():
        ours = gen.sample(PROMPTS, SEEDS, steps, guidance)
    ref = StableDiffusionPipeline.from_pretrained(
        tiny_pipelines[kind], safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    theirs = ref(
        PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt"
    ).images
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ours.std() > 0.01  # not a blank image


def test_family_defaults(tiny_pipelines):
    assert load_generator(tiny_pipelines["turbo"]).spec.family == "sd-turbo"
    eps = load_generator(tiny_pipelines["epsilon"]).spec
    assert (eps.family, eps.default_steps, eps.default_guidance) == ("sd1", 30, 7.0)
    assert load_generator(tiny_pipelines["v"]).spec.prediction_type == "v_prediction"


def test_initial_token_equals_its_word(tiny_pipelines):
    gen = load_generator(tiny_pipelines["epsilon"])
    gen.set_token("<t>", torch.nn.Parameter(gen.word_vector("a")))
    with torch.no_grad():
        with_token = gen.sample(["a photo of <t> lobster"], [1], 3, 4.0)
        with_word = gen.sample(["a photo of a lobster"], [1], 3, 4.0)
    torch.testing.assert_close(with_token, with_word, atol=0, rtol=0)
    assert gen.embedding.base.num_embeddings == 49408  # the vocabulary matrix was not resized


def test_gradient_only_through_last_steps(tiny_pipelines):
    """Skipped steps run without autograd; the token still gets a non-zero gradient."""
    gen = load_generator(tiny_pipelines["epsilon"])
    vec = torch.nn.Parameter(gen.word_vector("a"))
    gen.set_token("<t>", vec)
    calls = []
    hook = gen.unet.register_forward_pre_hook(
        lambda m, args: calls.append((torch.is_grad_enabled(), args[0].requires_grad))
    )
    images = gen.sample(["a photo of <t> lobster"] * 2, [0, 1], steps=5, guidance=4.0, grad_steps=2)
    hook.remove()
    assert [c[0] for c in calls] == [False, False, False, True, True]
    # the first step with gradient starts from latents that carry no graph of the skipped steps
    assert [c[1] for c in calls] == [False, False, False, False, True]
    images.mean().backward()
    assert vec.grad is not None and vec.grad.norm() > 0


def test_out_of_range_pixels_keep_their_gradient(tiny_pipelines):
    """The decoder's output is clamped in the forward pass only, so saturated pixels still pass gradient."""
    gen = load_generator(tiny_pipelines["turbo"])
    vec = torch.nn.Parameter(gen.word_vector("a"))
    gen.set_token("<t>", vec)
    images = gen.sample(["<t> lobster"], [0], grad_steps=1)
    assert images.min() >= 0 and images.max() <= 1
    images.sum().backward()
    assert vec.grad.abs().sum() > 0
