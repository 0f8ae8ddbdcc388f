"""The teacher-cache stage of a run or search: build (or finish) its caches once, on Ray.

The driver plans the caches from the run's inputs without loading the teacher
(`cache_plan.plan_caches`), writes each cache's manifest, and hands the shards still missing to
a pool of Ray actors placed like the trials' workers (`resources.cpus_per_worker`,
`resources.gpus_per_worker`), each loading the teacher once. Every shard is written under a
hidden name and renamed into place, so a killed stage leaves only whole shards and the next one
builds just the rest. Only the shards holding what the run, or any trial of its search,
reads are built (`cache_plan.search_reads`); when they are in, they are read back in full and
checked before any trial uses them. A second search over the same inputs that reads no more
finds everything built; one that reads more builds only the shards it lacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import ray
import torch
from ray.util import ActorPool

from amid_ray.cache_plan import (
    CachePlan,
    encode_all,
    open_run_caches,
    plan_caches,
    teacher_dtype_name,
)
from amid_ray.config import RunConfig, config_from_dict
from amid_ray.models import freeze_teacher, load_causal_lm, load_tokenizer, logits_width
from amid_ray.sources import absolute_paths, load_train_dev, teacher_source
from amid_ray.teacher_cache import (
    SHARD_SIZE,
    CacheIdentity,
    ShardPlan,
    TeacherCache,
    build_shard,
    ensure_manifest,
    pending_shards,
)


def _encoded_splits(run: RunConfig, tokenizer) -> dict[str, list]:
    train, dev = load_train_dev(run.data, run.train.seed)
    return {"train": encode_all(run, tokenizer, train), "dev": encode_all(run, tokenizer, dev)}


class ShardBuilder:
    """A Ray actor holding the frozen teacher and the run's encoded examples; builds shards."""

    def __init__(self, config: dict[str, Any]):
        run = config_from_dict(config, "teacher-cache stage")
        dtype = getattr(torch, teacher_dtype_name(run))
        self.device = torch.device("cuda" if run.resources.gpus_per_worker > 0 else "cpu")
        teacher, self.tokenizer = load_causal_lm(teacher_source(run.models))
        self.teacher = freeze_teacher(teacher, dtype).to(self.device)
        self.encoded = _encoded_splits(run, self.tokenizer)

    def build(self, split: str, folder: str, identity: dict[str, Any],
              shard: ShardPlan) -> tuple[str, int, float]:
        began = time.perf_counter()
        build_shard(self.teacher, self.encoded[split], folder=folder,
                    identity=CacheIdentity(**identity), shard=shard,
                    pad_token_id=self.tokenizer.pad_token_id)
        return split, shard.index, time.perf_counter() - began


def plan_run_caches(run: RunConfig, *, for_search: bool = True) -> CachePlan:
    """The caches `run` (with `for_search`: or any trial of its search) trains from, planned
    on the driver (tokenizer and data only)."""
    source = teacher_source(run.models)
    tokenizer = load_tokenizer(source)
    return plan_caches(run, source, tokenizer, _encoded_splits(run, tokenizer),
                       vocab_size=logits_width(source), for_search=for_search)


def _actor_count(run: RunConfig, jobs: int) -> int:
    """As many builders as the cluster fits (like the trials' workers), at most one per job."""
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 0) // run.resources.cpus_per_worker)
    if run.resources.gpus_per_worker > 0:
        fits = min(fits, int(resources.get("GPU", 0) // run.resources.gpus_per_worker))
    return max(1, min(fits, jobs))


def build_run_caches(run: RunConfig, *, for_search: bool = True,
                     log: Callable[[str], None] = print) -> dict[str, TeacherCache]:
    """Build whatever `run`'s teacher caches lack of what it reads (with `for_search`: what any
    trial of its search may read; needs a connected Ray), check those parts in full, and return
    them. `run.cache.enabled` must be set."""
    run = absolute_paths(run)
    plan = plan_run_caches(run, for_search=for_search)
    jobs = []
    for split, identity in plan.identities.items():
        folder = plan.folder(split)
        manifest = ensure_manifest(folder, identity, order=plan.orders[split],
                                   shard_size=SHARD_SIZE)
        wanted = manifest.holding(plan.reads[split])
        pending = pending_shards(folder, manifest, wanted)
        log(f"teacher cache ({split}): {folder}: {len(wanted) - len(pending)} of the "
            f"{len(wanted)} shards holding the {len(plan.reads[split])} of "
            f"{identity.num_examples} examples read already built")
        jobs += [(split, str(folder), asdict(identity), shard) for shard in pending]
    if jobs:
        _build(run, jobs, log)
    began = time.perf_counter()
    caches = open_run_caches(plan, verify=True)
    train = caches["train"]
    log(f"teacher cache ready: {train.num_positions} training positions "
        f"({train.num_examples_held} of {len(train)} examples), top {run.cache.top_k} "
        f"of {train.identity.vocab_size} in {run.cache.dtype}, "
        f"{sum(c.size_bytes for c in caches.values()) / 2**20:.1f} MiB "
        f"(checked in {time.perf_counter() - began:.1f} s)")
    return caches


def _build(run: RunConfig, jobs: list[tuple], log: Callable[[str], None]) -> None:
    resources = run.resources
    builder = ray.remote(num_cpus=resources.cpus_per_worker,
                         num_gpus=resources.gpus_per_worker)(ShardBuilder)
    actors = [builder.remote(run.to_dict()) for _ in range(_actor_count(run, len(jobs)))]
    log(f"teacher cache: building {len(jobs)} shard(s) with {len(actors)} teacher "
        f"process(es)")
    began = time.perf_counter()
    pool = ActorPool(actors)
    try:
        results = pool.map_unordered(lambda actor, job: actor.build.remote(*job), jobs)
        for done, (split, index, seconds) in enumerate(results, start=1):
            elapsed = time.perf_counter() - began
            log(f"teacher cache: {split} shard {index} built in {seconds:.1f} s; {done}/"
                f"{len(jobs)}, {elapsed:.0f} s elapsed, about "
                f"{elapsed / done * (len(jobs) - done):.0f} s left")
    finally:
        for actor in actors:
            ray.kill(actor)
