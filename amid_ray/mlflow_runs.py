"""A search's runs in MLflow: one parent run per search, one nested child run per Tune trial.

`SearchRuns` is the piece the Tune callback (`amid_ray.tracking`) and the end-of-search
publishing (`amid_ray.publish`) share: the client, the parent run and the child runs, found
again by any driver process. It talks to MLflow through `MlflowClient` with explicit run ids
(never the fluent active run), so it does not clash with other code in the same process that uses
MLflow. The parent run id is kept in `<search_dir>/mlflow_parent_run.json`: a search resumed by
a new driver process finds its parent and its children again instead of creating duplicates.

Credentials for a remote tracking server come from the environment (`MLFLOW_TRACKING_TOKEN`,
`MLFLOW_TRACKING_USERNAME`, `MLFLOW_TRACKING_PASSWORD`) and are read by MLflow itself; nothing
here logs the tracking URI, the environment or any value outside the trial's hyperparameters.
"""

from __future__ import annotations

import json
import logging
import numbers
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from amid_ray.atomic import write_text_atomic
from amid_ray.config import flatten_dotted
from amid_ray.metrics import CURVE_METRICS

logger = logging.getLogger(__name__)

#: File in the search folder that names the search's parent run.
PARENT_RUN_FILE = "mlflow_parent_run.json"

#: Tag holding the Tune trial id on each child run.
TRIAL_ID_TAG = "trial_id"
#: Tag of an ended child run: "true" when the scheduler or a stopper ended its trial (KILLED).
STOPPED_EARLY_TAG = "stopped_early"
#: Tag of a child run ended at the end of the search because a driver died leaving it RUNNING.
STATUS_INFERRED_TAG = "status_inferred"

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


def short_param_names(param_keys: Sequence[str]) -> dict[str, str]:
    """MLflow param name per dotted key: its last component (`train.lr` → `lr`), or the whole
    dotted key where two keys share a last component."""
    last = {key: key.rsplit(".", 1)[-1] for key in param_keys}
    counts = Counter(last.values())
    return {key: name if counts[name] == 1 else key for key, name in last.items()}


def read_parent_run_id(search_dir: Path) -> str | None:
    """The parent run id recorded in the search folder, or None before the search started."""
    record = Path(search_dir) / PARENT_RUN_FILE
    if not record.is_file():
        return None
    return json.loads(record.read_text())["run_id"]


def is_number(value: Any) -> bool:
    """A real number MLflow can log as a metric (bools are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_plain_data(data: Any) -> Any:
    """`data` as plain JSON/YAML values (anything else becomes its string)."""
    return json.loads(json.dumps(data, default=str))


def _now_ms() -> int:
    return int(time.time() * 1000)


class SearchRuns:
    """The MLflow runs of one search: its parent run and a child run per trial nested under it.

    Child runs carry the trial's hyperparameters (`param_keys`, under short names) and, per step,
    every metric of `CURVE_METRICS` a result holds. `max_steps` is the step at which a trial has
    finished. `artifact_location` (for a new experiment) defaults to `default_artifact_location`.
    What a driver process learns from MLflow (client, run ids, logged steps) is not pickled: a
    new driver finds it again on demand.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, search_dir: Path, *,
                 search_space: Mapping[str, Any], max_steps: int, param_keys: Sequence[str],
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
        """The search's parent run: the one named in the search folder, else a new one."""
        if self._parent is None:
            self._parent = self._resume_parent() or self._create_parent()
            self.client.log_text(self._parent.info.run_id,
                                 yaml.safe_dump(as_plain_data(self.search_space), sort_keys=False),
                                 "search_space.yaml")
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
                                     tags={"search_dir": str(self.search_dir)})
        record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
        write_text_atomic(self.search_dir / PARENT_RUN_FILE, json.dumps(record, indent=2) + "\n")
        return run

    def _experiment_id_by_name(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(self.experiment_name,
                                             artifact_location=self.artifact_location)

    # -- child runs -----------------------------------------------------------------------------

    def child_run_id(self, trial_id: str, *, run_name: str, config: Mapping[str, Any]) -> str:
        """The trial's child run: the one a driver made for it before, else a new one named
        `run_name`. Hyperparameters of `config` it does not hold yet are logged."""
        if trial_id not in self._children:
            run = self.find_child(trial_id) or self.client.create_run(
                self.experiment_id, run_name=run_name,
                tags={MLFLOW_PARENT_RUN_ID: self.parent_run_id, TRIAL_ID_TAG: trial_id},
            )
            self._children[trial_id] = run.info.run_id
            self.log_missing_params(run, config)
        return self._children[trial_id]

    def find_child(self, trial_id: str) -> Run | None:
        """The trial's child run as MLflow holds it now, or None if it has none."""
        runs = self.children(f"tags.{TRIAL_ID_TAG} = '{trial_id}'")
        return runs[0] if runs else None

    def children(self, condition: str | None = None) -> list[Run]:
        """The child runs of the search (those meeting an MLflow filter `condition`), oldest
        first."""
        filter_string = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'"
        if condition:
            filter_string += f" AND {condition}"
        return self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time ASC"])

    def set_running(self, run_id: str) -> None:
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))

    def end_child(self, run_id: str, status: int, *, inferred: bool = False) -> None:
        """End a child run with `status` (a `RunStatus`), tagged `stopped_early` (true when
        KILLED) and, when the status was read from its logged steps, `status_inferred`."""
        tags = {STOPPED_EARLY_TAG: str(status == RunStatus.KILLED).lower()}
        if inferred:
            tags[STATUS_INFERRED_TAG] = "true"
        self.client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        self.client.set_terminated(run_id, status=RunStatus.to_string(status))

    # -- what runs hold -------------------------------------------------------------------------

    def trial_params(self, config: Mapping[str, Any]) -> dict[str, str]:
        """The hyperparameters among `param_keys` of a (nested or dotted) config, by short
        name, as MLflow strings."""
        flat = flatten_dotted(dict(config))
        return {name: str(flat[key]) for key, name in self.param_names.items() if key in flat}

    def log_missing_params(self, run: Run, config: Mapping[str, Any], prefix: str = "") -> None:
        """Log the `trial_params` of `config` (names prefixed) that `run` does not hold yet."""
        params = {f"{prefix}{name}": value for name, value in self.trial_params(config).items()}
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
