"""A real 2-node Ray cluster on this machine: a search submitted as a Ray job (`ray job submit`),
spread over both nodes and logging to a real MLflow server, stopped (`ray job stop`) and resumed
by a second job; a run whose node is killed mid-run finishing on the other node.

Starts `ray start --head` (127.0.0.1) and a second `ray start --address …` with its own CPUs,
resources and temp folder, plus `mlflow server` on 127.0.0.1; stops exactly those processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import ray
import yaml
from mlflow_helpers import MlflowServer, free_port, tracking_summary
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from amid_ray.cluster import TRIAL_DRIVER_RESOURCE
from amid_ray.config import config_from_dict
from amid_ray.metrics import STEP, VAL_LOSS
from amid_ray.training import run_training

pytestmark = [pytest.mark.multinode, pytest.mark.slow]
RAY = str(Path(sys.executable).with_name("ray"))


def node_ports() -> list[str]:
    # Two nodes on one host must not share the per-node agent ports.
    return [f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}"]


def stop_processes_under(folder: str) -> None:
    """SIGTERM, then SIGKILL, every process whose command line mentions `folder`."""
    mine = [p for p in psutil.process_iter(["cmdline"])
            if any(folder in part for part in (p.info["cmdline"] or []))]
    for process in mine:
        process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for process in alive:
        process.kill()


def start_node(fresh_args: Callable[[], list[str]], env: dict[str, str], temp_dir: str,
               attempts: int = 3) -> None:
    """`ray start` with freshly chosen ports, retried: a port found free can be taken (by this
    very cluster's processes) before Ray binds it. A failed attempt's processes are stopped."""
    for attempt in range(attempts):
        try:
            subprocess.run([RAY, "start", *fresh_args(), f"--temp-dir={temp_dir}", *node_ports()],
                           check=True, env=env, capture_output=True, timeout=120)
            return
        except subprocess.CalledProcessError:
            stop_processes_under(temp_dir)
            if attempt == attempts - 1:
                raise


@dataclass(frozen=True)
class Cluster:
    address: str  # the GCS, host:port
    root: str  # the nodes' temp folders are <root>/head and <root>/second
    dashboard: str  # the head's dashboard and job API, http://host:port


@pytest.fixture
def two_node_cluster():
    # Short paths: Ray's Unix sockets live under the temp folders.
    root = tempfile.mkdtemp(prefix="amidmn-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    gcs = {}

    def head_args() -> list[str]:
        gcs["address"] = f"127.0.0.1:{free_port()}"
        gcs["dashboard"] = f"http://127.0.0.1:{free_port()}"
        return ["--head", "--node-ip-address=127.0.0.1", f"--port={gcs['address'].split(':')[1]}",
                "--num-cpus=1", f"--resources={{\"{TRIAL_DRIVER_RESOURCE}\": 8}}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={gcs['dashboard'].rsplit(':', 1)[1]}"]

    def second_args() -> list[str]:
        return [f"--address={gcs['address']}", "--node-ip-address=127.0.0.1", "--num-cpus=1"]

    try:
        start_node(head_args, env, f"{root}/head")
        start_node(second_args, env, f"{root}/second")
        yield Cluster(gcs["address"], root, gcs["dashboard"])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_processes_under(root)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    yield server.url
    server.stop()


def _cluster_space(world, storage: Path, name: str, *, max_steps: int,
                   baselines: list[str]) -> dict:
    """A 4-trial search over the tiny world, 2 trials at a time (one per node's CPU)."""
    return {
        "name": name,
        "models": {"teacher": world["teacher"], "student": world["student"]},
        "data": {"train": world["train"], "dev": world["dev"], "max_length": 96,
                 "max_prompt_length": 72},
        "train": {"batch_size": 4, "max_steps": max_steps},
        "eval": {"every": 2, "num_examples": 4, "max_new_tokens": 4, "batch_size": 4},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "storage": str(storage),
                      "keep_checkpoints": 1},
        "search": {"num_samples": 4, "max_concurrent": 2, "scheduler": None,
                   "baselines": baselines,
                   "params": {"amid.alpha": {"type": "uniform", "low": -3.0, "high": 0.5}}},
    }


def _history(search_dir: Path, trial_id: str) -> list[dict]:
    from amid_ray.training import read_outcome

    return read_outcome(ray.train.Result.from_path(str(search_dir / "trials" / trial_id))).history


def _drill_run(world, storage: Path):
    return config_from_dict({
        "name": "node-drill",
        "models": {"teacher": world["teacher"], "student": world["student"]},
        "data": {"train": world["train"], "dev": world["dev"], "max_length": 64,
                 "max_prompt_length": 48},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 8, "seed": 4},
        "eval": {"every": 2, "num_examples": 4, "max_new_tokens": 4, "batch_size": 4},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "storage": str(storage),
                      "keep_checkpoints": 2, "max_failures": 2},
    }, "test")


