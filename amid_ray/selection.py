"""How sure a search can be of its winner: bootstrap intervals over dev items.

A trial's dev ROUGE-L is a mean over a few hundred generated answers, so two trials a point
apart may differ only by which items happened to be easy for each. Trials are evaluated on the
same dev items, so a *paired* bootstrap (resample items, keep each item's scores together) of
the difference between two trials says whether the data can tell them apart:

    diff*_b = mean over a resample I_b of (a_i - b_i),   b = 1..n_resamples
    interval = the (1-level)/2 and (1+level)/2 quantiles of diff*_b

The winner is "distinguishable" from a rival when that interval excludes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Resamples and confidence level of every interval the search reports.
RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def _resampled_means(values: np.ndarray, seed: int, resamples: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[picks].mean(axis=1)


def bootstrap_interval(scores: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES,
                       level: float = LEVEL) -> Interval:
    """Percentile-bootstrap interval of the mean of per-item scores."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"need a non-empty list of per-item scores, got shape {values.shape}")
    means = _resampled_means(values, seed, resamples)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(values.mean()), float(low), float(high))


def paired_difference(a: Sequence[float], b: Sequence[float], *, seed: int = 0,
                      resamples: int = RESAMPLES, level: float = LEVEL) -> Interval:
    """Paired-bootstrap interval of mean(a) - mean(b) over the same items."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same items: {len(a)} vs {len(b)} scores")
    return bootstrap_interval(np.asarray(a, float) - np.asarray(b, float), seed=seed,
                              resamples=resamples, level=level)
