"""The teacher cache on a tiny GPT-2: round trip, resume after a crash, refusal of bad caches."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from amid_ray.data import (
    InstructionExample,
    TrainingCollator,
    build_prompt,
    encode_example,
    response_mask,
)
from amid_ray.demo import fresh_gpt2, load_gpt2_tokenizer
from amid_ray.losses import amid_loss
from amid_ray.sparse_teacher import reconstruct_logprobs
from amid_ray.teacher_cache import (
    MANIFEST,
    TeacherCacheError,
    build_cache,
    cache_folder,
    cache_identity,
    ensure_manifest,
    open_cache,
    pending_shards,
    teacher_fingerprint,
)

MAX_LENGTH, MAX_PROMPT = 40, 28
TOP_K = 8


def make_examples(count: int, variant: str = "") -> list[InstructionExample]:
    return [InstructionExample(prompt=build_prompt(f"Name {i} things that are {variant}red."),
                               response=f"Item {i}: apples, roses and {i * 7} fire trucks.",
                               references=("x",), source=f"test:{i}")
            for i in range(count)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tokenizer = load_gpt2_tokenizer(tmp_path_factory.mktemp("tok"))
    teacher = fresh_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=64, seed=3).eval()
    return tokenizer, teacher


def encode_all(tokenizer, examples):
    return [encode_example(tokenizer, e, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT)
            for e in examples]


def identity_for(tokenizer, teacher, encoded, *, top_k=TOP_K, dtype="float32"):
    return cache_identity(teacher_fingerprint(teacher), tokenizer, encoded,
                          vocab_size=teacher.config.vocab_size, max_length=MAX_LENGTH,
                          max_prompt_length=MAX_PROMPT, top_k=top_k, dtype=dtype)


def build(world, root, encoded, **options):
    tokenizer, teacher = world
    identity = identity_for(tokenizer, teacher, encoded,
                            **{k: options.pop(k) for k in ("top_k", "dtype") if k in options})
    cache = build_cache(teacher, encoded, identity, root,
                        pad_token_id=tokenizer.pad_token_id, shard_size=4, batch_size=3,
                        log=None, **options)
    return cache, identity


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    tokenizer, _ = world
    encoded = encode_all(tokenizer, make_examples(10))
    cache, identity = build(world, tmp_path_factory.mktemp("cache"), encoded)
    return cache, identity, encoded


def test_stored_top_k_is_the_teachers_at_exactly_the_response_positions(world, built):
    _, teacher = world
    cache, _, encoded = built
    assert len(cache) == 10 and len(list(cache.folder.glob("shard-*"))) == 3
    positions = 0
    for index, example in enumerate(encoded):
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor([example["labels"]])
        with torch.no_grad():  # alone, unpadded: nothing shared with the batched build
            log_p = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
        mask, _ = response_mask(labels)
        expected = log_p[mask[0]].topk(TOP_K, dim=-1)
        rows = cache.entries(index)
        assert len(rows) == int(mask.sum()) == sum(t != -100 for t in example["labels"][1:])
        torch.testing.assert_close(rows.logprobs, expected.values, rtol=0, atol=2e-5)
        # Ids: the teacher's own log-probs at the stored ids are the stored values (ties-proof).
        torch.testing.assert_close(log_p[mask[0]].gather(1, rows.ids.long()), rows.logprobs,
                                   rtol=0, atol=2e-5)
        rest = log_p[mask[0]].scatter(1, rows.ids.long(), -torch.inf).logsumexp(-1)
        torch.testing.assert_close(rows.tail_logmass, rest, rtol=0, atol=2e-5)
        positions += len(rows)
    assert cache.num_positions == positions


def test_a_batch_reads_its_teacher_from_the_cache(world, built):
    tokenizer, teacher = world
    cache, _, encoded = built
    indices = [7, 0, 4]
    batch = TrainingCollator(tokenizer.pad_token_id)([encoded[i] for i in indices])
    mask, _ = response_mask(batch["labels"])
    sparse = cache.batch_teacher(indices, mask)
    for b, index in enumerate(indices):
        rows = mask[b].nonzero().squeeze(1) + b * mask.shape[1]
        torch.testing.assert_close(sparse.logits(rows), reconstruct_logprobs(
            cache.entries(index), teacher.config.vocab_size))
    # k = 8 of 50257 on a random tiny model: the cached objective is close, not equal.
    student = torch.randn(*mask.shape, teacher.config.vocab_size,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    settings = dict(alpha=-3.0, lam=0.1, divergence="kl", order="pr")
    cached_loss = amid_loss(student, sparse.dense(), mask, **settings)
    live_loss = amid_loss(student, live, mask, **settings)
    assert 0 < abs(cached_loss - live_loss) / live_loss < 0.05


def test_the_key_follows_every_input(world, built):
    tokenizer, teacher = world
    _, identity, encoded = built
    assert identity == identity_for(tokenizer, teacher, encode_all(tokenizer, make_examples(10)))
    others = [identity_for(tokenizer, teacher, encoded, top_k=16),
              identity_for(tokenizer, teacher, encoded, dtype="float16"),
              identity_for(tokenizer, teacher, encoded[:9]),
              identity_for(tokenizer, teacher, encoded[::-1])]
    assert len({identity.key(), *(other.key() for other in others)}) == 5


def test_storage_dtype_is_kept_and_rounds_the_stored_values_only(world, built, tmp_path):
    cache32, _, encoded = built
    cache16, identity = build(world, tmp_path, encoded, dtype="bfloat16")
    rows16, rows32 = cache16.entries(2), cache32.entries(2)
    assert rows16.logprobs.dtype == torch.bfloat16 and rows16.ids.dtype == torch.int32
    torch.testing.assert_close(rows16.logprobs.float(), rows32.logprobs, rtol=2**-8, atol=0)
    assert cache16.size_bytes < cache32.size_bytes
    assert cache16.folder == cache_folder(tmp_path, identity)


class CrashAfter:
    """Counts the teacher's forwards (a hook on the model itself, so the build sees the real
    model), raising on forward number `crash_at` (if given), while the block runs."""

    def __init__(self, teacher, crash_at=None):
        self.teacher, self.crash_at, self.calls = teacher, crash_at, 0

    def __enter__(self):
        self.hook = self.teacher.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *error):
        self.hook.remove()

    def _count(self, _module, _args):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")


def test_a_crashed_build_resumes_from_its_complete_shards(world, built, tmp_path):
    reference, identity, encoded = built
    _, teacher = world
    # 10 examples in shards of 4: 2 batches of 3 per full shard; forward 4 is shard 1's second.
    with pytest.raises(RuntimeError, match="simulated crash"), CrashAfter(teacher, crash_at=4):
        build(world, tmp_path, encoded)
    folder = cache_folder(tmp_path, identity)
    first = folder / "shard-00000-of-00003.safetensors"
    assert first.is_file() and not (folder / "shard-00001-of-00003.safetensors").exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp left
    with pytest.raises(TeacherCacheError, match="shard-00001-of-00003.safetensors is missing"):
        open_cache(folder, identity)
    stamp = first.stat().st_mtime_ns
    with CrashAfter(teacher) as resumed:
        cache, _ = build(world, tmp_path, encoded)
    assert resumed.calls == 2 + 1  # shard 1 (4 examples) and shard 2 (2 examples) only
    assert first.stat().st_mtime_ns == stamp
    for index in range(len(encoded)):
        for mine, theirs in zip(dataclasses.astuple(cache.entries(index)),
                                dataclasses.astuple(reference.entries(index)), strict=True):
            assert torch.equal(mine, theirs)


@pytest.fixture
def copy_of(built, tmp_path):
    cache, identity, encoded = built
    folder = tmp_path / cache.folder.name
    folder.mkdir()
    for path in cache.folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder, identity, encoded


def test_a_truncated_shard_is_refused_by_name_and_rebuilt_on_resume(world, copy_of):
    folder, identity, encoded = copy_of
    shard = folder / "shard-00001-of-00003.safetensors"
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size - 100)
    with pytest.raises(TeacherCacheError, match=f"{shard}.*truncated or corrupt"):
        open_cache(folder, identity)
    manifest = ensure_manifest(folder, identity)
    assert [s.index for s in pending_shards(folder, manifest)] == [1]
    cache, _ = build(world, folder.parent, encoded)
    assert len(cache.entries(5)) > 0


def test_a_corrupted_shard_is_refused_by_its_digest(copy_of):
    folder, identity, _ = copy_of
    shard = folder / "shard-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # a byte inside the tensors: the file still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match=f"{shard} is corrupt: its content digest"):
        open_cache(folder, identity)


def test_a_shard_from_another_cache_is_refused(world, copy_of, tmp_path):
    folder, identity, encoded = copy_of
    other, _ = build(world, tmp_path / "other", encoded, top_k=4)
    name = "shard-00000-of-00003.safetensors"
    os.replace(other.folder / name, folder / name)
    with pytest.raises(TeacherCacheError, match=f"{name} does not belong to this cache .*key"):
        open_cache(folder, identity)


@pytest.mark.parametrize(("change", "named"), [
    ("tokenizer", "tokenizer \\(vocabulary hash\\) is"),
    ("data", "data \\(hash of the encoded examples of the split\\) is"),
    ("top_k", "top_k is 8 in the cache but 16 for this run"),
])
def test_a_cache_built_for_other_inputs_is_refused_naming_the_difference(
        world, copy_of, change, named):
    folder, identity, encoded = copy_of
    tokenizer, teacher = world
    if change == "tokenizer":
        changed = load_gpt2_tokenizer(Path(folder).parent / "tok2")
        changed.add_tokens(["<extra-token>"])
        expected = identity_for(changed, teacher, encoded)
    elif change == "data":
        expected = identity_for(tokenizer, teacher,
                                encode_all(tokenizer, make_examples(10, variant="bright ")))
    else:
        expected = identity_for(tokenizer, teacher, encoded, top_k=16)
    with pytest.raises(TeacherCacheError, match=f"{folder / MANIFEST} was built for other "
                                                f"inputs: .*{named}"):
        open_cache(folder, expected)
    with pytest.raises(TeacherCacheError, match=named):
        ensure_manifest(folder, expected)


def test_an_altered_manifest_or_a_missing_one_is_refused(copy_of, tmp_path):
    folder, identity, _ = copy_of
    manifest = folder / MANIFEST
    original = json.loads(manifest.read_text())
    dropped = {**original, "shards": original["shards"][:-1]}
    manifest.write_text(json.dumps(dropped))
    with pytest.raises(TeacherCacheError, match="does not hold each of the 10 examples exactly"):
        open_cache(folder)
    manifest.write_text(json.dumps(original).replace('"top_k": 8', '"top_k": 9'))
    with pytest.raises(TeacherCacheError, match="does not match its identity"):
        open_cache(folder)
    with pytest.raises(TeacherCacheError, match="is not a teacher cache"):
        open_cache(tmp_path / "nothing-here")


def test_only_the_shards_holding_the_examples_read_are_built_and_opened(world, built, tmp_path):
    reference, identity, encoded = built
    _, teacher = world
    order = [3, 9, 0, 7, 1, 8, 2, 6, 5, 4]  # shards of 4: {3, 9, 0, 7}, {1, 8, 2, 6}, {5, 4}
    with CrashAfter(teacher) as counting:
        cache, _ = build(world, tmp_path, encoded, order=order, examples=[9, 0, 7])
    folder = cache_folder(tmp_path, identity)
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000-of-00003.safetensors"]
    assert counting.calls == 2  # 4 examples in batches of 3
    assert cache.num_examples_held == 4 and len(cache) == 10
    for index in (3, 9, 0, 7):
        for mine, theirs in zip(dataclasses.astuple(cache.entries(index)),
                                dataclasses.astuple(reference.entries(index)), strict=True):
            assert torch.equal(mine, theirs)
    with pytest.raises(TeacherCacheError, match="example 1 is not among the 4 examples"):
        cache.entries(1)
    with pytest.raises(TeacherCacheError, match="shard-00001-of-00003.safetensors is missing"):
        open_cache(folder, identity, examples=[0, 1])
    # A run reading more builds only the shard it lacks; the manifest's plan is kept.
    with CrashAfter(teacher) as counting:
        wider, _ = build(world, tmp_path, encoded, order=list(range(10)),
                         examples=[0, 1, 8])
    assert counting.calls == 2 and wider.num_examples_held == 8
    assert [s.examples for s in ensure_manifest(folder, identity).shards] == [
        (3, 9, 0, 7), (1, 8, 2, 6), (5, 4)]
    torch.testing.assert_close(wider.entries(8).logprobs, reference.entries(8).logprobs)


def test_a_shard_holding_other_examples_than_planned_is_refused(copy_of):
    folder, identity, _ = copy_of
    manifest = folder / MANIFEST
    raw = json.loads(manifest.read_text())
    first, second = raw["shards"][0]["examples"], raw["shards"][1]["examples"]
    raw["shards"][0]["examples"], raw["shards"][1]["examples"] = second, first
    manifest.write_text(json.dumps(raw))  # still a valid plan, but not what the files hold
    with pytest.raises(TeacherCacheError, match="shard-00000-of-00003.safetensors is malformed: "
                                                "its examples are not the ones the manifest"):
        open_cache(folder, identity, verify=False)
