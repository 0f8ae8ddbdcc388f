"""The teacher cache in a search, end to end on a real local Ray: the stage builds it once with
Ray actors, trials train from it, a second search over the same inputs builds nothing, and with
k = vocabulary size a run from the cache follows the live-teacher run's dev loss exactly."""

from __future__ import annotations

import pytest
from test_local_session import Recorder

from amid_ray import cache_stage
from amid_ray.cache_plan import SPLITS
from amid_ray.cache_stage import build_run_caches, plan_run_caches
from amid_ray.config import config_from_dict
from amid_ray.metrics import VAL_LOSS
from amid_ray.results import FINISHED
from amid_ray.search import run_search
from amid_ray.sources import absolute_paths
from amid_ray.teacher_cache import TeacherCacheError, open_cache
from amid_ray.train_session import LocalSession
from amid_ray.worker import DistillationWorker

pytestmark = pytest.mark.slow

GPT2_VOCAB = 50257


def _cached_search(world, tmp_path, name: str, **cache) -> dict:
    return {
        "name": name,
        "models": {"teacher": world["teacher"], "student": world["student"]},
        "data": {"train": world["train"], "dev": world["dev"], "max_length": 64,
                 "max_prompt_length": 48, "max_train_examples": 8},
        # 2 steps of 2 read 4 of the 8 training examples; the dev loss reads 4 of 12.
        "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 2, "seed": 5},
        "amid": {"alpha": -3.0, "lam": 0.1, "divergence": "kl", "order": "pr"},
        "eval": {"every": 1, "num_examples": 4, "max_new_tokens": 4, "batch_size": 4},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "storage": str(tmp_path),
                      "max_failures": 0},
        # k = V, float32: the cache is the teacher, so runs from it must equal live ones.
        "cache": {"enabled": True, "top_k": GPT2_VOCAB, "dtype": "float32", **cache},
        "search": {"max_concurrent": 2, "scheduler": None,
                   "params": {"amid.alpha": {"type": "grid", "values": [-3.0, 0.5]}}},
    }


def _shard_files(plan):
    return {path: path.stat().st_mtime_ns for split in SPLITS
            for path in sorted(plan.folder(split).glob("*"))}


def test_a_search_builds_the_cache_once_and_trains_from_it(tiny_world, local_ray, tmp_path,
                                                           capsys, monkeypatch):
    monkeypatch.setattr(cache_stage, "SHARD_SIZE", 2)  # the stage plans on this driver
    first = config_from_dict(_cached_search(tiny_world, tmp_path, "cached-a"), "test")
    outcome = run_search(first)
    assert [(r.status, r.steps) for r in outcome.records] == [(FINISHED, 2)] * 2
    plan = plan_run_caches(absolute_paths(first))
    assert plan.root == tmp_path / "teacher-cache"
    built = _shard_files(plan)
    # Only the shards holding what the trials read: 2 of 4 (train), 2 of 6 (dev).
    for split, planned in (("train", 4), ("dev", 6)):
        shards = sorted(p.name for p in built if p.parent == plan.folder(split)
                        and p.suffix == ".safetensors")
        assert shards == [f"shard-{i:05d}-of-{planned:05d}.safetensors" for i in (0, 1)]
    log = capsys.readouterr().out
    assert "teacher cache (train)" in log
    assert "0 of the 2 shards holding the 4 of 8 examples read already built" in log

    # A second search over the same inputs (another name, another alpha grid) builds nothing.
    second = _cached_search(tiny_world, tmp_path, "cached-b")
    second["search"]["params"]["amid.alpha"]["values"] = [-1.0]
    run_search(config_from_dict(second, "test"))
    assert _shard_files(plan) == built
    log = capsys.readouterr().out
    assert "2 of the 2 shards holding the 4 of 8 examples read" in log and "building" not in log

    # Trials ran from the cache: with k = V their dev loss is the live teacher's, round by round.
    def dev_losses(raw) -> list[float]:
        recorder = Recorder(tmp_path / f"local-{raw['cache']['enabled']}")
        run = absolute_paths(config_from_dict({k: v for k, v in raw.items() if k != "search"},
                                              "test"))
        DistillationWorker(run, LocalSession(recorder)).train()
        return [m[VAL_LOSS] for m in recorder.rounds]

    cached = dev_losses(_cached_search(tiny_world, tmp_path, "local"))
    live = dev_losses(_cached_search(tiny_world, tmp_path, "local", enabled=False))
    assert cached == pytest.approx(live, rel=1e-5)
    # (the runs did train: the dev loss moved between the two rounds)
    assert abs(cached[1] - cached[0]) > 1e-4 * abs(cached[0])


def test_a_stale_or_truncated_cache_is_refused_before_training(tiny_world, local_ray,
                                                               tmp_path):
    raw = _cached_search(tiny_world, tmp_path, "stale", top_k=16)
    caches = build_run_caches(config_from_dict(raw, "test"), log=lambda line: None)
    plan = plan_run_caches(absolute_paths(config_from_dict(raw, "test")))
    assert {split: c.folder for split, c in caches.items()} == {
        split: plan.folder(split) for split in SPLITS}
    shard = next(plan.folder("train").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(TeacherCacheError, match="truncated or corrupt"):
        open_cache(plan.folder("train"), expected=plan.identities["train"])
    # A worker told to train from it refuses with the shard's name (no silent use).
    run = absolute_paths(config_from_dict({k: v for k, v in raw.items() if k != "search"},
                                          "test"))
    with pytest.raises(TeacherCacheError, match=shard.name):
        DistillationWorker(run, LocalSession(lambda metrics, folder: None))
    # Other data: the worker's identity differs, so it looks for (and misses) another cache.
    raw["data"]["max_train_examples"] = 6
    other = absolute_paths(config_from_dict({k: v for k, v in raw.items() if k != "search"},
                                            "test"))
    with pytest.raises(TeacherCacheError, match="does not exist"):
        DistillationWorker(other, LocalSession(lambda metrics, folder: None))
