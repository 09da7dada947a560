"""Open-vocabulary discovery: ranking on half the seeds, testing on the other half, synonyms merged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dct_audit import discover as D
from dct_audit.errors import DctAuditError


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _world(shift: float, seed: int = 0, n_seeds: int = 16, dim: int = 32, n_concepts: int = 200):
    """Paired token/baseline image features; the token images move towards concept 7 by ``shift``."""
    rng = np.random.default_rng(seed)
    feats = _unit(rng.normal(size=(n_concepts, dim))).astype(np.float32)
    rows, emb = [], []
    for ctx in range(2):
        for s in range(1000, 1000 + n_seeds):
            base = rng.normal(size=dim)
            for variant, x in (("baseline", base), ("token", base + shift * feats[7] * np.sqrt(dim))):
                rows.append({"variant": variant, "context_index": ctx, "seed": s})
                emb.append(_unit(x + 0.3 * rng.normal(size=dim)))
    names = [f"concept {i}" for i in range(n_concepts)]
    concepts = [D.Concept(n, f"line:{i}", (n,), "", n) for i, n in enumerate(names)]
    return pd.DataFrame(rows), np.array(emb, dtype=np.float32), feats, concepts


def test_a_concept_the_token_brings_in_ranks_first_and_holds_on_held_out_seeds():
    scores, emb, feats, concepts = _world(shift=0.8)
    seeds, d = D.paired_differences(scores, emb, feats)
    assert d.shape == (32, 200) and sorted(set(seeds)) == list(range(1000, 1016))
    rows, controls = D.discover_class(seeds, d, concepts, feats, top_k=5)
    assert rows[0]["concept"] == "concept 7" and rows[0]["rank"] == 1
    assert rows[0]["p_value"] < 1e-4 and rows[0]["wins"] >= 14 and rows[0]["n_pairs"] == 16
    assert 7 not in controls[:2]  # neutral concepts are the ones the token moved least


def test_without_a_planted_concept_nothing_survives_the_correction():
    from dct_audit.stats import benjamini_hochberg

    for seed in range(5):
        scores, emb, feats, concepts = _world(shift=0.0, seed=seed)
        rows, _ = D.discover_class(*D.paired_differences(scores, emb, feats), concepts, feats, top_k=10)
        q = benjamini_hochberg([r["p_value"] for r in rows])
        assert (q < 0.05).sum() == 0, seed


def test_synonyms_are_merged():
    scores, emb, feats, concepts = _world(shift=0.8)
    feats = np.vstack([feats, feats[7:8]])  # the same embedding under another name
    concepts = [*concepts, D.Concept("seven again", "line:x", ("seven again",), "", "seven again")]
    rows, _ = D.discover_class(*D.paired_differences(scores, emb, feats), concepts, feats, top_k=5)
    assert [r["concept"] for r in rows].count("concept 7") + [r["concept"] for r in rows].count(
        "seven again"
    ) == 1


def test_concept_lists(tmp_path):
    wordnet = D.wordnet_concepts()
    assert len(wordnet) == 21844
    plate = [c for c in wordnet if c.name == "plate"]
    assert plate and all(
        c.definition and c.definition in c.prompt for c in plate
    )  # disambiguated by definition
    path = tmp_path / "concepts.txt"
    path.write_text("# world words\nwater\ngrass\tlawn grass\nwater\n\n", encoding="utf-8")
    listed = D.read_concepts(path, "a shape on {}")
    assert [c.name for c in listed] == ["water", "grass"]  # duplicates dropped
    assert listed[0].prompt == "a shape on water" and listed[1].prompt == "a shape on grass, lawn grass"
    for text, message in (("water\n", "at least two"), ("{}\nwater\n", "not a concept name")):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DctAuditError, match=message):
            D.read_concepts(path)
    with pytest.raises(DctAuditError, match="cannot read"):
        D.read_concepts(tmp_path / "missing.txt")


def test_text_embeddings_are_cached_per_tagger_and_list(tmp_path):
    class Tagger:
        spec = "fake/tagger"
        calls = 0

        def text_features(self, texts):
            import torch

            Tagger.calls += 1
            return torch.nn.functional.normalize(
                torch.randn(len(texts), 8, generator=torch.Generator().manual_seed(0)), dim=-1
            )

    concepts = [D.Concept(n, n, (n,), "", n) for n in ("a", "b", "c")]
    first = D.concept_features(Tagger(), concepts, cache=tmp_path)
    again = D.concept_features(Tagger(), concepts, cache=tmp_path)
    assert Tagger.calls == 1 and np.allclose(first, again, atol=1e-3) and len(list(tmp_path.iterdir())) == 1
    D.concept_features(Tagger(), concepts[:2], cache=tmp_path)  # another list: computed and cached apart
    assert Tagger.calls == 2 and len(list(tmp_path.iterdir())) == 2


def test_discover_on_a_finished_run_keeps_every_tested_concept_and_only_confirmed_findings(
    tiny_run_options, tiny_classifier, tmp_path, monkeypatch, capsys
):
    """``dct-audit discover RUN_DIR`` end to end on tiny models: discovered.csv lists every tested concept;
    without the check the significant concepts become findings, unconfirmed; with it only confirmed ones do
    (a rerun replaces the earlier discovery's findings); too few seeds is one clear error."""
    import json

    import dct_audit
    from dct_audit import rundir

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the concept-embedding cache
    model, _ = tiny_classifier
    opts = dict(tiny_run_options, out=str(tmp_path), n_images=4)
    run_dir = dct_audit.run(f"file:{model}", "0", name="d", **opts).run_dir  # its token moves
    words = tmp_path / "concepts.txt"
    words.write_text("grass\nwater\nsnow\nplate\nperson\nbrick\nfork\ncandle\n")

    def discovered(root):
        return [f for f in rundir.read_json(root / rundir.FINDINGS) if f.get("source") == "discovered"]

    table = D.discover_run(run_dir, str(words), "{}", top_k=4, alpha=0.5, check=False, quiet=True)
    csv = pd.read_csv(run_dir / rundir.DISCOVERED)
    assert list(csv.columns) == list(D.DISCOVERED_COLUMNS) and 1 <= len(csv) <= 4
    assert {f["attribute"] for f in discovered(run_dir)} == set(table.loc[table["significant"], "concept"])
    assert not any(f["confirmed"] for f in discovered(run_dir))

    table = D.discover_run(run_dir, str(words), "{}", top_k=4, alpha=0.5, check=True, quiet=True)
    found = discovered(run_dir)
    assert {f["attribute"] for f in found} == set(table.loc[table["confirmed"], "concept"])
    assert all(f["confirmed"] and f["counterfactual"]["n"] == 8 for f in found)
    assert not (table["confirmed"] & ~table["significant"]).any()
    checked = table[table["significant"]]
    assert checked["cf_change"].notna().all() and table.loc[~table["significant"], "cf_change"].isna().all()
    # the findings path of a confirmed concept (tiny random models confirm nothing): the significant concept
    # ranked first is declared confirmed; it alone becomes a finding, once, with its counterfactual
    assert len(checked), "no significant concept at alpha 0.5 on the tiny run"
    first = checked.sort_values("rank")["concept"].iloc[0]
    monkeypatch.setattr(D, "confirmed", lambda eff: eff["with_prompt"].endswith(f" with {first}"))
    D.discover_run(run_dir, str(words), "{}", top_k=4, alpha=0.5, check=True, quiet=True)
    found = discovered(run_dir)
    assert [f["attribute"] for f in found] == [first] and found[0]["confirmed"]
    assert found[0]["counterfactual"]["with_prompt"].endswith(f" with {first}")
    record = json.loads((run_dir / rundir.MANIFEST).read_text())["discovery"]
    assert record["checked"] and record["findings"] == "confirmed concepts"

    few = dct_audit.run(f"file:{model}", "0", name="few", **dict(opts, n_images=2)).run_dir
    with pytest.raises(DctAuditError, match="at least 4 seeds"):
        D.discover_run(few, str(words), "{}", check=False, quiet=True)

    # a class of the run that is not finished (or damaged) is named, not skipped silently
    import shutil
    from dataclasses import replace

    partial = rundir.RunDir(shutil.copytree(run_dir, tmp_path / "partial"))
    manifest = partial.read_manifest()
    partial.write_manifest(
        replace(manifest, classes=[*manifest.classes, replace(manifest.classes[0], index=1)])
    )
    capsys.readouterr()
    D.discover_run(partial.root, str(words), "{}", top_k=4, alpha=0.5, check=False, quiet=True)
    assert "discovering on 1 of 2 classes; not finished or damaged:" in capsys.readouterr().err

    # bad arguments are one line before any model loads (a real CLIP takes seconds to load)
    from dct_audit import tag

    def no_load(*a, **k):
        raise AssertionError("the tagger was loaded before the arguments were checked")

    monkeypatch.setattr(tag, "load_tagger", no_load)
    for kwargs, message in (
        ({"concepts_file": str(tmp_path / "missing.txt")}, "cannot read it"),
        ({"concepts_file": str(words), "concept_template": "no braces"}, "needs one"),
        ({"concepts_file": str(words), "top_k": 0}, "at least 1"),
        ({"concepts_file": str(words), "with_template": "{}"}, "needs two"),
        ({"concepts_file": str(words), "alpha": 1.0}, r"--alpha: must be in \(0, 1\), not 1.0"),  # was: 0.05
    ):
        with pytest.raises(DctAuditError, match=message):
            D.discover_run(run_dir, check=False, quiet=True, **kwargs)

    # the command line's summary does not call significant concepts findings (the token moves its images)
    from dct_audit.cli import main

    monkeypatch.undo()  # the real tagger again
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    capsys.readouterr()
    argv = ["discover", str(run_dir), "--concepts", str(words), "--top-k", "4", "--alpha", "0.5", "--quiet"]
    assert main([*argv, "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "closer to the token's images on held-out seeds (not a finding by itself), not checked" in out
    assert " significant" not in out
