"""The search: Ray Tune trials (each a Ray Train run) proposed by Optuna, stopped early by ASHA.
This module builds, runs and resumes the Tuner; `amid_ray.results` reads what it produced.

Search folder `<storage>/<name>` holds everything needed to resume:

    search.yaml        the run configuration + search section the search started with
    tracking_uri       where the search logs to MLflow
    <Tune state>       experiment and searcher snapshots (Tune's own files)
    trials/<trial_id>  each trial's Ray Train run: checkpoints (best by ROUGE-L) and metrics
    best/              the best checkpoint over all trials, as a Hugging Face model folder
    optuna.db          the Optuna study of a sampled space (unless search.storage puts it elsewhere)
    mlflow.db          the default MLflow tracking store

With storage at a URI (`s3://…`) the same layout lives in the object store: the trials write
there themselves, and the driver works in a local staging folder (which also holds
`storage_uri`) mirrored to it (`amid_ray.remote_storage`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import ConcurrencyLimiter

from amid_ray.atomic import recover_folder, write_text_atomic
from amid_ray.cache_plan import cache_root
from amid_ray.cache_stage import build_run_caches
from amid_ray.cluster import TRIAL_DRIVER_RESOURCE
from amid_ray.config import (
    SEARCH_FILE,
    ConfigError,
    RunConfig,
    config_from_dict,
    point_config,
    read_yaml,
)
from amid_ray.early_stopping import make_scheduler
from amid_ray.mlflow_runs import (
    SearchRuns,
    default_tracking_uri,
    read_experiment_id,
    read_parent_run_id,
)
from amid_ray.publish import finish_search, sync_trial
from amid_ray.remote_storage import (
    NOT_MIRRORED,
    STORAGE_URI_FILE,
    Mirror,
    download_folder,
    exists,
    is_uri,
    join,
    staging_folder,
)
from amid_ray.results import (
    BEST_DIR,
    TRIALS_DIR,
    SearchOutcome,
    export_best,
    read_results,
    search_uri,
    study_from_trials,
    trials_root,
)
from amid_ray.sampling import FixedPoints, load_search_study, make_searcher
from amid_ray.search_space import PRESET_KEY, SearchSpec, grid_points
from amid_ray.system_metrics import SystemMetricsTarget, find_trial_run
from amid_ray.tracking import MLflowSearchTracker
from amid_ray.training import build_trainer

TRACKING_URI_FILE = "tracking_uri"


# --------------------------------------------------------------------------- one trial


def run_trial(config: dict[str, Any], *, base: dict[str, Any], search_dir: str,
              trials_root: str | None = None, system_metrics_s: float | None = None) -> None:
    """Tune function trainable: one Ray Train run with the trial's point applied.

    The Train run is named after the trial id, so a retried or resumed trial continues from its
    own checkpoints. Train's rank-0 reports reach Tune through TuneReportCallback.
    """
    trial_id = tune.get_context().get_trial_id()
    run = point_config(base, config, source=f"trial {trial_id}")
    run.resources.storage = trials_root or str(Path(search_dir) / TRIALS_DIR)
    metrics = None if system_metrics_s is None else _system_metrics_target(
        Path(search_dir), trial_id, system_metrics_s)
    build_trainer(run, name=trial_id, callbacks=[TuneReportCallback()],
                  system_metrics=metrics).fit()
    _wait_until_tune_has_every_report()


def _system_metrics_target(search_dir: Path, trial_id: str,
                           interval_s: float) -> SystemMetricsTarget | None:
    """Where the trial's rank-0 worker logs system metrics (`search.system_metrics`): the trial's
    child run, found through the search folder's records."""
    tracking_uri = load_tracking_uri(search_dir)
    experiment_id, parent_id = read_experiment_id(search_dir), read_parent_run_id(search_dir)
    if tracking_uri is None or experiment_id is None or parent_id is None:
        return None
    run_id = find_trial_run(tracking_uri, experiment_id, parent_id, trial_id)
    return None if run_id is None else SystemMetricsTarget(tracking_uri, run_id, interval_s)


