"""The search space as Optuna sees it: one mapping from parameters to distributions, and the
define-by-run function that samples a trial's point (baselines first)."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from amid_ray.search_space import PRESET_KEY, Param, SearchSpec


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


class DefineByRun:
    """Optuna define-by-run space: baselines first, then the (conditional) parameters.

    A callable object rather than a closure so Ray can pickle it with the searcher's state.
    """

    def __init__(self, spec: SearchSpec):
        self.spec = spec

    def __call__(self, trial: optuna.Trial) -> dict[str, Any] | None:
        if trial.number < len(self.spec.baselines):
            # Baselines set no sampled parameter: TPE learns nothing false from them.
            return {PRESET_KEY: self.spec.baselines[trial.number]}
        chosen: dict[str, Any] = {}
        for param in self.spec.params:
            # A parameter whose condition failed is absent, so it fails its dependants too.
            if any(key not in chosen or chosen[key] != value for key, value in param.when.items()):
                continue
            chosen[param.key] = suggest(trial, param.key, optuna_distribution(param))
        return None

    def __repr__(self) -> str:
        return f"DefineByRun({self.spec.keys}, baselines={list(self.spec.baselines)})"
