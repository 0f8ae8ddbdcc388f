"""A search's runs in MLflow: one parent run per search, one nested child run per Tune trial.

`SearchRuns` is the piece the Tune callback (`amid_ray.tracking`) and the end-of-search
publishing (`amid_ray.publish`) share: the client, the parent run and the child runs, found
again by any driver process. It talks to MLflow through `MlflowClient` with explicit run ids
(never the fluent active run), so it does not clash with other code in the same process that uses
MLflow. The parent run id is kept in `<search_dir>/mlflow_parent_run.json`: a search resumed by
a new driver process finds its parent and its children again instead of creating duplicates.

What a user reads there: each child run's params are its trial's full effective configuration
(a preset resolved into its fields and recipe) under the dotted names of search spaces and
`--set` (`amid.alpha`, `train.lr`, `data.max_length`), and its `config.yaml` artifact is that
configuration as a file `amid-ray train --config` runs. The parent run holds the base
configuration the trials start from the same way (its `config.yaml` with the search section).
Parent and children carry MLflow's standard context tags (user, source, git commit), as runs
started with `mlflow.start_run` do. A trial the scheduler stopped early is a normal outcome of a
search: its run ends FINISHED, tagged `amid_ray.stopped_early=true` with the step it reached;
KILLED and FAILED mean killed and failed. The experiment is marked a model-training one, and
`runs_page_url` is the UI page that lists its runs.

Credentials for a remote tracking server come from the environment (`MLFLOW_TRACKING_TOKEN`,
`MLFLOW_TRACKING_USERNAME`, `MLFLOW_TRACKING_PASSWORD`) and are read by MLflow itself; the
username is the runs' `mlflow.user`, as MLflow records it. Nothing here logs the tracking URI,
the environment or a password: a URL in the configuration is logged with its user info masked.
"""

from __future__ import annotations

import functools
import json
import logging
import numbers
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.git_utils import get_git_commit
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from amid_ray.atomic import write_text_atomic
from amid_ray.config import ConfigError, flatten_dotted, point_config
from amid_ray.metrics import CURVE_METRICS, ROUGE_L, VAL_LOSS
from amid_ray.search_space import PRESET_KEY

logger = logging.getLogger(__name__)

#: File in the search folder that names the search's parent run.
PARENT_RUN_FILE = "mlflow_parent_run.json"

#: Tag holding the Tune trial id on each child run.
TRIAL_ID_TAG = "trial_id"
#: Tag of an ended child run: "true" when the scheduler or a stopper ended its trial before
#: `max_steps`, a normal outcome of a search (the run ends FINISHED), "false" otherwise.
STOPPED_EARLY_TAG = "amid_ray.stopped_early"
#: Tag of a child run stopped early: the last step its trial trained to.
STOPPED_AT_STEP_TAG = "amid_ray.stopped_at_step"
#: Tag of a child run ended at the end of the search because a driver died leaving it RUNNING.
STATUS_INFERRED_TAG = "status_inferred"
#: Parent-run metric: the step at which the best trial reached its best ROUGE-L.
BEST_STEP = "best_step"
#: Run metrics and tags the runs table shows (besides the searched params).
RUNS_VIEW_METRICS = (ROUGE_L, VAL_LOSS, BEST_STEP)
RUNS_VIEW_TAGS = (STOPPED_EARLY_TAG, STOPPED_AT_STEP_TAG)

#: Artifact of every run: its configuration as YAML (a trial's runs as `amid-ray train --config`).
CONFIG_ARTIFACT = "config.yaml"
#: Artifact of the parent run: the search section alone.
SEARCH_SPACE_ARTIFACT = "search_space.yaml"
#: Top-level key of the search section in a configuration (not a run setting, so not a param).
SEARCH_SECTION = "search"

