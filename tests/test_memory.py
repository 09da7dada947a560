"""``--batch auto``: the batch from one measured update at batch 1, checkpointing when nothing fits."""

from __future__ import annotations

import json
import types

import pytest
import torch

from dct_audit import memory
from dct_audit.errors import DctAuditError

GB = 2**30


def test_choose_batch_fits_the_free_memory_with_headroom():
    assert memory.choose_batch(10 * GB, 3 * GB) == 2  # 0.8 x 10 / 3
    assert memory.choose_batch(80 * GB, 1 * GB) == memory.MAX_AUTO_BATCH  # capped
    assert memory.choose_batch(2 * GB, 3 * GB) == 0


class _Gen:
    def __init__(self):
        self.device = torch.device("cuda")
        self.checkpointing = False

    def enable_gradient_checkpointing(self):
        self.checkpointing = True


@pytest.fixture()
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GB, 16 * GB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")


def test_auto_batch_measures_and_switches_on_checkpointing_when_nothing_fits(monkeypatch, fake_cuda):
    gen = _Gen()
    costs = iter([12 * GB, 2 * GB])  # too big without checkpointing, then 2 GB with it
    monkeypatch.setattr(memory, "measure_update_bytes", lambda *a, **k: next(costs))
    opts = types.SimpleNamespace(grad_checkpointing=False)
    batch, checkpointing, record = memory.auto_batch(gen, None, 0, "plate", opts, say=lambda m: None)
    assert (batch, checkpointing, gen.checkpointing) == (4, True, True)
    assert record["per_image_gb"] == 2.0 and record["free_gb"] == 10.0 and record["device"] == "Fake GPU"


def test_auto_batch_that_cannot_fit_is_one_line(monkeypatch, fake_cuda):
    monkeypatch.setattr(memory, "measure_update_bytes", lambda *a, **k: 20 * GB)
    with pytest.raises(DctAuditError, match="even with gradient checkpointing; lower --resolution"):
        memory.auto_batch(
            _Gen(), None, 0, "plate", types.SimpleNamespace(grad_checkpointing=False), say=print
        )


def test_batch_auto_on_a_cpu_is_the_cpu_default_and_is_recorded(
    tiny_run_options, tiny_classifier, tmp_path, capsys
):
    import dct_audit

    options = {**tiny_run_options, "quiet": False, "n_images": 1, "tagger": None}
    result = dct_audit.run(
        f"file:{tiny_classifier[0]}", "0", batch="auto", out=str(tmp_path), name="auto", **options
    )
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["settings"]["batch"] == "auto"
    assert manifest["batch_auto"] == {"device": "cpu", "batch": memory.CPU_BATCH}
    assert "--batch auto: no GPU memory to fit on cpu; using batch 2" in capsys.readouterr().err
