"""A teacher-output cache: the teacher's top-k at every response-predicting position of a
split's examples, built once and read by every trial of a search.

Folder `<root>/teacher-<key>/`:

    manifest.json                       identity (what the cache is valid for) and shard plan:
                                        which examples each shard holds
    shard-00000-of-00012.safetensors    the examples the manifest plans for it, in that order:
        topk_logprobs [N, k]  float16 / bfloat16 / float32   (descending per row)
        topk_ids      [N, k]  int32
        tail_logmass  [N]     float32   log of the mass outside the k ids (-inf: none)
        offsets       [n + 1] int64     its i-th example owns rows offsets[i]:offsets[i+1]
        examples      [n]     int64     the ids of its examples (checked against the manifest)
      metadata: format, key, shard, digest (sha256 of the tensors)

An example's rows are its positions t with labels[t+1] ≠ -100, in order, for the example encoded
by `data.encode_example` (the positions `worker.response_mask` selects). The sparse teacher and
how the objective is evaluated from it: `sparse_teacher`.

Only what is read is built. The shards follow an order of the examples (for the training set,
the first epoch's order of the run's seed, `schedule.epoch_order`), so the examples a run of a
few hundred steps reads, a prefix of that order, fill the first shards, and only those are
built; a longer run later builds the next ones into the same folder.

Content address: key = sha256 of the `CacheIdentity` (teacher fingerprint, tokenizer vocabulary
hash, hash of the encoded examples and their count, the teacher's logits width, max lengths, k,
storage dtype, format version), so a second or resumed search over the same inputs finds it.
Building is resumable shard by shard: each shard is written under a hidden name and renamed into
place, and a rerun rebuilds only shards that are missing or fail their check. `build_shard` is a
plain function of its inputs (the cache stage runs shards on Ray actors); `build_cache` runs
them locally. `open_cache` checks everything a run will read before use — identity against what
the run expects, every shard it needs present, readable, untruncated, matching the plan and its
digest — and raises `TeacherCacheError` naming the file and the mismatch.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from amid_ray.atomic import create_text_atomic, write_bytes_atomic
from amid_ray.data import TrainingCollator, response_mask
from amid_ray.fused_loss import hidden_and_head
from amid_ray.sparse_teacher import SparseTeacherRows, TopKRows, sparsify

CACHE_FORMAT = "amid-ray-teacher-cache/2"
MANIFEST = "manifest.json"
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
}
#: Examples per shard file: the unit of building, resuming and reading. Small enough that a
#: run's reads (a prefix of the shard order) and the dev loss's few dozen examples waste
#: little of a last shard; a shard is some 9000 tokens, about 15 s of a CPU teacher.
SHARD_SIZE = 64
#: Tensor names of a shard, in the order the digest reads them.
SHARD_TENSORS = ("topk_logprobs", "topk_ids", "tail_logmass", "offsets", "examples")

Encoded = Mapping[str, Sequence[int]]


class TeacherCacheError(ValueError):
    """A teacher cache that must not be used: missing, incomplete, corrupt or built for other
    inputs. The message names the file and what is wrong."""


# --------------------------------------------------------------------------- identity

_FIELD_NAMES = {
    "teacher": "teacher (fingerprint of its config and weights)",
    "tokenizer": "tokenizer (vocabulary hash)",
    "data": "data (hash of the encoded examples of the split)",
    "num_examples": "number of examples in the split",
    "vocab_size": "teacher logits per position",
    "max_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length",
    "top_k": "top_k",
    "dtype": "storage dtype",
}


@dataclass(frozen=True)
class CacheIdentity:
    """Everything a cache's content depends on; its hash is the cache's key."""

    teacher: str
    tokenizer: str
    data: str
    num_examples: int
    vocab_size: int
    max_length: int
    max_prompt_length: int
    top_k: int
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(STORAGE_DTYPES)}, "
                             f"got {self.dtype!r}")
        if not 1 <= self.top_k <= self.vocab_size:
            raise ValueError(f"cache top_k must be in [1, {self.vocab_size}] (the teacher's "
                             f"logits per position), got {self.top_k}")

    def key(self) -> str:
        text = json.dumps({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def mismatches(self, other: CacheIdentity) -> list[str]:
        """Human-readable differences, `self` being the cache's and `other` the run's."""
        return [f"{_FIELD_NAMES[f.name]} is {getattr(self, f.name)!r} in the cache but "
                f"{getattr(other, f.name)!r} for this run"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's config (without its load path) and of every tensor of its state
    dict (name, dtype, shape, bytes): the same weights in the same dtype give the same value."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        settings = {k: v for k, v in config.to_dict().items()
                    if k not in ("_name_or_path", "transformers_version")}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        _hash_tensor(digest, name, tensor)
    return digest.hexdigest()


def source_fingerprint(source: str | Path, dtype: str) -> str:
    """sha256 of a teacher as stored (a `.gguf` file, or every file of a model folder: relative
    name and bytes, in name order) and of the dtype it runs in: what a worker can check without
    loading the teacher."""
    source = Path(source)
    digest = hashlib.sha256(f"dtype={dtype}|".encode())
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        digest.update(f"{path.relative_to(source) if path != source else path.name}|".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token ↔ id), special tokens and EOS / pad ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    identity = {"vocab": vocab, "special": sorted(tokenizer.all_special_tokens),
                "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def data_fingerprint(encoded: Sequence[Encoded]) -> str:
    """sha256 of the encoded examples in order (input ids and labels of each)."""
    digest = hashlib.sha256()
    for example in encoded:
        for name in ("input_ids", "labels"):
            values = np.asarray(example[name], dtype=np.int64)
            digest.update(len(values).to_bytes(8, "little"))
            digest.update(values.tobytes())
    return digest.hexdigest()


def cache_identity(
    teacher_id: str,
    tokenizer,
    encoded: Sequence[Encoded],
    *,
    vocab_size: int,
    max_length: int,
    max_prompt_length: int,
    top_k: int,
    dtype: str,
) -> CacheIdentity:
    """The identity of the cache of `encoded` (the training set as the worker encodes it, in
    training-set order) under the teacher fingerprinted as `teacher_id`, whose logits have
    `vocab_size` entries."""
    return CacheIdentity(teacher=teacher_id, tokenizer=tokenizer_fingerprint(tokenizer),
                         data=data_fingerprint(encoded), num_examples=len(encoded),
                         vocab_size=vocab_size, max_length=max_length,
                         max_prompt_length=max_prompt_length, top_k=top_k, dtype=dtype)


def cache_folder(root: str | Path, identity: CacheIdentity) -> Path:
    return Path(root) / f"teacher-{identity.key()}"


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` of `count`: the examples `examples` (ids into the split), in that order."""

    index: int
    count: int
    examples: tuple[int, ...]

    @property
    def file(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}.safetensors"