#: Experiment tag with which MLflow 3 tells model-training experiments from GenAI ones.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: Its value for a model-training experiment ("Machine learning" in the UI).
MODEL_TRAINING_KIND = "custom_model_development"
#: Query parameter of the MLflow 3 UI choosing its workflow ("genai" unless told, whatever an
#: experiment's kind tag says, in 3.17) and the value showing runs, models and their charts.
UI_WORKFLOW_PARAM = "workflowType"
UI_MODEL_TRAINING_WORKFLOW = "machine_learning"
#: Experiment tag prefix of the MLflow UI's shared runs-table views, and the name of ours.
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW = "amid-ray"

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


def runs_page_url(ui_url: str, experiment_id: str) -> str:
    """The page of the MLflow UI at `ui_url` listing the experiment's runs, in the UI's model
    training workflow, with the columns of the search's runs view (`runs_view`).

    MLflow 3.17 opens an experiment on its GenAI overview unless the URL asks for the model
    training workflow (the experiment's kind tag no longer decides it), and its runs table
    shows no metric or param column unless a view selects them.
    """
    return (f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?viewStateShareKey={RUNS_VIEW}&{UI_WORKFLOW_PARAM}={UI_MODEL_TRAINING_WORKFLOW}")


def _column(group: str, key: str) -> str:
    """A runs-table column as the MLflow UI names it: group.`key`."""
    return f"{group}.`{key}`"


def runs_view(param_keys: Sequence[str]) -> dict[str, Any]:
    """The MLflow UI's runs-table view of a search (a shared view state): the logged model, the
    headline metrics, the searched params `param_keys` and how trials ended."""
    return {"selectedColumns": [
        _column("attributes", "Models"),
        *(_column("metrics", key) for key in RUNS_VIEW_METRICS),
        *(_column("params", key) for key in param_keys),
        *(_column("tags", key) for key in RUNS_VIEW_TAGS)]}


def _parent_record(search_dir: Path) -> dict[str, str] | None:
    record = Path(search_dir) / PARENT_RUN_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def read_parent_run_id(search_dir: Path) -> str | None:
    """The parent run id recorded in the search folder, or None before the search started."""
    record = _parent_record(search_dir)
    return None if record is None else record["run_id"]


def read_experiment_id(search_dir: Path) -> str | None:
    """The id of the search's MLflow experiment recorded in the search folder (for
    `runs_page_url`), or None before the search started."""
    record = _parent_record(search_dir)
    return None if record is None else record["experiment_id"]


def is_number(value: Any) -> bool:
    """A real number MLflow can log as a metric (bools are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_plain_data(data: Any) -> Any:
    """`data` as plain JSON/YAML values (anything else becomes its string)."""
    return json.loads(json.dumps(data, default=str))


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- what runs hold


#: The user info of a URL (`scheme://user:password@host`): may hold a password or a token.
_URL_USER_INFO = re.compile(r"(?<=://)[^/?#@\s]+@")


def without_credentials(data: Any) -> Any:
    """Plain `data` with the user info of every URL in its strings masked (`://***@host`)."""
    if isinstance(data, str):
        return _URL_USER_INFO.sub("***@", data)
    if isinstance(data, Mapping):
        return {key: without_credentials(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [without_credentials(value) for value in data]
    return data


def param_value(value: Any) -> str:
    """A configuration value as an MLflow param: a string as it is, anything else as YAML writes
    it (`null`, `true`, `0.001`, `[0, 3]`: what `--set key=value` reads back). A text longer
    than MLflow allows (`MAX_PARAM_VAL_LENGTH`) is cut, ending with a note of its length."""
    if isinstance(value, str):
        text = value
    else:
        # A bare scalar document ends with YAML's "..." end marker.
        text = yaml.safe_dump(value, default_flow_style=True, width=2**31).removesuffix("...\n")
        text = text.strip()
    if len(text) <= MAX_PARAM_VAL_LENGTH:
        return text
    note = f" ... [cut: {len(text)} characters]"
    return text[:MAX_PARAM_VAL_LENGTH - len(note)] + note


def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    """A (nested or dotted) configuration as MLflow params, by dotted name (`train.lr`)."""
    flat = flatten_dotted(without_credentials(as_plain_data(dict(config))))
    return {key: param_value(value) for key, value in flat.items()}


def config_yaml(config: Mapping[str, Any]) -> str:
    """A configuration as the YAML text of a `config.yaml` artifact."""
    return yaml.safe_dump(without_credentials(as_plain_data(dict(config))), sort_keys=False)


def run_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A configuration without its search section: the settings one run trains with."""
    return {key: value for key, value in config.items() if key != SEARCH_SECTION}


def trial_config(base: Mapping[str, Any], point: Mapping[str, Any],
                 trial_id: str) -> dict[str, Any]:
    """The configuration a trial trains with, as plain data: `base` (`RunConfig.to_dict()`)
    with the trial's `point` (dotted keys) applied and validated, a preset resolved into its
    fields and recipe (`config.point_config`, as the trial does; only where its Train run
    stores checkpoints, under the search folder, is not part of it).

    A point the configuration refuses fails its trial; for the record the tracking then takes
    the plain merge (flat dotted keys) rather than stop the search.
    """
    try:
        run = point_config(dict(base), dict(point), source=f"trial {trial_id}")
    except ConfigError as error:
        logger.warning("trial %s: logging its settings unchecked: %s", trial_id, error)
        return {**flatten_dotted(run_settings(base)), **flatten_dotted(dict(point))}
    return run_settings(run.to_dict())


def _short_number(value: Any) -> str:
    return f"{value:.3g}" if is_number(value) else str(value)


def trial_run_name(config: Mapping[str, Any], trial_id: str) -> str:
    """A child run's name: what its trial trains, then the trial id (its folder's name).

    `kd (3f2a1c0b)` for a baseline preset, `amid α=-1.93 λ=0.76 ab/pr (3f2a1c0b)` otherwise.
    """
    flat = flatten_dotted(dict(config))
    label = flat.get(PRESET_KEY)
    if not label:
        label = (f"amid α={_short_number(flat.get('amid.alpha'))} "
                 f"λ={_short_number(flat.get('amid.lam'))} "
                 f"{flat.get('amid.divergence')}/{flat.get('amid.order')}")
    return f"{label} ({trial_id})"


@functools.cache
def _package_commit() -> str | None:
    return get_git_commit(str(Path(__file__).resolve().parent))


def context_tags() -> dict[str, str]:
    """MLflow's standard context tags of a run started here (`mlflow.user`, `mlflow.source.name`,
    `mlflow.source.type`, `mlflow.source.git.commit` in a git checkout, ...), as
    `mlflow.start_run` sets them. Where the entry point is in no checkout (a console script in
    a virtualenv), the commit is that of the checkout holding this package, if any."""
    tags = resolve_tags()
    if MLFLOW_GIT_COMMIT not in tags and _package_commit():
        tags[MLFLOW_GIT_COMMIT] = _package_commit()
    return tags


def child_filter(parent_run_id: str, condition: str | None = None) -> str:
    """The MLflow filter for the child runs of a search's parent run that meet `condition`."""
    wanted = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
    return wanted if not condition else f"{wanted} AND {condition}"


def trial_condition(trial_id: str) -> str:
    """The MLflow filter condition for the run of trial `trial_id`."""
    return f"tags.{TRIAL_ID_TAG} = '{trial_id}'"


class SearchRuns:
    """The MLflow runs of one search: its parent run and a child run per trial nested under it.

    `base_config` is the search's configuration (`RunConfig.to_dict()`, search section
    included): the parent logs it, each child the trial's configuration built from it
    (`trial_config`) and, per step, every metric of `CURVE_METRICS` a result holds.
    `param_keys` are the searched keys the parent logs the best trial's values of
    (`best.<key>`). `max_steps` is the step at which a trial has finished. `artifact_location`
    (for a new experiment) defaults to `default_artifact_location`. What a driver process learns
    from MLflow (client, run ids, logged steps) is not pickled: a new driver finds it again on
    demand.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, search_dir: Path, *,
                 base_config: Mapping[str, Any], max_steps: int, param_keys: Sequence[str],
                 artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.search_dir = Path(search_dir).resolve()
        self.base_config = as_plain_data(dict(base_config))
        self.max_steps = max_steps
        self.param_keys = list(param_keys)
        self.artifact_location = artifact_location or default_artifact_location(
            tracking_uri, self.search_dir)
        self._reset_session()

    def _reset_session(self) -> None:
        self._client: MlflowClient | None = None
        self._parent: Run | None = None
        self._children: dict[str, str] = {}
        #: Per run id, per metric: the last step MLflow holds.
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

    def parent(self) -> Run:
        """The search's parent run: the one named in the search folder, else a new one. It holds
        the base configuration: params, `config.yaml` and the search section alone."""
        if self._parent is None:
            self._parent = self._resume_parent() or self._create_parent()
            run_id = self._parent.info.run_id
            self.client.set_experiment_tag(self._parent.info.experiment_id,
                                           SHARED_VIEW_TAG_PREFIX + RUNS_VIEW,
                                           json.dumps(runs_view(self.param_keys)))
            self.log_missing_params(self._parent, config_params(run_settings(self.base_config)))
            self.client.log_text(run_id, config_yaml(self.base_config), CONFIG_ARTIFACT)
            self.client.log_text(run_id, config_yaml(self.base_config.get(SEARCH_SECTION) or {}),
                                 SEARCH_SPACE_ARTIFACT)
        return self._parent

    @property
    def parent_run_id(self) -> str:
        return self.parent().info.run_id

    @property
    def experiment_id(self) -> str:
        return self.parent().info.experiment_id

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
        self.set_running(run_id)
        return run

    def _create_parent(self) -> Run:
        run = self.client.create_run(self._experiment_id_by_name(), run_name=self.search_dir.name,
                                     tags={**context_tags(), "search_dir": str(self.search_dir)})
        record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
        write_text_atomic(self.search_dir / PARENT_RUN_FILE, json.dumps(record, indent=2) + "\n")
        return run

    def _experiment_id_by_name(self) -> str:
        """The experiment named `experiment_name`, made if missing, marked a model-training
        experiment unless it is marked already (a user's choice stays)."""
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return self.client.create_experiment(
                self.experiment_name, artifact_location=self.artifact_location,
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                           MODEL_TRAINING_KIND)
        return experiment.experiment_id

    # -- child runs -----------------------------------------------------------------------------

    def child_run_id(self, trial_id: str, point: Mapping[str, Any]) -> str:
        """The child run of the trial at `point` (its dotted keys, Tune's trial config): the one
        a driver made for it before, else a new one named by `trial_run_name`. The trial's
        configuration (`trial_config`) is logged: the params the run does not hold yet and
        `config.yaml`."""
        if trial_id not in self._children:
            config = trial_config(self.base_config, point, trial_id)
            run = self.find_child(trial_id) or self.client.create_run(
                self.experiment_id, run_name=trial_run_name(config, trial_id),
                tags={**context_tags(), MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                      TRIAL_ID_TAG: trial_id},
            )
            self._children[trial_id] = run.info.run_id
            self.log_missing_params(run, config_params(config))
            self.client.log_text(run.info.run_id, config_yaml(config), CONFIG_ARTIFACT)
        return self._children[trial_id]

    def find_child(self, trial_id: str) -> Run | None:
        """The trial's child run as MLflow holds it now, or None if it has none."""
        runs = self.children(trial_condition(trial_id))
        return runs[0] if runs else None

    def children(self, condition: str | None = None) -> list[Run]:
        """The child runs of the search (those meeting an MLflow filter `condition`), oldest
        first."""
        return self.client.search_runs([self.experiment_id],
                                       filter_string=child_filter(self.parent_run_id, condition),
                                       order_by=["attributes.start_time ASC"])

    def set_running(self, run_id: str) -> None:
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))

    def end_child(self, run_id: str, status: int, *, stopped_at_step: int | None = None,
                  inferred: bool = False) -> None:
        """End a child run with `status` (a `RunStatus`), tagged `amid_ray.stopped_early`.

        `stopped_at_step` is given for a trial the scheduler or a stopper ended there, before
        `max_steps`: a normal outcome of a search, so it goes with FINISHED, the step in the tag
        `amid_ray.stopped_at_step`. KILLED and FAILED are left for trials that were killed or
        failed. `inferred`: the status was read from the logged steps (tag `status_inferred`).
        """
        tags = {STOPPED_EARLY_TAG: str(stopped_at_step is not None).lower()}
        if stopped_at_step is not None:
            tags[STOPPED_AT_STEP_TAG] = str(stopped_at_step)
        elif STOPPED_AT_STEP_TAG in self.client.get_run(run_id).data.tags:
            # A trial first seen stopped whose Train run went on to the end.
            self.client.delete_tag(run_id, STOPPED_AT_STEP_TAG)
        if inferred:
            tags[STATUS_INFERRED_TAG] = "true"
        self.client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        self.client.set_terminated(run_id, status=RunStatus.to_string(status))

    def ending_of(self, run: Run) -> tuple[str, int | None]:
        """How a child run (as fetched) ended: its status and the step it was stopped at (None
        unless it was stopped early)."""
        step = run.data.tags.get(STOPPED_AT_STEP_TAG)
        stopped = run.data.tags.get(STOPPED_EARLY_TAG) == "true"
        return run.info.status, int(step) if stopped and step is not None else None

    # -- what runs hold -------------------------------------------------------------------------

    def searched_params(self, config: Mapping[str, Any]) -> dict[str, str]:
        """The `param_keys` values of a (nested or dotted) config, as MLflow params."""
        params = config_params(config)
        return {key: params[key] for key in self.param_keys if key in params}

    def log_missing_params(self, run: Run, params: Mapping[str, str]) -> None:
        """Log the `params` that `run` (as fetched) does not hold yet: MLflow keeps a param's
        first value and refuses another. (`MlflowClient.log_batch` sends them in requests of
        at most 100, MLflow's limit.)"""
        missing = [Param(name, value) for name, value in params.items()
                   if name not in run.data.params]
        if missing:
            self.client.log_batch(run.info.run_id, params=missing)

    def log_values(self, run_id: str, values: Mapping[str, float], step: int = 0) -> None:
        """Log metric `values` at `step`."""
        self.client.log_batch(run_id, metrics=[Metric(key, float(value), _now_ms(), step)
                                               for key, value in values.items()])

    def log_points(self, run_id: str, points: Iterable[tuple[int, Mapping[str, Any]]]) -> None:
        """Log the `CURVE_METRICS` of each (step, result) that MLflow does not hold yet: numeric
        values at steps past the metric's last logged step (a resumed trial re-reports earlier
        ones)."""
        logged = self._logged_steps_of(run_id)
        metrics, reached = [], dict(logged)
        for step, result in points:
            for key in CURVE_METRICS:
                if is_number(result.get(key)) and step > reached.get(key, -1):
                    metrics.append(Metric(key, float(result[key]), _now_ms(), step))
                    reached[key] = step
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
            logged.update(reached)

    def last_step(self, run_id: str) -> int:
        """The last step any metric of the run was logged at (-1 when none was)."""
        return max(self._logged_steps_of(run_id).values(), default=-1)

    def _logged_steps_of(self, run_id: str) -> dict[str, int]:
        if run_id not in self._logged_steps:
            metrics = self.client.get_run(run_id).data.metrics
            self._logged_steps[run_id] = {
                key: max(point.step for point in self.client.get_metric_history(run_id, key))
                for key in metrics}
        return self._logged_steps[run_id]
