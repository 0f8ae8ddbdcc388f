"""What the teacher cache buys a search on the SmolLM2 profile, measured in one process (no Ray).

Profile `search_spaces/smollm2_cpu.yaml` (or `--config`): teacher SmolLM2-135M-Instruct (the
shipped GGUF, 30 layers), the student derived from it, Dolly data, its lengths, batch size,
gradient accumulation and `train.max_steps`; `--examples N` caps the training set.

1. Cache build. For each k in `--top-k` and storage dtype in `--dtypes`, the training-set cache
   is built from scratch with `teacher_cache.build_cache` into the folder `cache_plan.plan_caches`
   gives the run (where a worker of that run would look): the teacher's forward pass over the
   training set, top-k sparsification, shard writing, and the final read-back check. Reported:
   build seconds, and size per million response tokens = bytes / cached positions · 10⁶.
2. Optimizer-step time. One student, one AdamW (the worker's parameter groups), the worker's
   micro-batch stream; a step is `train.grad_accum` micro-batches of forward + backward, gradient
   clipping and the optimizer step. Three ways on the same batches:
     live          `worker.distillation_losses` with the teacher model (its forward included);
     cached        the same with `TeacherCache.batch_teacher` (the cache read included);
     student-only  the student's forward + backward with cross-entropy on the response tokens
                   through `fused_loss.fused_cross_entropy` (the worker's own path, logits a
                   chunk of those positions at a time): no teacher at all;
     plain CE      the same with the response positions' logits formed at once and
                   `F.cross_entropy` (what a plain training loop does).
   The floor is the faster of the last two. After one warm-up step each, `--repeats` rounds
   interleave the four (order reversed every other round, so drift hits all alike); each way's
   step time is the median.
3. Projection of an N-trial search, every trial running `train.max_steps` steps and
   R = the evaluation rounds of such a trial (a round timed each way: dev loss with the live
   teacher or from the dev cache, 3 interleaved timings each, plus ROUGE-L generation and the
   checkpoint write, timed once):
     live    N · (steps · t_live + R · t_eval,live)
     cached  B + N · (steps · t_cached + R · t_eval,cached)
   B = the cache stage of the full profile (not the `--examples` subset): loading the teacher
   once plus building what the search's trials read of the train and dev sets (the shards
   holding them, `cache_plan.search_reads`), scaled from the measured build by token count:
   B = t_load + t_build · (tokens of the examples built) / built tokens.

Prints the tables, then one JSON line of headline figures. Goals (issue #14): a cached step
within 1.15× of the student-only one; an 8-trial search ≥ 1.8× faster with the cache, build
included.

Run: `python benchmarks/teacher_cache.py [--examples 32] [--repeats 5] [--threads 2]
[--save benchmarks/results/teacher_cache.json]`; `--smoke` for a quick check (tiny settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from amid_ray.cache_plan import SPLITS, encode_all, plan_caches  # noqa: E402
from amid_ray.config import CacheConfig, RunConfig, load_config  # noqa: E402
from amid_ray.data import TrainingCollator, response_mask  # noqa: E402
from amid_ray.fused_loss import fused_cross_entropy, hidden_and_head  # noqa: E402
from amid_ray.models import freeze_teacher  # noqa: E402
from amid_ray.schedule import micro_batches  # noqa: E402
from amid_ray.sources import load_models, load_train_dev, teacher_source  # noqa: E402
from amid_ray.spaces import config_path  # noqa: E402
from amid_ray.teacher_cache import (  # noqa: E402
    SHARD_SIZE,
    Encoded,
    Manifest,
    TeacherCache,
    build_cache,
    plan_shards,
)
from amid_ray.worker import (  # noqa: E402
    Objective,
    TrainerState,
    _optimizer,
    dev_losses,
    dev_rouge_l,
    distillation_losses,
)

#: Step goal: cached step / student-only step at most this.
STEP_GOAL = 1.15
#: Search goal: live / cached wall time of an 8-trial search at least this.
SEARCH_GOAL = 1.8
SEARCH_GOAL_TRIALS = 8
WAYS = ("live", "cached", "student-only", "plain CE")
#: Overrides of `--smoke`: tiny lengths and evaluation round, few examples and repeats.
SMOKE = {"examples": 8, "repeats": 1, "max_length": 64, "max_prompt_length": 48,
         "eval_examples": 2, "eval_new_tokens": 4}


# --------------------------------------------------------------------------- setup


def load_profile(args: argparse.Namespace, workdir: Path) -> RunConfig:
    """The profile's run settings (its search section dropped), capped to `--examples`, with the
    cache folder in `workdir`."""
    overrides = ["search=null", f"data.max_train_examples={args.examples}",
                 f"cache.dir={workdir / 'teacher-cache'}"]
    for key, value in (("data.max_length", args.max_length),
                       ("data.max_prompt_length", args.max_prompt_length),
                       ("eval.num_examples", args.eval_examples),
                       ("eval.max_new_tokens", args.eval_new_tokens)):
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(config_path(args.config), overrides)


def with_cache(run: RunConfig, top_k: int, dtype: str) -> RunConfig:
    return dataclasses.replace(run, cache=dataclasses.replace(run.cache, enabled=True,
                                                              top_k=top_k, dtype=dtype))


def token_count(encoded: Sequence[Encoded]) -> int:
    return sum(len(example["input_ids"]) for example in encoded)


def response_count(encoded: Sequence[Encoded]) -> int:
    """Positions that predict a response token (what a cache stores a row for)."""
    return sum(int((torch.tensor(e["labels"][1:]) != -100).sum()) for e in encoded)


# --------------------------------------------------------------------------- 1. build


@dataclasses.dataclass
class Build:
    top_k: int
    dtype: str
    seconds: float
    positions: int
    size_bytes: int
    cache: TeacherCache

    @property
    def mb_per_million(self) -> float:
        """Size per million response tokens (MB = 10⁶ bytes)."""
        return self.size_bytes / self.positions


def build_from_scratch(run: RunConfig, teacher, tokenizer, encoded: dict[str, list],
                       vocab_size: int) -> Build:
    """Build the run's training-set cache where the run would look, timing it end to end."""
    plan = plan_caches(run, teacher_source(run.models), tokenizer, encoded,
                       vocab_size=vocab_size)
    shutil.rmtree(plan.folder("train"), ignore_errors=True)  # a leftover would be reused
    began = time.perf_counter()
    cache = build_cache(teacher, encoded["train"], plan.identities["train"], plan.root,
                        pad_token_id=tokenizer.pad_token_id, log=None)
    seconds = time.perf_counter() - began
    return Build(run.cache.top_k, run.cache.dtype, seconds, cache.num_positions,
                 cache.size_bytes, cache)


