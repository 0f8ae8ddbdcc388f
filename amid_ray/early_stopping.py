"""Early stopping of trials on the run's own clock, with decisions that survive a resume.

ASHA (asynchronous successive halving) compares trials at rungs of optimizer steps: a trial
reaching a rung is stopped when its metric is worse than the `1 - 1/reduction_factor` quantile
of the values recorded there by earlier trials. Two things make Ray's `ASHAScheduler` unfit as
it is for a search that can be resumed:

- Its clock. Tune's `training_iteration` restarts at 1 when a trial resumes from a checkpoint;
  the worker's reported `step` (optimizer steps) does not, so the rungs are placed in steps.
- Its memory. Tune does not save the scheduler with the experiment, so a restored search would
  start with empty rungs and decide differently. `ResumableASHA` writes its rung records to a
  JSON file in the search folder after every decision and reads them back the first time a
  restored search uses it.

The median stopping rule (`scheduler: median`, the second choice) is kept the same way:
`ResumableMedian` decides on steps from per-trial records it writes to the search folder.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from amid_ray.atomic import write_text_atomic
from amid_ray.metrics import STEP
from amid_ray.search_space import SchedulerSpec

#: The rung records of a search's scheduler, in its search folder.
RUNGS_FILE = "asha_rungs.json"
#: The median rule's records (trial id → step → value), in the search folder.
MEDIAN_FILE = "median_records.json"


class ResumableASHA(ASHAScheduler):
    """ASHA on optimizer steps whose rung records persist in `state_file` (see the module)."""

    def __init__(self, *, state_file: str | Path, max_steps: int, grace_steps: int,
                 reduction_factor: int, metric: str, mode: str):
        super().__init__(time_attr=STEP, max_t=max_steps, grace_period=grace_steps,
                         reduction_factor=reduction_factor, metric=metric, mode=mode,
                         brackets=1)
        self.state_file = str(state_file)
        self._loaded = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled by a restored search: its rungs are those on disk, not those of the pickle.
        self.__dict__.update(state)
        self._loaded = False

    @property
    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """(milestone step, {trial id: recorded value}) from the last rung to the first."""
        return self._brackets[0]._rungs

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self.state_file)
        if not path.is_file():
            return
        saved = {float(step): recorded for step, recorded in json.loads(path.read_text()).items()}
        for milestone, recorded in self.rungs:
            recorded.update(saved.get(float(milestone), {}))

    def _save(self) -> None:
        state = {str(milestone): recorded for milestone, recorded in self.rungs}
        write_text_atomic(Path(self.state_file), json.dumps(state, sort_keys=True))

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        # A trial restored with the experiment may never have been added in this driver.
        self._trial_info.setdefault(trial.trial_id, self._brackets[0])
        decision = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load()
        self._trial_info.setdefault(trial.trial_id, self._brackets[0])
        super().on_trial_complete(tune_controller, trial, result)
        self._save()



class ResumableMedian(FIFOScheduler):
    """The median stopping rule (Vizier) on optimizer steps, its records persisted in
    `state_file` like `ResumableASHA`'s rungs.

    At an evaluation round at step t ≥ `grace_steps`, a trial is stopped when its best value so
    far is worse than the median, over the other trials that reported at step t or later, of
    each one's running mean of the values it reported up to step t, provided there are at least
    `min_samples` such trials. Records are kept per trial id and step, so a trial resumed from
    a checkpoint that reports a round again changes nothing.
    """

    def __init__(self, *, state_file: str | Path, grace_steps: int, min_samples: int,
                 metric: str, mode: str):
        super().__init__()
        self._metric, self._mode = metric, mode
        self.state_file = str(state_file)
        self.grace_steps, self.min_samples = grace_steps, min_samples
        self._records: dict[str, dict[int, float]] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._records = None  # read from disk, not from the pickle

    @property
    def records(self) -> dict[str, dict[int, float]]:
        """trial id → step → value, as reported (loaded from `state_file` on first use)."""
        if self._records is None:
            path = Path(self.state_file)
            saved = json.loads(path.read_text()) if path.is_file() else {}
            self._records = {trial: {int(step): value for step, value in steps.items()}
                             for trial, steps in saved.items()}
        return self._records

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if STEP not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        step = int(result[STEP])
        self.records.setdefault(trial.trial_id, {})[step] = float(result[self._metric])
        write_text_atomic(Path(self.state_file), json.dumps(self.records, sort_keys=True))
        if self.should_stop(trial.trial_id, step):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def should_stop(self, trial_id: str, step: int) -> bool:
        if step < self.grace_steps:
            return False
        means = []
        for other, steps in self.records.items():
            if other != trial_id and max(steps) >= step:
                values = [value for at, value in steps.items() if at <= step]
                means.append(sum(values) / len(values))
        if len(means) < self.min_samples:
            return False
        median = statistics.median(means)
        mine = [value for at, value in self.records[trial_id].items() if at <= step]
        return max(mine) < median if self._mode == "max" else min(mine) > median


def make_scheduler(spec: SchedulerSpec | None, *, eval_every: int, max_steps: int,
                   search_dir: Path) -> ResumableASHA | ResumableMedian | None:
    """The search's early stopping (None: every trial runs to the end). ASHA's rungs sit at
    `grace_rounds` evaluation rounds and then every `reduction_factor`-fold more steps; the
    median rule decides at every round from `grace_rounds` on."""
    if spec is None:
        return None
    if spec.type == "median":
        return ResumableMedian(state_file=Path(search_dir) / MEDIAN_FILE,
                               grace_steps=spec.grace_rounds * eval_every,
                               min_samples=spec.min_samples, metric=spec.metric, mode=spec.mode)
    return ResumableASHA(
        state_file=Path(search_dir) / RUNGS_FILE, max_steps=max_steps,
        grace_steps=spec.grace_rounds * eval_every, reduction_factor=spec.reduction_factor,
        metric=spec.metric, mode=spec.mode,
    )
