"""``dct-audit compare`` on tiny runs: a run against itself flags nothing; mismatched runs are refused."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from dct_audit.cli import main
from dct_audit.compare import compare
from dct_audit.errors import DctAuditError
from dct_audit.rundir import RunDir


@pytest.fixture(scope="module")
def two_runs(tiny_classifier, tiny_run_options, tmp_path_factory):
    import dct_audit

    out = tmp_path_factory.mktemp("runs")
    model = tiny_classifier[0]
    common = dict(tiny_run_options, out=str(out), n_images=4)
    a = dct_audit.run(f"file:{model}", "0,2", name="a", **common).run_dir
    # the runs compare refuses differ from run a only in what compare reads first, their manifests: copies
    # of it with another seed, and with class 2 dropped (auditing them would only make the same refusal slower)
    other_seed, other_classes = (RunDir(shutil.copytree(a, out / name)) for name in ("seed5", "one"))
    manifest = other_seed.read_manifest()
    other_seed.write_manifest(replace(manifest, settings={**manifest.settings, "seed": 5}))
    manifest = other_classes.read_manifest()
    other_classes.write_manifest(replace(manifest, classes=[c for c in manifest.classes if c.index != 2]))
    shutil.rmtree(other_classes.class_dir(2, "horizontal bar"))
    return a, other_seed.root, other_classes.root


def test_a_run_compared_with_itself_differs_nowhere(two_runs, tmp_path):
    a, _, _ = two_runs
    result = compare(a, a, tmp_path / "cmp")
    assert result.flagged == [] and len(result.classes) == 2
    row = result.classes.iloc[0]
    assert row["token_cosine"] == pytest.approx(1.0) and row["concept_distance"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert row["reference_distance"] > 0  # two halves of the baseline drawn from different seeds differ
    # cross-scoring by the same classifier reproduces its own accuracy (images read back from PNG)
    assert (result.classes["a_images_scored_by_b"] - result.classes["accuracy_a"]).abs().max() < 0.26
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["flagged"] == [] and {"classes.csv", "attributes.csv"} <= {
        p.name for p in (tmp_path / "cmp").iterdir()
    }


def test_mismatched_runs_are_one_line_errors(two_runs, capsys):
    a, other_seed, other_classes = two_runs
    with pytest.raises(DctAuditError, match="cannot be paired: seed: 0 vs 5"):
        compare(a, other_seed, cross_score=False)
    assert main(["compare", str(a), str(other_classes), "--no-cross-score"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "audit different classes" in err
    assert main(["compare", str(a)]) == 2 and "needs two run folders" in capsys.readouterr().err
    # rates the command line refuses are refused from Python too (alpha 1 made every difference significant)
    for bad, message in (
        ({"alpha": 1.0}, r"--alpha: must be in \(0, 1\)"),
        ({"min_effect": 0}, "--min-effect"),
    ):
        with pytest.raises(DctAuditError, match=message):
            compare(a, a, cross_score=False, **bad)
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main(["compare", str(a), str(a), "--alpha", "1"])
    assert e.value.code == 2 and "must be in (0, 1), not 1.0" in capsys.readouterr().err
    # the same indices naming other classes (a classifier with another label list): not paired by index
    renamed = RunDir(shutil.copytree(a, Path(a).parent / "renamed"))
    manifest = renamed.read_manifest()
    classes = [replace(c, name="dog") if c.index == 2 else c for c in manifest.classes]
    renamed.write_manifest(replace(manifest, classes=classes))
    assert main(["compare", str(a), str(renamed.root), "--no-cross-score"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name class 2 differently ('horizontal bar' vs 'dog')" in err
    # tagged by another tagger, or with another vocabulary: their tag rates are not comparable (the tagger is
    # recorded under "tagging", not among the settings, and was not checked)
    for key, value in (("tagger", "hf:another-clip"), ("vocabulary_sha256", "0" * 64)):
        other = RunDir(shutil.copytree(a, Path(a).parent / f"other-{key}"))
        manifest = other.read_manifest()
        other.write_manifest(replace(manifest, tagging={**manifest.tagging, key: value}))
        with pytest.raises(DctAuditError, match=f"cannot be paired: {key}: "):
            compare(a, other.root, cross_score=False)
    # a class whose numbers changed since it finished (a truncated or garbled file): refused, not a traceback
    for name in ("scores.csv", "tags.csv", "token.safetensors"):
        damaged = RunDir(shutil.copytree(a, Path(a).parent / f"damaged-{name}"))
        (damaged.class_dir(2, "horizontal bar") / name).write_bytes(b"\x00garbage{")
        assert main(["compare", str(a), str(damaged.root), "--no-cross-score"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is damaged ({name} has changed since the class finished)" in err
