"""Where a `DistillationWorker` runs: inside Ray Train, or in the calling process.

The worker asks its session five things: its rank and world size, its device, the checkpoint to
resume from, how to wrap the student (DDP under Ray Train), and where to send each evaluation
round's metrics and checkpoint. `RayTrainSession` answers from `ray.train`; `LocalSession` runs
one worker in this process with no Ray at all (benchmarks that train many short runs side by
side, and scripts that want a run without a cluster).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch


class TrainSession(Protocol):
    rank: int
    world_size: int
    device: torch.device
    node_id: str

    def restored(self) -> contextlib.AbstractContextManager[Path | None]:
        """The checkpoint folder to resume from (None for a fresh run), readable inside the
        `with` block."""
        ...

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        """One evaluation round's metrics and, from rank 0, the folder of its checkpoint (which
        the caller deletes once this returns)."""
        ...


class RayTrainSession:
    """The session of a Ray Train worker."""

    def __init__(self) -> None:
        import ray
        import ray.train
        import ray.train.torch

        self._train = ray.train
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node_id = ray.get_runtime_context().get_node_id()
        self._restore = ray.train.get_checkpoint()

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        if self._restore is None:
            yield None
            return
        with self._restore.as_directory() as folder:
            yield Path(folder)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        saved = None if checkpoint is None else self._train.Checkpoint.from_directory(checkpoint)
        self._train.report(metrics, checkpoint=saved)


class LocalSession:
    """One worker in this process, on `device`: `on_report(metrics, checkpoint_folder)` receives
    every evaluation round (it may raise to end the run, e.g. an early-stopping rule)."""

    rank = 0
    world_size = 1
    node_id = "local"

    def __init__(self, on_report: Callable[[dict[str, Any], Path | None], None], *,
                 device: str | torch.device = "cpu",
                 restore_from: str | Path | None = None) -> None:
        self.device = torch.device(device)
        self._on_report = on_report
        self._restore_from = None if restore_from is None else Path(restore_from)

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield self._restore_from

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        self._on_report(metrics, checkpoint)