@dataclass(frozen=True)
class Manifest:
    identity: CacheIdentity
    shards: tuple[ShardPlan, ...]

    def to_json(self) -> str:
        return json.dumps({
            "format": CACHE_FORMAT, "key": self.identity.key(), "identity": asdict(self.identity),
            "shards": [{"file": s.file, "examples": list(s.examples)} for s in self.shards],
        })

    def holding(self, examples: Iterable[int] | None) -> list[ShardPlan]:
        """The shards that hold any of `examples` (every shard for None)."""
        if examples is None:
            return list(self.shards)
        wanted = set(examples)
        return [s for s in self.shards if not wanted.isdisjoint(s.examples)]


def plan_shards(order: Sequence[int], shard_size: int) -> tuple[ShardPlan, ...]:
    """Consecutive runs of `shard_size` examples of `order`."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    starts = range(0, len(order), shard_size)
    return tuple(ShardPlan(i, len(starts), tuple(int(e) for e in order[start:start + shard_size]))
                 for i, start in enumerate(starts))


def ensure_manifest(folder: str | Path, identity: CacheIdentity, *,
                    order: Sequence[int] | None = None,
                    shard_size: int = SHARD_SIZE) -> Manifest:
    """The folder's manifest, written if absent with shards along `order` (a permutation of the
    examples; default: their own order), so that the first examples of `order` fill the first
    shards; an existing one must be for `identity`, and its shard plan is kept whatever `order`
    and `shard_size` say. Of stages racing to write it, the first one's plan is everyone's."""
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        return read_manifest(folder, expected=identity)
    order = range(identity.num_examples) if order is None else order
    if sorted(order) != list(range(identity.num_examples)):
        raise ValueError(f"order must list each of the {identity.num_examples} examples once")
    manifest = Manifest(identity, plan_shards(order, shard_size))
    if not create_text_atomic(folder / MANIFEST, manifest.to_json()):
        return read_manifest(folder, expected=identity)  # another stage planned it first
    return manifest


def read_manifest(folder: str | Path, expected: CacheIdentity | None = None) -> Manifest:
    """Parse and check `folder/manifest.json`; with `expected`, its identity must equal it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise TeacherCacheError(f"{path} does not exist: {Path(folder)} is not a teacher cache "
                                "(or its build never started); build it first")
    invalid = f"{path} is not a valid teacher-cache manifest"
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TeacherCacheError(f"{invalid} ({error}); delete the folder and rebuild") from None
    if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise TeacherCacheError(f"{invalid}: format {found!r}, this version reads "
                                f"{CACHE_FORMAT!r}; rebuild the cache")
    try:
        identity = CacheIdentity(**raw["identity"])
        shards = tuple(ShardPlan(i, len(raw["shards"]), tuple(int(e) for e in s["examples"]))
                       for i, s in enumerate(raw["shards"]))
        files = [s["file"] for s in raw["shards"]]
        key = raw["key"]
    except (KeyError, TypeError, ValueError) as error:
        raise TeacherCacheError(f"{invalid} ({error!r}); delete the folder and rebuild"
                                ) from None
    if key != identity.key():
        raise TeacherCacheError(f"{path}: key {key!r} does not match its identity (expected "
                                f"{identity.key()!r}); the manifest was altered; rebuild")
    listed = sorted(e for s in shards for e in s.examples)
    if (listed != list(range(identity.num_examples)) or any(not s.examples for s in shards)
            or files != [s.file for s in shards]):
        raise TeacherCacheError(f"{path}: the shard plan does not hold each of the "
                                f"{identity.num_examples} examples exactly once; rebuild")
    if expected is not None and identity != expected:
        raise TeacherCacheError(
            f"teacher cache {path} was built for other inputs: "
            + "; ".join(identity.mismatches(expected))
            + ". A cache is valid only for the exact teacher, tokenizer, data, lengths, k and "
            "dtype it was built with: build one for this run (another folder) instead")
    return Manifest(identity, shards)


