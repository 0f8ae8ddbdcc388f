"""Fault drills on a real local Ray: a run whose newest checkpoint was corrupted resumes from
the previous one (with a warning) instead of failing or starting over.

(The driver SIGKILLed three times is `test_search_resume.py`; a worker killed mid-run is
`test_train_e2e.py`.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from amid_ray.config import config_from_dict
from amid_ray.metrics import STEP, VAL_LOSS
from amid_ray.training import run_training
from amid_ray.worker import MODEL_DIR

pytestmark = pytest.mark.slow


def _run(world, storage: Path, max_steps: int):
    return config_from_dict({
        "name": "drill",
        "models": {"teacher": world["teacher"], "student": world["student"]},
        "data": {"train": world["train"], "dev": world["dev"], "max_length": 64,
                 "max_prompt_length": 48},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": max_steps, "seed": 4},
        "eval": {"every": 2, "num_examples": 4, "max_new_tokens": 4, "batch_size": 4},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "storage": str(storage),
                      "keep_checkpoints": 3, "max_failures": 1},
    }, "test")


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tiny_world, local_ray,
                                                                      tmp_path):
    first = run_training(_run(tiny_world, tmp_path, max_steps=4))
    assert [row[STEP] for row in first.history] == [2, 4]
    checkpoints = sorted(p for p in Path(first.result_dir).glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    weights = checkpoints[-1] / MODEL_DIR / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated

    # The same run started again: it resumes from step 2, not from the broken step 4, and
    # redoes steps 3-4 (the same batches and schedule, so the same round as before).
    resumed = run_training(_run(tiny_world, tmp_path, max_steps=4))
    assert [row[STEP] for row in resumed.history] == [2, 4]
    assert [row["restored_step"] for row in resumed.history] == [0, 2]
    assert resumed.history[1][VAL_LOSS] == pytest.approx(first.history[1][VAL_LOSS], rel=1e-6)
