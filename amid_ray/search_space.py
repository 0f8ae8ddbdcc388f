"""The `search` section of a search-space file: distributions, conditions, baselines.

    search:
      num_samples: 8                 # trials in all, baselines included
      params:
        amid.alpha: {type: uniform, low: -5, high: 1}
        amid.lam: {type: categorical, values: [0.1, 0.5]}
        amid.ab_alpha: {type: uniform, low: 0.1, high: 0.9, when: {amid.divergence: ab}}
        train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}
      baselines: [kd, srkl]          # loss presets, evaluated first

Parameter types: categorical, uniform, loguniform, int, grid. A `grid` space (every parameter a
grid) is swept exhaustively without Optuna; otherwise Optuna's TPE samples it. Settings whose
loss is identically zero (AMID_SPEC §2) can never be sampled: such spaces are rejected.

This module parses and checks the section; it knows nothing of the run configuration's types:
`config.config_from_dict` calls `parse_search` and hands it a function that validates one point
of the space as a whole run, so the spec is parsed once and carried by the `RunConfig`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from amid_ray.errors import ConfigError
from amid_ray.losses import PRESETS, is_degenerate
from amid_ray.metrics import BEST_ROUGE_L, ROUGE_L, VAL_LOSS

PARAM_TYPES = ("categorical", "uniform", "loguniform", "int", "grid")
#: Config key that carries a baseline preset into a trial.
PRESET_KEY = "amid.preset"


@dataclass(frozen=True)
class Param:
    """One searched setting (a dotted config key) and its distribution."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()
    when: dict[str, Any] = field(default_factory=dict)

    def possible_values(self) -> tuple[Any, ...] | None:
        """The finite set of values, or None for a continuous range."""
        return self.values if self.type in ("categorical", "grid") else None


#: Metrics ASHA may compare trials by, and whether higher is better.
SCHEDULER_METRICS = {BEST_ROUGE_L: "max", ROUGE_L: "max", VAL_LOSS: "min"}


@dataclass(frozen=True)
class SchedulerSpec:
    """Early stopping on evaluation rounds (None in SearchSpec: run every trial to the end).

    `asha` compares trials by `metric` at rungs (`reduction_factor`); `median` stops a trial
    whose best value so far is worse than the median of the other trials' running means at the
    same step, once `min_samples` others got there. ROUGE-L by default, as the search ranks.
    """

    grace_rounds: int = 1
    reduction_factor: int = 2
    metric: str = BEST_ROUGE_L
    type: str = "asha"
    min_samples: int = 3

    @property
    def mode(self) -> str:
        return SCHEDULER_METRICS[self.metric]


SAMPLER_TYPES = ("tpe", "gp", "random")


@dataclass(frozen=True)
class SamplerSpec:
    """Which Optuna sampler proposes the points (grids need none).

    `n_startup_trials`: complete trials (baselines included) before the sampler's model is used;
    None picks `default_startup_trials(num_samples)`. `multivariate`/`group`: TPE's joint model
    of the parameters (`group` splits conditional `when:` spaces into their own groups).
    """

    type: str = "tpe"
    n_startup_trials: int | None = None
    multivariate: bool = True
    group: bool = True


