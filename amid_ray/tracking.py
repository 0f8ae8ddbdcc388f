"""MLflow tracking of a search: one parent run per search, one nested child run per Tune trial.

`MLflowSearchTracker` is a Ray Tune callback that runs in the search driver. It talks to MLflow
through `MlflowClient` with explicit run ids (never the fluent active run), so it does not clash
with other code in the same process that uses MLflow. The parent run id is kept in
`<search_dir>/mlflow_parent_run.json`: a search resumed by a new driver process finds its parent
and its children again instead of creating duplicates.

Credentials for a remote tracking server come from the environment (`MLFLOW_TRACKING_TOKEN`,
`MLFLOW_TRACKING_USERNAME`, `MLFLOW_TRACKING_PASSWORD`) and are read by MLflow itself; nothing
here logs the tracking URI, the environment or any value outside the trial's hyperparameters.
"""

from __future__ import annotations

import csv
import json
import logging
import numbers
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.tune import Callback

if TYPE_CHECKING:
    import optuna
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

#: File in the search folder that names the search's parent run.
PARENT_RUN_FILE = "mlflow_parent_run.json"

#: Trial metrics logged to the child runs (when present and numeric), against `result["step"]`.
TRIAL_METRICS = (
    "rougeL", "val_loss", "train_loss", "distil_loss", "lm_loss", "tokens_per_s", "lr",
    "sgo_threshold",
)

#: The child run status of each trial verdict of `amid_ray.search.collect_trials`.
TRIAL_RUN_STATUS = {"finished": RunStatus.FINISHED, "stopped early": RunStatus.KILLED,
                    "error": RunStatus.FAILED}

#: Tag holding the Tune trial id on each child run.
TRIAL_ID_TAG = "trial_id"

#: Alias given to the registered model version of the search's best checkpoint.
BEST_ALIAS = "best"

#: Artifact folder of the parent run holding the best checkpoint (a Hugging Face model folder).
BEST_MODEL_ARTIFACT = "best_model"

#: Tracking URI schemes of tracking servers, which choose where artifacts go. With any other
#: store (SQLite, a database, a folder) artifacts would default to `./mlruns`.
_SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc")


def default_tracking_uri(search_dir: Path) -> str:
    """The local tracking store of a search: `sqlite:///<search_dir>/mlflow.db` (absolute)."""
    return f"sqlite:///{Path(search_dir).resolve() / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str, search_dir: Path) -> str | None:
    """None (the server decides) for a tracking server, else `<search_dir>/mlartifacts`."""
    if urlparse(tracking_uri).scheme in _SERVER_SCHEMES:
        return None
    return (Path(search_dir).resolve() / "mlartifacts").as_uri()


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A trial config as one level of dotted keys (`{"amid": {"alpha": 1}}` → `amid.alpha`)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def short_param_names(param_keys: Sequence[str]) -> dict[str, str]:
    """MLflow param name per dotted key: its last component (`train.lr` → `lr`), or the whole
    dotted key where two keys share a last component."""
    last = {key: key.rsplit(".", 1)[-1] for key in param_keys}
    counts = Counter(last.values())
    return {key: name if counts[name] == 1 else key for key, name in last.items()}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _result_step(result: Mapping[str, Any]) -> int | None:
    """The training step of a Tune result (Tune's report count when the trial sends none)."""
    step = result.get("step", result.get("training_iteration"))
    return int(step) if _is_number(step) else None


def _unlogged_metrics(result: Mapping[str, Any], step: int,
                      logged: Mapping[str, int]) -> list[Metric]:
    """The `TRIAL_METRICS` of one result at `step` that MLflow does not hold yet (`logged`: per
    metric, the last step already logged)."""
    return [Metric(key, float(result[key]), _now_ms(), step) for key in TRIAL_METRICS
            if _is_number(result.get(key)) and step > logged.get(key, -1)]


def _plain(data: Any) -> Any:
    """`data` as plain JSON/YAML values (anything else becomes its string)."""
    return json.loads(json.dumps(data, default=str))


