"""End to end on the planted-bias world: the audit finds what was planted, and nothing else.

The demo's own settings and seeds are used (``dct_audit.demo.DEMO_SETTINGS``), so what is asserted here is
what a user of ``dct-audit demo`` sees. The context shown in the images is judged by the world's
independent attribute checker (a CNN trained on true labels, not CLIP); the findings are the tagger's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dct_audit.compare import compare
from dct_audit.demo import DEMO_SETTINGS, demo, demo_run
from dct_audit.world import truth as T
from dct_audit.world.checker import AttributeChecker

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PLANTED = {(b.cls, b.value) for b in T.PLANTED}
ABSENCE = set(T.ABSENCE_ATTRIBUTES)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo (biased run, unbiased run, their comparison) and a second unbiased classifier's run."""
    out = tmp_path_factory.mktemp("demo")
    result = demo(str(out), quiet=True)
    result["unbiased_seed1"] = demo_run("unbiased_seed1", "demo-unbiased-seed1", str(out), quiet=True)
    result["compare_unbiased"] = compare(
        result["unbiased"].run_dir, result["unbiased_seed1"].run_dir, out / "compare-unbiased"
    )
    return result


@pytest.fixture(scope="module")
def checker():
    return AttributeChecker.from_pretrained().eval()


def _class_dir(run, name: str) -> Path:
    return next(p for p in (run.run_dir / "classes").iterdir() if p.name.endswith(f"-{name}"))


def _judged(run, name: str, checker) -> pd.DataFrame:
    """The checker's reading of every generated image of class ``name``, one row per image."""
    folder = _class_dir(run, name)
    scores = pd.read_csv(folder / "scores.csv")
    images = np.stack([np.asarray(Image.open(folder / f).convert("RGB")) for f in scores["file"]])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    names = checker.predict_names(x)
    for key in ("shape", "background", "context"):
        scores[key] = [n[key] for n in names]
    return scores


def _flagged(findings) -> set[tuple[str, str]]:
    return {(f["class_name"], f["attribute"]) for f in findings}


def test_inversion_raises_the_target_accuracy_of_every_class_it_learns(world):
    learned = 0
    for c in world["biased"].classes:
        if c["token_unchanged"]:  # the classifier accepted the baseline batch: nothing to learn
            assert c["initial"]["accuracy"] >= DEMO_SETTINGS["stop_accuracy"]
            assert c["token_accuracy"] == c["baseline_accuracy"]
        elif c["stop_reason"] == "accuracy":  # the token reached the stop accuracy on its training seeds
            learned += 1
            assert c["token_accuracy"] - c["baseline_accuracy"] >= 0.3, c  # held-out seeds
            assert c["token_target_prob"] > c["baseline_target_prob"], c
    assert learned >= 3  # triangle, star, ring at the demo's seeds (cross: see the next test)


def _found(world) -> set[tuple[str, str]]:
    return PLANTED & _flagged(world["biased"].findings)


def test_planted_classes_tokens_show_the_planted_context_far_more_often(world, checker):
    """Judged by the independent checker, over the demo's held-out seeds: counts and margins.

    Measured at the demo's settings: star -> water and ring -> snow are found; the cross token does not
    reach the stop accuracy (the classifier rejects 7 of the 8 training images, no update finds grass, and
    patience stops it), a miss the README reports. So: at least two of the three planted biases, and
    every planted class whose token reached the stop accuracy shows its context.
    """
    shows = 0
    for b in T.PLANTED:
        judged = _judged(world["biased"], b.cls, checker)
        counts = judged.groupby("variant")[b.attribute].apply(
            lambda v, value=b.value: int((v == value).sum())
        )
        n = int((judged["variant"] == "token").sum())
        summary = next(c for c in world["biased"].classes if c["name"] == b.cls)
        if summary["stop_reason"] != "accuracy":
            continue
        assert counts["token"] >= 0.6 * n, (b, counts.to_dict(), n)
        assert counts["token"] - counts["baseline"] >= 0.35 * n, (b, counts.to_dict(), n)
        token_shapes = judged.loc[judged["variant"] == "token", "shape"]
        assert (token_shapes == b.cls).mean() >= 0.8, b  # still the class's object, now in that context
        shows += 1
    assert shows >= 2


def test_findings_match_the_planted_biases(world):
    """Found planted biases are flagged; any other flag only says that a context was removed."""
    flagged = _flagged(world["biased"].findings)
    assert len(_found(world)) >= 2, flagged
    assert {attr for _, attr in flagged - PLANTED} <= ABSENCE, flagged - PLANTED
    for f in world["biased"].findings:
        if (f["class_name"], f["attribute"]) in PLANTED:
            assert f["token_rate"] - f["baseline_rate"] >= 0.25
            assert f["confirmed"] and f["counterfactual"]["diff"] > 0.5, f  # the classifier depends on it


def test_unbiased_classifier_gets_no_findings(world):
    assert world["unbiased"].findings == []
    # the second unbiased classifier (another seed): nothing its counterfactual check confirms (a token
    # that moved may change the images' style, e.g. more plain backgrounds, that the classifier ignores)
    assert [f for f in world["unbiased_seed1"].findings if f["confirmed"]] == []


def test_compare_biased_vs_unbiased_flags_the_planted_contexts(world):
    result = world["compare"]
    more_in_a = {(f["class_name"], f["attribute"]) for f in result.flagged if f["diff"] > 0}
    assert _found(world) <= more_in_a  # what the biased run found, the comparison shows too
    assert {attr for _, attr in more_in_a - PLANTED} <= ABSENCE, more_in_a - PLANTED


def test_compare_two_unbiased_classifiers_flags_nothing(world):
    assert world["compare_unbiased"].flagged == []
