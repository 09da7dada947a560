"""Paired statistics for token-vs-baseline (or classifier A vs B) attribute rates. Pure numpy, no scipy.

Images come in pairs (same seed and context, with and without the learned token), so an attribute's
presence gives a 2x2 table of pairs: ``b`` = present with the token only, ``c`` = present at baseline
only. The exact McNemar test is a two-sided binomial test of ``b`` out of ``b + c`` discordant pairs
at 1/2; the effect is the paired difference of rates ``(b - c) / n`` with the Agresti-Min interval
(add 1/2 to each cell, then Wald), which keeps its coverage for small n and rates near 0 or 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedResult:
    n: int  # pairs
    rate_a: float  # e.g. with the token
    rate_b: float  # e.g. at baseline
    only_a: int  # discordant pairs: present in a only
    only_b: int  # present in b only
    diff: float  # rate_a - rate_b
    ci_low: float
    ci_high: float
    p_value: float


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial p-value of ``k`` successes in ``n`` at p = 1/2."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_rates(a: np.ndarray, b: np.ndarray, z: float = 1.959964) -> PairedResult:
    """Exact McNemar test and Agresti-Min CI for paired booleans ``a`` and ``b`` (same length)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    n = int(a.size)
    if n == 0:
        return PairedResult(
            0, float("nan"), float("nan"), 0, 0, float("nan"), float("nan"), float("nan"), 1.0
        )
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    # Agresti-Min: add 1/2 to each cell
    n2 = n + 2.0
    pa, pb = (only_a + 0.5) / n2, (only_b + 0.5) / n2
    d_adj = pa - pb
    se = math.sqrt(max(0.0, (pa + pb - d_adj**2) / n2))
    diff = (only_a - only_b) / n
    low, high = max(-1.0, d_adj - z * se), min(1.0, d_adj + z * se)
    return PairedResult(
        n,
        float(a.mean()),
        float(b.mean()),
        only_a,
        only_b,
        diff,
        low,
        high,
        binom_two_sided(only_a, only_a + only_b),
    )


def benjamini_hochberg(p_values) -> np.ndarray:
    """BH-adjusted q-values (monotone, capped at 1), in the input order; NaN stays NaN."""
    p = np.asarray(p_values, dtype=float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


def mean_diff_ci(x: np.ndarray, y: np.ndarray, z: float = 1.959964) -> tuple[float, float, float]:
    """Mean of paired differences ``x - y`` with a normal-approximation CI: (diff, low, high)."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(d.mean())
    if d.size == 1:
        return m, float("nan"), float("nan")
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    return m, m - z * se, m + z * se


def seed_stages(first: int, most: int, factor: int = 4) -> list[int]:
    """Seeds of each stage of the counterfactual check (``check.check_class``): ``first``, then ``factor``
    times more per stage for the attributes still open, up to ``most`` (8, 32: ``[8, 32]``; 8, 128: ``[8,
    32, 128]``; 8, 100: ``[8, 32, 100]``; ``most`` 0 or not above ``first``: ``[first]``)."""
    stages = [first]
    while most > stages[-1]:
        stages.append(min(most, stages[-1] * factor))
    return stages
