"""A run's teacher cache: which examples it covers, what it is valid for, and where it lives.

A run with `cache.enabled` reads two caches under `cache_root(run)`: one over the training set
(the batches of ground-truth steps) and one over the dev set (the loss of evaluation rounds),
each content-addressed by `teacher_cache.CacheIdentity`. Of each, only the examples the run
reads are built (`examples_read`); for a search, those any of its trials may read. The build
stage (`cache_stage`, on Ray) and every worker compute the identities here from the same
inputs, the worker without loading the teacher: the teacher is identified by its stored files
and the dtype it runs in, the data by the examples as the worker encodes them, the vocabulary
by the tokenizer and the width of the logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from amid_ray.config import RunConfig
from amid_ray.data import InstructionExample, encode_example
from amid_ray.remote_storage import is_uri
from amid_ray.schedule import epoch_order
from amid_ray.schedule import examples_read as stream_reads
from amid_ray.search_space import probe_values
from amid_ray.teacher_cache import (
    CacheIdentity,
    Encoded,
    TeacherCache,
    cache_folder,
    cache_identity,
    open_cache,
    source_fingerprint,
)

#: The two caches of a run, by the split they cover.
SPLITS = ("train", "dev")
#: Default cache folder, beside the searches in the run's storage.
DEFAULT_CACHE_FOLDER = "teacher-cache"


def cache_root(run: RunConfig) -> Path:
    """`cache.dir`, else `<resources.storage>/teacher-cache`, absolute."""
    if run.cache.dir is not None:
        return Path(run.cache.dir).expanduser().resolve()
    root = run.resources.storage_root
    if is_uri(root):
        raise ValueError(f"resources.storage {root!r} is a URI: a teacher cache needs a "
                         "local or mounted folder; set cache.dir")
    return Path(root) / DEFAULT_CACHE_FOLDER


def teacher_dtype_name(run: RunConfig) -> str:
    """The dtype the teacher runs in: `models.teacher_dtype`, with auto resolved as the workers
    resolve it (bfloat16 on GPU workers, float32 on CPU ones)."""
    if run.models.teacher_dtype != "auto":
        return run.models.teacher_dtype
    return "bfloat16" if run.resources.gpus_per_worker > 0 else "float32"


def encode_all(run: RunConfig, tokenizer, examples: list[InstructionExample]) -> list[Encoded]:
    return [encode_example(tokenizer, example, max_length=run.data.max_length,
                           max_prompt_length=run.data.max_prompt_length)
            for example in examples]


#: Settings that decide which examples a run reads; each read more as it grows.
READ_SETTINGS = ("train.max_steps", "train.batch_size", "train.grad_accum",
                 "resources.num_workers", "eval.num_examples")


def examples_read(run: RunConfig, sizes: Mapping[str, int]) -> dict[str, list[int]]:
    """The examples (sorted ids) of each split that `run` reads, for splits of `sizes` examples:
    the training examples of its micro-batch stream over `train.max_steps` steps, and the
    first `eval.num_examples` dev examples (its dev loss)."""
    train = stream_reads(sizes["train"], run.train.batch_size, seed=run.train.seed,
                         world_size=run.resources.num_workers,
                         micro_steps=run.train.max_steps * run.train.grad_accum)
    return {"train": train, "dev": list(range(min(run.eval.num_examples, sizes["dev"])))}


def search_reads(run: RunConfig, sizes: Mapping[str, int]) -> dict[str, list[int]]:
    """What any trial of `run`'s search may read (`run`'s own reads when it has no search):
    the reads of the trial with every read setting the search varies at the largest value it
    may take, or every training example when the search varies `train.seed` (each seed reads
    its own order)."""
    spec = run.search_spec
    widest = run
    for param in spec.params if spec is not None else ():
        if param.key in READ_SETTINGS:
            section, name = param.key.split(".")
            value = max(probe_values(param))
            widest = replace(widest, **{section: replace(getattr(widest, section),
                                                         **{name: value})})
    reads = examples_read(widest, sizes)
    if spec is not None and "train.seed" in spec.keys:
        reads["train"] = list(range(sizes["train"]))
    return reads


@dataclass(frozen=True)
class CachePlan:
    """The identities of a run's two caches (by split), the folder they live under, the order a
    new cache's shards follow, and the examples to build (and read)."""

    root: Path
    identities: dict[str, CacheIdentity]
    orders: dict[str, list[int]]
    reads: dict[str, list[int]]

    def folder(self, split: str) -> Path:
        return cache_folder(self.root, self.identities[split])


def plan_caches(run: RunConfig, teacher_source: str | Path, tokenizer,
                encoded: dict[str, list[Encoded]], *, vocab_size: int,
                for_search: bool = False) -> CachePlan:
    """The cache identities of `run` whose teacher is stored at `teacher_source`, for the
    encoded training and dev examples (`encoded["train"]`, `encoded["dev"]`, in the order the
    worker indexes them), and what `run` reads of them (`for_search`: what any trial of its
    search may read)."""
    teacher = source_fingerprint(teacher_source, teacher_dtype_name(run))
    identities = {
        split: cache_identity(teacher, tokenizer, encoded[split], vocab_size=vocab_size,
                              max_length=run.data.max_length,
                              max_prompt_length=run.data.max_prompt_length,
                              top_k=min(run.cache.top_k, vocab_size), dtype=run.cache.dtype)
        for split in SPLITS
    }
    sizes = {split: len(encoded[split]) for split in SPLITS}
    reads = search_reads(run, sizes) if for_search else examples_read(run, sizes)
    orders = {"train": epoch_order(sizes["train"], seed=run.train.seed).tolist(),
              "dev": list(range(sizes["dev"]))}
    return CachePlan(cache_root(run), identities, orders, reads)


def open_run_caches(plan: CachePlan, *, verify: bool) -> dict[str, TeacherCache]:
    """Both caches for the examples the plan reads, checked against the plan
    (`TeacherCacheError` names what is wrong)."""
    return {split: open_cache(plan.folder(split), expected=plan.identities[split], verify=verify,
                              examples=plan.reads[split])
            for split in SPLITS}
