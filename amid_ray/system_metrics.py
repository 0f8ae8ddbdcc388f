"""A trial's system metrics in its MLflow run, sampled on the rank-0 worker's machine.

With `search.system_metrics` on, the trial function finds its child run (the driver makes it
when the trial starts) and hands the rank-0 Train worker a `SystemMetricsTarget`; the worker runs
MLflow's own `SystemMetricsMonitor` (CPU, memory, disk, network; GPU utilisation and memory when
pynvml finds GPUs) for as long as it trains. The metrics are MLflow's `system/…` series, shown
on the run's "System metrics" tab. Where they are logged is where the training runs, not the
driver's machine, which is what a user watching a GPU's memory wants.

Metrics are a convenience: a run that cannot be found, or a server that refuses them, costs a
warning, never the trial.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

#: The key of the Train loop config that carries the target to the workers.
CONFIG_KEY = "_system_metrics"


@dataclass(frozen=True)
class SystemMetricsTarget:
    tracking_uri: str
    run_id: str
    interval_s: float

    def into(self, loop_config: dict[str, Any]) -> dict[str, Any]:
        """`loop_config` with this target added (for `TorchTrainer(train_loop_config=…)`)."""
        return {**loop_config, CONFIG_KEY: asdict(self)}

    @classmethod
    def pop_from(cls, loop_config: dict[str, Any]) -> SystemMetricsTarget | None:
        """The target a Train loop config carries (removed from it), or None."""
        raw = loop_config.pop(CONFIG_KEY, None)
        return None if raw is None else cls(**raw)


def find_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                   *, timeout_s: float = 60.0) -> str | None:
    """The id of the trial's child run, waiting up to `timeout_s` for the driver to make it;
    None (with a warning) if it does not appear or the server cannot be asked."""
    from mlflow import MlflowClient

    from amid_ray.mlflow_runs import child_filter, trial_condition

    client = MlflowClient(tracking_uri)
    wanted = child_filter(parent_run_id, trial_condition(trial_id))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            runs = client.search_runs([experiment_id], filter_string=wanted, max_results=1)
        except Exception as error:  # noqa: BLE001 - metrics must never end a trial
            warnings.warn(f"no system metrics for trial {trial_id}: MLflow at {tracking_uri} "
                          f"could not be asked for its run ({error})", stacklevel=2)
            return None
        if runs:
            return runs[0].info.run_id
        if time.monotonic() > deadline:
            warnings.warn(f"no system metrics for trial {trial_id}: its MLflow run did not "
                          f"appear within {timeout_s:.0f} s", stacklevel=2)
            return None
        time.sleep(1.0)


@contextlib.contextmanager
def monitoring(target: SystemMetricsTarget | None) -> Iterator[None]:
    """Log system metrics to `target`'s run while the block runs (nothing when None). A resumed
    trial continues the run's `system/…` steps where they stopped."""
    if target is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(target.run_id, sampling_interval=target.interval_s,
                                       resume_logging=True, tracking_uri=target.tracking_uri)
        monitor.start()
    except Exception as error:  # noqa: BLE001 - metrics must never end a trial
        warnings.warn(f"system metrics not logged to run {target.run_id}: {error}",
                      stacklevel=3)
        yield
        return
    try:
        yield
    finally:
        monitor.finish()
