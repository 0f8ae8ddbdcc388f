"""One distillation run on Ray Train: build the TorchTrainer, run it, read the best checkpoint."""

from __future__ import annotations

import errno
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from amid_ray.cache_stage import build_run_caches
from amid_ray.config import RunConfig
from amid_ray.errors import StorageFullError
from amid_ray.metrics import ROUGE_L, STEP, VAL_LOSS
from amid_ray.preflight import nearest_existing
from amid_ray.remote_storage import is_uri, uri_of
from amid_ray.sources import absolute_paths
from amid_ray.system_metrics import SystemMetricsTarget
from amid_ray.train_snapshot import SnapshotKeeper, repair_snapshot
from amid_ray.worker import HISTORY_FILE, MODEL_DIR, train_loop_per_worker


def build_trainer(run: RunConfig, *, name: str | None = None,
                  callbacks: list[Any] | None = None,
                  system_metrics: SystemMetricsTarget | None = None) -> TorchTrainer:
    """A TorchTrainer for `run`; the same `name` and storage resume from its checkpoints (after
    mending Ray Train's checkpoint record if a failed write cut it: `train_snapshot`). With
    `system_metrics`, the rank-0 worker logs its machine's use to that MLflow run."""
    resources = run.resources
    name = name or run.name
    callbacks = list(callbacks or [])
    if not is_uri(run.resources.storage_root):
        run_dir = Path(run.resources.storage_root) / name
        repair_snapshot(run_dir)
        callbacks.append(SnapshotKeeper(run_dir))
    loop_config = absolute_paths(run).to_dict()
    if system_metrics is not None:
        loop_config = system_metrics.into(loop_config)
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        per_worker["GPU"] = resources.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=run.resources.storage_root,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=resources.keep_checkpoints,
                checkpoint_score_attribute=ROUGE_L,
                checkpoint_score_order="max",
            ),
            # A finite controller limit: a run whose workers cannot start must fail, not hang.
            failure_config=ray.train.FailureConfig(
                max_failures=resources.max_failures, controller_failure_limit=3
            ),
            callbacks=callbacks,
        ),
    )


@dataclass
class TrainOutcome:
    """What a finished run left: its folder, best checkpoint (by ROUGE-L) and metric history."""

    result_dir: str
    best_checkpoint: str | None
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        final = self.history[-1] if self.history else {}
        return {
            "best_checkpoint": self.best_checkpoint,
            ROUGE_L: self.best_metrics.get(ROUGE_L),
            VAL_LOSS: self.best_metrics.get(VAL_LOSS),
            "best_step": self.best_metrics.get(STEP),
            "steps": final.get(STEP),
            f"final_{ROUGE_L}": final.get(ROUGE_L),
            "result_dir": self.result_dir,
        }


def read_outcome(result: ray.train.Result) -> TrainOutcome:
    """Best checkpoint by ROUGE-L and the metric history, read from the run's result folder.

    The history comes from the latest checkpoint: Ray keeps metrics only for the checkpoints it
    retains, while each checkpoint carries the whole history up to its step.
    """
    history = []
    if result.checkpoint is not None:
        checkpoint = result.checkpoint
        history_file = f"{checkpoint.path.rstrip('/')}/{HISTORY_FILE}"
        if checkpoint.filesystem.get_file_info(history_file).is_file:
            with checkpoint.filesystem.open_input_stream(history_file) as stream:
                history = json.loads(stream.read())
    result_dir = uri_of(result.filesystem, result.path)
    scored = [(metrics, ckpt) for ckpt, metrics in (result.best_checkpoints or [])
              if math.isfinite(metrics.get(ROUGE_L, math.nan))]
    if not scored:
        return TrainOutcome(result_dir, None, {}, history)
    metrics, checkpoint = max(scored, key=lambda pair: pair[0][ROUGE_L])
    # A local path, or the checkpoint's URI when the run's storage is one (`s3://…`).
    best = uri_of(checkpoint.filesystem, f"{checkpoint.path.rstrip('/')}/{MODEL_DIR}")
    return TrainOutcome(result_dir, best, {k: _plain(v) for k, v in metrics.items()}, history)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def run_training(run: RunConfig) -> TrainOutcome:
    """Run (or resume, if the named run exists in storage) one distillation to the end, after
    building its teacher cache if it uses one."""
    if run.cache.enabled:
        build_run_caches(run, for_search=False)  # this run's reads, whatever a search's
    try:
        return read_outcome(build_trainer(run).fit())
    except ray.train.TrainingFailedError as failure:
        if not any(_is_disk_full(error) for error in _failure_chain(failure)):
            raise
        raise storage_full(run) from failure


def storage_full(run: RunConfig) -> StorageFullError:
    """The error for a run stopped by a full storage device, with what to do about it."""
    root = run.resources.storage_root
    free = "" if is_uri(root) else f" ({_free_mib(root)} MiB free)"
    return StorageFullError(
        run.source, "resources.storage", run.resources.storage,
        f"no space left on the device{free}: the run stopped, and its checkpoints stay as they "
        "are (an incomplete newest one is skipped with a warning on resume); free space and run "
        "the same command again to resume from the last complete checkpoint")


def _free_mib(folder: str) -> int:
    return shutil.disk_usage(nearest_existing(Path(folder))).free // 2**20


def _failure_chain(failure: BaseException) -> Iterator[BaseException]:
    """The errors behind a failed Train run: its controller's or workers' errors and their
    causes."""
    pending = [failure, getattr(failure, "controller_failure", None),
               *getattr(failure, "worker_failures", {}).values()]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        pending += [error.__cause__, error.__context__]


def _is_disk_full(error: BaseException) -> bool:
    # pyarrow's filesystem errors carry the errno; Ray's remote errors keep only the text.
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC
            or "No space left on device" in str(error))