# --------------------------------------------------------------------------- 2. steps


def student_only_loss(student: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                      fused: bool) -> torch.Tensor:
    """Mean cross-entropy of the student on the response tokens, logits formed only there: a
    chunk at a time (`fused`) or all at once."""
    mask, targets = response_mask(batch["labels"])
    rows = mask.reshape(-1).nonzero().squeeze(1)
    out = hidden_and_head(student, input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"])
    hidden = out.hidden.reshape(-1, out.hidden.shape[-1])
    if fused:
        return fused_cross_entropy(hidden, out.weight, out.bias, rows, targets.reshape(-1))
    logits = F.linear(hidden.index_select(0, rows), out.weight, out.bias)
    return F.cross_entropy(logits.float(), targets.reshape(-1).index_select(0, rows))


class StepTimer:
    """The three ways of taking one optimizer step over the same micro-batches."""

    def __init__(self, run: RunConfig, student, teacher, cache: TeacherCache,
                 encoded: list[Encoded], pad_token_id: int) -> None:
        self.run, self.student, self.teacher, self.cache = run, student, teacher, cache
        self.encoded = encoded
        self.collate = TrainingCollator(pad_token_id)
        self.objective = Objective.of(run)
        self.optimizer = _optimizer(student, run.train.lr, run.train.weight_decay)
        self.losses: dict[str, Callable[[list[int]], torch.Tensor]] = {
            "live": self._live, "cached": self._cached,
            "student-only": lambda indices: self._student_only(indices, fused=True),
            "plain CE": lambda indices: self._student_only(indices, fused=False)}

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.collate([self.encoded[i] for i in indices])

    def _live(self, indices: list[int]) -> torch.Tensor:
        return distillation_losses(self.student, self.teacher, self.batch(indices),
                                   self.objective, autocast_dtype=None).total

    def _cached(self, indices: list[int]) -> torch.Tensor:
        batch = self.batch(indices)
        taught = self.cache.batch_teacher(indices, response_mask(batch["labels"])[0])
        return distillation_losses(self.student, taught, batch, self.objective,
                                   autocast_dtype=None).total

    def _student_only(self, indices: list[int], *, fused: bool) -> torch.Tensor:
        return student_only_loss(self.student, self.batch(indices), fused=fused)

    def step(self, way: str, micro: list[list[int]]) -> float:
        """Seconds of one optimizer step the `way` way over the micro-batches `micro`."""
        began = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for indices in micro:
            loss = self.losses[way](indices)
            (loss / len(micro)).backward()
            loss.item()  # the worker reads every micro-batch's loss
        if self.run.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(),
                                           self.run.train.max_grad_norm)
        self.optimizer.step()
        return time.perf_counter() - began

    def first_batch_losses(self, indices: list[int]) -> tuple[float, float]:
        """Live and cached objective on one micro-batch, before any step (a sanity check)."""
        with torch.no_grad():
            return self._live(indices).item(), self._cached(indices).item()


