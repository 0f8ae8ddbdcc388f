"""Which examples a run, or any trial of a search, reads: what the cache stage builds."""

from __future__ import annotations

import pytest

from amid_ray.cache_plan import examples_read, search_reads
from amid_ray.config import config_from_dict, point_config
from amid_ray.schedule import micro_batches

SIZES = {"train": 100, "dev": 20}


def run_with(params: dict | None = None, **train):
    raw = {"name": "reads", "train": {"max_steps": 10, "batch_size": 2, "grad_accum": 2,
                                      "seed": 1, **train},
           "eval": {"num_examples": 5}, "cache": {"enabled": True}}
    if params is not None:
        raw["search"] = {"params": {"amid.alpha": {"type": "uniform", "low": -3, "high": 1},
                                    **params}}
    return config_from_dict(raw, "test")


def stream_reads(run) -> set[int]:
    stream = micro_batches(SIZES["train"], run.train.batch_size, seed=run.train.seed, rank=0,
                           world_size=1)
    return {i for _ in range(run.train.max_steps * run.train.grad_accum) for i in next(stream)}


def test_a_run_reads_its_stream_and_the_dev_loss_examples():
    run = run_with()
    reads = examples_read(run, SIZES)
    assert set(reads["train"]) == stream_reads(run) and len(reads["train"]) == 40
    assert reads["dev"] == [0, 1, 2, 3, 4]
    assert search_reads(run, SIZES) == reads  # no search: the run's own


@pytest.mark.parametrize("steps", [5, 17, 24])
def test_a_search_covers_every_trial_it_may_run(steps):
    search = run_with({"train.max_steps": {"type": "int", "low": 5, "high": 24},
                       "eval.num_examples": {"type": "categorical", "values": [3, 9]}})
    widest = search_reads(search, SIZES)
    assert len(widest["train"]) == 96 and widest["dev"] == list(range(9))
    trial = point_config(search.to_dict(), {"train.max_steps": steps, "eval.num_examples": 9},
                         source="trial")
    reads = examples_read(trial, SIZES)
    assert set(reads["train"]) <= set(widest["train"]) and reads["dev"] == widest["dev"]
    assert set(reads["train"]) == stream_reads(trial)


def test_a_search_varying_the_seed_covers_every_training_example():
    search = run_with({"train.seed": {"type": "categorical", "values": [1, 2]}})
    assert search_reads(search, SIZES)["train"] == list(range(100))
