"""How the demo teacher and student are trained: cross-entropy on response tokens.

AdamW with the worker's own data order (`micro_batches`) and warm-up + cosine learning-rate
schedule (`learning_rate_factor`), on one process.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import GPT2LMHeadModel

from amid_ray.data import IGNORE_INDEX, TrainingCollator
from amid_ray.schedule import learning_rate_factor, micro_batches

Report = Callable[[str], None]


@dataclass(frozen=True)
class TrainingRun:
    """A cross-entropy run on response tokens: AdamW, linear warm-up, cosine decay to zero."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    seed: int
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    log_every: int = 100


def response_loss(model: GPT2LMHeadModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens.

    The LM head runs only at positions whose next token is a response token: the prompt is most
    of every sequence and a 50257-way head on it would cost more than the rest of the model.
    """
    hidden = model.transformer(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits, targets[scored])


def train_on_responses(model: GPT2LMHeadModel, encoded: Sequence[dict[str, list[int]]],
                       run: TrainingRun, pad_token_id: int, report: Report) -> None:
    """Train `model` in place with cross-entropy on response tokens; seeded and repeatable.

    Batch order and any dropout draw from `run.seed`; the caller's torch RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        _train_loop(model, encoded, run, pad_token_id, report)


def _train_loop(model: GPT2LMHeadModel, encoded: Sequence[dict[str, list[int]]],
                run: TrainingRun, pad_token_id: int, report: Report) -> None:
    collate = TrainingCollator(pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.learning_rate,
                                  weight_decay=run.weight_decay, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(
        step, warmup=run.warmup_steps, total=run.steps, schedule="cosine"))
    batches = micro_batches(len(encoded), run.batch_size, seed=run.seed, rank=0, world_size=1,
                            items="demo training examples")
    model.train()
    started = time.monotonic()
    for step, indices in enumerate(itertools.islice(batches, run.steps), start=1):
        loss = response_loss(model, collate([encoded[index] for index in indices]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.max_grad_norm)
        optimizer.step()
        schedule.step()
        if step % run.log_every == 0 or step == run.steps:
            report(f"step {step}/{run.steps} loss {loss.item():.3f} "
                   f"({time.monotonic() - started:.0f} s)")
    model.eval()
