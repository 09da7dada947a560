"""Planted truth as data: parsing a planted set, drawing random ones, and scoring findings against it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dct_audit.world import scenes as S
from dct_audit.world import truth as T


def test_a_planted_set_parses_from_its_spec_and_prints_back():
    p = T.PlantedSet.parse("star:background:water@0.9, cross:colour:Red,ring:context:person", leak=0.01)
    assert p.spec() == "star:background:water@0.9,cross:colour:red@0.99,ring:context:person@0.99"
    assert p.leak == 0.01 and p.classes == ("star", "cross", "ring")
    assert p.for_class("cross").attribute_name == "red" and p.for_class("circle") is None
    assert T.PlantedSet.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize(
    "spec, says",
    [
        ("", "empty planted set"),
        ("star:background", "not CLASS:ATTRIBUTE:VALUE"),
        ("hexagon:background:water", "not a world class"),
        ("star:shape:circle", "choose from background, colour, context"),
        ("star:background:lava", "choose from water, grass"),
        ("star:background:plain", "choose from water"),  # an absence is not plantable
        ("star:context:none", "choose from plate"),
        ("star:background:water@1.5", "must be in (0, 1]"),
        ("star:background:water@x", "is not a number"),
        ("star:background:water,star:colour:red", "planted twice"),
        ("star:background:water,ring:background:water", "on two classes"),
    ],
)
def test_a_bad_planted_set_says_what_is_wrong(spec, says):
    with pytest.raises(ValueError, match=None) as e:
        T.PlantedSet.parse(spec)
    assert says in str(e.value)


def test_random_planted_sets_are_valid_and_cover_every_attribute_type():
    rng = np.random.default_rng(0)
    sets = [T.random_planted_set(rng) for _ in range(40)]
    assert all(1 <= len(p.biases) <= 3 for p in sets)
    kinds = {b.attribute for p in sets for b in p.biases}
    assert kinds == {"background", "colour", "context"}
    assert {b.strength for p in sets for b in p.biases} == {0.9, 0.99}
    # each draws training scenes where the planted value follows its class
    p = sets[0]
    attrs = S.draw_attributes(2000, seed=3, **p.sampling())
    for b in p.biases:
        own = attrs["shape"] == S.SHAPES.index(b.cls)
        has = attrs[b.attribute] == S.VOCAB[b.attribute].index(b.value)
        assert has[own].mean() > b.strength - 0.05 and has[~own].mean() == 0.0


def _finding(cls, attr, confirmed):
    return {"class_name": cls, "attribute": attr, "confirmed": confirmed}


def test_scoring_counts_confirmed_findings_against_the_truth():
    planted = T.PlantedSet.parse("star:background:water,cross:colour:red,ring:context:person@0.9")
    reliance = {
        "star": {"reliance": 0.95, "relies": True},
        "cross": {"reliance": 0.9, "relies": True},
        "ring": {"reliance": 0.05, "relies": False},
    }
    findings = [
        _finding("star", "water", True),
        _finding("cross", "red", False),  # flagged, not confirmed: not found
        _finding("circle", "grass", True),  # a false confirmation
        _finding("square", "plain background", False),
    ]
    score = T.score_findings(findings, planted, reliance)
    assert (score["found"], score["n_planted"], score["n_confirmed"], score["false_confirmations"]) == (
        1,
        3,
        2,
        1,
    )
    assert score["recall"] == pytest.approx(1 / 3) and score["recall_relied"] == pytest.approx(1 / 2)
    assert score["precision"] == pytest.approx(1 / 2)
    assert [r["flagged"] for r in score["planted"]] == [True, True, False]
    assert "1/3 planted biases confirmed" in T.format_score(score)
    # an unbiased control: every confirmed finding is false
    control = T.score_findings([_finding("star", "water", True)], T.PlantedSet(()))
    assert control["false_confirmations"] == 1 and control["recall"] is None


def test_an_unplanted_confirmation_the_classifier_relies_on_is_named_as_a_learned_cue():
    """A confirmed finding nobody planted stays false for precision; with its measured reliance the score says
    whether the classifier learned it all the same (and counts it true only in ``precision_learned``)."""
    planted = T.PlantedSet.parse("circle:background:brick")
    findings = [
        _finding("circle", "brick", True),
        _finding("circle", "red", True),  # brick walls are red: learned along
        _finding("star", "frame", True),  # the generator's framed star: false
    ]
    measured = {
        ("circle", "red"): {"reliance": 0.44, "relies": True},
        ("star", "frame"): {"reliance": 0.05, "relies": False},
    }
    score = T.score_findings(findings, planted, None, measured)
    assert score["false_confirmations"] == 2 and score["precision"] == pytest.approx(1 / 3)
    assert score["learned_unplanted"] == 1 and score["precision_learned"] == pytest.approx(2 / 3)
    assert [r.get("relies") for r in score["confirmed"]] == [None, True, False]
    line = T.format_score(score)
    assert "2 false (precision 0.33)" in line and "relies on all the same: circle/red 0.44" in line
    assert "star/frame" not in line
    unmeasured = T.score_findings(findings, planted)
    assert unmeasured["learned_unplanted"] is None and "relies on" not in T.format_score(unmeasured)


def test_findings_the_check_left_open_count_as_neither_found_nor_false_and_are_named():
    planted = T.PlantedSet.parse("star:background:water,cross:colour:red")
    reliance = {"star": {"reliance": 0.95, "relies": True}, "cross": {"reliance": 0.3, "relies": True}}
    findings = [
        _finding("star", "water", True),
        {**_finding("cross", "red", False), "open": True},  # a weak plant: the seeds could not decide
        {**_finding("ring", "grass", False), "open": True},  # nobody planted it
    ]
    score = T.score_findings(findings, planted, reliance)
    assert score["found"] == 1 and score["n_confirmed"] == 1 and score["precision"] == 1.0
    assert [r["open"] for r in score["planted"]] == [False, True] and score["open_relied"] == 1
    assert score["open"] == [
        {"class_name": "cross", "attribute": "red", "planted": True},
        {"class_name": "ring", "attribute": "grass", "planted": False},
    ]
    assert "2 left open by the check (1 planted: cross/red)" in T.format_score(score)
    assert "left open" not in T.format_score(T.score_findings(findings[:1], planted, reliance))


def test_dependences_of_a_class_s_own_images_only_are_not_found_and_are_named():
    planted = T.PlantedSet.parse("triangle:context:frame")
    specific = {"depends": True, "ci_low": 0.14, "association": {"associated": False, "diff": -0.01}}
    findings = [
        _finding("triangle", "frame", True),
        {**_finding("triangle", "brick", False), "counterfactual": specific},  # the generator's brick wall
    ]
    score = T.score_findings(findings, planted, {"triangle": {"reliance": 0.98, "relies": True}})
    assert score["found"] == 1 and score["precision"] == 1.0 and score["specific_relied"] == 0
    assert score["specific"] == [{"class_name": "triangle", "attribute": "brick", "planted": False}]
    assert "1 dependence(s) of a class's own images only, not confirmed (0 planted)" in T.format_score(score)


def test_the_truth_travels_with_the_classifier(tmp_path):
    planted = T.PlantedSet.parse("triangle:colour:blue@0.9")
    (tmp_path / "training.json").write_text(json.dumps({"train": {}, **planted.to_dict()}))
    assert T.PlantedSet.read(tmp_path) == planted
    (tmp_path / "training.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        T.PlantedSet.read(tmp_path)
    assert T.PlantedSet.read(tmp_path / "missing") is None
