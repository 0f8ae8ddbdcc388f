"""Searches end to end: real local Ray, Ray Train trials, Optuna + ASHA, a real MLflow SQLite
store; and a resume after the driver process is SIGKILLed."""

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

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from amid_ray.config import config_from_dict
from amid_ray.search import collect_trials, run_search
from amid_ray.tracking import tracking_summary
from amid_ray.training import read_outcome

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def search_file(world, storage: Path, name: str, **search) -> dict:
    return {
        "name": name,
        "models": {"teacher": world["teacher"], "student": world["student"]},
        "data": {"train": world["train"], "dev": world["dev"], "max_length": 96,
                 "max_prompt_length": 72},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 6},
        "amid": {"alpha": -3.0, "lam": 0.1, "divergence": "kl", "order": "pr"},
        "eval": {"every": 2, "num_examples": 4, "max_new_tokens": 6, "batch_size": 4},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "storage": str(storage),
                      "keep_checkpoints": 1, "max_failures": 1},
        "search": {
            "num_samples": 4, "max_concurrent": 2, "seed": 0,
            # Tiny random models tie at ROUGE-L 0, so rungs compare the (continuous) dev loss.
            "scheduler": {"type": "asha", "grace_rounds": 1, "reduction_factor": 2,
                          "metric": "val_loss"},
            "baselines": ["kd"],
            "params": {
                "amid.alpha": {"type": "uniform", "low": -5.0, "high": 3.0},
                "amid.lam": {"type": "uniform", "low": 0.05, "high": 0.5},
                "amid.divergence": {"type": "categorical", "values": ["kl", "ab"]},
                "amid.ab_alpha": {"type": "uniform", "low": 0.1, "high": 0.9,
                                  "when": {"amid.divergence": "ab"}},
                "train.lr": {"type": "loguniform", "low": 3e-4, "high": 3e-3},
            },
            **search,
        },
    }


def test_search_records_every_trial_and_exports_the_rouge_argmax(tiny_world, local_ray,
                                                                 tmp_path):
    # One trial at a time, so the order trials reach each ASHA rung is known and the stops
    # can be predicted from the recorded curves (with two at once it is a race).
    run = config_from_dict(search_file(tiny_world, tmp_path, "demo-search", max_concurrent=1),
                           "test")
    outcome = run_search(run)
    records = outcome.records
    assert len(records) == 4
    assert records[0].params == {"amid.preset": "kd"}  # the baseline runs first
    sampled = [r.params for r in records[1:]]
    assert all(set(p) >= {"amid.alpha", "amid.lam", "amid.divergence", "train.lr"}
               for p in sampled)
    assert all(("amid.ab_alpha" in p) == (p["amid.divergence"] == "ab") for p in sampled)
    # Best = argmax of ROUGE-L over every evaluation round of every trial, from Train results.
    best_rouge = max(r.best_rougeL for r in records if r.best_rougeL is not None)
    assert outcome.best.best_rougeL == best_rouge
    assert outcome.summary()["rougeL"] == best_rouge
    model = AutoModelForCausalLM.from_pretrained(outcome.best_dir)
    exported = torch.cat([p.flatten() for p in model.parameters()])
    original = AutoModelForCausalLM.from_pretrained(outcome.best.best_checkpoint)
    assert torch.equal(exported, torch.cat([p.flatten() for p in original.parameters()]))

    tracked = tracking_summary(outcome.tracking_uri, outcome.search_dir)
    children = {c["trial_id"]: c for c in tracked["children"]}
    assert set(children) == {r.trial_id for r in records}
    for record in records:
        child = children[record.trial_id]
        assert child["status"] == ("FINISHED" if record.status == "finished" else "KILLED")
        rouge_curve = child["metrics"]["rougeL"]
        assert len(rouge_curve) == record.steps // 2  # one point per evaluation round
        assert max(v for _, v in rouge_curve) == pytest.approx(record.best_rougeL)
        if "amid.alpha" in record.params:
            assert float(child["params"]["alpha"]) == pytest.approx(record.params["amid.alpha"])
    assert tracked["parent"]["status"] == "FINISHED"
    curves = [[v for _, v in children[r.trial_id]["metrics"]["val_loss"]] for r in records]
    print("val_loss per round, in trial order:", curves)
    expected = asha_stops(curves, grace=1, factor=2, max_rounds=3)
    assert [r.status == "stopped early" for r in records] == expected
    assert any(expected), "the recorded curves give ASHA nothing to stop"


def asha_stops(curves: list[list[float]], grace: int, factor: int, max_rounds: int) -> list[bool]:
    """Which of these trials, run one after another, asynchronous successive halving stops
    (metric minimised): at rounds grace·factor^k below max_rounds, a trial stops when its value
    is worse than the best 1/factor quantile of what earlier trials recorded at that round."""
    rungs = {}
    rung = grace
    while rung < max_rounds:
        rungs[rung] = []
        rung *= factor
    stops = []
    for curve in curves:
        stopped = False
        for rung, recorded in rungs.items():
            if len(curve) < rung:
                break
            value = curve[rung - 1]
            if recorded and value > float(np.percentile(recorded, 100 / factor)):
                stopped = True
            recorded.append(value)
            if stopped:
                break
        stops.append(stopped)
    return stops


def test_resume_after_driver_sigkill_keeps_finished_trials(tiny_world, tmp_path):
    config = search_file(tiny_world, tmp_path, "resumed", num_samples=4, max_concurrent=1,
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
        time.sleep(12)  # let Tune snapshot the experiment once more (every ~10 s)
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