# --------------------------------------------------------------------------- building


def build_shard(
    teacher: torch.nn.Module,
    encoded: Sequence[Encoded],
    *,
    folder: str | Path,
    identity: CacheIdentity,
    shard: ShardPlan,
    pad_token_id: int,
    batch_size: int = 8,
) -> Path:
    """Run the frozen `teacher` over the shard's examples of `encoded` (the whole split, encoded
    as the worker encodes it) and write the shard file atomically; returns its path.

    Examples are batched by length (less padding; right padding leaves the real positions'
    logits unchanged under a causal mask), on the teacher's device and in its dtype.
    """
    if len(encoded) != identity.num_examples:
        raise ValueError(f"{len(encoded)} encoded examples but the cache identity says "
                         f"{identity.num_examples}")
    members = [encoded[i] for i in shard.examples]
    storage = STORAGE_DTYPES[identity.dtype]
    device = next(teacher.parameters()).device
    collate = TrainingCollator(pad_token_id)
    by_length = sorted(range(len(members)), key=lambda i: len(members[i]["input_ids"]))
    rows: list[TopKRows | None] = [None] * len(members)
    with torch.no_grad():
        for start in range(0, len(by_length), batch_size):
            batched = by_length[start : start + batch_size]
            batch = collate([members[i] for i in batched])
            # Logits only where a response token is predicted: no [batch, length, V] tensor.
            taught = hidden_and_head(teacher, input_ids=batch["input_ids"].to(device),
                                     attention_mask=batch["attention_mask"].to(device))
            if taught.weight.shape[0] != identity.vocab_size:
                raise ValueError(f"the teacher produces {taught.weight.shape[0]} logits per "
                                 f"position but the cache identity says {identity.vocab_size}")
            mask = response_mask(batch["labels"])[0].to(device)
            for j, i in enumerate(batched):
                logits = F.linear(taught.hidden[j][mask[j]], taught.weight, taught.bias)
                top = sparsify(logits, identity.top_k)
                rows[i] = TopKRows(top.logprobs.to(storage).cpu(), top.ids.to(torch.int32).cpu(),
                                   top.tail_logmass.float().cpu())
    counts = torch.tensor([0] + [len(r) for r in rows], dtype=torch.int64)
    tensors = dict(zip(SHARD_TENSORS, (*_cat_rows(rows, identity, storage), counts.cumsum(0),
                                       torch.tensor(shard.examples, dtype=torch.int64)),
                       strict=True))
    metadata = {"format": CACHE_FORMAT, "key": identity.key(), "shard": str(shard.index),
                "digest": _digest(tensors)}
    path = Path(folder) / shard.file
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata=metadata))
    return path


