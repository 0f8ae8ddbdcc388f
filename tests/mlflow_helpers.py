"""Test helper: what MLflow holds for a search, as plain data to assert on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from amid_ray.mlflow_runs import TRIAL_ID_TAG, read_parent_run_id


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
