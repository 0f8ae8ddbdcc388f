"""Does distillation transfer anything on the demo? The demo student before and after one run.

One AMiD run on a local Ray (the path of `amid-ray train`) with the base values of
`search_spaces/demo.yaml` (or `--config`, plus `--set` overrides). The starting student and the
run's best checkpoint are then measured the same way, outside the run:

- dev AMiD loss and dev ROUGE-L: the worker's own evaluation functions (same dev items, teacher
  and AMiD settings as in training);
- greedy ROUGE-L and exact match on the whole demo test split (never seen in training or in
  checkpoint selection), with the teacher's score as the ceiling.

Run: `python benchmarks/demo_distillation.py [--set train.max_steps=80 ...]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from amid_ray import cluster
from amid_ray.cache_plan import encode_all
from amid_ray.config import load_config
from amid_ray.data import load_examples
from amid_ray.evaluation import GenerationSettings, evaluate
from amid_ray.metrics import VAL_LOSS
from amid_ray.models import load_causal_lm
from amid_ray.sources import demo_assets, load_models, load_train_dev
from amid_ray.training import run_training
from amid_ray.worker import Objective, dev_losses, dev_rouge_l

DEMO_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def measure(model, teacher, tokenizer, dev, test, run) -> dict[str, float]:
    """Dev AMiD loss / ROUGE-L (as an evaluation round computes them) and test-split scores."""
    model.eval()
    dev_loss = dev_losses(model, teacher, tokenizer, encode_all(run, tokenizer, dev), run,
                          Objective.of(run), rank=0, world_size=1, device=torch.device("cpu"),
                          autocast_dtype=None)
    dev_scores = dev_rouge_l(model, tokenizer, dev, run, rank=0)
    settings = GenerationSettings(max_new_tokens=run.eval.max_new_tokens,
                                  max_prompt_length=run.data.max_prompt_length,
                                  batch_size=run.eval.batch_size).as_greedy()
    test_scores = evaluate(model, tokenizer, {"test": test}, settings,
                           seeds=[run.eval.seed]).to_dict()["sets"]["test"]
    return {"dev_amid_loss": dev_loss[VAL_LOSS], "dev_rougeL": sum(dev_scores) / len(dev_scores),
            "test_rougeL": test_scores["rouge_l"]["mean"],
            "test_exact_match": test_scores["exact_match"]["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_SPACE))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    run = load_config(args.config, args.set)
    assets = demo_assets(progress=True)
    teacher, student, tokenizer = load_models(run.models)
    _, dev = load_train_dev(run.data, run.train.seed)
    test = load_examples(assets.test_file)

    rows = {"teacher (ceiling)": measure(teacher, teacher, tokenizer, dev, test, run),
            "student at start": measure(student, teacher, tokenizer, dev, test, run)}
    with tempfile.TemporaryDirectory(prefix="amid-demo-distillation-") as storage:
        run.resources.storage = storage
        run.name = "demo-distillation"
        begin = time.perf_counter()
        with cluster.ray_session(num_cpus=2, quiet=True):
            outcome = run_training(run)
        train_s = time.perf_counter() - begin
        trained, _ = load_causal_lm(outcome.best_checkpoint)
        rows["student after (best checkpoint)"] = measure(trained, teacher, tokenizer, dev,
                                                           test, run)

    amid = run.amid
    print(f"config: {args.config} {' '.join(args.set)}")
    print(f"  AMiD alpha={amid.alpha} lam={amid.lam} divergence={amid.divergence} "
          f"order={amid.order}; lr={run.train.lr}, {run.train.max_steps} steps x batch "
          f"{run.train.batch_size}, {run.resources.num_workers} worker(s); trained in "
          f"{train_s:.0f} s (Ray run incl. start-up)")
    print(f"  dev: first {run.eval.num_examples} dev items; test: all {len(test)} test items, "
          f"greedy, {run.eval.max_new_tokens} new tokens")
    print()
    print(f"{'model':32} {'dev AMiD loss':>13} {'dev ROUGE-L':>11} {'test ROUGE-L':>12} "
          f"{'test EM':>7}")
    for name, row in rows.items():
        print(f"{name:32} {row['dev_amid_loss']:>13.4f} {row['dev_rougeL']:>11.2f} "
              f"{row['test_rougeL']:>12.2f} {row['test_exact_match']:>7.2f}")
    print()
    print("the run's evaluation rounds:")
    print(f"{'step':>5} {'train AMiD loss':>15} {'dev AMiD loss':>13} {'dev ROUGE-L':>11}")
    for metrics in outcome.history:
        print(f"{metrics['step']:>5} {metrics['distil_loss']:>15.4f} {metrics['val_loss']:>13.4f} "
              f"{metrics['rougeL']:>11.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