class MLflowSearchTracker(Callback):
    """Tracks one search in MLflow: a parent run, and a child run per Tune trial nested under it.

    Children carry the trial's hyperparameters (`param_keys`, under short names), every metric
    of `TRIAL_METRICS` per step, and end as the trial ended: FINISHED when its last step reached
    `max_steps`, KILLED with tag `stopped_early=true` when the scheduler or a stopper ended it
    sooner, FAILED on error. Call `finish_search` once the search is done. `artifact_location`
    (for a new experiment) defaults to `default_artifact_location`.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, search_dir: Path, *,
                 search_space: dict[str, Any], max_steps: int, param_keys: Sequence[str],
                 artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.search_dir = Path(search_dir).resolve()
        self.search_space = search_space
        self.max_steps = max_steps
        self.param_names = short_param_names(param_keys)
        self.artifact_location = artifact_location or default_artifact_location(
            tracking_uri, self.search_dir)
        self._reset_session()

    def _reset_session(self) -> None:
        """Forget what this driver process learnt from MLflow (found again on demand)."""
        self._client: MlflowClient | None = None
        self._parent: Run | None = None
        self._children: dict[str, str] = {}
        self._logged_steps: dict[str, dict[str, int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with the experiment: keep the settings (public attributes),
        not the session (private ones)."""
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_session()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # -- the parent run -------------------------------------------------------------------------

    def open_parent(self) -> Run:
        """The search's parent run: the one named in the search folder, else a new one."""
        if self._parent is None:
            self._parent = self._resume_parent() or self._create_parent()
            self.client.log_text(self._parent.info.run_id,
                                 yaml.safe_dump(_plain(self.search_space), sort_keys=False),
                                 "search_space.yaml")
        return self._parent

    @property
    def parent_run_id(self) -> str:
        return self.open_parent().info.run_id

    @property
    def experiment_id(self) -> str:
        return self.open_parent().info.experiment_id

    def _resume_parent(self) -> Run | None:
        """The parent run of an earlier driver of this search, set back to RUNNING."""
        run_id = read_parent_run_id(self.search_dir)
        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            logger.warning("parent run %s of %s is not in the tracking store: starting a new one",
                           run_id, self.search_dir)
            return None
        if run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run

    def _create_parent(self) -> Run:
        run = self.client.create_run(self._experiment_id_by_name(), run_name=self.search_dir.name,
                                     tags={"search_dir": str(self.search_dir)})
        self.search_dir.mkdir(parents=True, exist_ok=True)
        record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
        staged = self.search_dir / f"{PARENT_RUN_FILE}.tmp"
        staged.write_text(json.dumps(record, indent=2) + "\n")
        staged.replace(self.search_dir / PARENT_RUN_FILE)
        return run

    def _experiment_id_by_name(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(self.experiment_name,
                                             artifact_location=self.artifact_location)

    # -- child runs -----------------------------------------------------------------------------

    def child_run_id(self, trial: Trial) -> str:
        """The trial's child run: the one an earlier driver made for it, else a new one."""
        trial_id = str(trial.trial_id)
        if trial_id not in self._children:
            run = self._find_child(trial_id) or self._create_child(trial)
            self._children[trial_id] = run.info.run_id
            self._logged_steps[trial_id] = self._last_logged_steps(run)
            self._log_missing_params(run, trial.config)
        return self._children[trial_id]

    def _find_child(self, trial_id: str) -> Run | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}' "
                          f"AND tags.{TRIAL_ID_TAG} = '{trial_id}'",
            order_by=["attributes.start_time ASC"],
        )
        return runs[0] if runs else None

    def _create_child(self, trial: Trial) -> Run:
        return self.client.create_run(
            self.experiment_id, run_name=str(trial),
            tags={MLFLOW_PARENT_RUN_ID: self.parent_run_id, TRIAL_ID_TAG: str(trial.trial_id)},
        )

    def _last_logged_steps(self, run: Run) -> dict[str, int]:
        """Per metric, the last step already in MLflow (a resumed trial re-reports earlier ones)."""
        return {key: max(point.step for point in self.client.get_metric_history(run.info.run_id,
                                                                                  key))
                for key in run.data.metrics}

    def trial_params(self, config: Mapping[str, Any]) -> dict[str, str]:
        """The trial's hyperparameters among `param_keys`, by short name, as MLflow strings."""
        flat = flatten_config(config)
        return {name: str(flat[key]) for key, name in self.param_names.items() if key in flat}

    def _log_missing_params(self, run: Run, config: Mapping[str, Any],
                            prefix: str = "") -> None:
        params = {f"{prefix}{name}": value for name, value in self.trial_params(config).items()}
        missing = [Param(name, value) for name, value in params.items()
                   if name not in run.data.params]
        if missing:
            self.client.log_batch(run.info.run_id, params=missing)

    def _end_child(self, run_id: str, status: RunStatus, tags: Mapping[str, str]) -> None:
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        self.client.set_terminated(run_id, status=RunStatus.to_string(status))

    # -- Tune callback hooks --------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        """Open (or reopen) the parent run when the search starts."""
        self.open_parent()

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        run_id = self.child_run_id(trial)
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict, **info: Any) -> None:
        step = _result_step(result)
        if step is None:
            return
        run_id = self.child_run_id(trial)
        logged = self._logged_steps[str(trial.trial_id)]
        metrics = _unlogged_metrics(result, step, logged)
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
            logged.update((metric.key, step) for metric in metrics)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        run_id = self.child_run_id(trial)
        if self._reached_step(trial) >= self.max_steps:
            self._end_child(run_id, RunStatus.FINISHED, {"stopped_early": "false"})
        else:
            self._end_child(run_id, RunStatus.KILLED, {"stopped_early": "true"})

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._end_child(self.child_run_id(trial), RunStatus.FAILED, {})

    def _reached_step(self, trial: Trial) -> int:
        """The last step the trial reported, in this driver or (resumed) in an earlier one."""
        logged = self._logged_steps.get(str(trial.trial_id), {}).values()
        last = _result_step(trial.last_result or {})
        return max([*logged, last if last is not None else -1])

    # -- the end of the search ------------------------------------------------------------------

    def sync_trial(self, trial_id: str, history: Sequence[Mapping[str, Any]],
                   trial_status: str) -> None:
        """Make a child run agree with its trial's Train result folder, the source of truth.

        Train runs ahead of Tune: a trial the scheduler stops can finish one more evaluation
        round before it dies, a round Tune never relays. Its points are logged here, and the
        end status corrected if that round was the run's last. `trial_status` is the search's
        verdict ("finished", "stopped early", "error"; others leave the status alone).
        """
        run = self._find_child(trial_id)
        if run is None:
            return
        logged = self._last_logged_steps(run)
        metrics = [metric for row in history
                   for metric in _unlogged_metrics(row, int(row["step"]), logged)]
        if metrics:
            self.client.log_batch(run.info.run_id, metrics=metrics)
        status = TRIAL_RUN_STATUS.get(trial_status)
        if status is not None and run.info.status != RunStatus.to_string(status):
            tags = {"stopped_early": str(status == RunStatus.KILLED).lower()}
            self._end_child(run.info.run_id, status, tags)

    def finish_search(self, *, best: Mapping[str, Any], trials_table: list[dict[str, Any]],
                      optuna_study: optuna.Study | None, best_model_dir: Path | None,
                      registered_model_name: str) -> ModelVersion | None:
        """Write the search's results onto the parent run and end it FINISHED.

        `best` describes the best trial: its `config` (flat dotted keys or nested) and its
        `rougeL`, plus anything else worth keeping (e.g. `trial_id`, `checkpoint`); all of it goes
        to `best_config.json`, the config's `param_keys` to params `best.<name>`. `trials_table`
        (one dict per trial) becomes `trials.csv`. Plots of `optuna_study` go under `plots/`.
        `best_model_dir` (a Hugging Face model folder) is logged under `best_model/` and
        registered as a new version of `registered_model_name` with alias `best`; returns that
        version (None without a model folder). Children still RUNNING (a driver that died) end
        with the status their logged steps show: FINISHED at `max_steps`, else KILLED.
        """
        parent_id = self.parent_run_id
        self.end_running_children()
        self._log_best(best)
        self.client.log_batch(parent_id, metrics=[Metric("num_trials", len(trials_table),
                                                         _now_ms(), 0)])
        with tempfile.TemporaryDirectory(prefix="amid-ray-report-") as tmp:
            report = Path(tmp)
            write_trials_csv(trials_table, report / "trials.csv")
            self.client.log_artifact(parent_id, str(report / "trials.csv"))
            if optuna_study is not None:
                plots = report / "plots"
                plots.mkdir()
                write_study_plots(optuna_study, plots)
                self.client.log_artifacts(parent_id, str(plots), "plots")
        version = None
        if best_model_dir is not None:
            version = self.register_best_model(best_model_dir, registered_model_name, best)
        self.client.set_terminated(parent_id, status=RunStatus.to_string(RunStatus.FINISHED))
        return version

    def end_running_children(self) -> None:
        """End every child still RUNNING with the status its logged steps show."""
        for run in self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}' "
                          "AND attributes.status = 'RUNNING'",
        ):
            steps = self._last_logged_steps(run).values()
            status = (RunStatus.FINISHED if max(steps, default=-1) >= self.max_steps
                      else RunStatus.KILLED)
            self._end_child(run.info.run_id, status, {"status_inferred": "true"})

    def _log_best(self, best: Mapping[str, Any]) -> None:
        parent_id = self.parent_run_id
        self.client.log_text(parent_id, json.dumps(_plain(best), indent=2) + "\n",
                             "best_config.json")
        self._log_missing_params(self.client.get_run(parent_id), best.get("config", {}),
                                 prefix="best.")
        if _is_number(best.get("rougeL")):
            self.client.log_batch(parent_id, metrics=[Metric("best_rougeL", float(best["rougeL"]),
                                                             _now_ms(), 0)])
        if "trial_id" in best:
            self.client.set_tag(parent_id, "best_trial_id", str(best["trial_id"]))

    def register_best_model(self, model_dir: Path, name: str,
                            best: Mapping[str, Any]) -> ModelVersion:
        """Log `model_dir` under the parent's `best_model/`, register it, alias it `best`."""
        parent_id = self.parent_run_id
        self.client.log_artifacts(parent_id, str(model_dir), BEST_MODEL_ARTIFACT)
        source = f"{self.client.get_run(parent_id).info.artifact_uri}/{BEST_MODEL_ARTIFACT}"
        try:
            self.client.get_registered_model(name)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            self.client.create_registered_model(
                name, description="Best AMiD students of amid-ray searches, by ROUGE-L")
        tags = {TRIAL_ID_TAG: str(best["trial_id"])} if "trial_id" in best else None
        version = self.client.create_model_version(name, source=source, run_id=parent_id,
                                                   tags=tags)
        self.client.set_registered_model_alias(name, BEST_ALIAS, version.version)
        return version


