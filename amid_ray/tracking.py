"""The Ray Tune callback that records a search in MLflow while it runs.

It holds only the hooks: a trial's start opens (or finds again) its child run, each result logs
the trial's curves, the trial's end sets how it ended. The runs themselves are
`amid_ray.mlflow_runs.SearchRuns`; what happens once the search is over is `amid_ray.publish`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlflow.entities import RunStatus
from ray.tune import Callback

from amid_ray.metrics import STEP
from amid_ray.mlflow_runs import SearchRuns, is_number

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


def result_step(result: Mapping[str, Any]) -> int | None:
    """The training step of a Tune result (Tune's report count when the trial sends none)."""
    step = result.get(STEP, result.get("training_iteration"))
    return int(step) if is_number(step) else None


class MLflowSearchTracker(Callback):
    """Runs in the search driver. A child run ends FINISHED when its trial ends: at `max_steps`,
    or sooner when the scheduler or a stopper ended it (tagged `amid_ray.stopped_early=true` and
    `amid_ray.stopped_at_step`); FAILED on error."""

    def __init__(self, runs: SearchRuns):
        self.runs = runs

    def setup(self, **info: Any) -> None:
        """Open (or reopen) the parent run when the search starts."""
        self.runs.parent()

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self.runs.set_running(self._child(trial))

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict, **info: Any) -> None:
        step = result_step(result)
        if step is not None:
            self.runs.log_points(self._child(trial), [(step, result)])

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        run_id = self._child(trial)
        # The last step reported, to this driver or (a resumed trial) to an earlier one.
        last_result = result_step(trial.last_result or {})
        reached = max(self.runs.last_step(run_id), -1 if last_result is None else last_result)
        stopped_at = None if reached >= self.runs.max_steps else max(reached, 0)
        self.runs.end_child(run_id, RunStatus.FINISHED, stopped_at_step=stopped_at)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self.runs.end_child(self._child(trial), RunStatus.FAILED)

    def _child(self, trial: Trial) -> str:
        return self.runs.child_run_id(str(trial.trial_id), trial.config)
