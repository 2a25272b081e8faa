"""Paired statistics: McNemar's exact test and the paired bootstrap interval, against
scipy and against small cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from gpt.errors import DataError
from gpt.eval.stats import mcnemar_exact, mcnemar_from_correct, paired_bootstrap_ci


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 0, 1.0),  # no discordant pairs: no evidence either way
        (3, 3, 1.0),
        (0, 5, 2 / 32),  # 2 * C(5,0) / 2^5
        (4, 1, 2 * (1 + 5) / 32),  # 2 * (C(5,0) + C(5,1)) / 2^5
        (2, 8, 2 * (1 + 10 + 45) / 1024),  # 2 * P[X <= 2], X ~ Bin(10, 1/2)
        (0, 1, 1.0),  # 2 * 1/2 capped at 1
    ],
)
def test_mcnemar_exact_by_hand(b: int, c: int, p: float) -> None:
    r = mcnemar_exact(b, c)
    assert (r.b, r.c, r.n_discordant) == (b, c, b + c)
    assert r.p_value == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_matches_scipy_binomtest() -> None:
    for b in range(0, 31):
        for c in range(0, 31):
            if b + c == 0:
                continue
            want = sps.binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
            assert mcnemar_exact(b, c).p_value == pytest.approx(want, rel=1e-9, abs=1e-15), (b, c)
    # large counts stay exact (integer arithmetic, no overflow / underflow to nonsense)
    want = sps.binomtest(120, 400, 0.5).pvalue
    assert mcnemar_exact(280, 120).p_value == pytest.approx(want, rel=1e-9)


def test_mcnemar_from_correct_counts_discordant_pairs() -> None:
    first = [True, True, False, False, True, False, True]
    second = [True, False, True, True, False, False, True]
    r = mcnemar_from_correct(first, second)
    assert (r.b, r.c) == (2, 2) and r.p_value == 1.0
    r = mcnemar_from_correct([True] * 6, [False] * 6)
    assert (r.b, r.c) == (6, 0) and r.p_value == pytest.approx(2 / 64)
    with pytest.raises(DataError, match="paired"):
        mcnemar_from_correct([True], [True, False])
    with pytest.raises(DataError, match="non-negative"):
        mcnemar_exact(-1, 2)


def test_bootstrap_small_cases_by_hand() -> None:
    # constant differences: every resample has the same mean
    r = paired_bootstrap_ci([10, 20, 30], [7, 17, 27], n_resamples=500)
    assert (r.mean_diff, r.low, r.high) == (-3.0, -3.0, -3.0)
    assert r.wholly_below_zero and not r.wholly_above_zero
    # one example: the interval is that example's difference
    r = paired_bootstrap_ci([50], [80], n_resamples=200)
    assert (r.n, r.low, r.high) == (1, 30.0, 30.0) and r.wholly_above_zero
    # differences {0, 1}: resample means are 0 (p 1/4), 0.5 (1/2), 1 (1/4), so the
    # 2.5 % and 97.5 % quantiles are 0 and 1
    r = paired_bootstrap_ci([0, 0], [0, 1], n_resamples=4000, seed=3)
    assert r.mean_diff == 0.5 and (r.low, r.high) == (0.0, 1.0)
    assert not r.wholly_below_zero and not r.wholly_above_zero


def test_bootstrap_matches_scipy_percentile_interval() -> None:
    rng = np.random.default_rng(11)
    a = rng.integers(0, 101, 60).astype(float)
    b = np.clip(a + rng.normal(-4, 12, 60).round(), 0, 100)
    ours = paired_bootstrap_ci(a, b, n_resamples=20_000, seed=1)
    ref = sps.bootstrap(
        (b - a,), np.mean, n_resamples=20_000, method="percentile", random_state=2
    ).confidence_interval
    width = ref.high - ref.low
    assert ours.mean_diff == pytest.approx(float(np.mean(b - a)))
    assert abs(ours.low - ref.low) < 0.05 * width, (ours, ref)
    assert abs(ours.high - ref.high) < 0.05 * width, (ours, ref)


def test_bootstrap_is_seeded_and_chunk_independent() -> None:
    a = [3.1, 9.7, 4.4, 7.2, 1.9, 8.05, 8.6, 2.3, 6.45]
    b = [5.2, 4.1, 4.35, 9.9, 0.4, 9.15, 3.3, 2.75, 7.0]
    one = paired_bootstrap_ci(a, b, n_resamples=3001, seed=5, chunk=1000)
    assert one == paired_bootstrap_ci(a, b, n_resamples=3001, seed=5, chunk=7)
    assert one == paired_bootstrap_ci(a, b, n_resamples=3001, seed=5, chunk=5000)
    other = paired_bootstrap_ci(a, b, n_resamples=3001, seed=6)
    assert (other.low, other.high) != (one.low, one.high)
    assert one.to_dict()["n_resamples"] == 3001 and one.seed == 5


def test_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="equally long"):
        paired_bootstrap_ci([1, 2], [1])
    with pytest.raises(DataError, match="at least one"):
        paired_bootstrap_ci([], [])
    with pytest.raises(DataError, match="finite"):
        paired_bootstrap_ci([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(DataError, match="confidence"):
        paired_bootstrap_ci([1], [2], confidence=1.5)
