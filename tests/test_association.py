"""The association stage of the check (``dct_audit/association.py``): a dependence is confirmed only when the
attribute also pulls other classes' images toward the class."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dct_audit import rundir
from dct_audit.association import (
    SUBJECTS,
    association_effect,
    association_sweep,
    check_associations,
    subjects_for,
)
from dct_audit.check import class_specific, confirmed, is_open
from dct_audit.resolve import ResolvedClass
from dct_audit.tag import Attribute, Vocabulary


def _vocabulary() -> Vocabulary:
    attrs = [
        Attribute(n, "background", (f"{n}",), f"{{}} on {n}", "", exclusive="background")
        for n in ("water", "grass", "snow")
    ]
    return Vocabulary(tuple(attrs), (), "test")


def _cf(effective=("grass", "snow")) -> dict:
    """A check that confirms water for the class (every replacement lowers it by about 0.5)."""
    return {
        "depends": True,
        "diff": 0.5,
        "ci_low": 0.4,
        "ci_high": 0.6,
        "replacements": [{"name": n, "effective": n in effective} for n in ("grass", "snow")],
    }


def _sweep(pull: dict[str, float], subjects, n=8, rng=None) -> dict:
    """Association scores of class 0 on every (template, subject): a base probability plus ``pull[bg]``."""
    rng = rng or np.random.default_rng(0)
    out = {}
    for bg, template in (("water", "{} on water"), ("grass", "{} on grass"), ("snow", "{} on snow")):
        for s in subjects:
            out[template.format(s)] = {
                0: list(np.clip(0.1 + pull.get(bg, 0.0) + rng.normal(0, 0.02, n), 0, 1))
            }
    return out


def test_an_attribute_that_pulls_other_classes_toward_the_class_is_an_association():
    voc, subjects = _vocabulary(), ["circle", "square"]
    a = voc.attributes[0]
    out = association_effect(a, _cf(), voc, subjects, _sweep({"water": 0.3}, subjects), 0)
    assert out["associated"] and out["n"] == 16 and out["subjects"] == subjects
    assert [r["name"] for r in out["replacements"]] == ["grass", "snow"]
    assert out["diff"] == pytest.approx(0.3, abs=0.03) and out["ci_low"] > 0


def test_a_dependence_only_this_class_shows_is_not_confirmed_nor_left_open():
    """The check confirms water for the class, but water does not raise the class on other classes' images
    (measured on the truth benchmark: a triangle on a generated brick wall, see association.py)."""
    voc, subjects = _vocabulary(), ["circle", "square"]
    cf = _cf()
    assert confirmed(cf)  # the check alone
    cf["association"] = association_effect(voc.attributes[0], cf, voc, subjects, _sweep({}, subjects), 0)
    assert not cf["association"]["associated"]
    assert not confirmed(cf) and class_specific(cf) and not is_open(cf)


def test_one_replacement_that_pulls_as_much_as_the_attribute_is_enough_to_refuse_the_association():
    voc, subjects = _vocabulary(), ["circle", "square"]
    out = association_effect(
        voc.attributes[0], _cf(), voc, subjects, _sweep({"water": 0.3, "snow": 0.3}, subjects), 0
    )
    assert not out["associated"] and out["worst_replacement"] == "snow"


def test_only_the_replacements_that_removed_the_attribute_in_the_check_are_compared():
    voc, subjects = _vocabulary(), ["circle", "square"]
    sweep = _sweep({"water": 0.3, "snow": 0.3}, subjects)
    out = association_effect(voc.attributes[0], _cf(effective=("grass",)), voc, subjects, sweep, 0)
    assert out["associated"] and [r["name"] for r in out["replacements"]] == ["grass"]


def test_subjects_are_the_runs_other_classes_then_drawn_from_the_labels_and_recorded(tmp_path):
    targets = [ResolvedClass(i, n, n) for i, n in enumerate(["a", "b", "c", "d", "e", "f", "g"])]
    assert subjects_for(targets[2], targets, lambda: pytest.fail("labels not needed")) == [
        "d",
        "e",
        "f",
        "g",
        "a",
    ]

    few = [ResolvedClass(3, "lobster", "lobster"), ResolvedClass(7, "bar", "bar")]
    labels = [f"label{i}" for i in range(50)]
    got = subjects_for(few[0], few, lambda: labels)
    assert got[0] == "bar" and len(got) == SUBJECTS and len(set(got)) == SUBJECTS
    assert "lobster" not in got and got == subjects_for(few[0], few, lambda: labels)  # fixed by the class

    # a label with the class's own name (ImageNet's two "crane"s) or one already drawn is not a subject
    twins = [ResolvedClass(134, "crane", "crane"), ResolvedClass(7, "Bar", "Bar")]
    named = ["crane", "bar", "crane ", "BAR", "kite"] * 40
    got = subjects_for(twins[0], twins, lambda: named)
    assert got == ["Bar", "kite"]  # five were asked for: the label list has only one other name
    cache = tmp_path / rundir.ASSOCIATION
    rundir.write_json(cache, {"subjects": {"3": ["x", "y"]}, "prompts": {}})
    assert subjects_for(few[0], few, lambda: pytest.fail("recorded"), cache) == ["x", "y"]


class _Generator:
    """Images whose brightness says whether the prompt has water; counts what it makes."""

    spec = SimpleNamespace(default_guidance=1.0)
    memo = None
    device = torch.device("cpu")

    def __init__(self):
        self.made = []

    def use_cfg(self, g):
        return False

    def has_added_token(self, prompts):
        return False

    def sample(self, prompts, seeds, steps, guidance, uncond=None):
        self.made += list(zip(prompts, seeds, strict=True))
        return torch.stack([torch.full((3, 4, 4), 0.9 if "water" in p else 0.1) for p in prompts])


class _Classifier(torch.nn.Module):
    device = torch.device("cpu")

    def forward(self, images):
        m = images.mean(dim=(1, 2, 3))
        return torch.stack([4 * m, torch.zeros_like(m), 4 * (1 - m)], dim=-1)  # class 0 likes bright images


def test_the_association_sweep_draws_each_image_once_for_every_class_and_resumes_from_its_cache(tmp_path):
    gen = _Generator()
    models = SimpleNamespace(generator=gen, classifier=_Classifier())
    opts = SimpleNamespace(steps=1, guidance=None, gen_batch=4)
    cache = tmp_path / rundir.ASSOCIATION
    texts = ["b on water", "b on grass", "c on water"]
    out = association_sweep(lambda: models, cache, texts, [1, 2], [0, 1], opts, 4, {0: ["b", "c"]})
    assert len(gen.made) == 6 and set(out) == set(texts)
    assert out["b on water"][0][0] > out["b on grass"][0][0]  # class 0 likes water
    assert rundir.read_json(cache)["subjects"] == {"0": ["b", "c"]}

    def no_models():
        raise AssertionError("everything is cached")

    again = association_sweep(no_models, cache, texts, [2], [1], opts, 4)  # fewer seeds, one class: cached
    assert again["c on water"][1] == [out["c on water"][1][1]]
    association_sweep(lambda: models, cache, texts, [1, 2, 3], [0], opts, 4)  # a new seed: drawn again
    assert len(gen.made) == 6 + 9


def test_check_associations_scores_every_candidate_in_one_sweep():
    voc, calls = _vocabulary(), []
    subjects = {0: ["circle"], 1: ["square"]}
    cfs = {0: {"water": _cf()}, 1: {"water": _cf()}}

    def sweep_on(texts, indices):
        calls.append((sorted(set(texts)), indices))
        both = {**_sweep({"water": 0.3}, ["circle"]), **_sweep({}, ["square"])}
        return {t: {0: v[0], 1: v[0]} for t, v in both.items()}

    a = voc.attributes[0]
    check_associations({0: [a], 1: [a]}, cfs, voc, subjects, sweep_on)
    assert len(calls) == 1 and calls[0][1] == [0, 1]
    assert confirmed(cfs[0]["water"]) and not confirmed(cfs[1]["water"]) and class_specific(cfs[1]["water"])


def test_a_class_without_other_classes_to_draw_keeps_the_checks_verdict():
    voc, cfs = _vocabulary(), {0: {"water": _cf()}}

    def sweep_on(texts, indices):
        raise AssertionError("nothing to draw")

    check_associations({0: [voc.attributes[0]]}, cfs, voc, {0: []}, sweep_on)
    assert "association" not in cfs[0]["water"] and confirmed(cfs[0]["water"])


def test_a_broken_association_cache_is_drawn_again_not_a_traceback(tmp_path):
    gen = _Generator()
    models = SimpleNamespace(generator=gen, classifier=_Classifier())
    opts = SimpleNamespace(steps=1, guidance=None, gen_batch=4)
    cache = tmp_path / rundir.ASSOCIATION
    for broken in ("{not json", '{"subjects": [], "prompts": {"b on water": {"seeds": 3}}}'):
        cache.write_text(broken)
        targets = [ResolvedClass(0, "a", "a"), ResolvedClass(1, "b", "b")]
        assert subjects_for(targets[0], targets, lambda: ["a", "b"], cache) == ["b"]
        out = association_sweep(lambda: models, cache, ["b on water"], [1], [0], opts, 4)
        assert len(out["b on water"][0]) == 1
    assert rundir.read_json(cache)["prompts"]["b on water"]["seeds"] == [1]  # written again, whole
