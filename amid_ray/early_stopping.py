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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from amid_ray.atomic import write_text_atomic
from amid_ray.metrics import STEP
from amid_ray.search_space import SchedulerSpec

#: The rung records of a search's scheduler, in its search folder.
RUNGS_FILE = "asha_rungs.json"


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



def make_scheduler(spec: SchedulerSpec | None, *, eval_every: int, max_steps: int,
                   search_dir: Path) -> ResumableASHA | None:
    """The search's early stopping (None: every trial runs to the end). Rungs sit at
    `grace_rounds` evaluation rounds and then every `reduction_factor`-fold more steps."""
    if spec is None:
        return None
    return ResumableASHA(
        state_file=Path(search_dir) / RUNGS_FILE, max_steps=max_steps,
        grace_steps=spec.grace_rounds * eval_every, reduction_factor=spec.reduction_factor,
        metric=spec.metric, mode=spec.mode,
    )
