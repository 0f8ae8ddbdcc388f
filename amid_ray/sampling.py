"""The search space as Optuna sees it: one mapping from parameters to distributions, the
define-by-run function that samples a trial's point (baselines first), and the searcher: the
chosen sampler over a study kept in a database, so `optuna-dashboard <url>` shows the search
while it runs and the study outlives the driver.

Baselines are real trials of the study: they are enqueued with their effective values of the
searched keys (the preset's α, λ, divergence and order, the base run's values for the rest), so
the sampler's model learns from them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from amid_ray.config import flatten_dotted, point_config
from amid_ray.metrics import BEST_ROUGE_L, STEP
from amid_ray.search_space import PRESET_KEY, Param, SearchSpec

#: The study's SQLite file in the search folder (when `search.storage` is not set).
STUDY_FILE = "optuna.db"


def optuna_distribution(param: Param) -> BaseDistribution:
    """The Optuna distribution of a searched parameter (the only place this mapping lives)."""
    if param.possible_values() is not None:
        return CategoricalDistribution(list(param.values))
    if param.type == "int":
        return IntDistribution(int(param.low), int(param.high))
    return FloatDistribution(param.low, param.high, log=param.type == "loguniform")


def suggest(trial: optuna.Trial, key: str, distribution: BaseDistribution) -> Any:
    """Ask `trial` for a value of `distribution` under the name `key`."""
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(key, distribution.low, distribution.high, log=distribution.log)
    return trial.suggest_float(key, distribution.low, distribution.high, log=distribution.log)


def baseline_point(spec: SearchSpec, base: dict[str, Any], name: str) -> dict[str, Any]:
    """The searched keys' values in baseline `name`'s run (the preset's settings over `base`),
    those the space can represent: a categorical value must be one of its choices, and a
    conditional key counts only where its condition holds."""
    effective = flatten_dotted(point_config(base, {PRESET_KEY: name}, f"baseline {name}")
                               .to_dict())
    point: dict[str, Any] = {}
    for param in spec.params:
        if any(point.get(key) != value for key, value in param.when.items()):
            continue
        value = effective[param.key]
        choices = param.possible_values()
        if choices is None or value in choices:
            point[param.key] = value
    return point


class DefineByRun:
    """Optuna define-by-run space: baselines first, then the (conditional) parameters.

    A callable object rather than a closure so Ray can pickle it with the searcher's state.
    `base`: the run configuration as plain data, for the baselines' effective values.
    """

    def __init__(self, spec: SearchSpec, base: dict[str, Any]):
        self.spec = spec
        self.base = base

    def __call__(self, trial: optuna.Trial) -> dict[str, Any] | None:
        distributions = {p.key: optuna_distribution(p) for p in self.spec.params}
        if trial.number < len(self.spec.baselines):
            name = self.spec.baselines[trial.number]
            # The trial was enqueued with this point: suggest returns its values (a baseline may
            # lie outside a sampled range, e.g. kd's lam = 0; Optuna records it with a warning).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Fixed parameter .* out of range")
                for key in baseline_point(self.spec, self.base, name):
                    suggest(trial, key, distributions[key])
            return {PRESET_KEY: name}
        chosen: dict[str, Any] = {}
        for param in self.spec.params:
            # A parameter whose condition failed is absent, so it fails its dependants too.
            if any(key not in chosen or chosen[key] != value for key, value in param.when.items()):
                continue
            chosen[param.key] = suggest(trial, param.key, distributions[param.key])
        return None

    def __repr__(self) -> str:
        return f"DefineByRun({self.spec.keys}, baselines={list(self.spec.baselines)})"


# --------------------------------------------------------------------------- the searcher


def make_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler `spec.sampler` names, seeded with the search's seed."""
    kind, seed = spec.sampler.type, spec.seed
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=spec.startup_trials,
                                         warn_independent_sampling=False)
    with warnings.catch_warnings():  # multivariate and group are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.startup_trials,
            multivariate=spec.sampler.multivariate, group=spec.sampler.group,
            # Trials running in parallel are told to the model as pessimistic guesses.
            constant_liar=spec.max_concurrent > 1,
        )


def study_storage_url(spec: SearchSpec, search_dir: Path) -> str:
    """Where the search's Optuna study lives: `search.storage`, else a SQLite file in the
    search folder."""
    return spec.storage or f"sqlite:///{Path(search_dir).resolve() / STUDY_FILE}"


def load_search_study(spec: SearchSpec, search_dir: Path) -> optuna.Study:
    """The study a sampled search keeps in its database (named after the search folder), with
    every trial the sampler saw: baselines, values and intermediate values."""
    return optuna.load_study(study_name=Path(search_dir).name,
                             storage=study_storage_url(spec, search_dir))


class RunStepOptunaSearch(OptunaSearch):
    """OptunaSearch that records every evaluation round Tune relays as an intermediate value, at
    the run's own optimizer step.

    Tune's `training_iteration` restarts at 1 when a trial resumes from a checkpoint, which would
    file a resumed trial's rounds under the wrong steps; and Tune does not pass the result that
    stops a trial to `on_trial_result`, so a trial stopped at its first rung would have none.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reported: dict[str, set[int]] = {}  # pickled with the searcher: survives resume

    def _report(self, trial_id: str, result: dict) -> None:
        step = int(result[STEP])
        done = self._reported.setdefault(trial_id, set())
        if step not in done:
            self._ot_trials[trial_id].report(result[self.metric], step)
            done.add(step)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or STEP not in result:
            return super().on_trial_result(trial_id, result)
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if (result and STEP in result and self.metric in result
                and trial_id in self._ot_trials and trial_id not in self._completed_trials):
            self._report(trial_id, result)
        super().on_trial_complete(trial_id, result=result, error=error)


def make_searcher(spec: SearchSpec, base: dict[str, Any], search_dir: Path,
                  study_name: str) -> ConcurrencyLimiter:
    """The Tune searcher of a sampled space: `spec.sampler` over the search's study."""
    searcher = RunStepOptunaSearch(
        space=DefineByRun(spec, base),
        metric=BEST_ROUGE_L,
        mode="max",
        sampler=make_sampler(spec),
        storage=optuna.storages.RDBStorage(study_storage_url(spec, search_dir)),
        study_name=study_name,
        points_to_evaluate=[baseline_point(spec, base, name) for name in spec.baselines],
    )
    return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)


class FixedPoints(Searcher):
    """Proposes a fixed list of points (a grid, or baselines only) in order, each once.

    Tune's `BasicVariantGenerator` looks each key of its `points_to_evaluate` up in a
    `param_space`, which a search of dotted keys does not have; this searcher hands the points
    over as they are. Its position is saved with the search (JSON), so a resumed grid goes on
    where it stopped.
    """

    def __init__(self, points: list[dict[str, Any]]):
        super().__init__(metric=BEST_ROUGE_L, mode="max")
        self.points = [dict(point) for point in points]
        self.proposed = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        if self.proposed >= len(self.points):
            return Searcher.FINISHED
        self.proposed += 1
        return dict(self.points[self.proposed - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass  # nothing to learn: the points are fixed

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"points": self.points,
                                                     "proposed": self.proposed}))

    def restore(self, checkpoint_path: str) -> None:
        saved = json.loads(Path(checkpoint_path).read_text())
        self.points, self.proposed = saved["points"], saved["proposed"]
