import numpy as np
import pandas as pd

from dct_audit.analyse import class_enrichment, flag_findings
from dct_audit.check import counterfactual_effect


def _tags(token_plate, base_plate, token_water, base_water):
    rows = []
    for variant, plate, water in (("token", token_plate, token_water), ("baseline", base_plate, base_water)):
        for i, (p, w) in enumerate(zip(plate, water, strict=True)):
            rows.append(
                {"variant": variant, "context_index": i % 2, "seed": 1000 + i // 2, "plate": p, "water": w}
            )
    return pd.DataFrame(rows)


def test_enrichment_flags_only_the_attribute_the_token_brings():
    n = 24
    rng = np.random.default_rng(0)
    token_plate = np.r_[np.full(20, 0.9), np.full(4, 0.1)]  # plate in 20 / 24 token images
    base_plate = np.r_[np.full(2, 0.9), np.full(22, 0.1)]  # and 2 / 24 baseline images
    water = rng.random(n)  # unrelated to the token: same distribution on both sides
    tags = _tags(token_plate, base_plate, water, rng.permutation(water))
    enr = class_enrichment(
        tags, 122, "American lobster", [("plate", "food"), ("water", "scene")], {"plate": 0.5, "water": 0.5}
    )
    out = flag_findings(enr).set_index("attribute")
    assert out.loc["plate", "token_rate"] == 20 / 24 and out.loc["plate", "baseline_rate"] == 2 / 24
    assert out.loc["plate", "flagged"] and out.loc["plate", "ci_low"] > 0.4
    assert not out.loc["water", "flagged"]
    assert (out["q_value"] >= out["p_value"]).all()


def test_small_effects_are_not_flagged_even_if_significant():
    token = np.r_[np.full(30, 0.9), np.full(70, 0.1)]
    base = np.r_[np.full(15, 0.9), np.full(85, 0.1)]
    tags = _tags(token, base, token, token)
    out = flag_findings(class_enrichment(tags, 1, "x", [("plate", "g")], {"plate": 0.5}), min_effect=0.25)
    assert out.loc[0, "p_value"] < 0.001 and not out.loc[0, "flagged"]


def _rep(probs, rate=None):
    return {"prompt": "{}", "probs": probs, "attribute_rate": rate}


def test_counterfactual_effect():
    eff = counterfactual_effect([0.9, 0.8, 0.85, 0.95], {"plain": _rep([0.2, 0.3, 0.1, 0.25])})
    assert eff["depends"] and eff["ci_low"] > 0 and eff["n"] == 4
    assert not counterfactual_effect([0.5, 0.6, 0.4], {"plain": _rep([0.5, 0.4, 0.6])})["depends"]


def test_a_dependence_on_one_replacement_only_is_not_a_dependence_on_the_attribute():
    """The outside check's false finding: 'plain background' replaced by grass only, and grass was what the
    classifier had learned for another class. Against every alternative the dependence does not hold."""
    with_probs = [0.9, 0.85, 0.95, 0.9]
    eff = counterfactual_effect(
        with_probs, {"grass": _rep([0.05, 0.1, 0.0, 0.05]), "stripes": _rep([0.9, 0.88, 0.93, 0.91])}
    )
    assert not eff["depends"] and eff["worst_replacement"] == "stripes"
    assert [r["depends"] for r in eff["replacements"]] == [True, False]


def test_a_replacement_that_did_not_remove_the_attribute_is_not_counted():
    """A token that learned 'red' can keep an 'orange' prompt red: that replacement says nothing."""
    with_probs = [0.95, 0.9, 1.0, 0.95]
    reps = {"green": _rep([0.0, 0.05, 0.0, 0.1], 0.0), "orange": _rep([0.95, 0.9, 1.0, 0.9], 0.75)}
    eff = counterfactual_effect(with_probs, reps, with_rate=1.0)
    assert eff["depends"] and eff["effective_replacements"] == 1 and eff["worst_replacement"] == "green"
    # nothing effective, or the images "with" the attribute do not show it: no dependence
    assert not counterfactual_effect(with_probs, {"orange": reps["orange"]}, with_rate=1.0)["depends"]
    assert not counterfactual_effect(with_probs, {"green": reps["green"]}, with_rate=0.25)["depends"]


def test_a_finding_is_confirmed_by_a_dependence_that_matters():
    from dct_audit.check import CONFIRM_MIN_CHANGE, confirmed

    assert confirmed({"depends": True, "diff": 0.9, "ci_low": 0.8})
    assert not confirmed({"depends": True, "diff": 0.2, "ci_low": CONFIRM_MIN_CHANGE / 3})  # may be tiny
    assert not confirmed({"depends": True, "diff": CONFIRM_MIN_CHANGE / 3, "ci_low": 0.01})  # real but tiny
    assert not confirmed({"depends": False, "diff": 0.5, "ci_low": -0.1})  # the interval includes 0
    assert not confirmed(None) and not confirmed({})
    assert not confirmed({"depends": True, "diff": 0.9, "ci_low": 0.8}, absence=True)  # an absence


def test_a_check_that_can_neither_confirm_nor_rule_out_a_change_that_matters_leaves_the_finding_open():
    from dct_audit.check import is_open

    assert is_open({"depends": True, "diff": 0.15, "ci_low": 0.05, "ci_high": 0.25})  # may reach 0.10, or not
    assert not is_open({"depends": True, "diff": 0.9, "ci_low": 0.8, "ci_high": 1.0})  # confirmed
    assert not is_open({"depends": True, "diff": 0.04, "ci_low": 0.01, "ci_high": 0.07})  # real but tiny
    assert not is_open(
        {"depends": False, "diff": 0.3, "ci_low": -0.1, "ci_high": 0.7}
    )  # one replacement fails
    assert not is_open({"depends": True, "diff": 0.15, "ci_low": 0.05, "ci_high": 0.25}, absence=True)
    assert not is_open(None) and not is_open({})


def test_replacements_that_all_bring_in_another_context_cannot_confirm():
    """Measured on a seed-13 world: 'square next to a person' was drawn on snow, 'square on a plate', 'in a
    frame' and 'alone' on water in 50-88% of images, and water was another class's planted background. Every
    replacement lowered the square's probability, but the water did it, not the missing person."""
    from dct_audit.check import confounders

    with_rates = {"person": 1.0, "snow": 1.0, "water": 0.0}
    others = ["snow", "water"]  # the groups other than the person's (context)
    on_water = {"person": 0.0, "snow": 0.125, "water": 0.875}
    assert confounders(with_rates, on_water, others) == {"water": 0.875}
    assert confounders(with_rates, {"person": 0.0, "snow": 0.9, "water": 0.1}, others) == {}
    assert confounders(None, on_water, others) == {}  # untagged: nothing known, nothing claimed

    with_probs = [0.9, 0.95, 0.85, 0.9]
    low = [0.1, 0.2, 0.05, 0.15]
    confounded = {"plate": {**_rep(low, 0.0), "confounders": {"water": 0.875}}}
    eff = counterfactual_effect(with_probs, confounded, with_rate=1.0)
    assert not eff["depends"] and eff["unconfounded_replacements"] == 0
    assert eff["replacements"][0]["depends"]  # the change itself is real; what caused it is not known
    # one unconfounded replacement that shows the change is enough support ...
    clean = {**confounded, "frame": _rep(low, 0.0)}
    assert counterfactual_effect(with_probs, clean, with_rate=1.0)["depends"]
    # ... and a confounded replacement still refutes: every effective replacement must show the change
    refuting = {"frame": _rep(low, 0.0), "plate": {**_rep(with_probs, 0.0), "confounders": {"water": 0.6}}}
    assert not counterfactual_effect(with_probs, refuting, with_rate=1.0)["depends"]


def _world_sweep(rng, n=8):
    """A class whose classifier needs water (0.99 on water, 0.01 elsewhere) and ignores the context: the
    generator puts the object on water in 60% of "on a plate" images and 20% of "alone" / "in a frame"
    images (the mechanism measured on the shipped world's star at 32 seeds: 19/32 vs 7/32)."""
    backgrounds = ["water", "grass", "snow"]
    sweep = {}
    for template, water_share, context in (
        ("{} on a plate", 0.6, "plate"),
        ("{} alone", 0.2, None),
        ("{} in a frame", 0.2, "frame"),
        ("{} on water", 1.0, None),
        ("{} on grass", 0.0, None),
        ("{} on snow", 0.0, None),
    ):
        shown, probs = [], []
        for _ in range(n):
            bg = "water" if rng.random() < water_share else backgrounds[1 + int(rng.integers(2))]
            if template.endswith(("grass", "snow")):
                bg = template.split()[-1]
            shown.append([bg] + ([context] if context else ["alone"]))
            probs.append(0.99 if bg == "water" else 0.01)
        rates = {
            a: float(np.mean([a in s for s in shown])) for a in ("plate", "frame", "alone", *backgrounds)
        }
        sweep[template] = {"probs": probs, "shown": shown, "rates": rates}
    return sweep


def test_the_adjusted_check_puts_a_change_on_the_attribute_the_generator_drew_along_not_the_prompted_one():
    from dct_audit.check import attribute_effect, class_response, confirmed
    from dct_audit.tag import Attribute, Vocabulary

    def attribute(name, group, template, absence=False):
        return Attribute(name, group, (template,), template, template, exclusive=group, absence=absence)

    attributes = [
        attribute("plate", "context", "{} on a plate"),
        attribute("frame", "context", "{} in a frame"),
        attribute("alone", "context", "{} alone", absence=True),
        attribute("water", "background", "{} on water"),
        attribute("grass", "background", "{} on grass"),
        attribute("snow", "background", "{} on snow"),
    ]
    vocabulary = Vocabulary(tuple(attributes), (), "test")
    names = vocabulary.names
    sweep = _world_sweep(np.random.default_rng(3), n=32)
    response = class_response(sweep, names)
    # the fit finds what the classifier uses (one background per image: only contrasts are identified)
    assert response["water"] - response["grass"] > 0.9 and abs(response["plate"] - response["frame"]) < 0.1
    plate = attributes[0]
    raw = attribute_effect(plate, vocabulary, sweep, "star")
    adjusted = attribute_effect(plate, vocabulary, sweep, "star", response)
    assert raw["diff"] > 0.2 and confirmed(raw)  # unadjusted: a dependence on the plate, confirmed
    assert abs(adjusted["diff"]) < 0.05 and not confirmed(adjusted)  # adjusted: the water explains it
    assert all(r["explained"] > 0.2 for r in adjusted["replacements"])
    water = attribute_effect(attributes[3], vocabulary, sweep, "star", response)
    assert confirmed(water) and water["diff"] > 0.9  # the real dependence is untouched
    # untagged images (no "shown"): nothing to fit, the check stays unadjusted
    bare = {t: {"probs": e["probs"], "rates": {}} for t, e in sweep.items()}
    assert class_response(bare, names) is None
    assert attribute_effect(plate, vocabulary, bare, "star", None)["replacements"][0]["explained"] is None


def test_more_seeds_go_only_to_the_attributes_the_first_seeds_leave_open():
    """--confirm-max-seeds: a check on 8 seeds rules out what lies clearly below the bar; the attributes it
    leaves open (confirmed, or an interval reaching 0.10) are decided on 32, and only their prompts are
    scored on 32."""
    from dct_audit.check import attribute_effect, check_class, confirmed, on_seeds
    from dct_audit.tag import Attribute, Vocabulary

    rng = np.random.default_rng(0)
    attributes = [
        Attribute(n, n, (f"{{}} {n}",), f"{{}} {n}", f"{{}} no {n}") for n in ("weak", "none", "strong")
    ]
    vocabulary = Vocabulary(tuple(attributes), (), "test")
    change = {"weak": 0.3, "none": -0.5, "strong": 0.9}
    full = {}
    for a in attributes:
        base = rng.uniform(0.05, 0.1, 32)
        noise = 0.25 if a.name == "weak" else 0.02
        full[a.with_context] = {"probs": list(base + change[a.name] + rng.normal(0, noise, 32)), "rates": {}}
        full[a.without_context] = {"probs": list(base + rng.normal(0, noise, 32)), "rates": {}}
    for e in full.values():
        e["seeds"] = list(range(32))
    asked = []

    def sweep_on(prompts, seeds):
        asked.append((len(seeds), set(prompts)))
        return {t: on_seeds(full[t], seeds) for t in prompts}

    few = check_class(attributes, vocabulary, "x", sweep_on, list(range(8)))
    assert not confirmed(few["weak"]) and few["weak"]["ci_high"] >= 0.10  # open on 8 seeds
    assert few["none"]["ci_high"] < 0.10 and confirmed(few["strong"])
    asked.clear()
    out = check_class(attributes, vocabulary, "x", sweep_on, list(range(8)), list(range(32)))
    assert [n for n, _ in asked] == [8, 32]
    assert asked[1][1] == {"{} weak", "{} no weak", "{} strong", "{} no strong"}  # not "none"'s prompts
    assert out["weak"]["n"] == 32 and confirmed(out["weak"])  # decided on 32 seeds
    assert out["weak"] == attribute_effect(attributes[0], vocabulary, {t: full[t] for t in full}, "x")
    assert out["none"]["n"] == 8 and not confirmed(out["none"])
    assert out["strong"]["n"] == 32 and confirmed(out["strong"])


def test_each_stage_of_the_check_takes_only_the_attributes_still_open_to_four_times_the_seeds():
    """--confirm-max-seeds 128: 8 seeds, then 32 for what they leave open, then 128 for what 32 leave open; a
    small real change that 32 seeds cannot tell from the bar is decided on 128."""
    from dct_audit.check import check_class, confirmed, on_seeds
    from dct_audit.stats import seed_stages
    from dct_audit.tag import Attribute, Vocabulary

    assert seed_stages(8, 0) == [8] and seed_stages(8, 8) == [8] and seed_stages(8, 32) == [8, 32]
    assert seed_stages(8, 128) == [8, 32, 128] and seed_stages(8, 100) == [8, 32, 100]
    rng = np.random.default_rng(1)
    attributes = [Attribute(n, n, (f"{{}} {n}",), f"{{}} {n}", f"{{}} no {n}") for n in ("small", "none")]
    vocabulary = Vocabulary(tuple(attributes), (), "test")
    full = {}
    for a, change, noise in ((attributes[0], 0.25, 0.3), (attributes[1], 0.0, 0.02)):
        base = rng.uniform(0.2, 0.3, 128)
        full[a.with_context] = {"probs": list(base + change + rng.normal(0, noise, 128)), "rates": {}}
        full[a.without_context] = {"probs": list(base + rng.normal(0, noise, 128)), "rates": {}}
    for e in full.values():
        e["seeds"] = list(range(128))
    asked = []

    def sweep_on(prompts, seeds):
        asked.append((len(seeds), set(prompts)))
        return {t: on_seeds(full[t], seeds) for t in prompts}

    at32 = check_class(attributes, vocabulary, "x", sweep_on, list(range(8)), list(range(32)))
    assert not confirmed(at32["small"]) and at32["small"]["ci_high"] >= 0.10  # still open on 32 seeds
    asked.clear()
    out = check_class(attributes, vocabulary, "x", sweep_on, list(range(8)), list(range(128)))
    assert [n for n, _ in asked] == [8, 32, 128]
    assert asked[1][1] == asked[2][1] == {"{} small", "{} no small"}
    assert out["small"]["n"] == 128 and confirmed(out["small"])
    assert out["none"]["n"] == 8 and not confirmed(out["none"])


def test_findings_file_round_trips_and_a_broken_one_is_one_clear_error(tmp_path):
    import pytest

    from dct_audit import rundir
    from dct_audit.errors import DctAuditError

    f = rundir.Finding(
        0,
        "star",
        "water",
        "background",
        "token",
        True,
        0.9,
        0.1,
        0.8,
        [0.7, 0.9],
        1e-4,
        1e-3,
        {"diff": 0.5},
        False,
        True,
    )
    rundir.write_findings(tmp_path, [f])
    assert rundir.read_findings(tmp_path) == [f]
    assert "discovered" not in rundir.read_json(tmp_path / rundir.FINDINGS)[0]
    for text, match in (
        ("{not json", "not valid"),
        ("[1, 2]", "not a list of findings"),
        ('[{"class_index": 0}]', "lacks a field"),
    ):
        (tmp_path / rundir.FINDINGS).write_text(text)
        with pytest.raises(DctAuditError, match=match):
            rundir.read_findings(tmp_path)
    assert rundir.read_findings(tmp_path / "none") == []


def test_class_summary_round_trips_and_reads_older_or_broken_files(tmp_path):
    import pytest

    from dct_audit import rundir
    from dct_audit.errors import DctAuditError

    s = rundir.ClassSummary(
        3,
        "star",
        "star",
        "<c3>",
        rundir.TOKEN,
        "a",
        12,
        False,
        "accuracy",
        0,
        1.0,
        10,
        0.1,
        {"loss": 2.0},
        0.9,
        0.2,
        0.8,
        0.3,
        64,
        {"total_s": 1.0},
        {},
    )
    rundir.write_class_summary(tmp_path, s)
    assert rundir.read_class_summary(tmp_path) == s
    assert "holdout_token_accuracy" not in rundir.read_json(tmp_path / rundir.CLASS_SUMMARY)
    older = {k: v for k, v in s.to_dict().items() if k != "restarts"}  # a field an older version lacked
    rundir.write_json(tmp_path / rundir.CLASS_SUMMARY, {**older, "extra": 1})
    assert rundir.read_class_summary(tmp_path).restarts is None
    (tmp_path / rundir.CLASS_SUMMARY).write_text("[]")
    with pytest.raises(DctAuditError, match="not a class summary"):
        rundir.read_class_summary(tmp_path)


def test_the_manifest_round_trips_keeps_unknown_keys_merges_shards_and_refuses_broken_files(tmp_path):
    import pytest

    from dct_audit import rundir
    from dct_audit.errors import DctAuditError

    run = rundir.RunDir(tmp_path)
    m = rundir.Manifest(
        settings={"seed": 0},
        created="2026-01-01T00:00:00",
        classes=[rundir.ManifestClass(3, "star", "star", "<dct-3>")],
        tagging={"tagger": "world"},
        extra={"written_by_a_later_version": [1]},
    )
    run.write_manifest(m)
    assert run.read_manifest() == m
    on_disk = rundir.read_json(run.manifest_path)
    assert "analysis" not in on_disk and on_disk["written_by_a_later_version"] == [1]
    assert on_disk["classes"] == [{"index": 3, "name": "star", "query": "star", "placeholder": "<dct-3>"}]

    # two shards finish classes concurrently: neither drops the other's record, nor a stage recorded meanwhile
    run.update_manifest(class_runs={"3": {"seconds": 1}}, analysis={"findings": 2})
    later = rundir.Manifest(settings={"seed": 0}, created="2026-02-02", class_runs={"4": {"seconds": 2}})
    merged = run.update_manifest(later)
    assert merged == run.read_manifest()
    assert merged.class_runs == {"3": {"seconds": 1}, "4": {"seconds": 2}}
    assert merged.created == "2026-01-01T00:00:00" and merged.analysis == {"findings": 2}
    assert merged.tagging == {"tagger": "world"} and merged.classes == []  # base's own fields win

    for text, match in (
        ("[]", "not a dct-audit manifest"),
        ('{"settings": [1]}', "not a dct-audit manifest"),
        ('{"settings": {}, "classes": [{"index": "3"}]}', "lists a class without an index and a name"),
    ):
        run.manifest_path.write_text(text)
        with pytest.raises(DctAuditError, match=match) as err:
            run.read_manifest()
        assert "\n" not in str(err.value)


def test_an_older_check_cache_is_served_where_it_can_be_and_scored_again_where_it_cannot(tmp_path):
    """The check's cache keeps scores by prompt and seed; a cache of an older version names its seeds once at
    the top and may lack the per-image tags. It serves as it is for its own seeds, and for fewer seeds when it
    was untagged; a tagged one is scored again for other seeds or under --adjust (its per-image tags are
    needed then)."""
    from types import SimpleNamespace

    import pytest

    from dct_audit import rundir
    from dct_audit.check import counterfactual_sweep
    from dct_audit.resolve import ResolvedClass

    cls = ResolvedClass(0, "star", "star")
    prompts = {"{} on water": "water"}

    class Generates(Exception):
        pass

    def ensure_models():
        raise Generates

    def sweep(entry, seeds, adjust=False):
        cache = tmp_path / "cache.json"
        rundir.write_json(cache, {"class": "star", "seeds": [1, 2], "prompts": {"{} on water": entry}})
        opts = SimpleNamespace(adjust=adjust, gen_batch=None, steps=1, guidance=None)
        return counterfactual_sweep(ensure_models, cache, cls, prompts, seeds, opts, 2)["{} on water"]

    tagged = {"name": "water", "prompt": "star on water", "probs": [0.9, 0.7], "rates": {"water": 1.0}}
    untagged = {**tagged, "rates": {}}
    assert sweep(tagged, [1, 2])["probs"] == [0.9, 0.7]  # its own seeds: served
    assert sweep(untagged, [2])["probs"] == [0.7]  # untagged: any of its seeds
    for entry, seeds, adjust in ((tagged, [2], False), (tagged, [1, 2], True), (untagged, [1, 2, 3], False)):
        with pytest.raises(Generates):  # rates of other seeds, per-image tags, a new seed: generate
            sweep(entry, seeds, adjust)
    shown = {**tagged, "shown": [["water"], []]}  # this version's entry, named by the top-level seeds
    out = sweep(shown, [2], adjust=True)
    assert out["probs"] == [0.7] and out["shown"] == [[]] and out["rates"] == {"water": 0.0}
