"""Regression: the audit finds a planted set that is *not* the shipped one, as `demo --classifier` audits.

A loop tuned on the shipped world alone (star/water, cross/grass, ring/snow) can pass the demo tests and
still miss other biases (the outside check found 1 of 3 on another set). Here a classifier is trained in the
test session on another planted set (a colour and a background, on other classes), its reliance is measured,
and the audit of its planted classes and one unplanted class must confirm exactly the planted biases it
relies on, audited as `dct-audit demo --classifier` does (the thorough check). About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from dct_audit.demo import audit_world_classifier
from dct_audit.errors import DctAuditError
from dct_audit.world import truth as T
from dct_audit.world.classifiers import ClassifierTrainConfig, train_classifier
from dct_audit.world.scenes import SHAPES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PLANTED = T.PlantedSet.parse("square:colour:green@0.99,triangle:background:stripes@0.99")
assert not set(PLANTED.biases) & set(T.PLANTED)  # not the shipped world


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("truth")
    folder = root / "clf"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tc = ClassifierTrainConfig(planted=PLANTED.spec(), seed=3, data_seed=3003, steps=200)
        train_classifier(folder, tc, eval_n=300, log=lambda m: None)
        result = audit_world_classifier(
            str(folder), str(root / "runs"), quiet=True, classes="square,triangle,circle"
        )
    finally:
        torch.set_num_threads(threads)
    return folder, result


def test_the_classifier_relies_on_what_was_planted(audited):
    folder, _ = audited
    record = json.loads((folder / "training.json").read_text())
    assert T.PlantedSet.from_dict(record) == PLANTED
    for b in PLANTED.biases:
        assert record["reliance"][b.cls]["relies"], record["reliance"][b.cls]


def test_the_audit_confirms_exactly_the_planted_biases_of_a_world_it_was_not_tuned_on(audited):
    _, result = audited
    truth = result["truth"]
    assert truth["recall"] == 1.0, truth
    assert truth["false_confirmations"] == 0, truth
    on_disk = json.loads((result["run"].run_dir / "truth.json").read_text())
    assert on_disk["found"] == len(PLANTED.biases)
    manifest = json.loads((result["run"].run_dir / "manifest.json").read_text())
    settings = manifest["settings"]
    # THOROUGH's second attempt, the demo's objective
    assert (settings["attempts"], settings["objective"]) == (2, "meanprob")


def test_demo_with_a_folder_that_is_not_a_classifier_says_so(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dct_audit.cli",
            "demo",
            "--classifier",
            str(tmp_path),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"dct-audit: error: --classifier {tmp_path} is not a world classifier folder (no config.json); "
        "train one with `python -m dct_audit.world.classifiers --planted SPEC --out DIR`"
    ]


@pytest.mark.parametrize(
    "training, labels, phrase",
    [
        ("[1, 2]", SHAPES, "is not a training record (a JSON object)"),
        ('{"planted": "star:background:water"}', SHAPES, "its planted set is not valid"),
        ('{"planted": [{"cls": "blob"}]}', SHAPES, "its planted set is not valid"),
        (
            '{"planted": [{"cls": "star", "attribute": "background", "value": "lava", "strength": 0.9}]}',
            SHAPES,
            "planted background 'lava' for star",
        ),
        ('{"planted": []}', ["a", "b", "c"], "are not the world's (circle, square"),
    ],
)
def test_demo_refuses_a_damaged_training_record_or_foreign_classes_before_auditing(
    tmp_path, training, labels, phrase
):
    (tmp_path / "config.json").write_text(json.dumps({"label_names": list(labels)}))
    (tmp_path / "training.json").write_text(training)
    with pytest.raises(DctAuditError, match=re.escape(phrase)):
        audit_world_classifier(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before anything was written
