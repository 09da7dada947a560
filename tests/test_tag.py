"""The attribute vocabulary, tagger adapters on tiny local models, and calibrated presence decisions."""

import json

import numpy as np
import pytest
import torch

from dct_audit.errors import DctAuditError
from dct_audit.tag import AttributeBank, load_tagger, load_vocabulary
from dct_audit.world.calibrate import calibrate_thresholds, precision_recall


def test_shipped_vocabulary_covers_the_documented_contexts():
    vocab = load_vocabulary()
    assert len(vocab) >= 80
    groups = {a.group for a in vocab.attributes}
    assert {"people and body parts", "food and tableware", "scenes and backgrounds", "objects"} <= groups
    for needed in [
        "person",
        "athlete",
        "gymnast",
        "face",
        "hands",
        "fingers",
        "legs",
        "plate",
        "dish",
        "cooked food",
        "water",
        "underwater",
        "snow",
        "grass",
        "sky",
        "trees",
        "indoor",
        "gym",
        "road",
        "kitchen",
        "stage",
        "keyboard keys",
        "text",
        "bird feeder",
        "flowers",
        "dog",
        "vehicle interior",
    ]:
        assert needed in vocab.names, needed
    assert all(
        a.with_context.count("{}") == 1 and a.without_context.count("{}") == 1 for a in vocab.attributes
    )


def test_user_vocabulary_replaces_or_extends(tmp_path):
    f = tmp_path / "attrs.json"
    f.write_text(json.dumps({"attributes": [{"name": "lab coat", "prompts": ["a lab coat"]}]}))
    assert load_vocabulary(f).names == ["lab coat"]
    f.write_text(
        json.dumps(
            {"mode": "extend", "attributes": [{"name": "lab coat"}, {"name": "plate", "prompts": ["a dish"]}]}
        )
    )
    vocab = load_vocabulary(f)
    assert "lab coat" in vocab.names and vocab.names.count("plate") == 1 and len(vocab) > 80


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"attrs": []}', "'attributes' list"),
        ('{"attributes": [{"prompts": ["x"]}]}', "needs a non-empty 'name'"),
        ('{"attributes": [{"name": "a", "with": "no slot"}]}', "'with' must be a prompt"),
        ('{"attributes": [{"name": "a", "threshold": 3}]}', "'threshold' must be"),
        ('{"attributes": [{"name": "a"}, {"name": "a"}]}', "names an attribute twice"),
    ],
)
def test_malformed_vocabulary_is_one_clear_error(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(DctAuditError, match=message) as e:
        load_vocabulary(f)
    assert "\n" not in str(e.value)


def test_calibration_finds_a_separating_threshold():
    rng = np.random.default_rng(0)
    truth = rng.random((200, 2)) < 0.3
    scores = np.where(
        truth, 0.3 + 0.1 * rng.random((200, 2)), 0.1 * rng.random((200, 2))
    )  # present > 0.3 > absent
    thr = calibrate_thresholds(scores, truth, ["a", "b"])
    pred = scores >= np.array([thr["a"], thr["b"]])
    precision, recall = precision_recall(pred, truth)
    assert np.all(precision == 1) and np.all(recall == 1) and all(0.1 <= t <= 0.3 for t in thr.values())


def test_transformers_clip_tagger_from_a_local_folder(tmp_path):
    from dct_audit.testing import make_tiny_clip

    make_tiny_clip(tmp_path)
    tagger = load_tagger(f"hf:{tmp_path}")
    vocab = load_vocabulary()
    bank = AttributeBank.build(tagger, vocab)
    feats = tagger.image_features(torch.rand(3, 3, 40, 40))
    assert feats.shape == (3, 8) and torch.allclose(feats.norm(dim=-1), torch.ones(3))
    scores = bank.scores(feats)
    assert scores.shape == (3, len(vocab)) and np.all((scores > 0) & (scores < 1))


def test_unknown_tagger():
    with pytest.raises(DctAuditError, match="unknown tagger architecture"):
        load_tagger("ViT-Nope/x")
