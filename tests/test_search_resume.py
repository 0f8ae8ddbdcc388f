"""A search resumed after its driver process is SIGKILLed three times: the real `tune_amid.py`
driver and its local Ray killed mid-search, then `amid-ray resume`, killed again twice wherever
it is once it has made progress, and resumed to the end. Its own module, so no other test's Ray
cluster is up beside the driver's (two local clusters confuse Ray Train's cleanup)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from asha_reference import asha_stop_rounds
from mlflow_helpers import tracking_summary

from amid_ray.results import collect_trials
from amid_ray.training import read_outcome

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TRIALS, MAX_STEPS, EVERY = 5, 6, 2  # the tiny search of conftest.py: 3 evaluation rounds


def test_three_driver_sigkills_keep_finished_work_and_asha_decisions(
        tiny_world, search_config, tmp_path):
    # One trial at a time, so ASHA's decisions are a function of the recorded curves.
    config = search_config(tiny_world, tmp_path, "resumed", num_samples=TRIALS, max_concurrent=1)
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
        # Kill once Tune's own snapshot holds a finished and a stopped trial, as it would in
        # real life some seconds after they end (Tune snapshots about every 10 s).
        ended = _wait_for_finished_and_stopped(search_dir, driver, timeout=900)
        os.kill(driver.pid, signal.SIGKILL)  # the real driver, abruptly
        driver.wait(timeout=30)
    finally:
        # The driver's local Ray cluster dies with its machine in this scenario.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    kept = {r.trial_id: r for r in collect_trials(search_dir, MAX_STEPS) if r.trial_id in ended}
    resume = [sys.executable, "-m", "amid_ray.cli", "resume", str(search_dir)]
    # Two more kills of the resumed driver, wherever it is once it has made progress.
    for _ in range(2):
        rounds = _rounds_reported(search_dir)
        driver = subprocess.Popen(resume, cwd=tmp_path, env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_progress(search_dir, rounds, driver, timeout=600)
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
        ended = _terminated_in_tune_snapshot(search_dir)
        kept |= {r.trial_id: r for r in collect_trials(search_dir, MAX_STEPS)
                 if r.trial_id in ended and r.trial_id not in kept}
    assert len(kept) < TRIALS, "the search ended before the last kill"

    resumed = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["num_trials"] == TRIALS
    records = collect_trials(search_dir, MAX_STEPS)
    after = {r.trial_id: r for r in records}
    assert len(after) == TRIALS
    for trial_id, before in kept.items():  # ended trials kept as they were: not re-run
        assert after[trial_id].history == before.history
        assert after[trial_id].best_checkpoint == before.best_checkpoint
    for record in records:  # no step counter restarted: each round once, in order
        steps = [row["step"] for row in record.history]
        assert steps == list(range(EVERY, EVERY * len(steps) + 1, EVERY)), steps

    # Every stop decision, before and after the kill, is the one ASHA makes when uninterrupted.
    curves = [[row["val_loss"] for row in r.history] for r in records]
    predicted = asha_stop_rounds(curves, grace=1, factor=2, max_rounds=MAX_STEPS // EVERY)
    assert any(stop is not None for stop in predicted)
    for record, stop in zip(records, predicted, strict=True):
        rounds = len(record.history)
        if stop is None:
            assert (record.status, rounds) == ("finished", MAX_STEPS // EVERY), record
        else:
            # Train runs ahead of Tune: a stopped run may complete one more round before it dies.
            assert rounds in (stop, stop + 1), (record, stop)

    # The Optuna study in the search folder holds every trial with its value and its rounds.
    study = optuna.load_study(study_name="resumed",
                              storage=f"sqlite:///{search_dir / 'optuna.db'}")
    assert len(study.trials) == TRIALS
    assert study.trials[0].params["amid.lam"] == 0.0  # the kd baseline, a trial of the study
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None
        assert trial.intermediate_values and set(trial.intermediate_values) <= {2, 4, 6}

    tracked = tracking_summary(summary["tracking_uri"], search_dir)
    assert sorted(c["trial_id"] for c in tracked["children"]) == sorted(after)  # no duplicates
    assert all(c["status"] in ("FINISHED", "KILLED") for c in tracked["children"])
    assert tracked["parent"]["status"] == "FINISHED"


def _train_history(search_dir: Path, trial_id: str) -> list[dict]:
    import ray.train

    result = ray.train.Result.from_path(str(search_dir / "trials" / trial_id))
    return read_outcome(result).history


def _rounds_reported(search_dir: Path) -> int:
    """Evaluation rounds recorded in the trials' latest Train checkpoints, all trials together."""
    total = 0
    for folder in (search_dir / "trials").glob("*"):
        with contextlib.suppress(Exception):  # a run being written right now
            total += len(_train_history(search_dir, folder.name))
    return total


def _wait_for_progress(search_dir: Path, rounds: int, driver, timeout: float) -> None:
    """Until the resumed search has checkpointed a round more than `rounds`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the resumed search ended before it could be interrupted"
        if _rounds_reported(search_dir) > rounds:
            return
        time.sleep(1)
    raise AssertionError("the resumed search made no progress in time")


def _wait_for_finished_and_stopped(search_dir: Path, driver, timeout: float) -> list[str]:
    """Ids of the trials Tune's snapshot holds as ended once it holds at least one that ran to
    the end and one that ASHA stopped (ended before the last step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the search ended before it could be interrupted"
        finished, stopped = [], []
        for trial_id in _terminated_in_tune_snapshot(search_dir):
            try:
                rows = _train_history(search_dir, trial_id)
            except Exception:  # not readable yet
                continue
            last = rows[-1]["step"] if rows else 0
            (finished if last == MAX_STEPS else stopped).append(trial_id)
        if finished and stopped:
            _wait_for_tune_snapshot(search_dir, finished + stopped, driver, timeout=120)
            return finished + stopped
        time.sleep(1)
    raise AssertionError("no finished and stopped trial in time")


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
