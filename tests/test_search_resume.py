"""A search resumed after its driver process is SIGKILLed: the real `tune_amid.py` driver and its
local Ray killed mid-search, then `amid-ray resume`. Its own module, so no other test's Ray
cluster is up beside the driver's (two local clusters confuse Ray Train's cleanup)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow_helpers import tracking_summary

from amid_ray.results import collect_trials
from amid_ray.training import read_outcome

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_resume_after_driver_sigkill_keeps_finished_trials(tiny_world, search_config, tmp_path):
    config = search_config(tiny_world, tmp_path, "resumed", num_samples=4, max_concurrent=1,
                           scheduler=None)
    config_path = tmp_path / "space.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    search_dir = tmp_path / "resumed"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "tune_amid.py"), "--config", str(config_path)],
        cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        finished = _wait_for_finished_trial(search_dir, driver, timeout=400)
        # Kill only once Tune's own snapshot holds them as finished, as it would in real life
        # some seconds after they end (Tune snapshots about every 10 s).
        _wait_for_tune_snapshot(search_dir, finished, driver, timeout=120)
        os.kill(driver.pid, signal.SIGKILL)  # the real driver, abruptly
        driver.wait(timeout=30)
    finally:
        # The driver's local Ray cluster dies with its machine in this scenario.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    before = {r.trial_id: r for r in collect_trials(search_dir, 6)}
    done_before = {tid: before[tid] for tid in finished}

    resumed = subprocess.run(
        [sys.executable, "-m", "amid_ray.cli", "resume", str(search_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["num_trials"] == 4
    after = {r.trial_id: r for r in collect_trials(search_dir, 6)}
    assert len(after) == 4 and all(r.status == "finished" for r in after.values())
    for trial_id, record in done_before.items():  # finished trials kept, not re-run or changed
        assert after[trial_id].best_rougeL == record.best_rougeL
        assert after[trial_id].best_checkpoint == record.best_checkpoint
        assert len(_train_history(search_dir, trial_id)) == 3
    tracked = tracking_summary(summary["tracking_uri"], search_dir)
    statuses = [c["status"] for c in tracked["children"]]
    assert sorted(c["trial_id"] for c in tracked["children"]) == sorted(after)  # no duplicates
    assert statuses == ["FINISHED"] * 4
    assert tracked["parent"]["status"] == "FINISHED"


def _train_history(search_dir: Path, trial_id: str) -> list[dict]:
    import ray.train

    result = ray.train.Result.from_path(str(search_dir / "trials" / trial_id))
    return read_outcome(result).history


def _wait_for_finished_trial(search_dir: Path, driver, timeout: float) -> list[str]:
    """Trial ids whose Train run reported its last step (6), polled from the search folder."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the search ended before it could be interrupted"
        finished = []
        for trial_dir in (search_dir / "trials").glob("*"):
            try:
                rows = _train_history(search_dir, trial_dir.name)
            except Exception:  # not written yet
                continue
            if rows and rows[-1].get("step") == 6 and math.isfinite(rows[-1]["rougeL"]):
                finished.append(trial_dir.name)
        if finished:
            return finished
        time.sleep(1)
    raise AssertionError("no trial finished in time")


def _wait_for_tune_snapshot(search_dir: Path, trial_ids: list[str], driver,
                            timeout: float) -> None:
    """Wait until Tune's snapshot in the search folder has `trial_ids` TERMINATED, then for the
    snapshot after it: Tune copies its snapshot files (experiment state, searcher state) into the
    folder one by one, and starts the next copy only when the previous one is complete."""
    deadline = time.monotonic() + timeout
    carried_by = None  # the version of the snapshot files that first had them finished
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the search ended before it could be interrupted"
        version = _snapshot_version(search_dir)
        if carried_by is None:
            finished = set(trial_ids) <= _terminated_in_tune_snapshot(search_dir)
            if finished and _snapshot_version(search_dir) == version:  # read one version
                carried_by = version
        elif version != carried_by:
            return
        time.sleep(0.5)
    raise AssertionError(f"no complete Tune snapshot recorded {trial_ids} as finished in time")


def _snapshot_version(search_dir: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns
            for path in search_dir.glob("experiment_state-*.json")}


def _terminated_in_tune_snapshot(search_dir: Path) -> set[str]:
    """Trial ids with status TERMINATED in `experiment_state-*.json` (Tune's restore file:
    `trial_data` is a list of [trial state as a JSON string, run metadata])."""
    terminated = set()
    for path in search_dir.glob("experiment_state-*.json"):
        try:
            trial_data = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):  # being written right now
            continue
        for trial_state, _ in trial_data:
            state = json.loads(trial_state)
            if state["status"] == "TERMINATED":
                terminated.add(state["trial_id"])
    return terminated
