"""The embedded demo: synthetic instruction data, a small GPT-2 teacher and a weaker student.

What a fresh user's first command runs, offline. Not part of the distillation library: the
product reaches it only through `amid_ray.sources` (the `"demo"` source name).

- `tasks`: synthetic instruction tasks with exact answers, written as MiniLLM JSONL splits;
- `models`: the real GPT-2 tokenizer (offline) and GPT-2s from random weights;
- `training`: cross-entropy on response tokens, with the worker's data order and schedule;
- `build`: the recipe, the cached build of all assets, and their evaluation.
"""

from amid_ray.demo.build import (
    DEMO_RECIPE,
    DemoAssets,
    DemoRecipe,
    ModelShape,
    build_demo_assets,
    evaluate_demo_models,
)
from amid_ray.demo.models import fresh_gpt2, load_gpt2_tokenizer
from amid_ray.demo.tasks import TASK_FAMILIES, generate_examples, write_demo_splits
from amid_ray.demo.training import TrainingRun, response_loss, train_on_responses

__all__ = [
    "DEMO_RECIPE",
    "TASK_FAMILIES",
    "DemoAssets",
    "DemoRecipe",
    "ModelShape",
    "TrainingRun",
    "build_demo_assets",
    "evaluate_demo_models",
    "fresh_gpt2",
    "generate_examples",
    "load_gpt2_tokenizer",
    "response_loss",
    "train_on_responses",
    "write_demo_splits",
]
