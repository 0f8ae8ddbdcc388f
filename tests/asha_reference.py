"""Independent statements of the early-stopping rules (asynchronous successive halving, the
median rule), for checking the stops a search made. Trials run one after another (no races
over who reaches a rung first)."""

from __future__ import annotations

import numpy as np


def asha_stop_rounds(curves: list[list[float]], *, grace: int, factor: int, max_rounds: int,
                     mode: str = "min") -> list[int | None]:
    """For each trial's per-round metric curve (in the order the trials ran), the round at which
    ASHA stops it, or None. Rungs sit at rounds grace·factor^k below max_rounds; at a rung, a trial
    stops when its value is worse than the best 1/factor quantile of what earlier trials recorded
    there (no cutoff while nothing is recorded)."""
    rungs: dict[int, list[float]] = {}
    rung = grace
    while rung < max_rounds:
        rungs[rung] = []
        rung *= factor
    sign = 1.0 if mode == "min" else -1.0  # compare as a loss
    stops: list[int | None] = []
    for curve in curves:
        stop = None
        for rung, recorded in rungs.items():
            if len(curve) < rung:
                break
            value = sign * curve[rung - 1]
            if recorded and value > float(np.percentile(recorded, 100 / factor)):
                stop = rung
            recorded.append(value)
            if stop is not None:
                break
        stops.append(stop)
    return stops


def median_stop_rounds(curves: list[list[float]], *, grace: int, min_samples: int,
                       max_rounds: int) -> list[int | None]:
    """The median stopping rule (higher is better), written from its definition for trials
    run one after another: trial i stops at the first round r ≥ grace (before the last) where
    its best value so far is below the median of the running means, up to round r, of the
    earlier trials that reached round r — if at least `min_samples` did."""
    reached: list[list[float]] = []  # what each earlier trial reported before it ended
    stops = []
    for curve in curves:
        stop = None
        for r in range(1, max_rounds):
            if r < grace:
                continue
            others = [c[:r] for c in reached if len(c) >= r]
            if len(others) < min_samples:
                continue
            means = sorted(sum(c) / len(c) for c in others)
            mid = len(means) // 2
            median = means[mid] if len(means) % 2 else (means[mid - 1] + means[mid]) / 2
            if max(curve[:r]) < median:
                stop = r
                break
        reached.append(curve if stop is None else curve[:stop])
        stops.append(stop)
    return stops
