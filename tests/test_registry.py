"""Adapters from other packages: a classifier and a generator registered by prefix run a whole audit."""

from __future__ import annotations

import sys
import types

import pandas as pd
import pytest
import torch

from dct_audit.adapters import registry
from dct_audit.adapters.classifier import describe_classifier, load_classifier
from dct_audit.adapters.generator_load import check_generator_spec, load_generator
from dct_audit.errors import DctAuditError


@pytest.fixture
def plugins(monkeypatch, tiny_pipelines, tiny_classifier):
    """A package ``acme_models`` whose loaders wrap the tiny models, registered as ``acme:`` specs."""
    model, labels = tiny_classifier
    calls = []

    def acme_classifier(spec, device, labels_file):
        calls.append(("classifier", spec, str(device), labels_file))
        if spec != "acme:tiny":
            raise DctAuditError(f"acme has no classifier {spec!r}")
        return load_classifier(f"file:{model}", labels, device)

    def acme_generator(spec, device, dtype):
        calls.append(("generator", spec, str(device), dtype))
        return load_generator(tiny_pipelines["turbo"], device, dtype)

    module = types.ModuleType("acme_models")
    module.classifier, module.generator = acme_classifier, acme_generator
    monkeypatch.setitem(sys.modules, "acme_models", module)
    for kind in ("classifier", "generator"):
        monkeypatch.setitem(registry.PLUGINS, kind, dict(registry.PLUGINS[kind]))
        registry.register(kind, "acme", f"acme_models:{kind}")
    return calls


def test_registered_plugins_load_classifier_and_generator_by_prefix(plugins, tiny_classifier):
    model, labels = tiny_classifier
    record, names = describe_classifier("acme:tiny")
    assert names.names == load_classifier(f"file:{model}", labels).labels.names
    clf = load_classifier("acme:tiny")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(clf(x), load_classifier(f"file:{model}", labels)(x))
    assert check_generator_spec("acme:sd") == "acme:sd"  # no hub lookup for a plugin's spec
    assert load_generator("acme:sd").spec.family == "sd-turbo"
    assert [c[0] for c in plugins] == ["classifier", "classifier", "generator"]
    with pytest.raises(DctAuditError, match="acme has no classifier"):
        load_classifier("acme:other")
    assert registry.find("classifier", "acmex:tiny") is None  # a prefix matches whole names only


def test_an_audit_runs_through_registered_plugins(
    plugins, tiny_classifier, tiny_pipelines, tmp_path, quick_run_kwargs
):
    import dct_audit

    model, labels = tiny_classifier
    common = quick_run_kwargs
    via_plugin = dct_audit.run("acme:tiny", "plate", generator="acme:sd", name="acme", **common)
    assert [c[0] for c in plugins] == ["classifier", "generator"]  # each loaded once for the run
    direct = dct_audit.run(
        f"file:{model}", "plate", labels=labels, generator=tiny_pipelines["turbo"], name="file", **common
    )
    assert via_plugin.classes[0]["token_accuracy"] == direct.classes[0]["token_accuracy"]
    a, b = (next((tmp_path / n / "classes").iterdir()) for n in ("acme", "file"))
    pd.testing.assert_frame_equal(pd.read_csv(a / "scores.csv"), pd.read_csv(b / "scores.csv"))


def test_register_refuses_malformed_entries():
    with pytest.raises(ValueError, match="kind"):
        registry.register("vae", "x", "m:f")
    with pytest.raises(ValueError, match="plain name"):
        registry.register("tagger", "a:b", "m:f")
    with pytest.raises(ValueError, match="module:function"):
        registry.register("tagger", "x", "module_only")
