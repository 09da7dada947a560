"""The planted-bias world's scene generator: determinism, masks, colours, captions, planted rates."""

from __future__ import annotations

import numpy as np
import pytest

from dct_audit.world import scenes as S
from dct_audit.world import truth


@pytest.fixture(scope="module")
def batch() -> S.Scenes:
    return S.sample_scenes(300, seed=7)


def test_same_seed_same_scenes_and_batches_are_slices_of_one_stream(batch):
    again = S.sample_scenes(300, seed=7)
    for name in ("images", "shape", "colour", "background", "context", "object_mask", "context_mask"):
        np.testing.assert_array_equal(getattr(batch, name), getattr(again, name))
    assert batch.captions == again.captions
    tail = S.sample_scenes(100, seed=7, start=200)
    np.testing.assert_array_equal(tail.images, batch.images[200:])
    assert tail.captions == batch.captions[200:]


def test_different_seed_different_scenes(batch):
    other = S.sample_scenes(300, seed=8)
    assert not np.array_equal(other.images, batch.images)
    assert (other.shape != batch.shape).mean() > 0.5


def test_arrays_have_the_documented_shapes_and_types(batch):
    assert batch.images.shape == (300, 32, 32, 3) and batch.images.dtype == np.uint8
    assert batch.object_mask.shape == batch.context_mask.shape == (300, 32, 32)
    assert batch.object_mask.dtype == bool
    for a in S.ATTRIBUTES:
        labels = batch.labels(a)
        assert labels.shape == (300,) and labels.min() >= 0 and labels.max() < len(S.VOCAB[a])
        assert len(set(labels.tolist())) == len(S.VOCAB[a])  # every value occurs in 300 scenes
    big = S.sample_scenes(2, seed=0, size=64)
    assert big.images.shape == (2, 64, 64, 3) and big.object_mask.shape == (2, 64, 64)


def test_object_mask_is_non_empty_and_has_the_object_colour(batch):
    for i in range(len(batch)):
        mask = batch.object_mask[i]
        assert mask.sum() >= 20, batch.attributes(i)
        median = np.median(batch.images[i][mask].astype(float), axis=0)
        distances = {c: np.abs(median - rgb).sum() for c, rgb in S.COLOUR_RGB.items()}
        assert min(distances, key=distances.get) == batch.attributes(i)["colour"], (i, median)
        assert distances[batch.attributes(i)["colour"]] < 60


def test_context_mask_is_non_empty_exactly_when_there_is_a_context(batch):
    has_context = batch.context != S.CONTEXTS.index("none")
    sizes = batch.context_mask.reshape(len(batch), -1).sum(1)
    assert (sizes[has_context] >= 8).all()
    assert (sizes[~has_context] == 0).all()
    assert not (batch.context_mask & batch.object_mask).any()


def test_shapes_differ_in_their_masks():
    """Same position and size, different shape -> different silhouettes (the class is visible)."""
    masks = [S.render_scene(s, "red", "plain", seed=3)[1] for s in S.SHAPES]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] ^ masks[j]).sum() >= 10, (S.SHAPES[i], S.SHAPES[j])


def test_captions_mention_the_attributes(batch):
    for i, text in enumerate(batch.captions):
        a = batch.attributes(i)
        assert a["shape"] in text and a["colour"] in text, text
        assert S.BACKGROUND_ON[a["background"]] in text or S.BACKGROUND_NOUN[a["background"]] in text, text
        if a["context"] != "none":
            assert a["context"] in text, text
        else:
            assert not any(c in text for c in S.CONTEXTS[1:]), text
    assert len(set(batch.phrasing.tolist())) == S.N_PHRASINGS


def test_caption_phrasings():
    assert S.caption("star", "red", "water", "person", 0) == "a red star on water next to a person"
    assert S.caption("star", "red", "grass", "plate", 1) == "a photo of a star, red, with a plate, on grass"
    assert S.caption("ring", "orange", "snow", "none", 0) == "an orange ring on snow"
    texts = {S.caption("cross", "blue", "brick", "frame", p) for p in range(S.N_PHRASINGS)}
    assert len(texts) == S.N_PHRASINGS
    assert all("  " not in t and not t.endswith(",") for t in texts)


def test_scenes_carry_the_drawn_attributes():
    """sample_scenes = draw_attributes + render_scenes, so rates can be counted without rendering."""
    kwargs = truth.biased_sampling()
    sc = S.sample_scenes(60, seed=11, start=5, **kwargs)
    drawn = S.draw_attributes(60, seed=11, start=5, **kwargs)
    for a in S.ATTRIBUTES:
        np.testing.assert_array_equal(sc.labels(a), drawn[a])


def test_planted_bias_gives_the_requested_rates():
    sc = S.draw_attributes(3000, seed=11, **truth.biased_sampling())
    for b in truth.PLANTED:
        value = S.VOCAB[b.attribute].index(b.value)
        in_class = sc["shape"] == S.SHAPES.index(b.cls)
        assert 400 < in_class.sum() < 600
        rate = (sc[b.attribute][in_class] == value).mean()
        assert abs(rate - b.strength) < 0.04, (b, rate)
        assert (sc[b.attribute][~in_class] == value).sum() == 0  # LEAK = 0: never with the others
    star = sc["shape"] == S.SHAPES.index("star")
    for k in range(len(S.CONTEXTS)):  # attributes that carry no planted value stay uniform
        assert abs((sc["context"][star] == k).mean() - 1 / len(S.CONTEXTS)) < 0.06
    square = sc["shape"] == S.SHAPES.index("square")
    planted_backgrounds = {b.value for b in truth.PLANTED if b.attribute == "background"}
    free = [v for v in S.BACKGROUNDS if v not in planted_backgrounds]
    for v in free:  # the others' backgrounds: spread over the values no class has planted
        rate = (sc["background"][square] == S.BACKGROUNDS.index(v)).mean()
        assert abs(rate - 1 / len(free)) < 0.07, (v, rate)


def test_bias_without_exclusivity_leaves_other_classes_uniform():
    sc = S.draw_attributes(3000, seed=12, bias={"star": ("background", "water", 0.9)})
    star = sc["shape"] == S.SHAPES.index("star")
    water = sc["background"] == S.BACKGROUNDS.index("water")
    assert abs(water[star].mean() - 0.9) < 0.05
    assert abs(water[~star].mean() - 1 / 6) < 0.03


def test_fixed_attributes_override_the_bias():
    sc = S.sample_scenes(
        50, seed=1, fixed={"background": "water", "shape": "cross"}, **truth.biased_sampling()
    )
    assert (sc.background == S.BACKGROUNDS.index("water")).all()
    assert (sc.shape == S.SHAPES.index("cross")).all()


def test_bad_bias_is_refused():
    with pytest.raises(ValueError):
        S.sample_scenes(1, bias={"star": ("background", "lava", 0.9)})
    with pytest.raises(ValueError):
        S.sample_scenes(1, bias={"dragon": ("background", "water", 0.9)})


def test_truth_helpers():
    assert truth.bias_arg()["star"] == ("background", "water", 0.99)
    assert truth.planted_for("cross").value == "grass"
    assert truth.planted_for("circle") is None
    assert set(truth.UNBIASED_CLASSES) == {"circle", "square", "triangle"}
    rates = truth.expected_rates()
    assert rates["background"]["ring"]["snow"] == pytest.approx(0.99)
    assert rates["context"]["ring"]["plate"] == pytest.approx(0.25)
    assert rates["background"]["circle"]["water"] == 0.0
