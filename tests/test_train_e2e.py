"""One distillation run end to end on a real local Ray cluster: 2 CPU workers (gloo, DDP)."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from amid_ray.config import config_from_dict
from amid_ray.state_file import load_state
from amid_ray.training import run_training
from amid_ray.worker import TRAINER_STATE

pytestmark = pytest.mark.slow


LM_WEIGHT = 0.5


def tiny_run(world, storage: Path, name: str, sgo: dict | None = None, **train):
    """Two workers, AB-divergence AMiD plus a language-modelling loss on a small corpus."""
    return config_from_dict({
        "name": name,
        "models": {"teacher": world["teacher"], "student": world["student"]},
        "data": {"train": world["train"], "dev": world["dev"], "max_length": 96,
                 "max_prompt_length": 72, "lm_corpus": world["corpus"]},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 6, "lm_weight": LM_WEIGHT, **train},
        "amid": {"alpha": -3.0, "lam": 0.1, "divergence": "ab", "order": "pr"},
        "eval": {"every": 3, "num_examples": 4, "max_new_tokens": 8, "batch_size": 4},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "storage": str(storage),
                      "keep_checkpoints": 2, "max_failures": 2},
        "sgo": sgo or {},
    })


def test_two_worker_run_reports_rounds_and_keeps_best_checkpoint(tiny_world, local_ray,
                                                                 tmp_path):
    # Most steps on student-generated answers (DistiLLM's scheme), fresh or replayed.
    sgo = {"enabled": True, "init_threshold": 0.8, "loss_eps": 0.0, "max_new_tokens": 8,
           "replay_capacity": 16}
    outcome = run_training(tiny_run(tiny_world, tmp_path, "two-workers", sgo=sgo))
    steps = [row["step"] for row in outcome.history]
    assert steps == [3, 6]
    # Adaptive SGO as released, checked round by round on what the run reported: the first
    # reference is the dev cross-entropy before the first step; tau rises by 0.1 when dev_ce
    # reaches the reference (+ loss_eps 0), and the reference then moves to that dev_ce.
    reference, tau = outcome.history[0]["sgo_reference_ce"], 0.8
    for row in outcome.history:
        assert row["sgo_reference_ce"] == pytest.approx(reference)
        if row["dev_ce"] >= reference:
            tau, reference = min(tau + 0.1, 1.0), row["dev_ce"]
        assert row["sgo_threshold"] == pytest.approx(tau)
    print("dev_ce per round:", [row["dev_ce"] for row in outcome.history], "tau:", tau)
    for row in outcome.history:
        for key in ("train_loss", "distil_loss", "lm_loss", "val_loss", "rougeL",
                    "tokens_per_s"):
            assert math.isfinite(row[key]), (key, row)
        # The optimised total holds both terms (kd_ratio 1: AMiD + lm_weight·LM).
        assert row["train_loss"] == pytest.approx(row["distil_loss"]
                                                  + LM_WEIGHT * row["lm_loss"], rel=1e-9)
        assert row["lm_loss"] > 1.0  # next-token cross-entropy of a barely trained student
    assert outcome.best_metrics["rougeL"] == max(row["rougeL"] for row in outcome.history)
    model = AutoModelForCausalLM.from_pretrained(outcome.best_checkpoint)
    assert model.config.n_layer == 1
    assert any(Path(outcome.best_checkpoint).glob("*.safetensors"))
    assert (Path(outcome.best_checkpoint) / "tokenizer_config.json").exists()
    # Each worker generated answers and kept them in its replay buffer (checkpointed per rank).
    states = [load_state(path.with_suffix(""))
              for path in Path(outcome.result_dir).glob(f"*/{TRAINER_STATE}.json")]
    last = max(states, key=lambda state: state["step"])
    assert last["step"] == 6
    assert [len(buffer["items"]) > 0 for buffer in last["replay"]] == [True, True]
    # The trained student differs from where it started.
    start = AutoModelForCausalLM.from_pretrained(tiny_world["student"])
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)


def _train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if "TrainWorker" in (a.class_name or "")]


def _registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints the Train controller has registered, i.e. those a restart can resume from.

    A checkpoint folder on disk is not enough: the controller learns of reports by polling the
    workers, so one written just before a kill may never be registered. The controller's
    snapshot in the run folder lists the registered ones.
    """
    try:
        state = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or mid-write
        return 0
    return len(state.get("checkpoint_results") or [])