def test_a_run_whose_node_dies_finishes_on_the_other_node_from_its_last_checkpoint(
        tiny_world, two_node_cluster, tmp_path):
    address, root = two_node_cluster.address, two_node_cluster.root
    ray.init(address=address)
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(
        TRIAL_DRIVER_RESOURCE))
    class Blocker:  # defined here: pickled by value, so workers need not import this file
        def ready(self) -> bool:
            return True

    # The head's one CPU is held, so the run's worker starts on the second node.
    blocker = ray.remote(num_cpus=1)(Blocker).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    ray.get(blocker.ready.remote())
    storage = tmp_path / "shared-storage"
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(
        run=run_training(_drill_run(tiny_world, storage))), daemon=True)
    runner.start()

    deadline = time.monotonic() + 300
    while not any((storage / "node-drill").glob("checkpoint_*/history.json")):
        assert runner.is_alive() and time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.1)
    ray.kill(blocker)  # room on the head for the restarted worker
    second = [p for p in psutil.process_iter(["cmdline"])
              if any(f"{root}/second" in part for part in (p.info["cmdline"] or []))]
    assert second
    for process in second:  # the node dies at once: no clean shutdown
        process.kill()
    runner.join(timeout=600)
    assert "run" in outcome, "the run did not finish after its node died"

    history = outcome["run"].history
    assert [row[STEP] for row in history] == [2, 4, 6, 8]
    nodes = [row["node_id"] for row in history]
    assert nodes[0] != head and nodes[-1] == head  # began on the second node, ended on the head
    moved = nodes.index(head)
    assert history[moved]["restored_step"] == history[moved - 1][STEP]  # from its checkpoint
    # Nothing lost or changed by the move: the rounds equal an uninterrupted run's.
    uninterrupted = run_training(_drill_run(tiny_world, tmp_path / "uninterrupted"))
    for got, want in zip(history, uninterrupted.history, strict=True):
        assert got[VAL_LOSS] == pytest.approx(want[VAL_LOSS], rel=1e-6)


def _job(dashboard: str, *args: str) -> subprocess.CompletedProcess:
    command, *rest = args
    return subprocess.run([RAY, "job", command, "--address", dashboard, *rest],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def _wait_for_job(dashboard: str, job: str, states: set[str], timeout_s: float) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job).value
        if status in states:
            return status
        time.sleep(2)
    pytest.fail(f"job {job} is {status}, not in {states}, after {timeout_s:.0f} s:\n"
                f"{client.get_job_logs(job)[-3000:]}")


REPO = Path(__file__).resolve().parents[1]


def test_a_search_submitted_as_a_ray_job_stops_and_resumes_as_jobs(
        tiny_world, two_node_cluster, mlflow_server, tmp_path):
    cluster = two_node_cluster
    shared = tmp_path / "shared-storage"
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(_cluster_space(tiny_world, shared, "job-search",
                                                   max_steps=4, baselines=["kd", "rkl"])))
    search_dir = shared / "job-search"
    # What a user runs from a checkout: the job's working dir is the project (.gitignore'd
    # files left out), its driver runs on the head and connects to this cluster.
    submitted = _job(cluster.dashboard, "submit", "--working-dir", str(REPO), "--submission-id",
                     "amid-first", "--no-wait", "--", sys.executable, "tune_amid.py", "--config",
                     str(space), "--tracking-uri", mlflow_server)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    assert _wait_for_job(cluster.dashboard, "amid-first", {"RUNNING", "FAILED", "SUCCEEDED"},
                         120) == "RUNNING"
    deadline = time.monotonic() + 300
    while not any(search_dir.glob("trials/*/checkpoint_*/history.json")):
        assert time.monotonic() < deadline, "the job's search made no checkpoint"
        time.sleep(0.5)
    assert _job(cluster.dashboard, "stop", "amid-first").returncode == 0
    assert _wait_for_job(cluster.dashboard, "amid-first", {"STOPPED"}, 120) == "STOPPED"

    resumed = _job(cluster.dashboard, "submit", "--working-dir", str(REPO), "--submission-id",
                   "amid-resume", "--", sys.executable, "tune_amid.py", "--resume",
                   str(search_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert _wait_for_job(cluster.dashboard, "amid-resume", {"SUCCEEDED", "FAILED"},
                         60) == "SUCCEEDED"
    # The driver's JSON summary, followed in the submit command's output by Ray's own lines.
    (summary,) = [json.loads(line) for line in resumed.stdout.splitlines()
                  if line.startswith('{"best_checkpoint"')]
    assert summary["best_checkpoint"] == str(search_dir / "best")
    assert (search_dir / "best" / "config.json").is_file()  # the exported Hugging Face model
    assert (search_dir / "search.yaml").is_file()
    assert any(search_dir.glob("experiment_state-*.json"))  # Tune's own state, for a resume

    ray.init(address=cluster.address)
    trials = sorted(p.name for p in (search_dir / "trials").iterdir() if p.is_dir())
    assert len(trials) == 4  # num_samples, the 2 baselines included: each trial run once
    nodes = {row["node_id"] for trial in trials for row in _history(search_dir, trial)}
    assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}  # trials on both nodes
    tracked = tracking_summary(mlflow_server, search_dir)
    assert sorted(c["trial_id"] for c in tracked["children"]) == trials
    assert all(c["status"] == "FINISHED" and c["metrics"]["rougeL"]
               for c in tracked["children"])
