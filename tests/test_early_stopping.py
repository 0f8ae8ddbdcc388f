"""ASHA on the run's optimizer steps, and the same decisions after the search is restored."""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass

import pytest
from asha_reference import asha_stop_rounds, median_stop_rounds
from ray.tune.schedulers import TrialScheduler

from amid_ray.early_stopping import RUNGS_FILE, make_scheduler
from amid_ray.search_space import SchedulerSpec

EVERY, MAX_STEPS = 10, 80  # evaluation every 10 steps, 8 rounds


@dataclass
class FakeTrial:
    trial_id: str


def run_trials(scheduler_factory, curves, *, kill_after: int | None = None,
               metric: str = "best_rougeL"):
    """Feed each trial's rounds to the scheduler, one trial after another; with `kill_after`,
    the scheduler is pickled and rebuilt (a restored search) after that many trials, and the
    interrupted trial re-reports its rounds from a checkpoint."""
    scheduler = scheduler_factory()
    pickled = pickle.dumps(scheduler)  # what Tune saved when the search started
    stops = {}
    for index, (trial_id, curve) in enumerate(curves.items()):
        if kill_after is not None and index == kill_after:
            scheduler = pickle.loads(pickled)
        trial = FakeTrial(trial_id)
        scheduler.on_trial_add(None, trial)
        stops[trial_id] = None
        for round_index, value in enumerate(curve):
            step = (round_index + 1) * EVERY
            result = {"step": step, metric: value, "training_iteration": 1}
            decision = scheduler.on_trial_result(None, trial, result)
            if step == MAX_STEPS:  # the end of the run (ASHA says STOP there too)
                break
            if decision == TrialScheduler.STOP:
                stops[trial_id] = step
                break
    return stops


@pytest.mark.parametrize("seed", range(5))
def test_asha_decisions_follow_the_rule_and_survive_a_restore(tmp_path, seed):
    rng = random.Random(seed)
    curves = {f"t{i}": [rng.random() for _ in range(MAX_STEPS // EVERY)] for i in range(8)}
    spec = SchedulerSpec(grace_rounds=1, reduction_factor=2, metric="best_rougeL")
    rounds = asha_stop_rounds(list(curves.values()), grace=1, factor=2,
                              max_rounds=MAX_STEPS // EVERY, mode="max")
    expected = {trial: None if stop is None else stop * EVERY
                for trial, stop in zip(curves, rounds, strict=True)}
    assert any(step is not None for step in expected.values())  # the check can fail

    def factory(folder):
        return lambda: make_scheduler(spec, eval_every=EVERY, max_steps=MAX_STEPS,
                                      search_dir=folder)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_trials(factory(tmp_path / "a"), curves) == expected
    restored = run_trials(factory(tmp_path / "b"), curves, kill_after=4)
    assert restored == expected
    assert (tmp_path / "b" / RUNGS_FILE).is_file()


def test_without_its_rung_file_a_restored_scheduler_forgets(tmp_path):
    # The contrast that shows the rung file is what carries the decisions: Ray's own scheduler
    # state after a restore is empty, so a worse trial is let through.
    spec = SchedulerSpec(grace_rounds=1, reduction_factor=2, metric="best_rougeL")
    scheduler = make_scheduler(spec, eval_every=EVERY, max_steps=MAX_STEPS, search_dir=tmp_path)
    pickled = pickle.dumps(scheduler)
    good = FakeTrial("good")
    scheduler.on_trial_add(None, good)
    scheduler.on_trial_result(None, good, {"step": EVERY, "best_rougeL": 0.9})
    bad = FakeTrial("bad")
    restored = pickle.loads(pickled)
    assert restored.on_trial_result(None, bad, {"step": EVERY, "best_rougeL": 0.1}) == "STOP"
    (tmp_path / RUNGS_FILE).unlink()
    forgetful = pickle.loads(pickled)
    assert forgetful.on_trial_result(None, bad, {"step": EVERY, "best_rougeL": 0.1}) == "CONTINUE"


def test_rungs_sit_at_evaluation_steps():
    spec = SchedulerSpec(grace_rounds=2, reduction_factor=3, metric="val_loss")
    scheduler = make_scheduler(spec, eval_every=5, max_steps=100, search_dir="/nonexistent")
    assert sorted(m for m, _ in scheduler.rungs) == [10, 30, 90]
    assert make_scheduler(None, eval_every=5, max_steps=100, search_dir="/x") is None


# --------------------------------------------------------------------------- the median rule


@pytest.mark.parametrize("seed", range(5))
def test_median_rule_follows_its_definition_and_survives_a_restore(tmp_path, seed):
    rng = random.Random(100 + seed)
    # Noisy rising curves of different levels, so some trials fall below the median.
    curves = {f"t{i}": [level + 0.05 * r + rng.gauss(0, 0.05) for r in range(MAX_STEPS // EVERY)]
              for i, level in enumerate(rng.uniform(0, 1) for _ in range(8))}
    spec = SchedulerSpec(type="median", grace_rounds=2, min_samples=3, metric="rougeL")
    rounds = median_stop_rounds(list(curves.values()), grace=2, min_samples=3,
                                max_rounds=MAX_STEPS // EVERY)
    expected = {trial: None if stop is None else stop * EVERY
                for trial, stop in zip(curves, rounds, strict=True)}
    assert any(step is not None for step in expected.values())  # the check can fail

    def factory(folder):
        return lambda: make_scheduler(spec, eval_every=EVERY, max_steps=MAX_STEPS,
                                      search_dir=folder)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_trials(factory(tmp_path / "a"), curves, metric="rougeL") == expected
    assert run_trials(factory(tmp_path / "b"), curves, metric="rougeL",
                      kill_after=5) == expected


def test_the_scheduler_section_takes_median_and_refuses_foreign_fields():
    from amid_ray.config import ConfigError, config_from_dict

    def parse(scheduler):
        return config_from_dict({"search": {
            "params": {"amid.alpha": {"type": "uniform", "low": -1, "high": 1}},
            "scheduler": scheduler}}, "space.yaml").search_spec

    assert parse("median").scheduler == SchedulerSpec(type="median")
    assert parse({"type": "median", "min_samples": 2}).scheduler.min_samples == 2
    with pytest.raises(ConfigError, match="reduction_factor"):
        parse({"type": "median", "reduction_factor": 3})
    with pytest.raises(ConfigError, match="min_samples"):
        parse({"type": "median", "min_samples": 0})
