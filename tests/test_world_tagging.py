"""The world CLIP as tagger: calibrated presence decisions on held-out procedural scenes (true labels known)."""

import numpy as np
import pytest
import torch

from dct_audit.world.calibrate import ATTRIBUTES_FILE, truth_table
from dct_audit.world.clip import SHIPPED

pytestmark = pytest.mark.skipif(
    not (SHIPPED / "config.json").is_file(), reason="world CLIP weights not installed"
)


def test_world_tagger_precision_and_recall_per_attribute():
    from dct_audit.tag import AttributeBank, load_tagger, load_vocabulary
    from dct_audit.world import scenes as S
    from dct_audit.world.calibrate import precision_recall

    vocab = load_vocabulary(ATTRIBUTES_FILE)
    tagger = load_tagger("world")
    bank = AttributeBank.build(tagger, vocab)
    batch = S.sample_scenes(600, seed=424242)  # not the calibration seed
    images = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
    pred = bank.scores(tagger.image_features(images)) >= bank.thresholds()
    precision, recall = precision_recall(pred, truth_table(batch, vocab.names))
    report = {
        n: (round(float(p), 3), round(float(r), 3))
        for n, p, r in zip(vocab.names, precision, recall, strict=True)
    }
    print(report)
    assert np.all(precision >= 0.9) and np.all(recall >= 0.9), report
