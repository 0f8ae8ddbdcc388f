"""The worker's pure parts: data order, response positions, learning-rate schedule, the loss."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from amid_ray.config import config_from_dict
from amid_ray.data import IGNORE_INDEX, response_mask
from amid_ray.losses import amid_token_losses
from amid_ray.schedule import examples_read, learning_rate_factor, micro_batches
from amid_ray.worker import (
    Objective,
    distillation_losses,
    language_modelling_loss,
)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_micro_batches_partition_each_epoch_across_workers():
    streams = [micro_batches(10, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    first_epoch = [take(s, 2) for s in streams]  # 2 steps × 2 workers × 2 = 8 of 10 examples
    seen = [i for worker in first_epoch for batch in worker for i in batch]
    assert len(seen) == 8 and len(set(seen)) == 8
    # A pure function of its arguments: a resumed run skipping k batches sees the same stream.
    again = micro_batches(10, 2, seed=3, rank=1, world_size=2)
    take(again, 1)
    assert next(again) == first_epoch[1][1]
    # The next epoch is a different permutation.
    assert take(streams[0], 2) != first_epoch[0]


@pytest.mark.parametrize(("examples", "batch", "workers", "micro_steps"), [
    (50, 3, 2, 4), (50, 4, 1, 12), (50, 4, 1, 13), (10, 2, 2, 3)])
def test_examples_read_are_what_every_workers_stream_yields(examples, batch, workers,
                                                            micro_steps):
    streams = [micro_batches(examples, batch, seed=7, rank=r, world_size=workers)
               for r in range(workers)]
    seen = {i for s in streams for step in take(s, micro_steps) for i in step}
    read = examples_read(examples, batch, seed=7, world_size=workers, micro_steps=micro_steps)
    # Within the first epoch exactly the stream's examples; past it (50 // 4 = 12 steps, and
    # 10 // 4 = 2), every example, since the next epochs' orders reach any of them.
    assert read == (sorted(seen) if micro_steps <= examples // (batch * workers)
                    else list(range(examples)))
    assert set(read) >= seen


def test_micro_batches_refuse_too_little_data():
    with pytest.raises(ValueError, match="3 training examples cannot fill one batch of 2 on each"):
        next(micro_batches(3, 2, seed=0, rank=0, world_size=2))
    with pytest.raises(ValueError, match="3 blocks of 96 tokens of owt.txt cannot fill one"):
        next(micro_batches(3, 2, seed=0, rank=0, world_size=2,
                           items="blocks of 96 tokens of owt.txt"))


def test_response_mask_marks_positions_predicting_response_tokens():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX]])
    mask, targets = response_mask(labels)
    assert mask.tolist() == [[False, True, True, True, False, False]]
    assert targets[mask].tolist() == [7, 8, 9]


def test_learning_rate_schedules():
    assert learning_rate_factor(0, warmup=4, total=20, schedule="cosine") == 0.25
    assert learning_rate_factor(3, warmup=4, total=20, schedule="cosine") == 1.0
    assert learning_rate_factor(4, warmup=4, total=20, schedule="cosine") == 1.0
    assert math.isclose(learning_rate_factor(12, warmup=4, total=20, schedule="cosine"), 0.5)
    assert math.isclose(learning_rate_factor(12, warmup=4, total=20, schedule="linear"), 0.5)
    assert learning_rate_factor(19, warmup=0, total=20, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="cosine"):
        learning_rate_factor(3, warmup=0, total=20, schedule="cosin")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kd_ratio", [1.0, 0.25])
def test_distillation_losses_match_a_direct_computation(kd_ratio, fused):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    teacher, student = GPT2LMHeadModel(config).eval(), GPT2LMHeadModel(config)
    input_ids = torch.randint(0, 50, (2, 7))
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[1, 6] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": labels}
    run = config_from_dict({"train": {"kd_ratio": kd_ratio, "fused_loss": fused},
                            "amid": {"alpha": 0.5, "lam": 0.3, "order": "qr"}})
    objective = Objective.of(run)
    assert objective.fused is fused
    losses = distillation_losses(student, teacher, batch, objective, autocast_dtype=None)
    losses.total.backward()
    fused_grad = student.transformer.h[0].mlp.c_fc.weight.grad.clone()
    student.zero_grad()

    # Independently: full logits of both models, the loss on the shifted response positions.
    s_logits = student(input_ids).logits[:, :-1]
    t_logits = teacher(input_ids).logits[:, :-1].detach()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    distil = amid_token_losses(s_logits, t_logits, alpha=0.5, lam=0.3, order="qr")[mask].mean()
    ce = torch.nn.functional.cross_entropy(s_logits[mask], targets[mask])
    direct_total = (1 - kd_ratio) * ce + kd_ratio * distil
    torch.testing.assert_close(losses.distil, distil.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.total, direct_total, rtol=1e-5, atol=1e-6)
    direct_total.backward()
    torch.testing.assert_close(fused_grad, student.transformer.h[0].mlp.c_fc.weight.grad,
                               rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # evaluation: the cross-entropy whatever the objective weighs
        evaluated = distillation_losses(student, teacher, batch, objective, autocast_dtype=None,
                                        with_ce=True)
    torch.testing.assert_close(evaluated.ce, ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(evaluated.total, direct_total.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="with_ce is for evaluation"):
        distillation_losses(student, teacher, batch, objective, autocast_dtype=None,
                            with_ce=True)


@pytest.mark.parametrize("tied", [True, False])
def test_language_modelling_loss_is_next_token_cross_entropy(tied):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        tie_word_embeddings=tied)
    student = GPT2LMHeadModel(config).eval()
    block = torch.randint(0, 50, (3, 9))
    log_probs = torch.log_softmax(student(block).logits.double(), dim=-1)
    direct = -log_probs[:, :-1].gather(-1, block[:, 1:, None]).mean()
    grads = {}
    for fused in (False, True):  # full logits, and a chunk of hidden states at a time
        student.zero_grad()
        loss = language_modelling_loss(student, block, autocast_dtype=None, fused=fused)
        torch.testing.assert_close(loss.double(), direct, rtol=1e-5, atol=1e-6)
        # Hugging Face's own shifted loss agrees.
        torch.testing.assert_close(loss, student(block, labels=block).loss, rtol=1e-5,
                                   atol=1e-6)
        loss.backward()
        grads[fused] = {n: p.grad.clone() for n, p in student.named_parameters()}
    assert "transformer.wte.weight" in grads[True]
    for name, want in grads[False].items():
        scale = float(want.abs().max())
        assert float((grads[True][name] - want).abs().max()) <= 1e-5 * scale + 1e-12, name


def test_progress_line_reports_step_loss_speed_and_eta(capsys, monkeypatch):
    from amid_ray import worker as worker_module
    from amid_ray.worker import DistillationWorker, _Window

    bare = DistillationWorker.__new__(DistillationWorker)  # only what the line reads
    bare.run = config_from_dict({"train": {"max_steps": 100}})
    bare.rank, bare.step = 0, 40
    window = _Window(loss=2.5, tokens=8000, steps=10, start=100.0)
    monkeypatch.setattr(worker_module.time, "perf_counter", lambda: 120.0)  # 10 steps in 20 s
    bare._log_progress(window)
    line = capsys.readouterr().out
    # 60 steps left at 2 s a step: 2.0 minutes; 8000 tokens in 20 s.
    assert line.startswith("[amid-ray] step 40/100  loss 0.2500  400 tokens/s")
    assert "ETA 2.0 min" in line
    bare.rank = 1
    bare._log_progress(window)
    assert capsys.readouterr().out == ""