def write_trials_csv(trials_table: list[dict[str, Any]], path: Path) -> None:
    """One row per trial; the columns are every key seen, in the order first seen."""
    columns = list(dict.fromkeys(key for row in trials_table for key in row))
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(trials_table)


def _study_plots() -> dict[str, Callable[..., Any]]:
    from optuna.visualization import matplotlib as optuna_plots

    return {
        "optimization_history.png": optuna_plots.plot_optimization_history,
        "param_importances.png": optuna_plots.plot_param_importances,
        "parallel_coordinate.png": optuna_plots.plot_parallel_coordinate,
    }


def _plot_target(study: optuna.Study) -> dict[str, Any]:
    """Plot arguments for a multi-objective study: its first objective (none for one objective)."""
    if len(study.directions) == 1:
        return {}
    name = study.metric_names[0] if study.metric_names else "objective 0"
    return {"target": lambda trial: trial.values[0], "target_name": name}


def write_study_plots(study: optuna.Study, folder: Path) -> list[str]:
    """PNG plots of the study (history, importances, parallel coordinates) into `folder`.

    A multi-objective study is plotted against its first objective. A plot Optuna cannot draw
    (fewer than 2 complete trials, or e.g. importances it fails to compute) is skipped with a
    note in the log and in `skipped.txt`. Returns the names of the files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from optuna.trial import TrialState

    notes, written = [], []
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        notes.append("all plots: the study has fewer than 2 complete trials")
    else:
        for filename, plot in _study_plots().items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    figure = plot(study, **_plot_target(study)).figure
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                notes.append(f"{filename}: {type(error).__name__}: {error}")
                continue
            figure.savefig(folder / filename, bbox_inches="tight", dpi=100)
            plt.close(figure)
            written.append(filename)
    for note in notes:
        logger.warning("study plot skipped: %s", note)
    if notes:
        (folder / "skipped.txt").write_text("\n".join(notes) + "\n")
    return written


def read_parent_run_id(search_dir: Path) -> str | None:
    """The parent run id recorded in the search folder, or None before the search started."""
    record = Path(search_dir) / PARENT_RUN_FILE
    if not record.is_file():
        return None
    return json.loads(record.read_text())["run_id"]


def _metric_histories(client: MlflowClient, run: Run) -> dict[str, list[tuple[int, float]]]:
    return {key: [(point.step, point.value) for point in sorted(
        client.get_metric_history(run.info.run_id, key), key=lambda point: point.step)]
        for key in run.data.metrics}


def _run_summary(client: MlflowClient, run: Run) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "params": dict(run.data.params),
        "tags": {key: value for key, value in run.data.tags.items()
                 if not key.startswith("mlflow.")},
        "metrics": _metric_histories(client, run),
    }


def tracking_summary(tracking_uri: str, search_dir: Path) -> dict[str, Any]:
    """What MLflow holds for a search: the parent run and one entry per child run.

    `{"parent_run_id", "experiment_id", "parent": {...}, "children": [{"trial_id", "run_id",
    "status", "params", "tags", "metrics": {key: [(step, value), ...]}}, ...]}`, children sorted
    by trial id. Empty `{}` when the search has no parent run yet.
    """
    parent_id = read_parent_run_id(search_dir)
    if parent_id is None:
        return {}
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
    )
    return {
        "parent_run_id": parent_id,
        "experiment_id": parent.info.experiment_id,
        "parent": _run_summary(client, parent),
        "children": sorted(
            ({"trial_id": run.data.tags.get(TRIAL_ID_TAG), **_run_summary(client, run)}
             for run in children),
            key=lambda child: child["trial_id"] or ""),
    }
