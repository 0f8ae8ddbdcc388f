"""TAID's adaptive interpolation schedule (Shing et al., ICLR 2025; github.com/SakanaAI/TAID).

TAID distils the student q toward r_t = softmax(t·z_p + (1 - t)·sg(z_q)) with the loss
ℓ = -Σ_v r_t log q (the `taid` preset of `amid_ray.losses`, lam = t). The interpolation weight
t moves from `t_start` toward `t_end` as training goes, faster while the loss keeps falling.
After each training step n, whose loss ℓ_n was computed with the current t:

    first step:  ℓ_prev ← ℓ_0 (nothing else changes)
    δ_n      = (ℓ_prev - ℓ_n) / (ℓ_prev + 1e-15)                relative improvement
    m_n      = β·m_(n-1) + (1 - β)·δ_n                           momentum, m_0 = 0
    t_target = t_start + (t_end - t_start)·progress              linear floor
    t        ← min(t_end, max(t_target, t + α·sigmoid(m_n)·(1 - t)))
    ℓ_prev   ← ℓ_n

`progress` is the optimizer steps completed before this one over all steps (Lightning's
`global_step / estimated_stepping_batches`, 0 on the first step). With `adaptive=False`, t is
t_target after the first step (the released `disable_adaptive`). Defaults are the released
ones (`src/distil_losses/taid.py`, `src/arguments.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

TAID_T_START = 0.4
TAID_T_END = 1.0
TAID_ALPHA = 5e-4
TAID_BETA = 0.99
#: Added to the previous loss in the relative change, as released (guards a zero loss).
_RELATIVE_CHANGE_EPS = 1e-15


def _check(name: str, value: object, valid: Callable[[float], bool], allowed: str) -> None:
    """Raise ValueError unless `value` is a finite real number (not a bool) with `valid(value)`."""
    # bool is an int subclass; True is never meant as a rate or a loss.
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and valid(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)  # the other branch would overflow for x below about -709
    return z / (1.0 + z)


class TAIDSchedule:
    """The interpolation weight t of TAID and its adaptive update (formula in the module doc)."""

    def __init__(
        self,
        t_start: float = TAID_T_START,
        t_end: float = TAID_T_END,
        alpha: float = TAID_ALPHA,
        beta: float = TAID_BETA,
        *,
        adaptive: bool = True,
    ) -> None:
        _check("t_start", t_start, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
        _check("t_end", t_end, lambda v: t_start <= v <= 1.0 and v > 0.0,
               f"a number in (0, 1] and >= t_start ({t_start!r})")
        _check("alpha", alpha, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
        _check("beta", beta, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be true or false, got {adaptive!r}")
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.alpha, self.beta = float(alpha), float(beta)
        self.adaptive = adaptive
        self.t = self.t_start
        self.momentum = 0.0
        self.previous_loss: float | None = None

    def update(self, loss: float, progress: float) -> float:
        """Take the loss of the step just made (computed with the current t) and return the t
        for the next step. `progress`: optimizer steps completed before that step / all steps."""
        _check("loss", loss, lambda v: True, "a finite number")
        _check("progress", progress, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
        if self.previous_loss is None:
            self.previous_loss = float(loss)
            return self.t
        relative_change = (self.previous_loss - loss) / (self.previous_loss + _RELATIVE_CHANGE_EPS)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative_change
        t_target = self.t_start + (self.t_end - self.t_start) * progress
        if self.adaptive:
            step = self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
            self.t = min(self.t_end, max(t_target, self.t + step))
        else:
            self.t = t_target
        self.previous_loss = float(loss)
        return self.t

    def state_dict(self) -> dict[str, Any]:
        """t, momentum and the previous loss, as plain Python data."""
        return {"t": self.t, "momentum": self.momentum, "previous_loss": self.previous_loss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output; later updates continue exactly."""
        t = state["t"]
        _check("t", t, lambda v: self.t_start <= v <= self.t_end,
               f"a number in [t_start, t_end] = [{self.t_start}, {self.t_end}]")
        self.t = float(t)
        self.momentum = float(state["momentum"])
        previous = state["previous_loss"]
        self.previous_loss = None if previous is None else float(previous)