def _wait_until_tune_has_every_report(settle_s: float = 0.5) -> None:
    """Return from the trial function only once Tune has taken every report Train sent.

    Ray 2.60 hangs a trial otherwise: TuneReportCallback puts Train's reports in a queue the
    trial's Tune session drains only when the driver asks for the next result. If the function
    returns first, the session's end-of-function result fills its one-slot result queue, and the
    next report taken from the Train queue blocks forever putting into it. A driver slowed down
    (an MLflow server retried through an outage) with a trial's last rounds close together is
    enough (seen in the MLflow outage drill).
    """
    from ray.train._internal.session import get_session

    session = get_session()
    reports = getattr(session, "_inter_actor_queue", None)
    if reports is None:
        return

    def wait_until_drained() -> None:
        while not (reports.empty() and session.result_queue.empty()):
            time.sleep(0.1)

    # Drained twice, `settle_s` apart: a report the session has just taken is in its result
    # queue (and back out to Tune) within microseconds.
    wait_until_drained()
    time.sleep(settle_s)
    wait_until_drained()


def trial_dirname(trial) -> str:
    return trial.trial_id


# --------------------------------------------------------------------------- building


def search_spec(run: RunConfig) -> SearchSpec:
    """The run's parsed search section; a run without one cannot be searched."""
    if run.search_spec is None:
        raise ConfigError(run.source, "search", None, "a search needs a `search` section, "
                          "e.g. search_spaces/demo.yaml")
    return run.search_spec


def fixed_points(spec: SearchSpec) -> list[dict[str, Any]] | None:
    """The points of a space that needs no sampler (a grid, or baselines only), else None."""
    if spec.is_grid:
        return grid_points(spec)
    if not spec.params:
        return [{PRESET_KEY: name} for name in spec.baselines]
    return None


def total_trials(spec: SearchSpec) -> int:
    """Trials in the search: every fixed point, or `num_samples` sampled ones."""
    points = fixed_points(spec)
    return spec.num_samples if points is None else len(points)


def _search_algorithm(run: RunConfig, spec: SearchSpec, search_dir: Path):
    points = fixed_points(spec)
    if points is not None:
        return ConcurrencyLimiter(FixedPoints(points), max_concurrent=spec.max_concurrent)
    return make_searcher(spec, run.to_dict(), search_dir, study_name=search_dir.name)


def _trial_resources() -> dict[str, float]:
    # The trial driver only waits on its Train run; on clusters that advertise the custom
    # resource it takes no CPU away from the workers.
    if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) >= 1:
        return {TRIAL_DRIVER_RESOURCE: 1}
    return {"CPU": 1}


def _trainable(run: RunConfig, search_dir: Path):
    trainable = tune.with_parameters(run_trial, base=run.to_dict(), search_dir=str(search_dir),
                                     trials_root=trials_root(search_dir),
                                     system_metrics_s=search_spec(run).system_metrics_s)
    return tune.with_resources(trainable, _trial_resources())