def test_killed_worker_resumes_from_its_last_checkpoint(tiny_world, local_ray, tmp_path):
    run = tiny_run(tiny_world, tmp_path, "fault", max_steps=12)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run_training(run)))
    thread.start()
    run_dir = tmp_path / "fault"
    deadline = time.monotonic() + 300
    while _registered_checkpoints(run_dir) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _registered_checkpoints(run_dir) >= 1, "no checkpoint was registered"
    pids = _train_worker_pids()
    assert pids, "no live Ray Train worker found"
    os.kill(pids[-1], signal.SIGKILL)  # a real kill of a worker process
    thread.join(timeout=600)
    assert not thread.is_alive()
    history = outcome["result"].history
    final = history[-1]
    assert final["step"] == 12
    assert final["restored_step"] >= 3  # the restarted workers began from a checkpoint
    assert all(math.isfinite(row["rougeL"]) for row in history)

    # It ends where an uninterrupted run ends: same rounds, same losses (model, optimizer,
    # data position, corpus position and RNG all restored).
    uninterrupted = run_training(tiny_run(tiny_world, tmp_path, "no-fault", max_steps=12))
    assert [row["step"] for row in history] == [row["step"] for row in uninterrupted.history]
    for resumed_row, plain_row in zip(history, uninterrupted.history, strict=True):
        for key in ("train_loss", "distil_loss", "lm_loss", "val_loss", "rougeL"):
            assert resumed_row[key] == pytest.approx(plain_row[key], rel=1e-6, abs=1e-9), key


def test_fused_loss_trains_as_the_full_logits_path(tiny_world, local_ray, tmp_path):
    # Same seed, two workers (DDP, gradients all-reduced once per step), gradient accumulation
    # and the LM loss: the fused path gives the losses the full-logits path gives.
    outcomes = {
        fused: run_training(tiny_run(tiny_world, tmp_path, f"fused-{fused}", max_steps=4,
                                     grad_accum=2, fused_loss=fused))
        for fused in (True, False)
    }
    fused_rows, logits_rows = outcomes[True].history, outcomes[False].history
    assert [row["step"] for row in fused_rows] == [3, 4]
    for fused_row, logits_row in zip(fused_rows, logits_rows, strict=True):
        for key in ("train_loss", "distil_loss", "lm_loss", "val_loss", "dev_ce"):
            assert fused_row[key] == pytest.approx(logits_row[key], rel=1e-5), key


def test_adaptive_sgo_raises_tau_exactly_when_the_dev_cross_entropy_rule_says(
        tiny_world, local_ray, tmp_path):
    # A learning rate far too high makes the dev cross-entropy rise, so tau must rise from 0
    # (the released start) and the student then generates; the rule is replayed independently.
    sgo = {"enabled": True, "init_threshold": 0.0, "max_new_tokens": 8, "replay_capacity": 8}
    outcome = run_training(tiny_run(tiny_world, tmp_path, "sgo-raise", sgo=sgo, lr=1.0,
                                    max_steps=6))
    reference, tau, raises = outcome.history[0]["sgo_reference_ce"], 0.0, []
    for row in outcome.history:
        assert row["sgo_reference_ce"] == pytest.approx(reference)
        if row["dev_ce"] >= reference + 0.1:
            tau, reference = min(tau + 0.1, 1.0), row["dev_ce"]
            raises.append(row["step"])
        assert row["sgo_threshold"] == pytest.approx(tau)
    assert raises, [row["dev_ce"] for row in outcome.history]  # the check can fail
