import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dct_audit.stats import benjamini_hochberg, binom_two_sided, mean_diff_ci, paired_rates


def test_exact_mcnemar_known_values():
    assert binom_two_sided(0, 6) == pytest.approx(2 / 64)
    assert binom_two_sided(5, 10) == 1.0
    assert binom_two_sided(1, 10) == pytest.approx(2 * 11 / 1024)


def test_paired_rates_counts_discordant_pairs():
    token = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 0], bool)
    base = np.array([0, 0, 0, 0, 0, 1, 0, 0, 1, 1], bool)
    r = paired_rates(token, base)
    assert (r.n, r.only_a, r.only_b) == (10, 5, 1)
    assert r.rate_a == 0.7 and r.rate_b == 0.3 and r.diff == pytest.approx(0.4)
    assert r.p_value == pytest.approx(binom_two_sided(1, 6))
    assert r.ci_low < 0.4 < r.ci_high


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_paired_interval_is_ordered_and_bounded(pairs):
    a, b = np.array(pairs).T
    r = paired_rates(a, b)
    assert -1 <= r.ci_low <= r.ci_high <= 1 and 0 <= r.p_value <= 1


def test_bh_matches_hand_computation():
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.2, np.nan])
    np.testing.assert_allclose(q[:4], [0.04, 0.16 / 3, 0.16 / 3, 0.2])
    assert np.isnan(q[4])


@given(st.lists(st.floats(0, 1), min_size=1, max_size=40))
def test_bh_is_at_least_p_and_at_most_one(ps):
    q = benjamini_hochberg(ps)
    assert np.all(q >= np.array(ps) - 1e-12) and np.all(q <= 1)


def test_mean_diff_ci():
    d, lo, hi = mean_diff_ci([0.9, 0.8, 0.7, 0.9], [0.1, 0.2, 0.1, 0.3])
    assert d == pytest.approx(0.65) and lo < d < hi