def default_startup_trials(num_samples: int) -> int:
    """Random points before the model takes over: a third of the trials, between 2 and 10.

    Optuna's own default (10) leaves searches of up to 10 trials entirely random.
    """
    return max(2, min(10, num_samples // 3))


@dataclass(frozen=True)
class SearchSpec:
    params: tuple[Param, ...]
    baselines: tuple[str, ...] = ()
    num_samples: int = 8
    max_concurrent: int = 1
    seed: int = 0
    scheduler: SchedulerSpec | None = SchedulerSpec()
    sampler: SamplerSpec = SamplerSpec()
    #: Optuna study storage (an SQLAlchemy URL); None: `sqlite:///<search folder>/optuna.db`.
    storage: str | None = None
    #: Seconds between samples of the rank-0 worker's system metrics; None: not logged.
    system_metrics_s: float | None = None

    @property
    def startup_trials(self) -> int:
        chosen = self.sampler.n_startup_trials
        return default_startup_trials(self.num_samples) if chosen is None else chosen

    @property
    def is_grid(self) -> bool:
        return bool(self.params) and all(p.type == "grid" for p in self.params)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]


# --------------------------------------------------------------------------- parsing


#: Validates one point of the space (dotted key → value) as a whole run; raises ConfigError.
PointCheck = Callable[[dict[str, Any]], Any]


def parse_search_section(raw: Mapping[str, Any] | None, source: str, *, base: Mapping[str, Any],
                 check_point: PointCheck) -> SearchSpec | None:
    """Validate a `search` section (None: the file has none) against the run it modifies.

    `base` is the run configuration as plain data (`RunConfig.to_dict()`); `check_point` turns a
    point into a run configuration, raising ConfigError when the point does not make a valid run.
    """
    if raw is None:
        return None

    def fail(key: str, value: Any, allowed: str):
        raise ConfigError(source, f"search.{key}", value, allowed)

    known = {"num_samples", "max_concurrent", "seed", "scheduler", "params", "baselines",
             "sampler", "storage", "system_metrics"}
    for key in raw:
        if key not in known:
            fail(key, raw[key], f"unknown setting; known: {sorted(known)}")
    raw_params = raw.get("params") or {}
    if not isinstance(raw_params, Mapping):
        fail("params", raw_params, "must map dotted keys to distributions, e.g. "
             "{amid.alpha: {type: uniform, low: -5, high: 1}}")
    params = _dependencies_first(
        [_parse_param(key, spec, fail) for key, spec in raw_params.items()], fail
    )
    raw_baselines = raw.get("baselines") or []
    if not isinstance(raw_baselines, list):
        fail("baselines", raw_baselines, "must be a list of preset names, e.g. [kd, srkl]")
    baselines = tuple(raw_baselines)
    for name in baselines:
        if name not in PRESETS:
            fail("baselines", name, f"unknown baseline; known: {sorted(PRESETS)}")
    spec = SearchSpec(
        params=params,
        baselines=baselines,
        num_samples=_positive_int(raw, "num_samples", 8, fail),
        max_concurrent=_positive_int(raw, "max_concurrent", 1, fail),
        seed=_positive_int(raw, "seed", 0, fail, minimum=0),
        scheduler=_parse_scheduler(raw.get("scheduler", "asha"), fail),
        sampler=_parse_sampler(raw.get("sampler", "tpe"), fail),
        storage=_parse_storage(raw.get("storage"), fail),
        system_metrics_s=_parse_system_metrics(raw.get("system_metrics", False), fail),
    )
    if spec.params and not spec.is_grid and spec.num_samples < len(spec.baselines):
        fail("num_samples", spec.num_samples, f"must be at least the {len(spec.baselines)} "
             f"baselines {list(spec.baselines)} (num_samples counts them)")
    _check_against_run(spec, base, check_point, fail)
    return spec


def _dependencies_first(params: list[Param], fail) -> tuple[Param, ...]:
    """Order parameters so each comes after those its `when` condition reads."""
    by_key = {p.key: p for p in params}
    for param in params:
        for key, value in param.when.items():
            if key not in by_key:
                fail(f"params.{param.key}.when", key, "must name another searched parameter")
            choices = by_key[key].possible_values()
            if choices is None:
                fail(f"params.{param.key}.when", {key: value},
                     f"{key} is a continuous range: a condition on one value would never hold")
            if value not in choices:
                fail(f"params.{param.key}.when", {key: value},
                     f"can never hold: {key} takes the values {list(choices)}")
    ordered: list[Param] = []
    placed: set[str] = set()
    while len(ordered) < len(params):
        ready = [p for p in params if p.key not in placed and set(p.when) <= placed]
        if not ready:
            cycle = sorted(p.key for p in params if p.key not in placed)
            fail("params", cycle, "their 'when' conditions depend on each other in a cycle")
        ordered.extend(ready)
        placed.update(p.key for p in ready)
    return tuple(ordered)


def _positive_int(raw, key, default, fail, minimum=1) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(key, value, f"must be an integer >= {minimum}")
    return value


def _parse_sampler(raw: Any, fail) -> SamplerSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict) or raw.get("type", "tpe") not in SAMPLER_TYPES:
        fail("sampler", raw, f"must be one of {list(SAMPLER_TYPES)} or {{type: tpe, "
             "n_startup_trials, multivariate, group}")
    kind = raw.get("type", "tpe")
    allowed = {"type", "n_startup_trials"} | ({"multivariate", "group"} if kind == "tpe" else set())
    extra = set(raw) - allowed
    if extra:
        fail("sampler", raw, f"unknown fields {sorted(extra)} for a {kind} sampler; known: "
             f"{sorted(allowed)}")
    startup = raw.get("n_startup_trials")
    if startup is not None and (isinstance(startup, bool) or not isinstance(startup, int)
                                or startup < 0):
        fail("sampler.n_startup_trials", startup, "must be an integer >= 0")
    flags = {}
    for key in ("multivariate", "group"):
        if key in raw:
            if not isinstance(raw[key], bool):
                fail(f"sampler.{key}", raw[key], "must be true or false")
            flags[key] = raw[key]
    if flags.get("group", True) and flags.get("multivariate") is False:
        fail("sampler.group", True, "grouping needs multivariate: true (set group: false)")
    return SamplerSpec(type=kind, n_startup_trials=startup, **flags)


