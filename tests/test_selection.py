"""Bootstrap intervals of dev ROUGE-L and paired comparisons between trials."""

from __future__ import annotations

import math

import numpy as np
import pytest

from amid_ray.selection import bootstrap_interval, paired_difference


def test_interval_matches_the_normal_approximation_for_many_items():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 100, size=2000)
    interval = bootstrap_interval(scores, seed=3)
    half = 1.96 * scores.std(ddof=1) / math.sqrt(len(scores))  # independent: CLT
    assert interval.mean == pytest.approx(scores.mean())
    assert interval.low == pytest.approx(scores.mean() - half, abs=0.1 * half)
    assert interval.high == pytest.approx(scores.mean() + half, abs=0.1 * half)


def test_pairing_tells_apart_what_unpaired_intervals_cannot():
    # Item difficulty dominates the spread; trial a beats trial b by 1 point on every item.
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 60, size=300)
    a, b = difficulty + 1.0, difficulty
    ia, ib = bootstrap_interval(a), bootstrap_interval(b)
    assert ia.low < ib.high  # the two intervals overlap
    diff = paired_difference(a, b)
    assert diff.excludes_zero and diff.mean == pytest.approx(1.0)


def test_noise_alone_is_not_distinguishable():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0, 50, size=200), rng.uniform(0, 50, size=200)
    same = paired_difference(a, a.copy())
    assert (same.low, same.high) == (0.0, 0.0) and not same.excludes_zero
    # Identically distributed scores: the interval covers 0 in most draws (level 0.95).
    covers = sum(not paired_difference(rng.permutation(a), rng.permutation(b), seed=s)
                 .excludes_zero for s in range(40))
    assert covers >= 30


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="same items: 2 vs 3"):
        paired_difference([1, 2], [1, 2, 3])
