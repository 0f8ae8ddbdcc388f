"""Shared test settings: quiet, local-only Ray and MLflow; paths to the shared eval data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The real instruction eval sets, beside the project (never copied into it).
SHARED_INSTRUCT = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct"


@pytest.fixture(scope="session", autouse=True)
def private_local_ray_lock(tmp_path_factory):
    """The CLI commands tests run in-process take a lock of their own, not the machine's: a
    test must never block (or be blocked by) a real search running beside the suite."""
    from amid_ray import cli
    from amid_ray.preflight import local_ray_lock

    lock = tmp_path_factory.mktemp("lock") / "local-ray.lock"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "_local_ray_lock", lambda run, address: local_ray_lock(lock))
        yield lock


@pytest.fixture(scope="session")
def instruct_dir() -> Path:
    if not SHARED_INSTRUCT.is_dir():
        pytest.skip(f"shared eval data not found at {SHARED_INSTRUCT} (../shared/data/instruct)")
    return SHARED_INSTRUCT


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, str]:
    """Tiny teacher and student GPT-2s (real GPT-2 tokenizer) and small demo-task data."""
    from amid_ray.data import load_examples
    from amid_ray.demo import fresh_gpt2, load_gpt2_tokenizer, write_demo_splits
    from amid_ray.models import save_model

    root = tmp_path_factory.mktemp("world")
    tokenizer = load_gpt2_tokenizer(root / "tokenizer")
    teacher = fresh_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=128, seed=1)
    student = fresh_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=128, seed=2)
    save_model(teacher, tokenizer, root / "teacher")
    save_model(student, tokenizer, root / "student")
    splits = write_demo_splits(root / "data", n_train=64, n_dev=12, n_test=8, seed=0)
    # A plain-text corpus for the language-modelling loss: one document per training item.
    corpus = root / "data" / "corpus.txt"
    corpus.write_text("\n\n".join(e.prompt + e.response
                                   for e in load_examples(splits["train"])))
    return {"teacher": str(root / "teacher"), "student": str(root / "student"),
            "train": str(splits["train"]), "dev": str(splits["dev"]), "corpus": str(corpus)}


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for one test module (2 CPUs, dashboard on 127.0.0.1)."""
    import ray

    from amid_ray import cluster

    started = cluster.connect(num_cpus=2, quiet=True)
    yield
    if started:
        ray.shutdown()


def _tiny_search(world, storage: Path, name: str, **search) -> dict:
    return {
        "name": name,
        "models": {"teacher": world["teacher"], "student": world["student"]},
        "data": {"train": world["train"], "dev": world["dev"], "max_length": 96,
                 "max_prompt_length": 72},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 6},
        "amid": {"alpha": -3.0, "lam": 0.1, "divergence": "kl", "order": "pr"},
        "eval": {"every": 2, "num_examples": 4, "max_new_tokens": 6, "batch_size": 4},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "storage": str(storage),
                      "keep_checkpoints": 1, "max_failures": 1},
        "search": {
            "num_samples": 4, "max_concurrent": 2, "seed": 0,
            # Tiny random models tie at ROUGE-L 0, so rungs compare the (continuous) dev loss.
            "scheduler": {"type": "asha", "grace_rounds": 1, "reduction_factor": 2,
                          "metric": "val_loss"},
            "baselines": ["kd"],
            "params": {
                "amid.alpha": {"type": "uniform", "low": -5.0, "high": 3.0},
                "amid.lam": {"type": "uniform", "low": 0.05, "high": 0.5},
                "amid.divergence": {"type": "categorical", "values": ["kl", "ab"]},
                "amid.ab_alpha": {"type": "uniform", "low": 0.1, "high": 0.9,
                                  "when": {"amid.divergence": "ab"}},
                "train.lr": {"type": "loguniform", "low": 3e-4, "high": 3e-3},
            },
            **search,
        },
    }


@pytest.fixture
def search_config():
    """Builds a small search-space file (as a dict) over `tiny_world`; `**search` overrides
    fields of its search section."""
    return _tiny_search
