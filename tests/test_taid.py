"""TAID: the adaptive schedule against the released update rule, the loss against TAID's loss."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch

from amid_ray.losses import amid_loss, preset
from amid_ray.taid import TAID_ALPHA, TAID_BETA, TAID_T_END, TAID_T_START, TAIDSchedule

# ----------------------------------------------------------------------------- the schedule
#
# Written from github.com/SakanaAI/TAID `src/distil_losses/taid.py` (`TAID.update_t`), not from
# amid_ray.taid: prev_loss starts at inf, the first call only stores the loss.


def released_trace(losses, progresses, *, t_start, t_end, alpha, beta, adaptive=True):
    t, prev_loss, momentum = t_start, math.inf, 0.0
    trace = []
    for loss, progress in zip(losses, progresses, strict=True):
        if math.isinf(prev_loss):
            prev_loss = loss
            trace.append(t)
            continue
        relative_change = (prev_loss - loss) / (prev_loss + 1e-15)
        momentum = beta * momentum + (1 - beta) * relative_change
        adaptive_delta = 1 / (1 + math.exp(-momentum))
        t_target = t_start + (t_end - t_start) * progress
        delta_t = alpha * adaptive_delta * (1 - t)
        t = min(t_end, max(t_target, t + delta_t)) if adaptive else t_target
        prev_loss = loss
        trace.append(t)
    return trace


def noisy_losses(seed: int, steps: int, trend: float) -> list[float]:
    """A loss curve that drifts by `trend` per step (negative: falling) with noise."""
    rng = random.Random(seed)
    loss, losses = 3.0, []
    for _ in range(steps):
        loss = max(0.05, loss + trend + rng.gauss(0.0, 0.02))
        losses.append(loss)
    return losses


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("t_start", "alpha", "beta", "trend"),
    [(0.4, 5e-4, 0.99, -1e-3), (0.2, 5e-3, 0.9, -2e-3), (0.4, 1e-2, 0.5, 1e-3),
     (0.0, 0.1, 0.99, 0.0)],
)
@pytest.mark.parametrize("adaptive", [True, False])
def test_t_trace_matches_the_released_update(seed, t_start, alpha, beta, trend, adaptive):
    steps = 2000
    losses = noisy_losses(seed, steps, trend)
    progresses = [step / steps for step in range(steps)]
    schedule = TAIDSchedule(t_start, 1.0, alpha, beta, adaptive=adaptive)
    got = [schedule.update(loss, t) for loss, t in zip(losses, progresses, strict=True)]
    want = released_trace(losses, progresses, t_start=t_start, t_end=1.0, alpha=alpha,
                          beta=beta, adaptive=adaptive)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_float64_state_stays_within_float32_rounding_of_the_released_tensors():
    # The released state lives in float32 CUDA tensors; amid-ray keeps Python floats.
    steps = 3000
    losses = noisy_losses(7, steps, -1e-3)
    schedule = TAIDSchedule()
    t32, prev32, m32 = (torch.tensor(TAID_T_START), torch.tensor(math.inf), torch.tensor(0.0))
    for step, loss in enumerate(losses):
        got = schedule.update(loss, step / steps)
        loss32 = torch.tensor(loss, dtype=torch.float32)
        if torch.isinf(prev32):
            prev32 = loss32
        else:
            m32 = TAID_BETA * m32 + (1 - TAID_BETA) * (prev32 - loss32) / (prev32 + 1e-15)
            target = TAID_T_START + (TAID_T_END - TAID_T_START) * step / steps
            t32 = torch.tensor(min(TAID_T_END, max(target, float(
                t32 + TAID_ALPHA * torch.sigmoid(m32) * (1 - t32)))), dtype=torch.float32)
            prev32 = loss32
        assert abs(got - float(t32)) < 1e-5


def test_released_defaults():
    schedule = TAIDSchedule()
    assert (schedule.t_start, schedule.t_end, schedule.alpha, schedule.beta) == (
        0.4, 1.0, 5e-4, 0.99)
    assert schedule.adaptive and schedule.t == 0.4
    assert preset("taid").lam == TAID_T_START


def test_first_update_only_records_the_loss():
    schedule = TAIDSchedule(0.3, adaptive=False)
    assert schedule.update(2.0, progress=0.5) == 0.3  # not the target 0.65: nothing to compare
    assert schedule.update(2.0, progress=0.5) == pytest.approx(0.65)


def test_falling_loss_runs_ahead_of_the_linear_target_and_t_is_capped():
    schedule = TAIDSchedule(0.4, 1.0, alpha=0.05, beta=0.9)
    trace = [schedule.update(3.0 * 0.99**step, step / 400) for step in range(400)]
    targets = [0.4 + 0.6 * step / 400 for step in range(400)]
    assert all(b >= a for a, b in zip(trace, trace[1:], strict=False))  # never decreases
    assert trace[100] > targets[100] + 0.2
    assert max(trace) <= 1.0 and trace[-1] == pytest.approx(1.0, abs=1e-3)


def test_rising_loss_follows_the_floor_when_the_step_is_small():
    schedule = TAIDSchedule(0.2, 1.0, alpha=1e-6, beta=0.0)
    trace = [schedule.update(1.0 + step, step / 100) for step in range(100)]
    assert trace[1:] == pytest.approx([0.2 + 0.8 * step / 100 for step in range(1, 100)])


def test_state_round_trip_continues_exactly():
    losses = noisy_losses(3, 200, -1e-3)
    original = TAIDSchedule(alpha=1e-2)
    for step, loss in enumerate(losses[:120]):
        original.update(loss, step / 200)
    restored = TAIDSchedule(alpha=1e-2)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    for step, loss in enumerate(losses[120:], start=120):
        assert restored.update(loss, step / 200) == original.update(loss, step / 200)
    assert restored.state_dict() == original.state_dict()
    fresh = TAIDSchedule()
    fresh.load_state_dict(json.loads(json.dumps(TAIDSchedule().state_dict())))
    assert fresh.previous_loss is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"t_start": 1.0}, "t_start must be a number in [0, 1), got 1.0"),
        ({"t_start": 0.5, "t_end": 0.3}, "t_end must be a number in (0, 1] and >= t_start (0.5)"),
        ({"alpha": -0.1}, "alpha must be a number in [0, 1], got -0.1"),
        ({"beta": float("nan")}, "beta must be a number in [0, 1], got nan"),
        ({"t_start": True}, "t_start must be a number in [0, 1), got True"),
    ],
)
def test_arguments_validated(arguments, message):
    with pytest.raises(ValueError) as error:
        TAIDSchedule(**arguments)
    assert str(error.value).startswith(message)


def test_update_arguments_validated():
    schedule = TAIDSchedule()
    with pytest.raises(ValueError, match="loss must be a finite number, got inf"):
        schedule.update(math.inf, 0.1)
    with pytest.raises(ValueError, match="progress must be a number in \\[0, 1\\], got 1.5"):
        schedule.update(1.0, 1.5)
    with pytest.raises(ValueError, match="t must be a number in \\[t_start, t_end\\]"):
        schedule.load_state_dict({"t": 0.1, "momentum": 0.0, "previous_loss": None})


# ----------------------------------------------------------------------------- the loss
#
# TAID's `compute_loss`: p_t = softmax((1 - t)·z_q.detach() + t·z_p), then its `forward_kl`
# with teacher_probs = p_t: -Σ p_t log_softmax(z_q), token mean over the mask.


def released_taid_loss(student_logits, teacher_logits, mask, t):
    p_t = torch.softmax((1 - t) * student_logits.detach() + t * teacher_logits, dim=-1)
    x = (p_t * torch.log_softmax(student_logits, dim=-1)).sum(-1).view(-1)
    return -(x * mask.view(-1)).sum() / mask.sum()


@pytest.mark.parametrize("t", [0.2, TAID_T_START, 0.73, 1.0])
def test_taid_preset_with_lam_t_is_the_released_loss(t):
    g = torch.Generator().manual_seed(int(100 * t))
    student = torch.randn(3, 6, 40, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(3, 6, 40, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(3, 6, generator=g) > 0.3
    settings = dataclasses.replace(preset("taid"), lam=t)
    s = student.clone().requires_grad_(True)
    got = amid_loss(s, teacher, mask, **settings.as_kwargs())
    (got_grad,) = torch.autograd.grad(got, s)
    s_ref = student.clone().requires_grad_(True)
    want = released_taid_loss(s_ref, teacher, mask, t)
    (want_grad,) = torch.autograd.grad(want, s_ref)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-15)
