"""The Ray Train per-worker loop: batches → teacher/student logits → AMiD loss → step → report.

`train_loop_per_worker(config)` is a plain function of the run configuration (as a dict); Ray
Train runs one copy per worker. (`DistillationWorker(run, LocalSession(...))` runs one in this
process without Ray: `train_session`.) It reads in three parts, as torchtune's recipes do:

- `DistillationWorker.__init__` (setup): the frozen teacher, the student under DDP, the data
  streams, the optimizer, the objective, and the state a checkpoint restores;
- `_optimizer_step`: one optimizer step over `train.grad_accum` micro-batches (gradients
  all-reduced once, on the step's last backward pass);
- `_evaluation_round` + `_report`: every `eval.every` steps, dev loss, dev cross-entropy and
  ROUGE-L of dev generations (generation split across workers), reported with a rank-0
  checkpoint through `ray.train.report`.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

from amid_ray.cache_plan import encode_all, open_run_caches, plan_caches
from amid_ray.config import RunConfig, config_from_dict
from amid_ray.data import (
    IGNORE_INDEX,
    InstructionExample,
    TrainingCollator,
    response_mask,
)
from amid_ray.evaluation import GenerationSettings, generate_responses, rouge_l
from amid_ray.fused_loss import (
    TeacherHead,
    TeacherRows,
    fused_amid_loss,
    fused_cross_entropy,
    hidden_and_head,
)
from amid_ray.lm_corpus import load_lm_blocks
from amid_ray.losses import AMiDSettings, amid_loss
from amid_ray.metrics import (
    BEST_ROUGE_L,
    DEV_CE,
    DISTIL_LOSS,
    LEARNING_RATE,
    LM_LOSS,
    ROUGE_L,
    SGO_REFERENCE_CE,
    SGO_THRESHOLD,
    STEP,
    TAID_T,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
)
from amid_ray.models import freeze_teacher, save_model
from amid_ray.schedule import learning_rate_factor, micro_batches
from amid_ray.sgo import (
    AdaptiveSGOScheduler,
    MixedSGOScheduler,
    ReplayBuffer,
    generate_student_batch,
)
from amid_ray.sources import load_models, load_student, load_train_dev, teacher_source
from amid_ray.state_file import load_state, save_state
from amid_ray.system_metrics import SystemMetricsTarget, monitoring
from amid_ray.teacher_cache import Encoded, TeacherCache
from amid_ray.train_session import RayTrainSession, TrainSession

#: The trainer state of a checkpoint: `trainer_state.json` + `trainer_state.safetensors`
#: (`state_file`: no pickle, so a checkpoint on shared storage cannot run code when loaded).
TRAINER_STATE = "trainer_state"
MODEL_DIR = "model"
#: The run's metric history up to a checkpoint, readable without loading optimizer state.
HISTORY_FILE = "history.json"
#: Per-dev-item ROUGE-L of a checkpoint's evaluation round (for bootstrap intervals).
DEV_SCORES_FILE = "dev_scores.json"
#: Offset of the corpus blocks' shuffling seed from the instruction data's.
LM_SEED_OFFSET = 7919


# --------------------------------------------------------------------------- batches


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


@dataclass(frozen=True)
class Objective:
    """A run's distillation objective, built once per worker:
    `(1 - kd_ratio)·CE + kd_ratio·AMiD(settings)` on the response tokens."""

    settings: AMiDSettings
    kd_ratio: float = 1.0
    #: Hidden states in, logits formed per chunk of response positions (else full logits).
    fused: bool = True

    @classmethod
    def of(cls, run: RunConfig) -> Objective:
        return cls(run.amid.settings(), run.train.kd_ratio, run.train.fused_loss)

    def at_lam(self, lam: float) -> Objective:
        """The same objective with the assistant's teacher weight moved (TAID's schedule)."""
        return replace(self, settings=replace(self.settings, lam=lam))


@dataclass
class StepLosses:
    total: torch.Tensor
    distil: torch.Tensor
    ce: torch.Tensor


def distillation_losses(
    student: torch.nn.Module,
    teacher: torch.nn.Module | TeacherRows,
    batch: dict[str, torch.Tensor],
    objective: Objective,
    *,
    autocast_dtype: torch.dtype | None,
    with_ce: bool = False,
) -> StepLosses:
    """The objective on the response tokens of one batch, from both models' hidden states: the
    fused loss forms logits only at positions that predict a response token, a chunk at a time
    (`fused_loss.fused_amid_loss`), so no `[batch, length, vocab]` tensor is ever held.

    `teacher` is the live teacher model, or the batch's teacher read from a cache
    (`SparseTeacherRows`: no teacher forward pass at all).

    The cross-entropy is computed when the objective weighs it; `with_ce` (evaluation, without
    gradient) asks for it whatever the weight.
    """
    if with_ce and torch.is_grad_enabled():
        raise ValueError("with_ce is for evaluation: call it under torch.no_grad()")
    live = isinstance(teacher, torch.nn.Module)
    if not objective.fused:
        if not live:
            raise ValueError("a cached teacher feeds the fused loss only (train.fused_loss)")
        return _losses_from_logits(student, teacher, batch, objective,
                                   autocast_dtype=autocast_dtype, with_ce=with_ce)
    mask, targets = response_mask(batch["labels"])
    rows = mask.reshape(-1).nonzero().squeeze(1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    device_type = batch["input_ids"].device.type
    teacher_rows = teacher
    if live:
        with torch.no_grad():
            taught = hidden_and_head(teacher, **inputs)
        teacher_rows = TeacherHead(taught.hidden.reshape(-1, taught.hidden.shape[-1]),
                                   taught.weight, taught.bias)
    ratio = objective.kd_ratio
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        learner = hidden_and_head(student, **inputs)
        losses = fused_amid_loss(
            learner.hidden.reshape(-1, learner.hidden.shape[-1]), learner.weight, learner.bias,
            teacher_rows, rows, targets.reshape(-1), settings=objective.settings,
            kd_ratio=0.0 if with_ce else ratio,  # 0: the cross-entropy is computed too
        )
    if with_ce:
        return StepLosses(total=(1.0 - ratio) * losses.ce + ratio * losses.distil,
                          distil=losses.distil, ce=losses.ce)
    return StepLosses(total=losses.total, distil=losses.distil, ce=losses.ce)


def _losses_from_logits(student, teacher, batch, objective: Objective, *,
                        autocast_dtype: torch.dtype | None, with_ce: bool) -> StepLosses:
    """The same objective on both models' full logits (`train.fused_loss: false`): for models
    that transform logits after their head, and as the reference the fused path is checked by."""
    mask, targets = response_mask(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    device_type = batch["input_ids"].device.type
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        student_logits = student(**inputs).logits
    distil = amid_loss(student_logits, teacher_logits, mask, **objective.settings.as_kwargs())
    ratio = objective.kd_ratio
    if ratio < 1.0 or with_ce:
        rows = mask.reshape(-1).nonzero().squeeze(1)
        flat = student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, rows)
        ce = F.cross_entropy(flat.float(), targets.reshape(-1).index_select(0, rows))
    else:
        ce = distil.new_zeros(())
    return StepLosses(total=(1.0 - ratio) * ce + ratio * distil, distil=distil, ce=ce)


def language_modelling_loss(
    student: torch.nn.Module, block: torch.Tensor, *, autocast_dtype: torch.dtype | None,
    fused: bool = True,
) -> torch.Tensor:
    """Next-token cross-entropy of the student on `[batch, block_size]` corpus tokens: from its
    hidden states a chunk of positions at a time (`fused_cross_entropy`), or from its full
    logits with `fused=False` (`train.fused_loss: false`)."""
    # Targets shifted instead of logits: no copy of the [batch, length, vocab] tensor.
    targets = torch.full_like(block, IGNORE_INDEX)
    targets[:, :-1] = block[:, 1:]
    targets = targets.reshape(-1)
    with torch.autocast(block.device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        if not fused:
            logits = student(input_ids=block).logits
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets,
                                   ignore_index=IGNORE_INDEX)
        learner = hidden_and_head(student, input_ids=block)
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        return fused_cross_entropy(learner.hidden.reshape(-1, learner.hidden.shape[-1]),
                                   learner.weight, learner.bias, rows, targets)


def corpus_blocks(run: RunConfig, tokenizer, world_size: int) -> torch.Tensor | None:
    """The LM corpus cut into `max_length` blocks, as many as the run consumes (or fewer,
    reused epoch after epoch); None without an LM loss."""
    if run.train.lm_weight == 0:
        return None
    per_step = run.train.grad_accum * run.train.batch_size * world_size
    return load_lm_blocks(run.data.lm_corpus, tokenizer, run.data.max_length,
                          max_blocks=run.train.max_steps * per_step)


# --------------------------------------------------------------------------- evaluation


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _gather(value: Any) -> list[Any]:
    """`value` from every rank, in rank order."""
    if _distributed():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered
    return [value]


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(tensor)
    return tensor.tolist()


def dev_losses(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    tokenizer,
    encoded_dev: list[Encoded],
    run: RunConfig,
    objective: Objective,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    cache: TeacherCache | None = None,
) -> dict[str, float]:
    """Token means over this round's dev items (split across workers) of the AMiD loss
    (`val_loss`) and of the student's next-token cross-entropy on the reference answers
    (`dev_ce`, what adaptive SGO watches). `encoded_dev` is the dev set as `encode_all` gives
    it (encoded once per run). With `cache` (the dev set's teacher cache) the teacher is read
    from it instead of run."""
    mine = list(range(min(run.eval.num_examples, len(encoded_dev))))[rank::world_size]
    collate = TrainingCollator(tokenizer.pad_token_id)
    distil_sum, ce_sum, tokens = 0.0, 0.0, 0.0
    was_training = student.training
    student.eval()
    with torch.no_grad():
        for start in range(0, len(mine), run.train.batch_size):
            indices = mine[start : start + run.train.batch_size]
            batch = {k: v.to(device) for k, v in collate([encoded_dev[i] for i in indices]).items()}
            taught = teacher if cache is None else cache.batch_teacher(
                indices, response_mask(batch["labels"])[0])
            losses = distillation_losses(student, taught, batch, objective,
                                         autocast_dtype=autocast_dtype, with_ce=True)
            count = float(response_mask(batch["labels"])[0].sum())
            distil_sum += losses.distil.item() * count
            ce_sum += losses.ce.item() * count
            tokens += count
    student.train(was_training)
    distil_sum, ce_sum, tokens = _all_reduce_sum([distil_sum, ce_sum, tokens], device)
    return {VAL_LOSS: distil_sum / max(tokens, 1.0), DEV_CE: ce_sum / max(tokens, 1.0)}


def dev_rouge_l(
    student: torch.nn.Module,
    tokenizer,
    dev_examples: list[InstructionExample],
    run: RunConfig,
    *,
    rank: int,
) -> list[float]:
    """ROUGE-L of the student's answer to each of this round's dev prompts, in dev order on
    every worker (generation is split across workers; the scores are gathered)."""
    items = dev_examples[: run.eval.num_examples]
    mine = items[rank::_world_size()]
    scores: list[float] = []
    if mine:
        settings = GenerationSettings(
            no_repeat_ngram_size=run.eval.no_repeat_ngram_size,
            max_new_tokens=run.eval.max_new_tokens,
            max_prompt_length=run.data.max_prompt_length,
            batch_size=run.eval.batch_size,
        )
        if run.eval.greedy:
            settings = settings.as_greedy()
        answers = generate_responses(
            student, tokenizer, [e.prompt for e in mine], settings, seed=run.eval.seed + rank,
        )
        scores = [rouge_l([answer], [e.references]) for answer, e in zip(answers, mine,
                                                                           strict=True)]
    per_rank = _gather(scores)  # rank r holds items r, r + world, r + 2·world, ...
    ordered = [0.0] * len(items)
    for r, rank_scores in enumerate(per_rank):
        ordered[r::len(per_rank)] = rank_scores
    return ordered


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    # Plain lists and tensors only, as a state file holds (`state_file`).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state()}


def _restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


@dataclass
class TrainerState:
    """Everything a checkpoint restores besides the model: where the run is and how it got there.

    The per-worker parts (SGO scheduler, replay buffer, RNG) are gathered from every rank so
    rank 0 can checkpoint them all.
    """

    step: int
    history: list[dict[str, Any]]
    optimizer: dict[str, Any]
    sgo_scheduler: list[dict[str, Any]]
    replay: list[dict[str, Any]]
    taid: list[dict[str, Any]] | None
    rng: list[dict[str, Any]]

    def save(self, folder: Path, student, tokenizer, dev_scores: list[float]) -> None:
        save_model(student, tokenizer, folder / MODEL_DIR)
        save_state(vars(self), folder / TRAINER_STATE)
        (folder / HISTORY_FILE).write_text(json.dumps(self.history))
        (folder / DEV_SCORES_FILE).write_text(json.dumps({ROUGE_L: dev_scores}))

    @classmethod
    def load(cls, folder: Path) -> TrainerState:
        return cls(**load_state(folder / TRAINER_STATE))


def load_checkpoint(folder: Path, student_class, *, log=None) -> tuple[Any, TrainerState]:
    """The student and trainer state of checkpoint `folder`, or, if it cannot be read (a
    truncated or altered file), of the newest readable older checkpoint beside it (Ray Train's
    `checkpoint_<time>` folders), with a warning through `log`."""
    older = sorted((p for p in folder.parent.glob("checkpoint_*")
                    if p.name < folder.name and p.is_dir()), reverse=True)
    for candidate in [folder, *older]:
        try:
            return (student_class.from_pretrained(candidate / MODEL_DIR),
                    TrainerState.load(candidate))
        except Exception as error:  # corrupt files raise OSError, safetensors or pickle errors
            if log is not None:
                log(f"WARNING: checkpoint {candidate} cannot be read ({type(error).__name__}: "
                    f"{str(error)[:200]}); trying an older one")
    raise RuntimeError(f"no readable checkpoint: {folder} and the {len(older)} older one(s) "
                       "beside it all fail to load; remove them to start the run afresh")


# --------------------------------------------------------------------------- the loop


@dataclass
class _Window:
    """Running sums of the optimizer steps since the last report."""

    loss: float = 0.0
    distil: float = 0.0
    lm: float = 0.0
    tokens: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` is `RunConfig.to_dict()` with absolute paths (and, for
    a search with system metrics, where rank 0 logs them)."""
    target = SystemMetricsTarget.pop_from(config)
    worker = DistillationWorker(config_from_dict(config, "run config"))
    with monitoring(target if worker.rank == 0 else None):
        worker.train()


class DistillationWorker:
    """One Ray Train worker of a distillation run (see the module docstring)."""

    def __init__(self, run: RunConfig, session: TrainSession | None = None):
        self.run = run
        self.session = session or RayTrainSession()
        self.rank, self.world_size = self.session.rank, self.session.world_size
        self.device = self.session.device
        on_gpu = self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if on_gpu else None
        seed = run.train.seed
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed + self.rank)

        # Per-tensor loading bars from every worker of every trial drown the search's output.
        transformers.utils.logging.disable_progress_bar()
        teacher_dtype = {
            "auto": torch.bfloat16 if on_gpu else torch.float32,
            "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
        }[run.models.teacher_dtype]
        # With a teacher cache the teacher runs only for student-generated batches.
        self.teacher = None
        if run.cache.enabled and not run.sgo.enabled:
            student, self.tokenizer = load_student(run.models)
        else:
            teacher, student, self.tokenizer = load_models(run.models)
            self.teacher = freeze_teacher(teacher, teacher_dtype).to(self.device)
        self.objective = Objective.of(run)

        self.train_examples, self.dev_examples = load_train_dev(run.data, seed)
        self.encoded_train = encode_all(run, self.tokenizer, self.train_examples)
        self.encoded_dev = encode_all(run, self.tokenizer, self.dev_examples)
        self.caches = self._open_caches(student) if run.cache.enabled else None
        self.collate = TrainingCollator(self.tokenizer.pad_token_id)
        self.lm_blocks = corpus_blocks(run, self.tokenizer, self.world_size)

        restored: TrainerState | None = None
        with self.session.restored() as folder:
            if folder is not None:
                student, restored = load_checkpoint(folder, type(student),
                                                    log=self._log if self.rank == 0 else None)
        student.train()
        self.model = self.session.prepare_model(student)
        self.student = self.model.module if hasattr(self.model, "module") else self.model
        self.optimizer = _optimizer(self.model, run.train.lr, run.train.weight_decay)

        sgo = run.sgo
        if sgo.scheme == "mixed":
            self.sgo_scheduler = MixedSGOScheduler(sgo.mixed_alpha, seed=seed + self.rank)
        else:
            self.sgo_scheduler = AdaptiveSGOScheduler(
                sgo.init_threshold, loss_eps=sgo.loss_eps, replay_schedule=sgo.replay_schedule,
                seed=seed + self.rank)
        self.replay = ReplayBuffer(sgo.replay_capacity, seed=seed + self.rank)
        # TAID moves its interpolation weight (the assistant's lam) with the training loss.
        self.taid = run.taid.schedule() if run.amid.preset == "taid" else None
        self.step, self.history = 0, []
        if restored is not None:  # resume exactly where the checkpoint left off
            self.optimizer.load_state_dict(restored.optimizer)
            self.sgo_scheduler.load_state_dict(restored.sgo_scheduler[self.rank])
            self.replay.load_state_dict(restored.replay[self.rank])
            if self.taid is not None:
                self.taid.load_state_dict(restored.taid[self.rank])
            _restore_rng(restored.rng[self.rank])
            self.step, self.history = restored.step, restored.history
        self.restored_step = self.step
        self._open_streams()

    def _open_caches(self, student: torch.nn.Module) -> dict[str, TeacherCache]:
        """The run's train and dev teacher caches, checked against what this worker encodes
        (the cache stage built them before the run started)."""
        encoded = {"train": self.encoded_train, "dev": self.encoded_dev}
        plan = plan_caches(self.run, teacher_source(self.run.models), self.tokenizer, encoded,
                           vocab_size=int(student.config.vocab_size))
        # The stage read every shard it built in full; here a cheaper check of each one read.
        return open_run_caches(plan, verify=False)

    def _open_streams(self) -> None:
        """The data streams, advanced past what the checkpointed run consumed."""
        run = self.run
        self.batches = micro_batches(len(self.encoded_train), run.train.batch_size,
                                     seed=run.train.seed, rank=self.rank,
                                     world_size=self.world_size)
        self.lm_batches = None
        if self.lm_blocks is not None:
            self.lm_batches = micro_batches(
                len(self.lm_blocks), run.train.batch_size, seed=run.train.seed + LM_SEED_OFFSET,
                rank=self.rank, world_size=self.world_size,
                items=f"blocks of {run.data.max_length} tokens of "
                      f"{Path(run.data.lm_corpus).name}",
            )
        for _ in range(self.step * run.train.grad_accum):
            next(self.batches)
            if self.lm_batches is not None:
                next(self.lm_batches)

    # -- training ---------------------------------------------------------------------------

    def train(self) -> None:
        run = self.run
        if self.step >= run.train.max_steps and self.history:
            # Restored at its end (its driver died between the last checkpoint and the search
            # recording it): report the last round again, so the search sees how it ended
            # rather than a run that reported nothing.
            self.session.report(dict(self.history[-1]), None)
            return
        if run.sgo.enabled and run.sgo.scheme == "adaptive" and self.step == 0:
            # Adaptive SGO's reference: the dev cross-entropy before the first step (the mixed
            # scheme reads no dev signal, so it skips this pass).
            self.sgo_scheduler.observe_eval(self._dev_losses()[DEV_CE])
        window = _Window()
        while self.step < run.train.max_steps:
            self._optimizer_step(window)
            if run.train.log_every and self.step % run.train.log_every == 0:
                self._log_progress(window)
            if self.step % run.eval.every == 0 or self.step == run.train.max_steps:
                self._report(self._evaluation_round(window))
                window = _Window()

    @staticmethod
    def _log(line: str) -> None:
        print(f"[amid-ray] {line}", flush=True)

    def _log_progress(self, window: _Window) -> None:
        """One line in the rank-0 worker's log: where the run is and when it will end."""
        if self.rank != 0:
            return
        elapsed = time.perf_counter() - window.start
        left = self.run.train.max_steps - self.step
        eta = elapsed / max(window.steps, 1) * left
        print(f"[amid-ray] step {self.step}/{self.run.train.max_steps}  loss "
              f"{window.loss / window.steps:.4f}  {window.tokens / elapsed:.0f} tokens/s per "
              f"worker  ETA {eta / 60:.1f} min (to the end, without evaluation rounds)",
              flush=True)

    def _sync_gradients(self, on: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces on the step's last backward pass only (as nanoGPT does)."""
        if on or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _optimizer_step(self, window: _Window) -> None:
        run, accum = self.run, self.run.train.grad_accum
        train = run.train
        self.lr = train.min_lr + (train.lr - train.min_lr) * learning_rate_factor(
            self.step, warmup=train.warmup_steps, total=train.max_steps, schedule=train.schedule)
        objective = self.objective if self.taid is None else self.objective.at_lam(self.taid.t)
        step_distil = 0.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            last = micro == accum - 1
            batch, teacher = self._next_batch()
            with self._sync_gradients(last and self.lm_batches is None):
                losses = distillation_losses(self.model, teacher, batch, objective,
                                             autocast_dtype=self.autocast_dtype)
                (losses.total / accum).backward()
            window.loss += losses.total.item() / accum
            step_distil += losses.distil.item() / accum
            window.distil += losses.distil.item() / accum
            window.tokens += int(batch["attention_mask"].sum())
            if self.lm_batches is not None:
                # Its own forward/backward pair: the distillation graph is freed first, and DDP
                # sees one backward per forward.
                block = self.lm_blocks[next(self.lm_batches)].to(self.device)
                with self._sync_gradients(last):
                    lm = language_modelling_loss(self.model, block,
                                                 autocast_dtype=self.autocast_dtype,
                                                 fused=self.objective.fused)
                    (run.train.lm_weight * lm / accum).backward()
                window.loss += run.train.lm_weight * lm.item() / accum
                window.lm += lm.item() / accum
        if run.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), run.train.max_grad_norm)
        self.optimizer.step()
        if self.taid is not None:  # this rank's own loss, as TAID's released code reads it
            self.taid.update(step_distil, progress=self.step / run.train.max_steps)
        self.step += 1
        window.steps += 1

    def _next_batch(self) -> tuple[dict[str, torch.Tensor], torch.nn.Module | TeacherRows]:
        """The next micro-batch (ground truth, or with SGO fresh or replayed student answers)
        and its teacher: read from the cache for ground truth when there is one, else live."""
        indices = next(self.batches)
        encoded = [self.encoded_train[i] for i in indices]
        ground_truth = True
        if self.run.sgo.enabled:
            encoded, ground_truth = self._student_generated_or_not(encoded, indices)
        batch = {k: v.to(self.device) for k, v in self.collate(encoded).items()}
        if ground_truth and self.caches is not None:
            return batch, self.caches["train"].batch_teacher(
                indices, response_mask(batch["labels"])[0])
        return batch, self.teacher

    def _student_generated_or_not(self, encoded, indices: list[int]) -> tuple[list, bool]:
        """The step's examples and whether they are the ground truth `encoded`."""
        # t counts the step being taken from 1, as the released code does.
        choice = self.sgo_scheduler.choose(
            buffer_full=self.replay.full, progress=(self.step + 1) / self.run.train.max_steps)
        if choice == "ground_truth":
            return encoded, True
        if choice == "replay":  # the adaptive rule replays only from a full buffer
            return self.replay.sample(len(encoded)), False
        run = self.run
        generated = generate_student_batch(
            self.student, self.tokenizer, [self.train_examples[i] for i in indices],
            max_length=run.data.max_length, max_prompt_length=run.data.max_prompt_length,
            max_new_tokens=run.sgo.max_new_tokens,
            seed=run.train.seed + 1000 * self.step + self.rank,
        )
        self.replay.push(generated)
        if choice == "generate_and_replay":  # GKD's mixing: train on a batch from the buffer
            return self.replay.sample(len(encoded)), False
        return generated, False

    # -- evaluation and reports --------------------------------------------------------------

    def _dev_losses(self) -> dict[str, float]:
        return dev_losses(self.student, self.teacher, self.tokenizer, self.encoded_dev,
                          self.run, self.objective, rank=self.rank, world_size=self.world_size,
                          device=self.device, autocast_dtype=self.autocast_dtype,
                          cache=None if self.caches is None else self.caches["dev"])

    def _evaluation_round(self, window: _Window) -> dict[str, Any]:
        run = self.run
        elapsed = time.perf_counter() - window.start
        tokens = _all_reduce_sum([float(window.tokens)], self.device)[0]
        metrics = {
            STEP: self.step,
            "epoch": self.step * run.train.grad_accum * run.train.batch_size * self.world_size
            / len(self.encoded_train),
            TRAIN_LOSS: window.loss / window.steps,
            DISTIL_LOSS: window.distil / window.steps,
            **({LM_LOSS: window.lm / window.steps} if self.lm_batches is not None else {}),
            LEARNING_RATE: self.lr,
            TOKENS_PER_S: tokens / elapsed,
            "restored_step": self.restored_step,
            "node_id": self.session.node_id,
        }
        metrics |= self._dev_losses()
        began = time.perf_counter()
        if self.rank == 0:
            print(f"[amid-ray] step {self.step}: evaluation round, generating answers to "
                  f"{min(run.eval.num_examples, len(self.dev_examples))} dev prompts "
                  f"on {self.world_size} worker(s)", flush=True)
        self.dev_scores = dev_rouge_l(self.student, self.tokenizer, self.dev_examples, run,
                                      rank=self.rank)
        metrics[ROUGE_L] = sum(self.dev_scores) / max(len(self.dev_scores), 1)
        if self.rank == 0:
            print(f"[amid-ray] step {self.step}: ROUGE-L {metrics[ROUGE_L]:.2f}, val_loss "
                  f"{metrics[VAL_LOSS]:.4f}, dev_ce {metrics[DEV_CE]:.4f} "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
        # The running best is what a search ranks trials by (the kept checkpoint is the best).
        metrics[BEST_ROUGE_L] = max([metrics[ROUGE_L]] + [h[ROUGE_L] for h in self.history])
        if run.sgo.enabled:
            reference = getattr(self.sgo_scheduler, "reference_ce", None)
            if reference is not None:  # what this round's dev_ce is compared with
                metrics[SGO_REFERENCE_CE] = reference
            self.sgo_scheduler.observe_eval(metrics[DEV_CE])
        metrics[SGO_THRESHOLD] = self.sgo_scheduler.threshold
        if self.taid is not None:
            metrics[TAID_T] = self.taid.t
        return metrics

    def _report(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        state = TrainerState(
            step=self.step, history=self.history, optimizer=self.optimizer.state_dict(),
            sgo_scheduler=_gather(self.sgo_scheduler.state_dict()),
            replay=_gather(self.replay.state_dict()), rng=_gather(_rng_state()),
            taid=None if self.taid is None else _gather(self.taid.state_dict()),
        )
        with tempfile.TemporaryDirectory(prefix="amid-ckpt-") as folder:
            checkpoint = None
            if self.rank == 0:
                checkpoint = Path(folder)
                state.save(checkpoint, self.student, self.tokenizer, self.dev_scores)
            self.session.report(metrics, checkpoint)
