"""Fault drills on a real local Ray: a run whose newest checkpoint was corrupted resumes from
the previous one (with a warning) instead of failing or starting over; a search whose MLflow
server is down for a minute mid-search loses no metric and duplicates no run; a run whose
storage fills up stops with a one-line error and, once space is freed, resumes to the result an
uninterrupted run reaches.

(The driver SIGKILLed three times is `test_search_resume.py`; a worker killed mid-run is
`test_train_e2e.py`.)
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow_helpers import MlflowServer, tracking_summary

from amid_ray.config import config_from_dict
from amid_ray.errors import StorageFullError
from amid_ray.metrics import ROUGE_L, STEP, VAL_LOSS
from amid_ray.search import run_search
from amid_ray.train_snapshot import LAST_GOOD
from amid_ray.training import run_training
from amid_ray.worker import MODEL_DIR

pytestmark = pytest.mark.slow


def _run(world, storage: Path, max_steps: int):
    return config_from_dict({
        "name": "drill",
        "models": {"teacher": world["teacher"], "student": world["student"]},
        "data": {"train": world["train"], "dev": world["dev"], "max_length": 64,
                 "max_prompt_length": 48},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": max_steps, "seed": 4},
        "eval": {"every": 2, "num_examples": 4, "max_new_tokens": 4, "batch_size": 4},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "storage": str(storage),
                      "keep_checkpoints": 3, "max_failures": 1},
    }, "test")


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tiny_world, local_ray,
                                                                      tmp_path):
    first = run_training(_run(tiny_world, tmp_path, max_steps=4))
    assert [row[STEP] for row in first.history] == [2, 4]
    checkpoints = sorted(p for p in Path(first.result_dir).glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    weights = checkpoints[-1] / MODEL_DIR / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated

    # The same run started again: it resumes from step 2, not from the broken step 4, and
    # redoes steps 3-4 (the same batches and schedule, so the same round as before).
    resumed = run_training(_run(tiny_world, tmp_path, max_steps=4))
    assert [row[STEP] for row in resumed.history] == [2, 4]
    assert [row["restored_step"] for row in resumed.history] == [0, 2]
    assert resumed.history[1][VAL_LOSS] == pytest.approx(first.history[1][VAL_LOSS], rel=1e-6)


def _outage_after_first_round(server: MlflowServer, search_dir: Path, seconds: float,
                              times: dict[str, float]) -> None:
    """Stop the server once a trial has checkpointed its first round; start it again (same
    port, same store) `seconds` later."""
    deadline = time.monotonic() + 600
    while not any(search_dir.glob("trials/*/checkpoint_*")):
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    server.stop()
    times["down"] = time.monotonic()
    time.sleep(seconds)
    server.start()
    times["up"] = time.monotonic()


def test_an_mlflow_outage_of_a_minute_loses_no_metric_and_duplicates_no_run(
        tiny_world, local_ray, tmp_path, search_config):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    space = search_config(tiny_world, tmp_path / "storage", "outage", num_samples=2,
                          max_concurrent=1)
    space["train"]["max_steps"] = 4  # the kd baseline and one sampled trial, two rounds each
    run = config_from_dict(space, "test")
    times: dict[str, float] = {}
    outage = threading.Thread(target=_outage_after_first_round, daemon=True,
                              args=(server, tmp_path / "storage" / "outage", 60.0, times))
    outage.start()
    try:
        outcome = run_search(run, tracking_uri=server.url)
        ended = time.monotonic()
        outage.join(timeout=120)
        # The server was down mid-search: it went down after the first round and came back
        # before the search ended (the driver's MLflow calls retried through the minute).
        assert times.keys() == {"down", "up"}
        assert times["up"] - times["down"] >= 60 and times["up"] < ended

        tracked = tracking_summary(server.url, outcome.search_dir)
        children = tracked["children"]
        assert sorted(child["trial_id"] for child in children) == sorted(
            record.trial_id for record in outcome.records)  # one run per trial, no duplicate
        assert all(child["status"] == "FINISHED" for child in children)
        histories = {record.trial_id: record.history for record in outcome.records}
        for child in children:
            history = histories[child["trial_id"]]
            assert history
            for key in (ROUGE_L, VAL_LOSS):  # every round, as the trial reported it
                assert child["metrics"][key] == [(row[STEP], row[key]) for row in history]
    finally:
        server.stop()


def _fill_once_checkpointed(folder: Path, filler: Path) -> None:
    """Write `filler` until the device is full, once the run's first checkpoint is complete and
    recorded (Ray Train's record copied by `SnapshotKeeper`)."""
    deadline = time.monotonic() + 600
    while not (folder / "drill" / LAST_GOOD).is_file():
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    with filler.open("wb") as stream:
        try:
            while True:
                stream.write(bytes(1 << 16))
                stream.flush()
        except OSError:
            pass


@pytest.fixture
def small_device(tmp_path):
    """A 64 MiB tmpfs (needs root or CAP_SYS_ADMIN: skipped otherwise)."""
    folder = tmp_path / "device"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()[:200]}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_storage_stops_the_run_clearly_and_it_resumes_once_space_is_freed(
        tiny_world, local_ray, tmp_path, small_device):
    filler = small_device / "filler"
    threading.Thread(target=_fill_once_checkpointed, args=(small_device, filler),
                     daemon=True).start()
    with pytest.raises(StorageFullError) as stopped:
        run_training(_run(tiny_world, small_device, max_steps=8))
    message = str(stopped.value)
    assert f"resources.storage = {str(small_device)!r}: no space left on the device" in message
    assert "run the same command again" in message

    filler.unlink()
    resumed = run_training(_run(tiny_world, small_device, max_steps=8))
    uninterrupted = run_training(_run(tiny_world, tmp_path / "roomy", max_steps=8))
    assert [row[STEP] for row in resumed.history] == [2, 4, 6, 8]
    assert resumed.history[-1]["restored_step"] > 0  # resumed, not started afresh
    for got, want in zip(resumed.history, uninterrupted.history, strict=True):
        assert got[VAL_LOSS] == pytest.approx(want[VAL_LOSS], rel=1e-6)