def _cat_rows(rows: list[TopKRows], identity: CacheIdentity,
              storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not rows:
        k = identity.top_k
        return (torch.zeros(0, k, dtype=storage), torch.zeros(0, k, dtype=torch.int32),
                torch.zeros(0))
    joined = TopKRows.cat(rows)
    return joined.logprobs, joined.ids, joined.tail_logmass


def pending_shards(folder: str | Path, manifest: Manifest,
                   shards: Iterable[ShardPlan] | None = None) -> list[ShardPlan]:
    """Of `shards` (default: all), those still to build: missing, or failing `check_shard`."""
    pending = []
    for shard in manifest.shards if shards is None else shards:
        try:
            check_shard(Path(folder), manifest.identity, shard)
        except TeacherCacheError:
            pending.append(shard)
    return pending


def build_cache(
    teacher: torch.nn.Module,
    encoded: Sequence[Encoded],
    identity: CacheIdentity,
    root: str | Path,
    *,
    pad_token_id: int,
    order: Sequence[int] | None = None,
    examples: Iterable[int] | None = None,
    shard_size: int = SHARD_SIZE,
    batch_size: int = 8,
    log: Callable[[str], None] | None = print,
) -> TeacherCache:
    """Build (or finish) the cache of `encoded` under `root` and return it, checked: the shards
    holding `examples` (default: all), planned along `order` (see `ensure_manifest`).

    Shards already complete are kept; each finished shard logs a progress line through `log`.
    """
    if len(encoded) != identity.num_examples:
        raise ValueError(f"{len(encoded)} encoded examples but the identity says "
                         f"{identity.num_examples}")
    examples = None if examples is None else sorted(set(examples))
    folder = cache_folder(root, identity)
    manifest = ensure_manifest(folder, identity, order=order, shard_size=shard_size)
    wanted = manifest.holding(examples)
    pending = pending_shards(folder, manifest, wanted)
    say = log or (lambda _: None)
    say(f"teacher cache {folder}: {len(wanted) - len(pending)} of the {len(wanted)} shards "
        f"needed already built ({len(manifest.shards)} in all)")
    began = time.perf_counter()
    for done, shard in enumerate(pending, start=1):
        path = build_shard(teacher, encoded, folder=folder, identity=identity, shard=shard,
                           pad_token_id=pad_token_id, batch_size=batch_size)
        elapsed = time.perf_counter() - began
        left = elapsed / done * (len(pending) - done)
        say(f"teacher cache: {path.name} ({len(shard.examples)} examples) written; "
            f"{len(wanted) - len(pending) + done}/{len(wanted)} shards, {elapsed:.0f} s, "
            f"about {left:.0f} s left")
    return open_cache(folder, expected=identity, examples=examples)


# --------------------------------------------------------------------------- reading


def check_shard(folder: Path, identity: CacheIdentity, shard: ShardPlan, *,
                verify_digest: bool = True) -> dict[str, torch.Tensor]:
    """Raise `TeacherCacheError` unless the shard file is complete and belongs to this plan.
    Returns its `offsets` and `examples`, and with `verify_digest` every tensor, read and
    checked against the digest recorded when it was written."""
    path = folder / shard.file
    if not path.is_file():
        raise TeacherCacheError(f"teacher cache shard {path} is missing: the build was "
                                "interrupted, or built other examples than this run reads; run "
                                "the cache build (amid-ray teacher-cache) with this run's config")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
            read = SHARD_TENSORS if verify_digest else ("offsets", "examples")
            tensors = ({name: handle.get_tensor(name) for name in read}
                       if names >= set(SHARD_TENSORS) else None)
    except (SafetensorError, OSError) as error:
        raise TeacherCacheError(f"teacher cache shard {path} cannot be read ({error}): it is "
                                "truncated or corrupt; delete it and run the cache build again"
                                ) from None
    expected = {"format": CACHE_FORMAT, "key": identity.key(), "shard": str(shard.index)}
    wrong = {k: (metadata.get(k), v) for k, v in expected.items() if metadata.get(k) != v}
    if wrong or tensors is None or names != set(SHARD_TENSORS):
        detail = "; ".join(f"{k} is {got!r}, expected {want!r}" for k, (got, want) in
                           wrong.items()) or f"tensors {sorted(names)}"
        raise TeacherCacheError(f"teacher cache shard {path} does not belong to this cache "
                                f"({detail}); delete it and run the cache build again")
    if verify_digest and _digest(tensors) != metadata.get("digest"):
        raise TeacherCacheError(f"teacher cache shard {path} is corrupt: its content digest "
                                "differs from the one recorded when it was written; delete it "
                                "and run the cache build again")
    _check_shapes(path, identity, shard, tensors)
    return tensors


def _check_shapes(path: Path, identity: CacheIdentity, shard: ShardPlan,
                  tensors: dict[str, torch.Tensor]) -> None:
    offsets, examples = tensors["offsets"], tensors["examples"]
    rows, k, count = int(offsets[-1]), identity.top_k, len(shard.examples)
    problems = []
    if examples.tolist() != list(shard.examples):
        problems.append("its examples are not the ones the manifest plans for it")
    if offsets.shape != (count + 1,) or int(offsets[0]) != 0 or bool((offsets.diff() < 0).any()):
        problems.append(f"offsets are not {count + 1} non-decreasing row counts from 0")
    if "topk_logprobs" in tensors:
        logprobs, ids, tail = (tensors[name] for name in SHARD_TENSORS[:3])
        if logprobs.shape != (rows, k) or logprobs.dtype != STORAGE_DTYPES[identity.dtype]:
            problems.append(f"topk_logprobs is {logprobs.dtype} {tuple(logprobs.shape)}, "
                            f"expected {identity.dtype} ({rows}, {k})")
        if ids.shape != (rows, k) or ids.dtype != torch.int32:
            problems.append(f"topk_ids is {ids.dtype} {tuple(ids.shape)}, expected int32 "
                            f"({rows}, {k})")
        elif rows and not (int(ids.min()) >= 0 and int(ids.max()) < identity.vocab_size):
            problems.append(f"topk_ids outside [0, {identity.vocab_size})")
        if tail.shape != (rows,):
            problems.append(f"tail_logmass has shape {tuple(tail.shape)}, expected ({rows},)")
    if problems:
        raise TeacherCacheError(f"teacher cache shard {path} is malformed: "
                                + "; ".join(problems) + "; delete it and rebuild")


class TeacherCache:
    """A checked cache folder, opened for some or all of its shards; `entries(i)` is example
    i's sparse teacher (i indexes the split), for the examples those shards hold."""

    def __init__(self, folder: Path, manifest: Manifest,
                 offsets: dict[int, torch.Tensor]) -> None:
        self.folder = folder
        self.identity = manifest.identity
        self._shards = {number: manifest.shards[number] for number in sorted(offsets)}
        self._offsets = offsets
        self._where = {example: (shard.index, local) for shard in self._shards.values()
                       for local, example in enumerate(shard.examples)}
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.identity.num_examples

    @property
    def num_examples_held(self) -> int:
        """Examples this cache was opened for (those its opened shards hold)."""
        return len(self._where)

    @property
    def num_positions(self) -> int:
        """Cached positions (response tokens) of the examples held."""
        return sum(int(o[-1]) for o in self._offsets.values())

    @property
    def size_bytes(self) -> int:
        return sum((self.folder / s.file).stat().st_size for s in self._shards.values())

    def entries(self, index: int) -> TopKRows:
        """Example `index`'s rows (its response-predicting positions, in order)."""
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} is outside the cache's {len(self)} examples")
        if index not in self._where:
            raise TeacherCacheError(
                f"example {index} is not among the {self.num_examples_held} examples the "
                f"teacher cache {self.folder} was opened for (open_cache's `examples`); in a "
                "worker that means its batches and cache_plan.examples_read disagree, a bug "
                "to report")
        number, local = self._where[index]
        first, last = (int(v) for v in self._offsets[number][local : local + 2])
        handle = self._handle(number)
        return TopKRows(*(handle.get_slice(name)[first:last] for name in SHARD_TENSORS[:3]))

    def batch_teacher(self, indices: Sequence[int], mask: torch.Tensor) -> SparseTeacherRows:
        """The teacher of a micro-batch of the split's examples `indices`, collated in that order,
        whose response mask is `mask` [batch, length]."""
        return SparseTeacherRows([self.entries(i) for i in indices], mask,
                                 self.identity.vocab_size)

    def _handle(self, number: int):
        if number not in self._handles:
            self._handles[number] = safe_open(self.folder / self._shards[number].file,
                                              framework="pt")
        return self._handles[number]


def open_cache(folder: str | Path, expected: CacheIdentity | None = None, *,
               verify: bool = True, examples: Iterable[int] | None = None) -> TeacherCache:
    """Open a cache for `examples` (default: all of them) after checking it (see the module
    docstring): every shard holding one of them must be present, readable, untruncated and
    planned for it; `verify` also reads each such shard once to compare its digest. Raises
    `TeacherCacheError` on any problem."""
    folder = Path(folder)
    manifest = read_manifest(folder, expected)
    offsets = {shard.index: check_shard(folder, manifest.identity, shard,
                                        verify_digest=verify)["offsets"]
               for shard in manifest.holding(examples)}
    return TeacherCache(folder, manifest, offsets)


# --------------------------------------------------------------------------- digests


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in SHARD_TENSORS:
        _hash_tensor(digest, name, tensors[name])
    return digest.hexdigest()
