"""What each optimizer step sees: which examples (`micro_batches`) and which learning rate
(`learning_rate_factor`). Pure functions of their arguments (torch only, no Ray), shared by the
Ray Train worker and the demo's own training."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

#: Learning-rate decays after warm-up that `learning_rate_factor` knows.
LR_SCHEDULES = ("cosine", "linear", "constant")


def micro_batches(
    num_examples: int, batch_size: int, *, seed: int, rank: int, world_size: int,
    items: str = "training examples",
) -> Iterator[list[int]]:
    """Endless stream of this worker's micro-batches (example indices).

    Each epoch is a fresh seeded permutation split evenly across workers (the tail that does not
    fill a batch on every worker is dropped), so the stream is a pure function of its arguments
    and a resumed run can skip ahead to where it stopped. `items` names what is batched in the
    error for too little data.
    """
    per_step = batch_size * world_size
    if num_examples < per_step:
        raise ValueError(
            f"{num_examples} {items} cannot fill one batch of {batch_size} on each of "
            f"{world_size} workers"
        )
    epoch = 0
    while True:
        order = epoch_order(num_examples, seed=seed, epoch=epoch)
        for start in range(0, num_examples - per_step + 1, per_step):
            chunk = order[start : start + per_step]
            yield chunk[rank * batch_size : (rank + 1) * batch_size].tolist()
        epoch += 1


def epoch_order(num_examples: int, *, seed: int, epoch: int = 0) -> torch.Tensor:
    """The order in which `micro_batches` visits the examples in epoch `epoch`."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))


def examples_read(num_examples: int, batch_size: int, *, seed: int, world_size: int,
                  micro_steps: int) -> list[int]:
    """The examples (sorted ids) that `micro_steps` micro-batches on each of `world_size`
    workers read: a prefix of the first epoch's order, or every example once the run goes
    past the first epoch."""
    per_step = batch_size * world_size
    if micro_steps > num_examples // per_step:
        return list(range(num_examples))
    return sorted(epoch_order(num_examples, seed=seed)[: micro_steps * per_step].tolist())


def learning_rate_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warm-up `(step + 1) / warmup` for the first `warmup` steps, then with
    `p = (step - warmup) / (total - warmup)`: cosine `(1 + cos(pi p)) / 2`, linear `1 - p`,
    constant `1`.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use one of {LR_SCHEDULES}")
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0
