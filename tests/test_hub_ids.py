"""Hugging Face Hub ids as model and data sources, offline, from a Hub cache these tests fill
themselves (the documented layout: blobs, snapshots/<commit> linking to them, refs/<revision>).

No network and no Ray: every test sets HF_HOME to its own folder and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amid_ray.config import (
    ConfigError,
    HubId,
    ModelsConfig,
    config_from_dict,
    hub_cache_dir,
    hub_id,
)
from amid_ray.data import DataError, build_prompt, load_examples
from amid_ray.lm_corpus import load_lm_blocks
from amid_ray.models import ModelError, load_causal_lm, load_tokenizer, logits_width
from amid_ray.preflight import check_data, check_models, read_model
from amid_ray.sources import absolute_paths, load_train_dev, model_path, teacher_source
from amid_ray.teacher_cache import source_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[1]


def fill_hub_cache(cache: Path, repo_type: str, repo_id: str, files: dict[str, bytes],
                   revision: str = "main") -> Path:
    """Put `files` (repository path -> bytes) into the Hub cache `cache` as the snapshot of
    `revision`, as a download would leave them; returns the snapshot folder."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def folder_files(folder: str | Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def dolly_rows(prefix: str, count: int) -> list[dict]:
    return [{"instruction": f"{prefix} question {i}", "context": "" if i % 2 else f"ctx {i}",
             "response": f"{prefix} answer {i}", "category": "open_qa"} for i in range(count)]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty, offline Hub cache under HF_HOME; returns the cache folder."""
    import datasets

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    # datasets fixed its cache folder when imported; keep its lock files out of the real home.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    cache = home / "hub"
    assert hub_cache_dir() == cache
    return cache


@pytest.fixture
def hub_world(hub, tiny_world) -> dict[str, Path]:
    """The tiny teacher as `acme/tiny-gpt2` (main) with the tiny student as its `v2` tag, the
    student alone as `acme/tiny-student`, and instruction data as `acme/dolly`."""
    return {
        "teacher": fill_hub_cache(hub, "model", "acme/tiny-gpt2",
                                  folder_files(tiny_world["teacher"])),
        "v2": fill_hub_cache(hub, "model", "acme/tiny-gpt2", folder_files(tiny_world["student"]),
                             revision="v2"),
        "student": fill_hub_cache(hub, "model", "acme/tiny-student",
                                  folder_files(tiny_world["student"])),
        "dolly": fill_hub_cache(hub, "dataset", "acme/dolly", {
            "README.md": b"---\nlicense: cc-by-sa-3.0\n---\n# acme dolly\n",
            "data/train.jsonl": jsonl(dolly_rows("train", 20)),
            "data/validation.jsonl": jsonl(dolly_rows("valid", 6)),
        }),
    }


# --------------------------------------------------------------------------- what is a Hub id


@pytest.mark.parametrize(("source", "repo", "revision", "part"), [
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", None, None),
    ("databricks/databricks-dolly-15k", "databricks/databricks-dolly-15k", None, None),
    ("org/name@v1.0", "org/name", "v1.0", None),
    ("org/name:validation", "org/name", None, "validation"),
    ("org/name@refs/pr/3:test", "org/name", "refs/pr/3", "test"),
    ("org/name@0123456789abcdef0123456789abcdef01234567", "org/name",
     "0123456789abcdef0123456789abcdef01234567", None),
    ("org/gguf-repo:model.Q4_K_M.gguf", "org/gguf-repo", None, "model.Q4_K_M.gguf"),
])
def test_org_name_with_revision_and_part_is_a_hub_id(source, repo, revision, part):
    assert hub_id(source) == HubId(source, repo, revision, part)


@pytest.mark.parametrize("source", [
    "demo", "smollm2", "derive", "s3://bucket/data", "plain-name", "./org/name", "../org/name",
    "/org/name", "~/org/name", "a/b/c", "data/train.jsonl", "models/teacher.gguf",
    "org--x/name", "org/na..me", "org/name-", "org/name@", "org/name:", "org/name:a/b",
])
def test_names_uris_paths_and_missing_files_are_not_hub_ids(source):
    assert hub_id(source) is None


def test_a_path_that_exists_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_id("acme/dolly") is not None
    (tmp_path / "acme" / "dolly").mkdir(parents=True)
    assert hub_id("acme/dolly") is None


def test_the_config_accepts_hub_ids_without_a_cache_or_network(hub):
    run = config_from_dict({
        "models": {"teacher": "acme/teacher@v1", "student": "acme/student"},
        "data": {"train": "acme/dolly", "dev": "acme/dolly:validation",
                 "lm_corpus": "acme/corpus"},
        "train": {"lm_weight": 1.0},
    })
    assert (run.models.teacher, run.data.dev, run.data.lm_corpus) == (
        "acme/teacher@v1", "acme/dolly:validation", "acme/corpus")
    # On the driver, Hub ids travel to the workers as written; paths become absolute.
    fixed = absolute_paths(run)
    assert (fixed.models.teacher, fixed.data.train) == ("acme/teacher@v1", "acme/dolly")


@pytest.mark.parametrize(("key", "value"), [
    ("data.train", "data/missing.jsonl"),
    ("data.dev", "./acme/dolly"),
    ("models.teacher", "smollm3"),
    ("data.lm_corpus", "corpus.txt"),
])
def test_a_missing_path_is_still_refused_at_config_time(key, value):
    section, field = key.split(".")
    raw = {section: {field: value}}
    if field == "lm_corpus":
        raw["train"] = {"lm_weight": 1.0}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    assert caught.value.key == key
    assert "no such file or folder" in str(caught.value)
    assert "Hugging Face Hub id 'org/name[@revision]'" in str(caught.value)


# --------------------------------------------------------------------------- models


def test_a_hub_model_loads_the_same_weights_as_its_folder(hub_world, tiny_world):
    model, tokenizer = load_causal_lm("acme/tiny-gpt2")
    stored = load_file(str(Path(tiny_world["teacher"]) / "model.safetensors"))
    state = model.state_dict()
    assert set(stored) <= set(state)
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
    assert model.config.n_layer == 2 and logits_width("acme/tiny-gpt2") == 50257
    text = "Name three colours."
    local_tokenizer = load_tokenizer(tiny_world["teacher"])
    assert tokenizer.encode(text) == local_tokenizer.encode(text)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256


def test_a_revision_selects_its_snapshot(hub_world, tiny_world):
    assert Path(model_path("acme/tiny-gpt2@v2", "student")) == hub_world["v2"]
    student, _ = load_causal_lm("acme/tiny-gpt2@v2")
    assert student.config.n_layer == 1 and student.config.n_embd == 16
    stored = load_file(str(Path(tiny_world["student"]) / "model.safetensors"))
    assert torch.equal(student.state_dict()["transformer.wte.weight"],
                       stored["transformer.wte.weight"])


def test_the_teacher_source_is_the_snapshot_folder_and_fingerprints_as_its_files(
        hub_world, tiny_world, hub):
    source = teacher_source(ModelsConfig(teacher="acme/tiny-gpt2", student="acme/tiny-student"))
    assert Path(source) == hub_world["teacher"]
    assert Path(source).is_relative_to(hub / "models--acme--tiny-gpt2" / "snapshots")
    # Identified by the stored bytes: the same files in a plain folder fingerprint the same.
    assert source_fingerprint(source, "float32") == source_fingerprint(tiny_world["teacher"],
                                                                       "float32")
    assert source_fingerprint(model_path("acme/tiny-gpt2@v2", "teacher"), "float32") != (
        source_fingerprint(source, "float32"))


def test_a_gguf_file_of_a_hub_repository_is_its_cached_file(hub):
    snapshot = fill_hub_cache(hub, "model", "acme/gguf", {"tiny.Q4_0.gguf": b"GGUF..."})
    assert Path(model_path("acme/gguf:tiny.Q4_0.gguf", "teacher")) == snapshot / "tiny.Q4_0.gguf"
    with pytest.raises(ModelError, match=r"names a \.gguf file of the repository, got 'w\.bin'"):
        model_path("acme/gguf:w.bin", "teacher")
    with pytest.raises(ModelError, match=r"has no config\.json.*'acme/gguf:<file>\.gguf'"):
        load_causal_lm("acme/gguf")


def test_a_model_missing_from_the_offline_cache_is_a_clear_error(hub_world, hub):
    with pytest.raises(ModelError) as caught:
        load_causal_lm("acme/absent@v3")
    message = str(caught.value)
    for part in ("'acme/absent@v3' is not a local path", "model 'acme/absent' at revision 'v3'",
                 f"cache {hub} lacks it", "HF_HUB_OFFLINE is set",
                 "`hf download acme/absent --revision v3`", "unset HF_HUB_OFFLINE"):
        assert part in message
    # Before Ray starts, the same is refused against the key that names it.
    with pytest.raises(ConfigError) as refused:
        read_model("acme/absent@v3", role="student", config_source="run.yaml")
    assert (refused.value.key, refused.value.value) == ("models.student", "acme/absent@v3")
    assert "HF_HUB_OFFLINE is set" in str(refused.value)


def test_a_hub_model_loads_in_a_fresh_offline_process(hub_world, hub):
    # huggingface_hub reads HF_HOME and HF_HUB_OFFLINE on import: check a process started with
    # them, as a Ray worker is, against the same weights.
    code = ("from amid_ray.models import load_causal_lm\n"
            "model, _ = load_causal_lm('acme/tiny-gpt2')\n"
            "print(float(model.transformer.wte.weight.double().sum()))\n")
    env = {**os.environ, "HF_HOME": str(hub.parent), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    stored = load_file(str(hub_world["teacher"] / "model.safetensors"))
    assert float(done.stdout.split()[-1]) == pytest.approx(
        float(stored["transformer.wte.weight"].double().sum()), rel=1e-12)


# --------------------------------------------------------------------------- data


def test_a_hub_dataset_reads_as_its_rows(hub_world):
    train = load_examples("acme/dolly")
    assert len(train) == 20
    rows = dolly_rows("train", 20)
    assert [e.response for e in train] == [row["response"] for row in rows]
    assert train[0].prompt == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\ntrain question 0\n\n### Input:\nctx 0\n\n### Response:\n")
    assert train[1].prompt == build_prompt("train question 1")
    assert train[19].source == "acme/dolly:20"
    dev = load_examples("acme/dolly:validation")
    assert [e.response for e in dev] == [f"valid answer {i}" for i in range(6)]


def test_train_and_dev_come_from_two_splits_of_one_repository(hub_world):
    run = config_from_dict({"data": {"train": "acme/dolly@main:train",
                                     "dev": "acme/dolly:validation", "max_train_examples": 15}})
    train, dev = load_train_dev(run.data, seed=0)
    assert (len(train), len(dev)) == (15, 6)
    assert train[0].response == "train answer 0" and dev[5].response == "valid answer 5"


def test_a_revision_of_a_hub_dataset_reads_its_own_files(hub_world, hub):
    fill_hub_cache(hub, "dataset", "acme/dolly", {"train.jsonl": jsonl(dolly_rows("old", 3))},
                   revision="v0")
    assert [e.response for e in load_examples("acme/dolly@v0")] == [
        "old answer 0", "old answer 1", "old answer 2"]
    assert len(load_examples("acme/dolly@main")) == 20


def test_a_bad_row_of_a_hub_dataset_is_named_by_its_row(hub):
    rows = dolly_rows("x", 5)
    del rows[2]["instruction"]
    fill_hub_cache(hub, "dataset", "acme/bad", {"train.jsonl": jsonl(rows)})
    with pytest.raises(DataError, match=r"^acme/bad: row 3: field 'instruction': expected a "
                                        r"string"):
        load_examples("acme/bad")


def test_a_missing_split_names_the_ones_there(hub_world):
    with pytest.raises(DataError, match=r"^acme/dolly:test: cannot be read as a dataset with "
                                        r"split 'test' .*\['train', 'validation'\]"):
        load_examples("acme/dolly:test")


def test_a_dataset_missing_from_the_offline_cache_is_a_clear_error(hub_world, hub):
    with pytest.raises(DataError) as caught:
        load_examples("acme/absent:validation")
    message = str(caught.value)
    for part in ("acme/absent:validation: ", "dataset 'acme/absent'", f"cache {hub} lacks it",
                 "HF_HUB_OFFLINE is set", "`hf download acme/absent --repo-type dataset`"):
        assert part in message


def test_an_lm_corpus_from_the_hub_gives_the_blocks_of_its_text(hub, tiny_world):
    tokenizer = load_tokenizer(tiny_world["teacher"])
    documents = [f"Document {i} says something about the number {i * 7}." for i in range(12)]
    fill_hub_cache(hub, "dataset", "acme/corpus",
                   {"train.jsonl": jsonl([{"text": text} for text in documents])})
    blocks = load_lm_blocks("acme/corpus", tokenizer, 16)
    stream = [i for text in documents for i in tokenizer.encode(text) + [tokenizer.eos_token_id]]
    expected = torch.tensor(stream[: len(stream) // 16 * 16]).view(-1, 16)
    assert torch.equal(blocks, expected)


# --------------------------------------------------------------------------- preflight


def test_a_run_of_hub_ids_passes_the_checks(hub_world):
    run = config_from_dict({
        "models": {"teacher": "acme/tiny-gpt2", "student": "acme/tiny-student"},
        "data": {"train": "acme/dolly", "dev": "acme/dolly:validation", "max_length": 96,
                 "max_prompt_length": 72},
        "train": {"batch_size": 4},
        "eval": {"max_new_tokens": 6},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }, "run.yaml")
    tokenizer = check_models(run)
    check_data(run, tokenizer)
    facts = read_model("acme/tiny-gpt2", role="teacher", config_source="run.yaml")
    assert (Path(facts.location), facts.layers, facts.positions) == (hub_world["teacher"], 2, 128)


def test_a_hub_dataset_the_offline_cache_lacks_is_refused_against_its_key(hub_world, tiny_world):
    run = config_from_dict({"data": {"train": tiny_world["train"], "dev": "acme/gone:dev"}},
                           "run.yaml")
    with pytest.raises(ConfigError) as refused:
        check_data(run, load_tokenizer(tiny_world["teacher"]))
    assert (refused.value.key, refused.value.value) == ("data.dev", "acme/gone:dev")
    assert "HF_HUB_OFFLINE is set" in str(refused.value)
