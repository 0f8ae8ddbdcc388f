"""Building the demo once into a cache folder: data splits, tokenizer, teacher and student.

The teacher is trained to be useful; the student only gets a short warm-up, like the paper's
briefly fine-tuned "init" students, so it is weak but not random and distillation has room to
help. A build happens inside `atomic_folder`, so a folder that exists is complete; a lock file
makes concurrent callers wait for one build instead of racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from amid_ray.atomic import atomic_folder
from amid_ray.data import encode_example, load_examples
from amid_ray.demo.models import fresh_gpt2, load_gpt2_tokenizer
from amid_ray.demo.tasks import write_demo_splits
from amid_ray.demo.training import Report, TrainingRun, train_on_responses
from amid_ray.evaluation import GenerationSettings, generate_responses, rouge_l
from amid_ray.models import save_model

# Bump when the build changes in a way the recipe does not show, so old caches are not reused.
# 2: training batches come from the worker's `micro_batches` (a different data order).
BUILD_FORMAT = 2
MANIFEST = "demo.json"


@dataclass(frozen=True)
class ModelShape:
    """Size of a GPT-2 built from scratch."""

    n_layer: int
    n_embd: int
    n_head: int


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo assets; the cache folder is named after its hash.

    The defaults build in about 140 s on 2 uncontended CPU cores (teacher ~115 s). On the 280
    test items the teacher scores ROUGE-L ~31 greedy / ~19 sampled, the init student ~4 / ~3
    and a random student 0 (see `evaluate_demo_models`; measured on build format 1, which
    shuffled the training examples with another generator). Both models are saved without
    dropout.
    """

    n_train: int = 6000
    n_dev: int = 280
    n_test: int = 280
    data_seed: int = 0
    n_positions: int = 256
    max_length: int = 128
    max_prompt_length: int = 112
    teacher: ModelShape = ModelShape(n_layer=2, n_embd=128, n_head=4)
    teacher_training: TrainingRun = TrainingRun(
        steps=1200, batch_size=16, learning_rate=2e-3, warmup_steps=50, seed=1)
    student: ModelShape = ModelShape(n_layer=2, n_embd=64, n_head=2)
    student_warmup: TrainingRun = TrainingRun(
        steps=400, batch_size=16, learning_rate=3e-3, warmup_steps=20, seed=2)

    def fingerprint(self) -> str:
        """A short hash of the recipe and the build format."""
        text = json.dumps({"format": BUILD_FORMAT, "recipe": asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


DEMO_RECIPE = DemoRecipe()


@dataclass(frozen=True)
class DemoAssets:
    """Where the built demo lives: MiniLLM-format splits, HF model folders and the tokenizer."""

    data_dir: Path
    train_file: Path
    dev_file: Path
    test_file: Path
    teacher_dir: Path
    student_dir: Path
    tokenizer_dir: Path
    # demo.json: the recipe and how long each part of the build took.
    manifest: dict[str, object] = field(default_factory=dict, compare=False)

    @classmethod
    def in_folder(cls, root: Path) -> DemoAssets:
        """The asset paths of a complete build folder."""
        data_dir = root / "data"
        return cls(
            data_dir=data_dir,
            train_file=data_dir / "train.jsonl",
            dev_file=data_dir / "dev.jsonl",
            test_file=data_dir / "test.jsonl",
            teacher_dir=root / "teacher",
            student_dir=root / "student",
            tokenizer_dir=root / "tokenizer",
            manifest=json.loads((root / MANIFEST).read_text()),
        )


def build_demo_assets(
    cache_dir: str | Path, *, progress: bool = True, recipe: DemoRecipe = DEMO_RECIPE
) -> DemoAssets:
    """Build the demo data, teacher and student into `cache_dir` once; return their paths.

    A second call with the same recipe returns at once. Concurrent callers (threads or
    processes) wait on a lock file and the later ones reuse the first one's build. A smaller
    `recipe` gives a faster, weaker build (for tests); the default is the real demo.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / f"demo-{recipe.fingerprint()}"
    if final.is_dir():
        return DemoAssets.in_folder(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    report = _printer(progress)
    # Under the lock this process is the folder's only writer, as atomic_folder requires.
    with _exclusive_lock(cache_dir / ".demo.lock"):
        if not final.is_dir():
            with atomic_folder(final) as staging:
                _build_into(staging, recipe, report)
    return DemoAssets.in_folder(final)


def _printer(progress: bool) -> Report:
    def report(line: str) -> None:
        if progress:
            print(f"[demo] {line}", flush=True)

    return report


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _all_cpu_threads() -> Iterator[None]:
    """Let torch use every CPU this process may run on (Ray may have lowered it), then restore."""
    before = torch.get_num_threads()
    # sched_getaffinity honours CPU pinning (containers, taskset) but is Linux-only.
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(len(usable) if usable else os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_into(folder: Path, recipe: DemoRecipe, report: Report) -> None:
    started = time.monotonic()
    splits = write_demo_splits(folder / "data", n_train=recipe.n_train, n_dev=recipe.n_dev,
                               n_test=recipe.n_test, seed=recipe.data_seed)
    tokenizer = load_gpt2_tokenizer(folder / "tokenizer")
    encoded = [
        encode_example(tokenizer, example, max_length=recipe.max_length,
                       max_prompt_length=recipe.max_prompt_length)
        for example in load_examples(splits["train"])
    ]
    report(f"data: {recipe.n_train} train, {recipe.n_dev} dev, {recipe.n_test} test examples")
    seconds = {}
    with _all_cpu_threads():
        for role, shape, run in (("teacher", recipe.teacher, recipe.teacher_training),
                                 ("student", recipe.student, recipe.student_warmup)):
            role_started = time.monotonic()
            # No dropout: these runs are short, and dropout only slows them down.
            model = fresh_gpt2(tokenizer, n_layer=shape.n_layer, n_embd=shape.n_embd,
                               n_head=shape.n_head, n_positions=recipe.n_positions,
                               seed=run.seed, dropout=False)
            train_on_responses(model, encoded, run, tokenizer.pad_token_id, _tagged(report, role))
            save_model(model, tokenizer, folder / role)
            seconds[role] = round(time.monotonic() - role_started, 1)
    seconds["total"] = round(time.monotonic() - started, 1)
    manifest = {"format": BUILD_FORMAT, "recipe": asdict(recipe), "build_seconds": seconds}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    report(f"built in {seconds['total']:.0f} s")


def _tagged(report: Report, tag: str) -> Report:
    return lambda line: report(f"{tag}: {line}")


def evaluate_demo_models(
    assets: DemoAssets, n_test: int, *, seed: int = 10, max_new_tokens: int = 64
) -> dict[str, object]:
    """ROUGE-L of the teacher, the init student and a random student on the test split.

    Each model answers the first `n_test` test prompts greedily and by sampling at temperature
    1.0 (the paper protocol, one seed). `max_new_tokens` is cut from the protocol's 256 because
    every demo answer is short; an untrained model would otherwise babble for 256 tokens.
    """
    tokenizer = load_gpt2_tokenizer(assets.tokenizer_dir)
    examples = load_examples(assets.test_file, limit=n_test)
    prompts = [example.prompt for example in examples]
    references = [example.references for example in examples]
    student = AutoModelForCausalLM.from_pretrained(assets.student_dir)
    models = {
        "teacher": AutoModelForCausalLM.from_pretrained(assets.teacher_dir),
        "init_student": student,
        "random_student": fresh_gpt2(tokenizer, n_layer=student.config.n_layer,
                                     n_embd=student.config.n_embd,
                                     n_head=student.config.n_head,
                                     n_positions=student.config.n_positions, seed=seed),
    }
    sampled = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=32)
    scores: dict[str, object] = {"n_test": len(examples)}
    with _all_cpu_threads():
        for name, model in models.items():
            scores[name] = {
                mode: rouge_l(generate_responses(model, tokenizer, prompts, settings, seed=seed),
                              references)
                for mode, settings in (("greedy", sampled.as_greedy()), ("sampled", sampled))
            }
    return scores
