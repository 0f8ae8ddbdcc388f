"""The search: Ray Tune trials (each a Ray Train run) proposed by Optuna, stopped early by ASHA.

Search folder `<storage>/<name>` holds everything needed to resume:

    search.yaml        the run configuration + search section the search started with
    <Tune state>       experiment and searcher snapshots (Tune's own files)
    trials/<trial_id>  each trial's Ray Train run: checkpoints (best by ROUGE-L) and metrics
    best/              the best checkpoint over all trials, as a Hugging Face model folder
    mlflow.db          the default MLflow tracking store
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from amid_ray.cluster import TRIAL_DRIVER_RESOURCE
from amid_ray.config import ConfigError, RunConfig, config_from_dict
from amid_ray.search_space import (
    PRESET_KEY,
    DefineByRun,
    SearchSpec,
    grid_points,
    parse_search,
    trial_run_config,
)
from amid_ray.training import build_trainer, read_outcome, storage_root

SEARCH_FILE = "search.yaml"
TRACKING_URI_FILE = "tracking_uri"
TRIALS_DIR = "trials"
BEST_DIR = "best"
#: What Ray Train writes into a run folder once it has reported.
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"
METRIC, MODE = "best_rougeL", "max"


# --------------------------------------------------------------------------- one trial


def run_trial(config: dict[str, Any], *, base: dict[str, Any], search_dir: str) -> None:
    """Tune function trainable: one Ray Train run with the trial's point applied.

    The Train run is named after the trial id, so a retried or resumed trial continues from its
    own checkpoints. Train's rank-0 reports reach Tune through TuneReportCallback.
    """
    trial_id = tune.get_context().get_trial_id()
    run = trial_run_config(base, config, source=f"trial {trial_id}")
    run.resources.storage = str(Path(search_dir) / TRIALS_DIR)
    build_trainer(run, name=trial_id, callbacks=[TuneReportCallback()]).fit()


def trial_dirname(trial) -> str:
    return trial.trial_id


# --------------------------------------------------------------------------- building


def evaluation_rounds(run: RunConfig) -> int:
    return math.ceil(run.train.max_steps / run.eval.every)


def _fixed_points(spec: SearchSpec) -> list[dict[str, Any]] | None:
    """The points of a space that needs no sampler (a grid, or baselines only), else None."""
    if spec.is_grid:
        return grid_points(spec)
    if not spec.params:
        return [{PRESET_KEY: name} for name in spec.baselines]
    return None


def _search_algorithm(spec: SearchSpec):
    points = _fixed_points(spec)
    if points is not None:
        return BasicVariantGenerator(points_to_evaluate=points)
    searcher = OptunaSearch(
        space=DefineByRun(spec),
        metric=METRIC,
        mode=MODE,
        sampler=optuna.samplers.TPESampler(seed=spec.seed),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)


def total_trials(spec: SearchSpec) -> int:
    points = _fixed_points(spec)
    return spec.num_samples if points is None else len(points)


def _trial_resources() -> dict[str, float]:
    # The trial driver only waits on its Train run; on clusters that advertise the custom
    # resource it takes no CPU away from the workers.
    if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) >= 1:
        return {TRIAL_DRIVER_RESOURCE: 1}
    return {"CPU": 1}


def _trainable(run: RunConfig, search_dir: Path):
    trainable = tune.with_parameters(run_trial, base=run.to_dict(), search_dir=str(search_dir))
    return tune.with_resources(trainable, _trial_resources())


def build_tuner(run: RunConfig, spec: SearchSpec, search_dir: Path,
                callbacks: list[tune.Callback]) -> tune.Tuner:
    scheduler = None
    if spec.scheduler is not None and _fixed_points(spec) is None:
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=evaluation_rounds(run),
            grace_period=spec.scheduler.grace_rounds,
            reduction_factor=spec.scheduler.reduction_factor,
            metric=spec.scheduler.metric,
            mode=spec.scheduler.mode,
        )
    return tune.Tuner(
        _trainable(run, search_dir),
        tune_config=tune.TuneConfig(
            search_alg=_search_algorithm(spec),
            scheduler=scheduler,
            num_samples=total_trials(spec),
            max_concurrent_trials=spec.max_concurrent,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=search_dir.name,
            storage_path=str(search_dir.parent),
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=run.resources.max_failures),
            verbose=1,
        ),
    )


# --------------------------------------------------------------------------- folders


def search_dir_for(run: RunConfig) -> Path:
    root = storage_root(run)
    if "://" in root:
        raise ConfigError(run.source, "resources.storage", root,
                          "searches need a local or mounted shared folder for now")
    return Path(root) / run.name


def save_search_file(run: RunConfig, search_dir: Path) -> None:
    search_dir.mkdir(parents=True, exist_ok=True)
    staging = search_dir / f".{SEARCH_FILE}.tmp"
    staging.write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    staging.replace(search_dir / SEARCH_FILE)


def load_search_file(search_dir: Path) -> RunConfig:
    path = search_dir / SEARCH_FILE
    if not path.is_file():
        raise ConfigError(str(search_dir), "(search folder)", str(search_dir),
                          f"not a search folder: {SEARCH_FILE} is missing")
    return config_from_dict(yaml.safe_load(path.read_text()), str(path))


# --------------------------------------------------------------------------- results


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]
    status: str  # finished, stopped early, error, or not started
    best_rougeL: float | None
    best_val_loss: float | None
    best_step: int | None
    steps: int | None
    best_checkpoint: str | None
    #: Every evaluation round's metrics, from the Train run folder.
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def table_row(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "history"}


def collect_trials(search_dir: Path, max_steps: int) -> list[TrialRecord]:
    """Every trial's outcome, read from its Train run folder (not from Tune's metrics, which
    can be stale after a resume) and Tune's trial states."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(search_dir))
    records = []
    for trial in sorted(analysis.trials, key=_creation_index):
        train_dir = search_dir / TRIALS_DIR / trial.trial_id
        outcome = None
        if (train_dir / TRAIN_SNAPSHOT).is_file():  # absent when a trial failed before a report
            outcome = read_outcome(ray.train.Result.from_path(str(train_dir)))
        steps = outcome.history[-1].get("step") if outcome and outcome.history else None
        if trial.status == "ERROR":
            status = "error"
        elif steps is None:
            status = "not started"
        elif steps >= max_steps:
            status = "finished"
        else:
            status = "stopped early" if trial.status == "TERMINATED" else trial.status.lower()
        best = outcome.best_metrics if outcome else {}
        records.append(TrialRecord(
            trial_id=trial.trial_id,
            params=dict(trial.config),
            status=status,
            best_rougeL=best.get("rougeL"),
            best_val_loss=best.get("val_loss"),
            best_step=best.get("step"),
            steps=steps,
            best_checkpoint=outcome.best_checkpoint if outcome else None,
            history=outcome.history if outcome else [],
        ))
    return records


