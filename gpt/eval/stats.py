"""Paired statistics for comparing two models on the same examples.

- :func:`mcnemar_exact` — McNemar's exact test: under the null hypothesis that both
  classifiers err equally often, each discordant pair (one right, the other wrong) is a
  fair coin flip, so the two-sided p-value is the binomial tail
  ``min(1, 2 · P[X ≤ min(b, c)])`` with ``X ~ Binomial(b + c, 1/2)``, computed exactly
  with integers.
- :func:`paired_bootstrap_ci` — the percentile bootstrap interval of the mean of paired
  differences (``second − first`` per example): resample the examples with replacement
  ``n_resamples`` times from a seeded generator, take the mean difference of each
  resample and the ``(1 − confidence) / 2`` and ``(1 + confidence) / 2`` quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gpt.errors import DataError

#: Bootstrap resamples used unless told otherwise (``gptflow compare``, the gates).
DEFAULT_RESAMPLES = 10_000
#: Seed of the bootstrap's generator unless told otherwise.
DEFAULT_SEED = 0
#: Coverage of the bootstrap interval unless told otherwise.
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's exact test on the discordant pairs of two paired classifiers."""

    b: int
    """Examples the first classifier got right and the second wrong."""
    c: int
    """Examples the first classifier got wrong and the second right."""
    p_value: float
    """Two-sided exact p-value (1.0 when there are no discordant pairs)."""

    @property
    def n_discordant(self) -> int:
        """``b + c``."""
        return self.b + self.c

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (with ``n_discordant``)."""
        return {**asdict(self), "n_discordant": self.n_discordant}


def mcnemar_exact(b: int, c: int) -> McNemarResult:
    """McNemar's exact test from the discordant counts ``b`` (first right, second wrong)
    and ``c`` (first wrong, second right)."""
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise DataError(f"McNemar counts must be non-negative integers, got b={b!r}, c={c!r}")
    b, c = int(b), int(c)
    n = b + c
    if n == 0:
        return McNemarResult(b, c, 1.0)
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    # 2 * tail / 2**n with exact integers; capped at 1 (b == c makes it exceed 1)
    p = min(1.0, (2 * tail) / (1 << n))
    return McNemarResult(b, c, p)


def mcnemar_from_correct(first: Sequence[bool], second: Sequence[bool]) -> McNemarResult:
    """McNemar's exact test from per-example correctness of two classifiers on the same
    examples (same order)."""
    if len(first) != len(second):
        raise DataError(
            f"McNemar needs paired examples: {len(first)} results vs {len(second)} results"
        )
    b = sum(1 for x, y in zip(first, second, strict=True) if x and not y)
    c = sum(1 for x, y in zip(first, second, strict=True) if y and not x)
    return mcnemar_exact(b, c)


@dataclass(frozen=True)
class BootstrapCI:
    """The mean of paired differences and its percentile bootstrap interval."""

    n: int
    """Paired examples."""
    mean_diff: float
    """Mean of ``second − first`` over the examples."""
    low: float
    """Lower end of the interval."""
    high: float
    """Upper end of the interval."""
    confidence: float
    """Coverage of the interval (e.g. 0.95)."""
    n_resamples: int
    """Bootstrap resamples drawn."""
    seed: int
    """Seed of the generator (``numpy.random.default_rng``)."""

    @property
    def wholly_below_zero(self) -> bool:
        """True when the whole interval lies below 0 (a drop that is not noise)."""
        return self.high < 0

    @property
    def wholly_above_zero(self) -> bool:
        """True when the whole interval lies above 0."""
        return self.low > 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)


def paired_bootstrap_ci(
    first: Sequence[float],
    second: Sequence[float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
    chunk: int = 1000,
) -> BootstrapCI:
    """Percentile bootstrap interval of ``mean(second − first)`` over paired examples.

    Deterministic for a given ``seed`` (and independent of ``chunk``, the resamples drawn
    per step to bound memory)."""
    import numpy as np

    a = np.asarray(first, dtype=float)
    b = np.asarray(second, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise DataError(
            f"a paired bootstrap needs two equally long lists of scores, got {a.shape} and "
            f"{b.shape}"
        )
    if a.size == 0:
        raise DataError("a paired bootstrap needs at least one paired example, got none")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("a paired bootstrap needs finite scores; drop unscored examples first")
    if n_resamples < 1:
        raise DataError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise DataError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    diffs = b - a
    n = diffs.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for s in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - s)
        idx = rng.integers(0, n, size=(k, n))
        means[s : s + k] = diffs[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return BootstrapCI(
        n=int(n),
        mean_diff=float(diffs.mean()),
        low=float(low),
        high=float(high),
        confidence=float(confidence),
        n_resamples=int(n_resamples),
        seed=int(seed),
    )


__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "BootstrapCI",
    "McNemarResult",
    "mcnemar_exact",
    "mcnemar_from_correct",
    "paired_bootstrap_ci",
]
