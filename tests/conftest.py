"""Shared fixtures: tiny random models of the real classes, saved once per session and loaded by path."""

from __future__ import annotations

import pytest

from dct_audit.testing import build_tiny_run, make_tiny_classifier, make_tiny_clip, make_tiny_pipeline

TINY_LABELS = ["American lobster, Maine lobster", "spiny lobster", "horizontal bar, high bar", "plate"]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """``{kind: folder}`` for the epsilon (SD 1.x), v-prediction (SD 2.x) and Turbo-style tiny pipelines."""
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: str(make_tiny_pipeline(root / kind, kind)) for kind in ("epsilon", "v", "turbo")}


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    """``(model_path, labels_path)`` of a tiny TorchScript timm ResNet with four labels."""
    model, labels = make_tiny_classifier(tmp_path_factory.mktemp("classifier"), TINY_LABELS)
    return str(model), str(labels)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny transformers CLIP folder, used as ``--tagger hf:FOLDER``."""
    return str(make_tiny_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="session")
def tiny_run_options(tiny_pipelines, tiny_classifier, tiny_clip):
    """Keyword arguments for a fast ``dct_audit.run`` on the tiny models (add ``out``, ``name``)."""
    model, labels = tiny_classifier
    return dict(
        labels=labels,
        generator=tiny_pipelines["turbo"],
        tagger=f"hf:{tiny_clip}",
        max_updates=2,
        contexts=("a photo of {}",),
        explain_images=0,
        report=False,
        quiet=True,
        lr=0.2,
        confirm_seeds=2,  # the check of every attribute on 2 seeds, not 8: the same code, a quarter of the images
        gen_batch=64,  # tiny images: one generator call per 64 (the default, 4, spends the time in Python calls)
    )


@pytest.fixture
def quick_run_kwargs(tmp_path):
    """Keyword arguments for the quickest ``dct_audit.run`` (no tagger, one image, two updates) into
    ``tmp_path``; add the classifier, classes, generator and name."""
    return dict(
        out=str(tmp_path),
        max_updates=2,
        n_images=1,
        contexts=("a photo of {}",),
        tagger=None,
        explain_images=0,
        quiet=True,
    )


@pytest.fixture(scope="session")
def tiny_run_command(tiny_pipelines, tiny_classifier, tiny_clip):
    """The start of a ``dct-audit run`` command line on the tiny models (add classes, out, settings)."""
    model, labels = tiny_classifier
    return [
        "run",
        "--tagger",
        f"hf:{tiny_clip}",
        "--generator",
        tiny_pipelines["turbo"],
        "--classifier",
        f"file:{model}",
        "--labels",
        labels,
        "--confirm-seeds",
        "2",
        "--gen-batch",
        "64",
    ]


@pytest.fixture(scope="module")
def tiny_run(tiny_pipelines, tiny_classifier, tiny_clip, tmp_path_factory):
    return build_tiny_run(tmp_path_factory, tiny_pipelines, tiny_classifier, tiny_clip)