def _creation_index(trial) -> int:
    # Tune's experiment tag starts with the trial's 1-based creation index ("3_amid.alpha=…").
    head = str(trial.experiment_tag).split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def best_trial(records: list[TrialRecord]) -> TrialRecord | None:
    scored = [r for r in records if r.best_rougeL is not None and r.best_checkpoint]
    return max(scored, key=lambda r: r.best_rougeL) if scored else None


def export_best(record: TrialRecord, search_dir: Path) -> Path:
    """Copy the best checkpoint to `<search_dir>/best` (complete or not at all)."""
    target = search_dir / BEST_DIR
    staging = search_dir / f".{BEST_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(record.best_checkpoint, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def effective_settings(base: RunConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The AMiD and learning-rate settings a trial really ran with (presets expanded)."""
    run = trial_run_config(base.to_dict(), params, source="trial")
    amid = run.amid.loss_kwargs()
    return {"preset": run.amid.preset, "alpha": amid["alpha"], "lam": amid["lam"],
            "divergence": amid["divergence"], "order": amid["order"], "lr": run.train.lr}


def format_trials_table(base: RunConfig, records: list[TrialRecord]) -> str:
    header = (f"{'trial':<12} {'method':<6} {'alpha':>7} {'lam':>5} {'div':<3} {'ord':<3} "
              f"{'lr':>8} {'rougeL':>7} {'val_loss':>9} {'steps':>5}  status")
    lines = [header, "-" * len(header)]
    for r in records:
        s = effective_settings(base, r.params)
        rouge = f"{r.best_rougeL:.2f}" if r.best_rougeL is not None else "-"
        loss = f"{r.best_val_loss:.4f}" if r.best_val_loss is not None else "-"
        lines.append(
            f"{r.trial_id:<12} {s['preset'] or 'amid':<6} {s['alpha']:>7.3g} {s['lam']:>5.3g} "
            f"{s['divergence']:<3} {s['order']:<3} {s['lr']:>8.2e} {rouge:>7} {loss:>9} "
            f"{r.steps if r.steps is not None else '-':>5}  {r.status}"
        )
    return "\n".join(lines)


