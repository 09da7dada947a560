import numpy as np
import pandas as pd

from dct_audit.analyse import class_enrichment, counterfactual_effect, flag_findings


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


def test_counterfactual_effect():
    eff = counterfactual_effect([0.9, 0.8, 0.85, 0.95], [0.2, 0.3, 0.1, 0.25])
    assert eff["depends"] and eff["ci_low"] > 0 and eff["n"] == 4
    assert not counterfactual_effect([0.5, 0.6, 0.4], [0.5, 0.4, 0.6])["depends"]


def test_a_finding_is_confirmed_by_a_dependence_that_matters():
    from dct_audit.analyse import CONFIRM_MIN_CHANGE, confirmed

    assert confirmed({"depends": True, "diff": 0.9})
    assert not confirmed({"depends": True, "diff": CONFIRM_MIN_CHANGE / 3})  # real but tiny
    assert not confirmed({"depends": False, "diff": 0.5})  # the interval includes 0
    assert not confirmed(None) and not confirmed({})
