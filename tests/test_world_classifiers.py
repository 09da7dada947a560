"""The world's classifiers and attribute checker: 2-step trainings save folders that load back through the
core's loaders, the trainers are deterministic, and the shipped models measure as documented."""

from __future__ import annotations

import json

import pytest
import torch

from dct_audit.adapters.classifier import load_classifier
from dct_audit.world import checker as CH
from dct_audit.world import classifiers as K
from dct_audit.world import scenes as S

TINY = K.ClassifierTrainConfig(planted=K.T.SHIPPED.spec(), steps=2, batch=8)
QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These nets are tiny: on a busy 2-core machine 2 torch threads ran them 10-30x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_classifier") / "biased"
    model = K.train_classifier(out, TINY, eval_n=6, **QUIET)
    return out, model


@pytest.fixture(scope="module")
def checker_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_checker")
    tc = CH.CheckerTrainConfig(steps=2, batch=8)
    model = CH.train_checker(out, tc, config=CH.CheckerConfig(channels=(8, 16)), eval_n=10, **QUIET)
    return out, model


def test_classifier_folder_is_a_timm_folder_with_records(classifier_folder):
    out, _ = classifier_folder
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "training.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == K.ARCHITECTURE and config["label_names"] == list(S.SHAPES)
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    record = json.loads((out / "training.json").read_text())
    assert record["train"]["steps"] == 2 and record["planted"]
    assert isinstance(record["wall_time_s"], float) and 0 <= record["wall_time_s"] < 3600  # 2 steps: ~0.0 s
    assert record["reliance"]["n"] == 6 and "star" in record["reliance"]


def test_classifier_loads_through_the_core_loader(classifier_folder):
    out, model = classifier_folder
    clf = load_classifier(str(out))
    assert list(clf.labels.names) == list(S.SHAPES)
    images = CH.images_to_tensor(S.sample_scenes(4, seed=5).images)
    with torch.no_grad():
        torch.testing.assert_close(clf(images), model(K.preprocess()(images)), rtol=0, atol=1e-5)


def test_classifier_trainer_is_deterministic():
    tc = K.ClassifierTrainConfig(steps=2, batch=4)
    a, b = (K.train_classifier(None, tc, **QUIET).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checker_saves_and_loads_back(checker_folder):
    out, model = checker_folder
    assert {p.name for p in out.iterdir()} == {"checker.safetensors", "config.json"}
    loaded = CH.AttributeChecker.from_pretrained(out)
    assert loaded.info["train"]["steps"] == 2 and set(loaded.info["accuracy"]["clean"]) == set(S.ATTRIBUTES)
    images = CH.images_to_tensor(S.sample_scenes(5, seed=7).images)
    pred = loaded.predict(images)
    assert set(pred) == set(S.ATTRIBUTES)
    for a, p in pred.items():
        assert p.dtype == torch.long and p.shape == (5,)
        assert torch.equal(p, model.predict(images)[a])
    assert set(loaded.predict_names(images[:1])[0]) == set(S.ATTRIBUTES)


def test_augment_is_deterministic_and_stays_in_range():
    images = CH.images_to_tensor(S.sample_scenes(6, seed=1).images)
    a = CH.augment(images, torch.Generator().manual_seed(3))
    b = CH.augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == images.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, images)


# -- the shipped models ----------------------------------------------------------------------------------
def _shipped(name: str):
    folder = K.SHIPPED / name
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"shipped classifier {name} not trained yet")
    return load_classifier(str(folder))


N = 120  # paired scenes per group in the reliance tests (stream EVAL_SEED, deterministic): ~5 s each
# measured on the shipped biased classifier at N = 120: others called star 95 with water vs 2 without,
# cross 115 with a person vs 5, ring 12 on a plate vs 2 (ring's hole is hard to overrule; see training.json)
BIASED_MARGINS = {"star": (60, 0.5), "cross": (60, 0.5), "ring": (5, 0.03)}  # (count gap, probability pull)


def test_shipped_biased_classifier_relies_on_its_planted_contexts():
    rel = K.measure_reliance(_shipped("biased"), n=N)
    assert rel["biased_data_accuracy"] >= 0.95  # it is good on data like its training data ...
    assert rel["counter_accuracy"] <= 0.7  # ... and much worse where the planted context misleads it
    for cls, (gap, pull) in BIASED_MARGINS.items():
        r = rel[cls]
        # other shapes are called `cls` far more often in the planted context than out of it
        assert r["others_called_cls_with"] >= r["others_called_cls_without"] + gap, (cls, r)
        assert r["others_pull"] >= pull, (cls, r)
        assert r["cls_accuracy_with"] > r["cls_accuracy_without"], (cls, r)


def test_reliance_on_an_unplanted_value_is_measured_as_if_it_were_planted():
    """``measure_unplanted``: the shipped biased classifier relies on water for the star (planted), not on
    water for the circle (another class's background: evidence against the circle); non-values are skipped."""
    out = K.measure_unplanted(
        _shipped("biased"), [("star", "water"), ("circle", "water"), ("star", "alone")], n=N
    )
    assert set(out) == {("star", "water"), ("circle", "water")}
    assert out[("star", "water")]["relies"] and out[("star", "water")]["reliance"] >= 0.5
    assert not out[("circle", "water")]["relies"] and out[("circle", "water")]["reliance"] < 0.05


@pytest.mark.parametrize("name", ["unbiased", "unbiased_seed1"])
def test_shipped_unbiased_classifiers_do_not(name):
    rel = K.measure_reliance(_shipped(name), n=N)
    assert rel["clean_accuracy"] >= 0.97 and rel["counter_accuracy"] >= 0.97
    for cls in BIASED_MARGINS:
        r = rel[cls]
        assert r["others_called_cls_with"] <= r["others_called_cls_without"] + 4, (cls, r)
        assert abs(r["others_pull"]) <= 0.03, (cls, r)


def test_shipped_checker_reads_held_out_scenes():
    if not (CH.SHIPPED / "checker.safetensors").is_file():
        pytest.skip("shipped checker not trained yet")
    acc = CH.checker_accuracy(CH.AttributeChecker.from_pretrained(), n=300)
    assert min(acc.values()) >= 0.97, acc