def study_from_trials(spec: SearchSpec, records: list[TrialRecord]) -> optuna.Study | None:
    """An Optuna study of the sampled trials (baselines have no sampled parameters), for the
    history, importance and parallel-coordinates plots."""
    distributions = {p.key: _distribution(p) for p in spec.params}
    study = optuna.create_study(direction="maximize")
    for record in records:
        params = {k: v for k, v in record.params.items() if k in distributions}
        if not params or record.best_rougeL is None:
            continue
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params},
            value=record.best_rougeL,
        ))
    return study if study.trials else None


def _distribution(param) -> optuna.distributions.BaseDistribution:
    if param.type in ("categorical", "grid"):
        return optuna.distributions.CategoricalDistribution(list(param.values))
    if param.type == "int":
        return optuna.distributions.IntDistribution(param.low, param.high)
    return optuna.distributions.FloatDistribution(param.low, param.high,
                                                  log=param.type == "loguniform")


@dataclass
class SearchOutcome:
    search_dir: Path
    records: list[TrialRecord]
    best: TrialRecord | None
    best_dir: Path | None
    best_settings: dict[str, Any] | None
    tracking_uri: str
    table: str

    def summary(self) -> dict[str, Any]:
        return {
            "best_checkpoint": str(self.best_dir) if self.best_dir else None,
            "best_config": self.best_settings,
            "best_trial": self.best.trial_id if self.best else None,
            "rougeL": self.best.best_rougeL if self.best else None,
            "num_trials": len(self.records),
            "tracking_uri": self.tracking_uri,
            "search_dir": str(self.search_dir),
        }


def run_search(run: RunConfig | None = None, *, resume_dir: Path | None = None,
               tracking_uri: str | None = None) -> SearchOutcome:
    """Start the search `run` describes, or resume the one in `resume_dir`, and see it through:
    trials, best checkpoint exported to `<search_dir>/best`, everything logged to MLflow."""
    from amid_ray.tracking import MLflowSearchTracker, default_tracking_uri

    if resume_dir is not None:
        search_dir = Path(resume_dir).expanduser().resolve()
        run = load_search_file(search_dir)
    else:
        assert run is not None
        search_dir = search_dir_for(run)
        if tune.Tuner.can_restore(str(search_dir)):
            raise ConfigError(run.source, "name", run.name,
                              f"a search already exists in {search_dir}; resume it with "
                              f"`amid-ray resume {search_dir}` or choose another --name")
    spec = parse_search(run)
    uri_file = search_dir / TRACKING_URI_FILE
    if resume_dir is None:
        save_search_file(run, search_dir)
        uri_file.write_text(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                            or default_tracking_uri(search_dir))
    # A resumed search logs where it started logging, unless told otherwise.
    tracking_uri = tracking_uri or uri_file.read_text().strip()
    tracker = MLflowSearchTracker(
        tracking_uri, run.name, search_dir, search_space=run.search or {},
        max_steps=run.train.max_steps, param_keys=spec.keys + [PRESET_KEY, "train.lr"],
    )
    if resume_dir is not None and tune.Tuner.can_restore(str(search_dir)):
        tuner = tune.Tuner.restore(str(search_dir), _trainable(run, search_dir),
                                   resume_errored=True)
    else:
        tuner = build_tuner(run, spec, search_dir, [tracker])
    tuner.fit()

    records = collect_trials(search_dir, run.train.max_steps)
    for record in records:
        tracker.sync_trial(record.trial_id, record.history, record.status)
    best = best_trial(records)
    best_dir = export_best(best, search_dir) if best else None
    best_settings = effective_settings(run, best.params) if best else None
    table = format_trials_table(run, records)
    tracker.finish_search(
        best={"trial_id": best.trial_id, "config": best.params, "settings": best_settings,
              "rougeL": best.best_rougeL, "checkpoint": best.best_checkpoint} if best else {},
        trials_table=[r.table_row() for r in records],
        optuna_study=study_from_trials(spec, records),
        best_model_dir=best_dir,
        registered_model_name=f"amid-{run.name}",
    )
    return SearchOutcome(search_dir, records, best, best_dir, best_settings, tracking_uri, table)
