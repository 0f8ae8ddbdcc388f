"""A run's teacher cache: which examples it covers, what it is valid for, and where it lives.

A run with `cache.enabled` reads two caches under `cache_root(run)`: one over the training set
(the batches of ground-truth steps) and one over the dev set (the loss of evaluation rounds),
each content-addressed by `teacher_cache.CacheIdentity`. The build stage (`cache_stage`, on
Ray) and every worker compute the identities here from the same inputs, the worker without
loading the teacher: the teacher is identified by its stored files and the dtype it runs in, the
data by the examples as the worker encodes them, the vocabulary by the tokenizer and the width
of the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from amid_ray.config import RunConfig
from amid_ray.data import InstructionExample, encode_example
from amid_ray.remote_storage import is_uri
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


@dataclass(frozen=True)
class CachePlan:
    """The identities of a run's two caches (by split) and the folder they live under."""

    root: Path
    identities: dict[str, CacheIdentity]

    def folder(self, split: str) -> Path:
        return cache_folder(self.root, self.identities[split])


def plan_caches(run: RunConfig, teacher_source: str | Path, tokenizer,
                encoded: dict[str, list[Encoded]], *, vocab_size: int) -> CachePlan:
    """The cache identities of `run` whose teacher is stored at `teacher_source`, for the
    encoded training and dev examples (`encoded["train"]`, `encoded["dev"]`, in the order the
    worker indexes them)."""
    teacher = source_fingerprint(teacher_source, teacher_dtype_name(run))
    identities = {
        split: cache_identity(teacher, tokenizer, encoded[split], vocab_size=vocab_size,
                              max_length=run.data.max_length,
                              max_prompt_length=run.data.max_prompt_length,
                              top_k=min(run.cache.top_k, vocab_size), dtype=run.cache.dtype)
        for split in SPLITS
    }
    return CachePlan(cache_root(run), identities)


def open_run_caches(plan: CachePlan, *, verify: bool) -> dict[str, TeacherCache]:
    """Both caches, checked against the plan (`TeacherCacheError` names what is wrong)."""
    return {split: open_cache(plan.folder(split), expected=plan.identities[split], verify=verify)
            for split in SPLITS}
