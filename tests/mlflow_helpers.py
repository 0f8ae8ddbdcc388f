"""Test helper: what MLflow holds for a search, as plain data to assert on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over a SQLite store in `root`; it can be stopped and
    started again on the same port and store (an outage, as a client sees it)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        # Its own process group: the server runs worker processes, stopped with it.
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1", "--backend-store-uri",
             f"sqlite:///{self.root}/server.db", "--artifacts-destination",
             str(self.root / "artifacts")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {self._process.returncode} "
                                   f"(port {self.port} taken?)")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not answer /health within "
                                       f"{timeout_s:.0f} s") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait(timeout=30)
        self._process = None