def _parse_storage(raw: Any, fail) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or "://" not in raw:
        fail("storage", raw, "must be an SQLAlchemy database URL such as "
             "sqlite:////shared/optuna.db or postgresql://user@host/db (null: the search folder)")
    if urlsplit(raw).password is not None:
        fail("storage", raw.replace(urlsplit(raw).password, "***"),
             "carries a password, which search.yaml in the search folder would store; give it "
             "through the database driver (PGPASSWORD or ~/.pgpass for PostgreSQL)")
    return raw


#: Sampling interval of `system_metrics: true`, MLflow's own default.
DEFAULT_SYSTEM_METRICS_S = 10.0


def _parse_system_metrics(raw: Any, fail) -> float | None:
    if raw is None or raw is False:
        return None
    if raw is True:
        return DEFAULT_SYSTEM_METRICS_S
    if isinstance(raw, int | float) and math.isfinite(raw) and raw > 0:
        return float(raw)
    fail("system_metrics", raw, "must be true (every 10 s), false, or the seconds between "
         "samples of the rank-0 worker's CPU, memory, disk, network and GPU use (> 0)")


#: Early-stopping rules and the fields each takes besides `type`.
SCHEDULER_FIELDS = {"asha": {"grace_rounds", "reduction_factor", "metric"},
                    "median": {"grace_rounds", "min_samples", "metric"}}


def _parse_scheduler(raw: Any, fail) -> SchedulerSpec | None:
    if raw is None or raw is False or raw == "none":
        return None
    if isinstance(raw, str) and raw in SCHEDULER_FIELDS:
        return SchedulerSpec(type=raw)
    if not isinstance(raw, dict) or raw.get("type", "asha") not in SCHEDULER_FIELDS:
        fail("scheduler", raw, "must be null, 'asha', 'median', {type: asha, grace_rounds, "
             "reduction_factor, metric} or {type: median, grace_rounds, min_samples, metric}")
    kind = raw.get("type", "asha")
    extra = set(raw) - SCHEDULER_FIELDS[kind] - {"type"}
    if extra:
        fail("scheduler", raw, f"unknown fields {sorted(extra)} for {kind}; known: "
             f"{sorted(SCHEDULER_FIELDS[kind])}")
    grace = raw.get("grace_rounds", 1)
    factor = raw.get("reduction_factor", 2)
    samples = raw.get("min_samples", 3)
    metric = raw.get("metric", BEST_ROUGE_L)
    if metric not in SCHEDULER_METRICS:
        fail("scheduler.metric", metric, f"must be one of {sorted(SCHEDULER_METRICS)}")
    if not isinstance(grace, int) or isinstance(grace, bool) or grace < 1:
        fail("scheduler.grace_rounds", grace, "must be an integer >= 1")
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
        fail("scheduler.reduction_factor", factor, "must be an integer >= 2")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        fail("scheduler.min_samples", samples, "must be an integer >= 1")
    return SchedulerSpec(grace_rounds=grace, reduction_factor=factor, metric=metric, type=kind,
                         min_samples=samples)


