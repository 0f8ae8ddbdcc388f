"""The distillation worker in this process, without Ray (`train_session.LocalSession`): it reports
every evaluation round with a checkpoint, and a run resumed from a checkpoint ends with exactly
the weights of the run that was never interrupted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amid_ray.config import config_from_dict
from amid_ray.metrics import ROUGE_L, STEP, VAL_LOSS
from amid_ray.train_session import LocalSession
from amid_ray.worker import MODEL_DIR, TRAINER_STATE, DistillationWorker


def _run(world, max_steps: int):
    return config_from_dict({
        "name": "local",
        "models": {"teacher": world["teacher"], "student": world["student"]},
        "data": {"train": world["train"], "dev": world["dev"], "max_length": 96,
                 "max_prompt_length": 72},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": max_steps, "seed": 3},
        "amid": {"alpha": -3.0, "lam": 0.1, "divergence": "kl", "order": "pr"},
        "eval": {"every": 2, "num_examples": 4, "max_new_tokens": 4, "batch_size": 4},
    }, "test")


class Recorder:
    """Keeps every round's metrics and a copy of each checkpoint folder."""

    def __init__(self, root: Path):
        self.root, self.rounds = root, []

    def __call__(self, metrics, checkpoint):
        self.rounds.append(metrics)
        shutil.copytree(checkpoint, self.root / f"step-{metrics[STEP]}")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / MODEL_DIR / "model.safetensors")


def test_a_local_run_reports_every_round_and_resumes_exactly(tiny_world, tmp_path):
    straight = Recorder(tmp_path / "straight")
    DistillationWorker(_run(tiny_world, 4), LocalSession(straight)).train()
    assert [m[STEP] for m in straight.rounds] == [2, 4]
    for metrics in straight.rounds:
        assert metrics["node_id"] == "local" and metrics["restored_step"] == 0
        assert 0.0 <= metrics[ROUGE_L] <= 100.0 and metrics[VAL_LOSS] > 0
    assert (tmp_path / "straight" / "step-2" / f"{TRAINER_STATE}.json").is_file()

    resumed = Recorder(tmp_path / "resumed")
    DistillationWorker(_run(tiny_world, 4),
                       LocalSession(resumed, restore_from=tmp_path / "straight" / "step-2")
                       ).train()
    assert [m[STEP] for m in resumed.rounds] == [4]
    assert resumed.rounds[0]["restored_step"] == 2
    assert resumed.rounds[0][VAL_LOSS] == pytest.approx(straight.rounds[1][VAL_LOSS], rel=1e-6)
    before, after = (_weights(tmp_path / name / "step-4") for name in ("straight", "resumed"))
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    # And the resumed run did train: its weights moved from the checkpoint it started at.
    start = _weights(tmp_path / "straight" / "step-2")
    assert any(not torch.equal(start[name], after[name]) for name in after)

    # Restored at its very end, a run trains nothing and reports its last round again (so a
    # search that lost track of it learns how it ended), without a new checkpoint.
    again = []
    DistillationWorker(_run(tiny_world, 4),
                       LocalSession(lambda m, folder: again.append((m, folder)),
                                    restore_from=tmp_path / "straight" / "step-4")).train()
    assert again == [(straight.rounds[-1], None)]


def test_a_report_that_raises_ends_the_run(tiny_world):
    class EarlyStop(Exception):
        pass

    seen = []

    def stop_after_first(metrics, checkpoint):
        seen.append(metrics[STEP])
        raise EarlyStop

    with pytest.raises(EarlyStop):
        DistillationWorker(_run(tiny_world, 6), LocalSession(stop_after_first)).train()
    assert seen == [2]
