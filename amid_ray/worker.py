"""The Ray Train per-worker loop: batches → teacher/student logits → AMiD loss → step → report.

`train_loop_per_worker(config)` is a plain function of the run configuration (as a dict); Ray
Train runs one copy per worker. Each worker loads the frozen teacher and the student, trains on
its shard of the data with DDP, and every `eval.every` steps runs an evaluation round (dev loss
and ROUGE-L of dev generations, generation sharded across workers) and reports the metrics, with
a checkpoint from rank 0, through `ray.train.report`.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from ray.train import Checkpoint

from amid_ray.config import RunConfig, config_from_dict
from amid_ray.data import (
    IGNORE_INDEX,
    InstructionExample,
    TrainingCollator,
    encode_example,
)
from amid_ray.evaluation import GenerationSettings, generate_responses, rouge_l
from amid_ray.lm_corpus import load_lm_blocks
from amid_ray.losses import amid_loss
from amid_ray.models import freeze_teacher, save_model
from amid_ray.sgo import AdaptiveSGOScheduler, ReplayBuffer, generate_student_batch
from amid_ray.sources import load_models, load_train_dev

#: Names of the metrics a worker reports each evaluation round (what Tune, the search and MLflow
#: read); spelled here, where they are produced, and imported everywhere else.
STEP = "step"
ROUGE_L = "rougeL"
BEST_ROUGE_L = "best_rougeL"
VAL_LOSS = "val_loss"
DEV_CE = "dev_ce"
TRAIN_LOSS = "train_loss"
DISTIL_LOSS = "distil_loss"
LM_LOSS = "lm_loss"
LEARNING_RATE = "lr"
TOKENS_PER_S = "tokens_per_s"
SGO_THRESHOLD = "sgo_threshold"
#: The metrics worth a curve per trial (numeric, one value per evaluation round).
CURVE_METRICS = (ROUGE_L, VAL_LOSS, DEV_CE, TRAIN_LOSS, DISTIL_LOSS, LM_LOSS, TOKENS_PER_S,
                 LEARNING_RATE, SGO_THRESHOLD)

TRAINER_STATE = "trainer_state.pt"
MODEL_DIR = "model"
#: The run's metric history up to a checkpoint, readable without loading optimizer state.
HISTORY_FILE = "history.json"
#: Offset of the corpus blocks' shuffling seed from the instruction data's.
LM_SEED_OFFSET = 7919


# --------------------------------------------------------------------------- batches


def micro_batches(
    num_examples: int, batch_size: int, *, seed: int, rank: int, world_size: int,
    items: str = "training examples",
) -> Iterator[list[int]]:
    """Endless stream of this worker's micro-batches (example indices).

    Each epoch is a fresh seeded permutation split evenly across workers (the tail that does not
    fill a batch on every worker is dropped), so the stream is a pure function of its arguments
    and a resumed run can skip ahead to where it stopped. `items` names what is batched in the
    error for too little data.
    """
    per_step = batch_size * world_size
    if num_examples < per_step:
        raise ValueError(
            f"{num_examples} {items} cannot fill one batch of {batch_size} on each of "
            f"{world_size} workers"
        )
    epoch = 0
    while True:
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, num_examples - per_step + 1, per_step):
            chunk = order[start : start + per_step]
            yield chunk[rank * batch_size : (rank + 1) * batch_size].tolist()
        epoch += 1


def response_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which logit positions predict a response token, and the token each predicts.

    The logits at position t predict token t+1, so position t counts when labels[t+1] is not
    ignored. Working on the unshifted logits avoids copying the `[batch, length, vocab]` tensor.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets != IGNORE_INDEX, targets


def learning_rate_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def _optimizer(student: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Biases and norm weights are 1-D; decaying them only hurts.
    decay = [p for p in student.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


# --------------------------------------------------------------------------- the loss


@dataclass
class StepLosses:
    total: torch.Tensor
    distil: torch.Tensor
    ce: torch.Tensor


def distillation_losses(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    run: RunConfig,
    *,
    autocast_dtype: torch.dtype | None,
) -> StepLosses:
    """(1 - kd_ratio)·CE + kd_ratio·AMiD on the response tokens of one batch."""
    mask, targets = response_mask(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    device_type = batch["input_ids"].device.type
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        student_logits = student(**inputs).logits
    distil = amid_loss(student_logits, teacher_logits, mask, **run.amid.loss_kwargs())
    ratio = run.train.kd_ratio
    if ratio < 1.0:
        rows = mask.reshape(-1).nonzero().squeeze(1)
        flat = student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, rows)
        ce = F.cross_entropy(flat.float(), targets.reshape(-1).index_select(0, rows))
    else:
        ce = distil.new_zeros(())
    return StepLosses(total=(1.0 - ratio) * ce + ratio * distil, distil=distil, ce=ce)


def language_modelling_loss(
    student: torch.nn.Module, block: torch.Tensor, *, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """Next-token cross-entropy of the student on `[batch, block_size]` corpus tokens."""
    # Targets shifted instead of logits: no copy of the [batch, length, vocab] tensor.
    targets = torch.full_like(block, IGNORE_INDEX)
    targets[:, :-1] = block[:, 1:]
    with torch.autocast(block.device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        logits = student(input_ids=block).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def corpus_blocks(run: RunConfig, tokenizer, world_size: int) -> torch.Tensor | None:
    """The LM corpus cut into `max_length` blocks, as many as the run consumes (or fewer,
    reused epoch after epoch); None without an LM loss."""
    if run.train.lm_weight == 0:
        return None
    per_step = run.train.grad_accum * run.train.batch_size * world_size
    return load_lm_blocks(run.data.lm_corpus, tokenizer, run.data.max_length,
                          max_blocks=run.train.max_steps * per_step)


# --------------------------------------------------------------------------- evaluation


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def evaluation_round(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer,
    dev_examples: list[InstructionExample],
    run: RunConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """Dev loss (AMiD, token mean) and ROUGE-L of generated answers on the first
    `eval.num_examples` dev items, split across workers."""
    mine = dev_examples[: run.eval.num_examples][rank::world_size]
    collate = TrainingCollator(tokenizer.pad_token_id)
    loss_sum, tokens = 0.0, 0.0
    was_training = student.training
    student.eval()
    with torch.no_grad():
        for start in range(0, len(mine), run.train.batch_size):
            encoded = [
                encode_example(tokenizer, example, max_length=run.data.max_length,
                               max_prompt_length=run.data.max_prompt_length)
                for example in mine[start : start + run.train.batch_size]
            ]
            batch = {k: v.to(device) for k, v in collate(encoded).items()}
            losses = distillation_losses(student, teacher, batch, run,
                                         autocast_dtype=autocast_dtype)
            count = float(response_mask(batch["labels"])[0].sum())
            loss_sum += losses.distil.item() * count
            tokens += count
    student.train(was_training)

    generated = mine
    rouge_sum = 0.0
    if generated:
        settings = GenerationSettings(
            max_new_tokens=run.eval.max_new_tokens,
            max_prompt_length=run.data.max_prompt_length,
            batch_size=run.eval.batch_size,
        )
        if run.eval.greedy:
            settings = settings.as_greedy()
        answers = generate_responses(
            student, tokenizer, [e.prompt for e in generated], settings,
            seed=run.eval.seed + rank,
        )
        rouge_sum = rouge_l(answers, [e.references for e in generated]) * len(generated)
    loss_sum, tokens, rouge_sum, items = _all_reduce_sum(
        [loss_sum, tokens, rouge_sum, float(len(generated))], device
    )
    return {"val_loss": loss_sum / max(tokens, 1.0), "rougeL": rouge_sum / max(items, 1.0)}


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _save_checkpoint(folder: Path, student, tokenizer, trainer_state: dict[str, Any]) -> None:
    save_model(student, tokenizer, folder / MODEL_DIR)
    torch.save(trainer_state, folder / TRAINER_STATE)
    (folder / HISTORY_FILE).write_text(json.dumps(trainer_state["history"]))


# --------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` is `RunConfig.to_dict()` with absolute paths."""
    run = config_from_dict(config, "run config")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if on_gpu else None

    seed = run.train.seed
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)

    # Per-tensor loading bars from every worker of every trial drown the search's own output.
    transformers.utils.logging.disable_progress_bar()
    teacher_dtype = {
        "auto": torch.bfloat16 if on_gpu else torch.float32,
        "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    }[run.models.teacher_dtype]
    teacher, student, tokenizer = load_models(run.models)
    teacher = freeze_teacher(teacher, teacher_dtype).to(device)

    train_examples, dev_examples = load_train_dev(run.data, seed)
    encoded_train = [
        encode_example(tokenizer, example, max_length=run.data.max_length,
                       max_prompt_length=run.data.max_prompt_length)
        for example in train_examples
    ]
    collate = TrainingCollator(tokenizer.pad_token_id)
    lm_blocks = corpus_blocks(run, tokenizer, world_size)

    checkpoint = ray.train.get_checkpoint()
    trainer_state: dict[str, Any] | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            student = type(student).from_pretrained(Path(folder) / MODEL_DIR)
            trainer_state = torch.load(Path(folder) / TRAINER_STATE, weights_only=False)
    student.train()
    model = ray.train.torch.prepare_model(student)
    bare_student = model.module if hasattr(model, "module") else model
    optimizer = _optimizer(model, run.train.lr, run.train.weight_decay)

    sgo = run.sgo
    scheduler = AdaptiveSGOScheduler(sgo.init_threshold, loss_eps=sgo.loss_eps,
                                     replay_ratio=sgo.replay_ratio,
                                     replay_schedule=sgo.replay_schedule, seed=seed + rank)
    replay = ReplayBuffer(sgo.replay_capacity, seed=seed + rank)
    step, history = 0, []
    if trainer_state is not None:  # resume exactly where the checkpoint left off
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["sgo_scheduler"][rank])
        replay.load_state_dict(trainer_state["replay"][rank])
        _restore_rng(trainer_state["rng"][rank])
        step, history = trainer_state["step"], trainer_state["history"]
    restored_step = step

    batches = micro_batches(len(encoded_train), run.train.batch_size, seed=seed, rank=rank,
                            world_size=world_size)
    lm_batches = None
    if lm_blocks is not None:
        lm_batches = micro_batches(
            len(lm_blocks), run.train.batch_size, seed=seed + LM_SEED_OFFSET, rank=rank,
            world_size=world_size,
            items=f"blocks of {run.data.max_length} tokens of {Path(run.data.lm_corpus).name}",
        )
    for _ in range(step * run.train.grad_accum):  # skip what the checkpointed run consumed
        next(batches)
        if lm_batches is not None:
            next(lm_batches)

    window = _fresh_window()
    while step < run.train.max_steps:
        factor = learning_rate_factor(step, warmup=run.train.warmup_steps,
                                      total=run.train.max_steps, schedule=run.train.schedule)
        for group in optimizer.param_groups:
            group["lr"] = run.train.lr * factor
        optimizer.zero_grad(set_to_none=True)
        for _ in range(run.train.grad_accum):
            indices = next(batches)
            encoded = [encoded_train[i] for i in indices]
            if sgo.enabled:
                encoded = _student_generated_or_not(
                    encoded, [train_examples[i] for i in indices], bare_student, tokenizer,
                    run, scheduler, replay, seed=seed + 1000 * step + rank,
                    progress=step / run.train.max_steps,
                )
            batch = {k: v.to(device) for k, v in collate(encoded).items()}
            losses = distillation_losses(model, teacher, batch, run,
                                         autocast_dtype=autocast_dtype)
            (losses.total / run.train.grad_accum).backward()
            window["loss"] += losses.total.item() / run.train.grad_accum
            window["distil"] += losses.distil.item() / run.train.grad_accum
            window["tokens"] += int(batch["attention_mask"].sum())
            if lm_batches is not None:
                # Its own forward/backward pair: the distillation graph is freed first, and DDP
                # sees one backward per forward.
                block = lm_blocks[next(lm_batches)].to(device)
                lm = language_modelling_loss(model, block, autocast_dtype=autocast_dtype)
                (run.train.lm_weight * lm / run.train.grad_accum).backward()
                window["loss"] += run.train.lm_weight * lm.item() / run.train.grad_accum
                window["lm"] += lm.item() / run.train.grad_accum
        if run.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), run.train.max_grad_norm)
        optimizer.step()
        step += 1
        window["steps"] += 1

        if step % run.eval.every == 0 or step == run.train.max_steps:
            elapsed = time.perf_counter() - window["start"]
            tokens = _all_reduce_sum([float(window["tokens"])], device)[0]
            metrics = {
                "step": step,
                "epoch": step * run.train.grad_accum * run.train.batch_size * world_size
                / len(encoded_train),
                "train_loss": window["loss"] / window["steps"],
                "distil_loss": window["distil"] / window["steps"],
                **({"lm_loss": window["lm"] / window["steps"]} if lm_batches is not None else {}),
                "lr": run.train.lr * factor,
                "tokens_per_s": tokens / elapsed,
                "sgo_threshold": scheduler.threshold,
                "restored_step": restored_step,
                "node_id": ray.get_runtime_context().get_node_id(),
            }
            metrics |= evaluation_round(
                bare_student, teacher, tokenizer, dev_examples, run, rank=rank,
                world_size=world_size, device=device, autocast_dtype=autocast_dtype,
            )
            # The running best is what a search ranks trials by (the kept checkpoint is the best).
            metrics["best_rougeL"] = max([metrics["rougeL"]] + [h["rougeL"] for h in history])
            if sgo.enabled:
                scheduler.observe_eval(metrics["val_loss"])
            history.append(metrics)
            _report(metrics, history, step, bare_student, tokenizer, optimizer, scheduler,
                    replay, rank=rank, device=device)
            window = _fresh_window()


