"""An independent statement of the asynchronous successive-halving rule, for checking the
stops a search made. Trials run one after another (no races over who reaches a rung first)."""

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