def time_steps(timer: StepTimer, run: RunConfig, repeats: int) -> dict[str, list[float]]:
    """Per-way step seconds: one warm-up step each, then `repeats` interleaved rounds."""
    stream = micro_batches(len(timer.encoded), run.train.batch_size, seed=run.train.seed,
                           rank=0, world_size=1)

    def next_step() -> list[list[int]]:
        return [next(stream) for _ in range(run.train.grad_accum)]

    warm = next_step()
    for way in WAYS:
        timer.step(way, warm)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for repeat in range(repeats):
        micro = next_step()
        for way in WAYS if repeat % 2 == 0 else reversed(WAYS):
            seconds[way].append(timer.step(way, micro))
        print(f"  round {repeat + 1}/{repeats}: "
              + ", ".join(f"{way} {seconds[way][-1]:.2f} s" for way in WAYS), flush=True)
    return seconds


# --------------------------------------------------------------------------- 3. projection


def evaluation_rounds(max_steps: int, every: int) -> int:
    """Rounds in a run of `max_steps` steps (every `every` steps and at the last one)."""
    return sum(1 for step in range(1, max_steps + 1) if step % every == 0 or step == max_steps)


def time_evaluation_round(run: RunConfig, student, teacher, tokenizer, dev_examples,
                          timer: StepTimer, workdir: Path, dev_cache: TeacherCache,
                          repeats: int = 3) -> dict[str, float]:
    """Seconds of one evaluation round as the worker runs it, both ways: dev losses (the live
    teacher, or the dev set's cache; `repeats` interleaved timings each, median), plus ROUGE-L
    of generated dev answers and the checkpoint (timed once: the same either way)."""
    encoded_dev = encode_all(run, tokenizer, dev_examples)

    def losses(cache: TeacherCache | None) -> float:
        began = time.perf_counter()
        dev_losses(student, teacher, tokenizer, encoded_dev, run, timer.objective, rank=0,
                   world_size=1, device=torch.device("cpu"), autocast_dtype=None, cache=cache)
        return time.perf_counter() - began

    loss_s: dict[str, list[float]] = {"live": [], "cached": []}
    for repeat in range(repeats):
        for way in ("live", "cached") if repeat % 2 == 0 else ("cached", "live"):
            loss_s[way].append(losses(None if way == "live" else dev_cache))
    began = time.perf_counter()
    scores = dev_rouge_l(student, tokenizer, dev_examples, run, rank=0)
    state = TrainerState(step=0, history=[], optimizer=timer.optimizer.state_dict(),
                         sgo_scheduler=[{}], replay=[{}], taid=None, rng=[{}])
    folder = workdir / "checkpoint"
    folder.mkdir(exist_ok=True)
    state.save(folder, student, tokenizer, scores)
    rest = time.perf_counter() - began
    return {way: statistics.median(seconds) + rest for way, seconds in loss_s.items()}


@dataclasses.dataclass(frozen=True)
class Projection:
    trials: int
    live_s: float
    cached_s: float
    live_train_s: float
    cached_train_s: float

    @property
    def speedup(self) -> float:
        return self.live_s / self.cached_s

    @property
    def train_speedup(self) -> float:
        return self.live_train_s / self.cached_train_s