def _fresh_window() -> dict[str, float]:
    """Running sums of the steps since the last report."""
    return {"loss": 0.0, "distil": 0.0, "lm": 0.0, "tokens": 0, "start": time.perf_counter(),
            "steps": 0}


def _gather(value: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered
    return [value]


def _report(metrics, history, step, student, tokenizer, optimizer, scheduler, replay, *,
            rank: int, device: torch.device) -> None:
    # Per-worker states (SGO, replay buffer, RNG) are gathered so rank 0 can checkpoint them all.
    scheduler_states = _gather(scheduler.state_dict())
    replay_states = _gather(replay.state_dict())
    rng_states = _gather(_rng_state())
    with tempfile.TemporaryDirectory(prefix="amid-ckpt-") as folder:
        checkpoint = None
        if rank == 0:
            trainer_state = {
                "step": step,
                "history": history,
                "optimizer": optimizer.state_dict(),
                "sgo_scheduler": scheduler_states,
                "replay": replay_states,
                "rng": rng_states,
            }
            _save_checkpoint(Path(folder), student, tokenizer, trainer_state)
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def _student_generated_or_not(encoded, examples, student, tokenizer, run, scheduler, replay, *,
                              seed: int, progress: float):
    """The SGO choice of one micro-batch: ground truth, fresh student answers, or replay."""
    choice = scheduler.choose(can_replay=len(replay) >= len(encoded), progress=progress)
    if choice == "ground_truth":
        return encoded
    if choice == "replay":
        return replay.sample(len(encoded))
    generated = generate_student_batch(
        student, tokenizer, examples, max_length=run.data.max_length,
        max_prompt_length=run.data.max_prompt_length, max_new_tokens=run.sgo.max_new_tokens,
        seed=seed,
    )
    replay.push(generated)
    return generated
