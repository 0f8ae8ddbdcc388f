"""A search end to end: real local Ray, Ray Train trials, Optuna + ASHA, a real MLflow SQLite
store."""

from __future__ import annotations

import pytest
import torch
from asha_reference import asha_stop_rounds, median_stop_rounds
from mlflow_helpers import tracking_summary
from transformers import AutoModelForCausalLM

from amid_ray.config import config_from_dict
from amid_ray.search import run_search

pytestmark = pytest.mark.slow


def test_search_records_every_trial_and_exports_the_rouge_argmax(tiny_world, local_ray,
                                                                 search_config, tmp_path):
    # One trial at a time, so the order trials reach each ASHA rung is known and the stops
    # can be predicted from the recorded curves (with two at once it is a race).
    # System metrics sampled every second on the trials' rank-0 workers.
    run = config_from_dict(search_config(tiny_world, tmp_path, "demo-search", max_concurrent=1,
                                         system_metrics=1), "test")
    outcome = run_search(run)
    records = outcome.records
    assert len(records) == 4
    assert records[0].params["amid.preset"] == "kd"  # the baseline runs first
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
        stopped = record.status == "stopped early"
        assert child["status"] == "FINISHED"  # stopped early is not a failure
        assert child["tags"]["amid_ray.stopped_early"] == str(stopped).lower()
        assert child["tags"].get("amid_ray.stopped_at_step") == (
            str(record.steps) if stopped else None)
        rouge_curve = child["metrics"]["rougeL"]
        assert len(rouge_curve) == record.steps // 2  # one point per evaluation round (synced)
        assert max(v for _, v in rouge_curve) == pytest.approx(record.best_rougeL)
        if "amid.alpha" in record.params:
            alpha = float(child["params"]["amid.alpha"])
            assert alpha == pytest.approx(record.params["amid.alpha"])
        # The worker's machine, sampled while it trained (MLflow's own `system/` series).
        assert child["metrics"]["system/cpu_utilization_percentage"]
        assert child["metrics"]["system/system_memory_usage_megabytes"]
        # Every trial has its dev cross-entropy and SGO tau curves, a point per round.
        assert len(child["metrics"]["dev_ce"]) == len(child["metrics"]["sgo_threshold"]) == len(
            rouge_curve)
    assert tracked["parent"]["status"] == "FINISHED"
    curves = [[v for _, v in children[r.trial_id]["metrics"]["val_loss"]] for r in records]
    print("val_loss per round, in trial order:", curves)
    stops = asha_stop_rounds(curves, grace=1, factor=2, max_rounds=3)
    assert any(stop is not None for stop in stops), "the recorded curves give ASHA nothing to stop"
    for record, stop in zip(records, stops, strict=True):
        rounds = record.steps // 2
        if stop is None:
            assert (record.status, rounds) == ("finished", 3)
        else:
            # Train runs ahead of Tune: a stopped run may complete one more round before it dies.
            assert rounds in (stop, stop + 1)
            assert record.status == ("finished" if rounds == 3 else "stopped early")


def test_a_median_rule_search_stops_what_the_rule_says(tiny_world, local_ray, search_config,
                                                        tmp_path):
    scheduler = {"type": "median", "grace_rounds": 1, "min_samples": 1, "metric": "val_loss"}
    raw = search_config(tiny_world, tmp_path, "median", max_concurrent=1, scheduler=scheduler,
                        baselines=[])
    outcome = run_search(config_from_dict(raw, "test"))
    records = outcome.records
    # Lower val_loss is better: the rule on the negated curves, as recorded round by round.
    curves = [[-h["val_loss"] for h in r.history] for r in records]
    print("-val_loss per round, in trial order:", curves)
    stops = median_stop_rounds(curves, grace=1, min_samples=1, max_rounds=3)
    assert any(stop is not None for stop in stops), "nothing for the rule to stop"
    for record, stop in zip(records, stops, strict=True):
        rounds = record.steps // 2
        if stop is None:
            assert (record.status, rounds) == ("finished", 3)
        else:  # Train may finish one more round before the stop reaches it
            assert rounds in (stop, stop + 1)
    # The search's own Optuna study holds every trial with its intermediate values.
    import optuna

    study = optuna.load_study(study_name="median",
                              storage=f"sqlite:///{outcome.search_dir / 'optuna.db'}")
    assert len(study.trials) == len(records) == 4
    assert all(t.intermediate_values for t in study.trials)