def _parse_param(key: str, spec: Any, fail) -> Param:
    where = f"params.{key}"
    if not isinstance(spec, dict):
        fail(where, spec, "must be a mapping like {type: uniform, low: 0.0, high: 1.0}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        fail(f"{where}.type", kind, f"must be one of {list(PARAM_TYPES)}")
    extra = set(spec) - {"type", "low", "high", "values", "when"}
    if extra:
        fail(where, spec, f"unknown fields {sorted(extra)}")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        fail(f"{where}.when", when, "must map a config key to the value it must have")
    if kind in ("categorical", "grid"):
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            fail(f"{where}.values", values, "must be a non-empty list")
        return Param(key, kind, values=tuple(values), when=when)
    low, high = spec.get("low"), spec.get("high")
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail(f"{where}.{name}", value, "must be a number")
        if not math.isfinite(value):
            fail(f"{where}.{name}", value, "must be a finite number")
    if not low < high:
        fail(where, spec, f"low ({low}) must be below high ({high})")
    if kind == "loguniform" and low <= 0:
        fail(f"{where}.low", low, "must be > 0 for a log-uniform range")
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        fail(where, spec, "an int range needs integer low and high")
    return Param(key, kind, low=low, high=high, when=when)


def _check_against_run(spec: SearchSpec, base: Mapping[str, Any], check_point: PointCheck,
                       fail) -> None:
    """Every value the space can produce must make a valid run; no degenerate loss."""
    params = {p.key: p for p in spec.params}
    if any(p.type == "grid" for p in spec.params) and not spec.is_grid:
        fail("params", sorted(params), "a grid cannot be mixed with sampled parameters")
    if spec.is_grid and any(p.when for p in spec.params):
        fail("params", sorted(params), "conditional ('when') parameters need a sampled space")
    _check_degenerate(spec, base, fail)
    # Each value at the edge of the space, with the other parameters at a value inside it.
    inside = {p.key: _representative(p) for p in spec.params}
    try:
        check_point(inside)
    except ConfigError as error:
        _blame_one_parameter(spec, check_point, fail)
        fail("params", inside, f"these values, one inside each parameter's range, do not make "
             f"a valid run together: {error}")
    for param in spec.params:
        for probe in probe_values(param):
            try:
                check_point(inside | {param.key: probe})
            except ConfigError as error:
                fail(f"params.{param.key}", probe, f"does not make a valid run: {error}")


def _blame_one_parameter(spec: SearchSpec, check_point: PointCheck, fail) -> None:
    """When the space's inner point is invalid, refuse the first parameter with a value that is
    invalid on its own (the others at their base values), naming that value: the probes around
    the inner point would blame whichever parameter they vary first."""
    for param in spec.params:
        for probe in (*probe_values(param), _representative(param)):
            try:
                check_point({param.key: probe})
            except ConfigError as error:
                fail(f"params.{param.key}", probe, f"does not make a valid run: {error}")


def _check_degenerate(spec: SearchSpec, base: dict, fail) -> None:
    params = {p.key: p for p in spec.params}
    lam = params.get("amid.lam")
    order = params.get("amid.order")
    orders = order.possible_values() if order else (base["amid"]["order"],)
    if lam is None:
        lams: tuple = (base["amid"]["lam"],)
    elif lam.possible_values() is not None:
        lams = lam.possible_values()
    else:  # a continuous range reaches 0 or 1 only at a closed end
        if lam.low < 0 or lam.high > 1:
            fail("params.amid.lam", [lam.low, lam.high], "must lie within [0, 1]")
        lams = tuple(v for v in (lam.low, lam.high) if v in (0, 1))
    for order_value, lam_value in itertools.product(orders, lams):
        if is_degenerate(order_value, lam_value):
            fail("params", {"amid.order": order_value, "amid.lam": lam_value},
                 "this combination has an identically zero loss (nothing to learn); restrict "
                 "amid.lam to (0, 1) or drop the order")


def _representative(param: Param) -> Any:
    if param.possible_values() is not None:
        return param.values[0]
    if param.type == "loguniform":
        return math.sqrt(param.low * param.high)
    if param.type == "int":
        return (param.low + param.high) // 2
    return (param.low + param.high) / 2


def probe_values(param: Param) -> tuple[Any, ...]:
    """The values that stand for a parameter's whole range: every listed value, or both ends."""
    if param.possible_values() is not None:
        return param.values
    return (param.low, param.high)


# --------------------------------------------------------------------------- sampling


def grid_points(spec: SearchSpec) -> list[dict[str, Any]]:
    """Every point of a grid space (the baselines come first, as their own points)."""
    points = [{PRESET_KEY: name} for name in spec.baselines]
    keys = spec.keys
    for values in itertools.product(*(p.values for p in spec.params)):
        points.append(dict(zip(keys, values, strict=True)))
    return points