def project(trials: int, *, steps: int, rounds: int, live: float, cached: float,
            eval_live: float, eval_cached: float, stage: float) -> Projection:
    """Wall time of a `trials`-trial search both ways (see the module docstring); the
    `_train` figures leave the evaluation rounds out."""
    return Projection(trials, trials * (steps * live + rounds * eval_live),
                      stage + trials * (steps * cached + rounds * eval_cached),
                      trials * steps * live, stage + trials * steps * cached)


def stage_examples(run: RunConfig, tokenizer, full: dict[str, list[Encoded]],
                   vocab_size: int) -> dict[str, list[Encoded]]:
    """What the cache stage of a search over the full profile builds, by split: the examples of
    the shards holding what its trials read."""
    plan = plan_caches(run, teacher_source(run.models), tokenizer, full, vocab_size=vocab_size,
                       for_search=True)
    built = {}
    for split in SPLITS:
        manifest = Manifest(plan.identities[split], plan_shards(plan.orders[split], SHARD_SIZE))
        built[split] = [full[split][i] for shard in manifest.holding(plan.reads[split])
                        for i in shard.examples]
    return built


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smollm2_cpu",
                        help="profile: a shipped search-space name or a YAML file "
                             "(default smollm2_cpu)")
    parser.add_argument("--examples", type=int, default=32,
                        help="training examples cached and stepped over (default 32)")
    parser.add_argument("--top-k", type=int, nargs="+", default=[64, CacheConfig().top_k],
                        help="cache k values to build (default 64 and cache.top_k's default)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"],
                        help="storage dtypes to build (default float32 float16)")
    parser.add_argument("--step-top-k", type=int, default=CacheConfig().top_k,
                        help="k of the cache the cached step reads (default cache.top_k's)")
    parser.add_argument("--step-dtype", default=CacheConfig().dtype,
                        help="dtype of the cache the cached step reads (default cache.dtype's)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved timed rounds of the three steps (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 4, 8, 16],
                        help="search sizes to project (default 1 4 8 16)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the caches and the checkpoint (default: a temporary "
                             "one, removed at the end)")
    parser.add_argument("--save", type=Path, default=None,
                        help="also write every figure as JSON to this file")
    parser.add_argument("--smoke", action="store_true",
                        help=f"quick check with tiny settings: {SMOKE}")
    for name in ("max-length", "max-prompt-length"):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"override data.{name.replace('-', '_')}")
    parser.add_argument("--eval-examples", type=int, default=None,
                        help="override eval.num_examples (the timed evaluation round)")
    parser.add_argument("--eval-new-tokens", type=int, default=None,
                        help="override eval.max_new_tokens (the timed evaluation round)")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.examples < 1 or args.repeats < 1 or args.threads < 1:
        parser.error(f"--examples ({args.examples}), --repeats ({args.repeats}) and --threads "
                     f"({args.threads}) must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        return run_benchmark(args, workdir)


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    run = load_profile(args, workdir)
    began = time.perf_counter()
    teacher, student, tokenizer = load_models(run.models)
    load_s = time.perf_counter() - began
    teacher = freeze_teacher(teacher, torch.float32)  # the CPU workers' teacher dtype
    student.train()
    vocab_size = int(teacher.config.vocab_size)
    train, dev = load_train_dev(run.data, run.train.seed)
    encoded = {"train": encode_all(run, tokenizer, train), "dev": encode_all(run, tokenizer, dev)}
    full_train, _ = load_train_dev(dataclasses.replace(run.data, max_train_examples=None),
                                   run.train.seed)
    full = {"train": encode_all(run, tokenizer, full_train), "dev": encoded["dev"]}
    built_tokens = token_count(encoded["train"])
    t = run.train
    print(f"profile {run.name} ({args.config}): teacher {run.models.teacher} "
          f"({teacher.config.num_hidden_layers} layers, "
          f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.0f} M params), student "
          f"{student.config.num_hidden_layers} layers "
          f"({sum(p.numel() for p in student.parameters()) / 1e6:.0f} M); V = {vocab_size}; "
          f"loaded in {load_s:.1f} s; torch threads {args.threads}")
    print(f"data: {len(train)} training examples ({built_tokens} tokens, "
          f"{response_count(encoded['train'])} response tokens) of {len(full_train)}, "
          f"{len(dev)} dev; max_length {run.data.max_length}, max_prompt_length "
          f"{run.data.max_prompt_length}; batch {t.batch_size} × grad_accum {t.grad_accum}, "
          f"max_steps {t.max_steps}\n")

    # 1. build
    print("1. cache build (training set, from scratch: teacher forward, top-k, write, check)")
    header = f"{'k':>5} {'dtype':>8} {'build s':>8} {'tok/s':>7} {'positions':>9} " \
             f"{'MB':>7} {'MB per M resp. tok':>18}"
    print(header + "\n" + "-" * len(header))
    builds: dict[tuple[int, str], Build] = {}
    wanted = [(k, d) for k in args.top_k for d in args.dtypes]
    if (args.step_top_k, args.step_dtype) not in wanted:
        wanted.append((args.step_top_k, args.step_dtype))
    for top_k, dtype in wanted:
        b = build_from_scratch(with_cache(run, top_k, dtype), teacher, tokenizer, encoded,
                               vocab_size)
        builds[top_k, dtype] = b
        print(f"{top_k:>5} {dtype:>8} {b.seconds:>8.1f} {built_tokens / b.seconds:>7.0f} "
              f"{b.positions:>9} {b.size_bytes / 1e6:>7.2f} {b.mb_per_million:>18.0f}")

    # 2. steps
    step_build = builds[args.step_top_k, args.step_dtype]
    timer = StepTimer(run, student, teacher, step_build.cache, encoded["train"],
                      tokenizer.pad_token_id)
    first = next(micro_batches(len(encoded["train"]), t.batch_size, seed=t.seed, rank=0,
                               world_size=1))
    live_loss, cached_loss = timer.first_batch_losses(first)
    print(f"\n2. optimizer step ({t.grad_accum} micro-batches of {t.batch_size}; cached step "
          f"reads k = {args.step_top_k}, {args.step_dtype}); objective on the first "
          f"micro-batch: live {live_loss:.4f}, cached {cached_loss:.4f} "
          f"(rel. diff {abs(cached_loss - live_loss) / abs(live_loss):.1e})")
    seconds = time_steps(timer, run, args.repeats)
    median = {way: statistics.median(values) for way, values in seconds.items()}
    floor = min(median["student-only"], median["plain CE"])
    header = f"{'way':>13} {'median s':>9} {'min s':>7} {'max s':>7} {'× floor':>8}"
    print(header + "\n" + "-" * len(header))
    for way in WAYS:
        print(f"{way:>13} {median[way]:>9.3f} {min(seconds[way]):>7.3f} "
              f"{max(seconds[way]):>7.3f} {median[way] / floor:>8.2f}")
    cached_ratio = median["cached"] / floor
    live_ratio = median["live"] / median["cached"]
    print(f"cached / student-only floor = {cached_ratio:.2f} (goal ≤ {STEP_GOAL}: "
          f"{'met' if cached_ratio <= STEP_GOAL else 'MISSED'}); live / cached = "
          f"{live_ratio:.2f}")

    # 3. projection
    step_run = with_cache(run, args.step_top_k, args.step_dtype)
    dev_plan = plan_caches(step_run, teacher_source(run.models), tokenizer, encoded,
                           vocab_size=vocab_size)
    dev_cache = build_cache(teacher, encoded["dev"], dev_plan.identities["dev"], dev_plan.root,
                            pad_token_id=tokenizer.pad_token_id, order=dev_plan.orders["dev"],
                            examples=dev_plan.reads["dev"], shard_size=SHARD_SIZE, log=None)
    evaluation = time_evaluation_round(run, student, teacher, tokenizer, dev, timer, workdir,
                                       dev_cache)
    eval_live, eval_cached = evaluation["live"], evaluation["cached"]
    rounds = evaluation_rounds(t.max_steps, run.eval.every)
    staged = stage_examples(step_run, tokenizer, full, vocab_size)
    stage_tokens = sum(token_count(staged[split]) for split in SPLITS)
    build_full = step_build.seconds * stage_tokens / built_tokens
    stage = load_s + build_full
    print(f"\n3. projected search wall time (one worker, {t.max_steps} steps and {rounds} "
          f"evaluation rounds per trial, every trial to the end); an evaluation round takes "
          f"{eval_live:.1f} s with the live teacher, {eval_cached:.1f} s from the dev cache")
    print(f"cache stage B = teacher load {load_s:.1f} s + build of what the trials read, in "
          f"whole shards of {SHARD_SIZE}: {len(staged['train'])} of {len(full['train'])} train "
          f"+ {len(staged['dev'])} of {len(full['dev'])} dev examples ({stage_tokens} tokens, "
          f"scaled from {built_tokens} built in {step_build.seconds:.1f} s) {build_full:.0f} s "
          f"= {stage:.0f} s; cache size "
          f"{step_build.mb_per_million * response_count(staged['train'] + staged['dev']) / 1e6:.0f}"
          f" MB (k = {args.step_top_k}, {args.step_dtype})")
    header = (f"{'trials':>6} {'live s':>8} {'cached s':>9} {'speedup':>8} "
              f"{'train-only speedup':>19}")
    print(header + "\n" + "-" * len(header))
    projections = []
    for trials in sorted(set(args.trials) | {SEARCH_GOAL_TRIALS}):
        p = project(trials, steps=t.max_steps, rounds=rounds, live=median["live"],
                    cached=median["cached"], eval_live=eval_live, eval_cached=eval_cached,
                    stage=stage)
        projections.append(p)
        print(f"{trials:>6} {p.live_s:>8.0f} {p.cached_s:>9.0f} {p.speedup:>8.2f} "
              f"{p.train_speedup:>19.2f}")
    goal = next(p for p in projections if p.trials == SEARCH_GOAL_TRIALS)
    # The most any cache could give: built for free, and a step as fast as the student alone.
    ceiling = project(SEARCH_GOAL_TRIALS, steps=t.max_steps, rounds=rounds, live=median["live"],
                      cached=floor, eval_live=eval_live, eval_cached=eval_cached, stage=0.0)
    teacher_share = (median["live"] - floor) / median["live"]
    saved = t.max_steps * (median["live"] - median["cached"]) + rounds * (eval_live - eval_cached)
    break_even = stage / saved if saved > 0 else float("inf")
    print(f"{SEARCH_GOAL_TRIALS} trials: {goal.speedup:.2f}× (goal ≥ {SEARCH_GOAL}: "
          f"{'met' if goal.speedup >= SEARCH_GOAL else 'MISSED'}); the ceiling of any cache "
          f"on this profile (no build, cached step = student-only floor) is "
          f"{ceiling.speedup:.2f}×. The cache removes only the teacher's share of a live step, "
          f"here {teacher_share:.0%} (at the paper's 1.5B teacher / 0.1B student about 80 %), "
          f"so with many trials the speedup tends to live / cached = {live_ratio:.2f}× on "
          f"training alone, less with evaluation rounds; the cache stage pays for itself after "
          f"{break_even:.1f} trials")

    headline = {
        "benchmark": "teacher_cache", "profile": run.name, "examples": len(train),
        "threads": args.threads, "repeats": args.repeats, "smoke": args.smoke,
        "load_s": round(load_s, 2),
        "build": [{"top_k": b.top_k, "dtype": b.dtype, "seconds": round(b.seconds, 2),
                   "positions": b.positions, "bytes": b.size_bytes,
                   "mb_per_million_response_tokens": round(b.mb_per_million, 1)}
                  for b in builds.values()],
        "step_s": {way: round(value, 4) for way, value in median.items()},
        "cached_over_student_only": round(cached_ratio, 3),
        "live_over_cached": round(live_ratio, 3),
        "step_goal_met": cached_ratio <= STEP_GOAL,
        "eval_round_s": {"live": round(eval_live, 2), "cached": round(eval_cached, 2)},
        "rounds_per_trial": rounds, "stage_examples": {k: len(v) for k, v in staged.items()},
        "max_steps": t.max_steps, "stage_s": round(stage, 1),
        "projection": [{"trials": p.trials, "live_s": round(p.live_s), "cached_s":
                        round(p.cached_s), "speedup": round(p.speedup, 3),
                        "train_only_speedup": round(p.train_speedup, 3)} for p in projections],
        "teacher_share_of_live_step": round(teacher_share, 3),
        "break_even_trials": round(break_even, 2) if saved > 0 else None,
        "search_speedup_8": round(goal.speedup, 3),
        "search_speedup_8_ceiling": round(ceiling.speedup, 3),
        "search_goal_met": goal.speedup >= SEARCH_GOAL,
    }
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        detail = {**headline, "step_seconds": seconds, "settings": vars(args) | {
            "config": str(args.config), "workdir": str(args.workdir), "save": str(args.save)}}
        args.save.write_text(json.dumps(detail, indent=2) + "\n")
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