def build_tuner(run: RunConfig, spec: SearchSpec, search_dir: Path,
                callbacks: list[tune.Callback]) -> tune.Tuner:
    # Grids run every point to the end, as the paper's sweeps did.
    scheduler = None if fixed_points(spec) is not None else make_scheduler(
        spec.scheduler, eval_every=run.eval.every, max_steps=run.train.max_steps,
        search_dir=search_dir)
    return tune.Tuner(
        _trainable(run, search_dir),
        tune_config=tune.TuneConfig(
            search_alg=_search_algorithm(run, spec, search_dir),
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
    """`<resources.storage>/<name>`, absolute; for storage at a URI, the local staging folder
    of `<storage>/<name>` (`remote_storage`)."""
    location = search_location(run)
    return staging_folder(location) if is_uri(location) else Path(location)


def search_location(run: RunConfig) -> str:
    """Where the search lives for its user: its folder, or its URI."""
    root = run.resources.storage_root
    return join(root, run.name) if is_uri(root) else str(Path(root) / run.name)


def open_search_folder(location: str | Path) -> Path:
    """The local folder of the search at `location`: the folder itself, or for a URI a fresh
    staging folder with the search's own files downloaded (its trials stay in the store)."""
    if not is_uri(str(location)):
        return Path(location).expanduser()
    uri = str(location).rstrip("/")
    try:
        found = exists(join(uri, SEARCH_FILE))
    except OSError as error:
        raise ConfigError(uri, "(search)", uri, f"cannot be read: {error}") from None
    if not found:
        raise ConfigError(uri, "(search)", uri, f"not a search: {SEARCH_FILE} is missing")
    staging = staging_folder(uri)
    shutil.rmtree(staging, ignore_errors=True)
    download_folder(uri, staging, skip=NOT_MIRRORED)
    return staging


def _mirrored(search_dir: Path) -> contextlib.AbstractContextManager:
    """Uploads of a URI search's own files while the block runs (nothing for a local one)."""
    uri = search_uri(search_dir)
    return contextlib.nullcontext() if uri is None else Mirror(search_dir, uri).running()


def save_search_file(run: RunConfig, search_dir: Path) -> None:
    write_text_atomic(search_dir / SEARCH_FILE, yaml.safe_dump(run.to_dict(), sort_keys=False))


def load_search_file(search_dir: Path) -> RunConfig:
    path = search_dir / SEARCH_FILE
    if not path.is_file():
        raise ConfigError(str(search_dir), "(search folder)", str(search_dir),
                          f"not a search folder: {SEARCH_FILE} is missing")
    return config_from_dict(read_yaml(path), str(path))


#: The files Ray Tune restores a search from (`Tuner.restore`), checked without unpickling.
TUNER_FILE = "tuner.pkl"
PICKLE_START = b"\x80"


def check_resumable(search_dir: Path) -> None:
    """Refuse, before Ray starts, a search folder Tune could not restore: no Tune state (the
    search never started its trials), or a Tune state that is not one (no readable experiment
    snapshot, a `tuner.pkl` that is not a pickle). The pickles are not loaded here."""
    if not tune.Tuner.can_restore(str(search_dir)):
        held = sorted(p.name for p in search_dir.iterdir())
        raise ConfigError(str(search_dir), "(search folder)", str(search_dir),
                          f"has no Ray Tune state (it holds {held}): no trials yet, the "
                          "search never started them; start it anew with `amid-ray tune "
                          f"--config {search_dir / SEARCH_FILE}` after removing the folder")
    tuner = search_dir / TUNER_FILE
    if not tuner.read_bytes()[:1] == PICKLE_START:
        raise ConfigError(str(tuner), "(Ray Tune state)", TUNER_FILE,
                          "is not a Ray Tune state file (not a pickle): the folder was damaged")
    snapshots = list(search_dir.glob("experiment_state-*.json"))
    for snapshot in snapshots:
        try:
            json.loads(snapshot.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(str(snapshot), "(Ray Tune state)", snapshot.name,
                              f"cannot be read ({error}): the folder was damaged") from None
    if not snapshots:
        raise ConfigError(str(search_dir), "(search folder)", str(search_dir),
                          "has no trials yet: no Ray Tune experiment snapshot "
                          "(experiment_state-*.json)")


def save_tracking_uri(search_dir: Path, tracking_uri: str) -> None:
    write_text_atomic(search_dir / TRACKING_URI_FILE, tracking_uri)


def load_tracking_uri(search_dir: Path) -> str | None:
    """The tracking URI the search logs to, None if the folder does not record one."""
    path = search_dir / TRACKING_URI_FILE
    return path.read_text().strip() if path.is_file() else None


# --------------------------------------------------------------------------- running


def run_search(run: RunConfig | None = None, *, resume_dir: Path | None = None,
               tracking_uri: str | None = None) -> SearchOutcome:
    """Start the search `run` describes, or resume the one in `resume_dir`, and see it through:
    trials, best checkpoint exported to `<search_dir>/best`, everything logged to MLflow."""
    if resume_dir is not None:
        search_dir = open_search_folder(resume_dir).resolve()
        run = load_search_file(search_dir)
        check_resumable(search_dir)
        # A driver killed while exporting can leave the old best/ aside: put it back now.
        recover_folder(search_dir / BEST_DIR)
    else:
        assert run is not None
        search_dir = search_dir_for(run)
        if is_uri(run.resources.storage_root):  # a fresh staging folder, marked as mirroring
            location = search_location(run)
            if exists(join(location, SEARCH_FILE)):
                raise ConfigError(run.source, "name", run.name,
                                  f"a search already exists at {location}; resume it with "
                                  f"`amid-ray resume {location}` or choose another --name")
            shutil.rmtree(search_dir, ignore_errors=True)
            search_dir.mkdir(parents=True)
            write_text_atomic(search_dir / STORAGE_URI_FILE, search_location(run))
        if tune.Tuner.can_restore(str(search_dir)):
            raise ConfigError(run.source, "name", run.name,
                              f"a search already exists in {search_dir}; resume it with "
                              f"`amid-ray resume {search_dir}` or choose another --name")
    spec = search_spec(run)
    if run.cache.enabled:
        # Before anything is written to the search folder; trials read it from this folder.
        run.cache.dir = str(cache_root(run))
        build_run_caches(run)
    if resume_dir is None:
        save_search_file(run, search_dir)
        save_tracking_uri(search_dir, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                          or default_tracking_uri(search_dir))
    # A resumed search logs where it started logging, unless told otherwise.
    tracking_uri = (tracking_uri or load_tracking_uri(search_dir)
                    or default_tracking_uri(search_dir))
    runs = SearchRuns(
        tracking_uri, run.name, search_dir, base_config=run.to_dict(),
        max_steps=run.train.max_steps, param_keys=spec.keys + [PRESET_KEY, "train.lr"],
    )
    if resume_dir is not None:
        # The restored experiment brings back its own tracker (pickled with the callbacks).
        try:
            tuner = tune.Tuner.restore(str(search_dir), _trainable(run, search_dir),
                                       resume_errored=True)
        except Exception as error:  # Tune's pickles, damaged or from another version
            raise ConfigError(str(search_dir), "(Ray Tune state)", type(error).__name__,
                              f"cannot be restored: {error}") from error
    else:
        tuner = build_tuner(run, spec, search_dir, [MLflowSearchTracker(runs)])
    with _mirrored(search_dir):
        tuner.fit()
        return _conclude(run, spec, search_dir, runs)


def _conclude(run: RunConfig, spec: SearchSpec, search_dir: Path,
              runs: SearchRuns) -> SearchOutcome:
    """Read the results, export the best checkpoint, publish everything to MLflow."""
    outcome = read_results(run, search_dir, runs.tracking_uri)
    for record in outcome.records:
        sync_trial(runs, record.trial_id, record.history, record.status)
    if outcome.best is not None:
        outcome = dataclasses.replace(outcome, best_dir=export_best(outcome.best, search_dir))
    finish_search(
        runs,
        best=outcome.best_details(),
        trials_table=[r.table_row() for r in outcome.records],
        # A sampled search's own study; a grid has none, so one is made of its trials.
        optuna_study=(load_search_study(spec, search_dir) if fixed_points(spec) is None
                      else study_from_trials(spec, outcome.records)),
        best_model_dir=outcome.best_dir,
        registered_model_name=f"amid-{run.name}",
    )
    return outcome


def search_results(location: str | Path) -> SearchOutcome:
    """The results of the search at `location` (its folder or URI) as they stand now (no Ray
    needed)."""
    search_dir = open_search_folder(location).resolve()
    run = load_search_file(search_dir)
    check_resumable(search_dir)
    return read_results(run, search_dir, load_tracking_uri(search_dir))
