"""The `amid-ray` command. It composes library parts and holds no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from amid_ray.config import ConfigError, load_config

EPILOG = "Run `amid-ray COMMAND --help` for the options of a command."


def _print_json_last(summary: dict) -> None:
    sys.stdout.flush()
    print(json.dumps(summary, default=str), flush=True)


# --------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    from amid_ray import cluster
    from amid_ray.sources import demo_assets, uses_demo
    from amid_ray.training import run_training

    run = load_config(args.config, args.set)  # every config error before Ray starts
    if args.address:
        run.resources.address = args.address
    if uses_demo(run):
        print("preparing the embedded demo (cached after the first time)...", flush=True)
        demo_assets(progress=True)
    started = cluster.connect(run.resources.address)
    try:
        begin = time.perf_counter()
        outcome = run_training(run)
        summary = outcome.summary() | {"wall_s": round(time.perf_counter() - begin, 1)}
    finally:
        if started:
            import ray

            ray.shutdown()
    print(f"best ROUGE-L {summary['rougeL']} at step {summary['best_step']}: "
          f"{summary['best_checkpoint']}")
    _print_json_last(summary)
    return 0


# --------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from amid_ray.data import load_examples
    from amid_ray.evaluation import GenerationSettings, evaluate
    from amid_ray.models import load_causal_lm

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens,
                                  max_prompt_length=args.max_prompt_length,
                                  batch_size=args.batch_size)
    if args.greedy:
        settings = settings.as_greedy()
    eval_sets = {}
    for path in args.data:
        name = Path(path).stem
        eval_sets[name] = load_examples(path, limit=args.max_examples)
    begin = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model)
    report = evaluate(model, tokenizer, eval_sets, settings, seeds=args.seeds, progress=True)
    wall = time.perf_counter() - begin
    print(report.format_table())
    print(f"wall time {wall:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict() | {"wall_s": wall}, indent=2))
    return 0


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from amid_ray.sources import demo_assets

    assets = demo_assets(progress=True)
    _print_json_last({k: str(v) for k, v in vars(assets).items()})
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amid-ray",
        description="Hyperparameter search for AMiD knowledge distillation of LLMs on Ray.",
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="run one distillation (the base values of a config or search-space file)",
        description="Run one AMiD distillation on Ray Train and print, as the last line, a JSON "
        "summary with the best checkpoint by ROUGE-L. With no --config: the embedded demo.",
    )
    train.add_argument("--config", help="YAML run configuration or search-space file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set train.lr=1e-4 (repeatable)")
    train.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a "
                       "local Ray)")
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser(
        "eval", help="ROUGE-L / exact match of a model on instruction eval sets",
        description="Generate answers with the paper's protocol (sampling, temperature 1, "
        "no-repeat-ngram 6, several seeds) and print a table per eval set.",
    )
    evaluate.add_argument("--model", required=True,
                          help="Hugging Face model folder or .gguf file")
    evaluate.add_argument("--data", required=True, nargs="+", metavar="FILE",
                          help="eval sets (.jsonl/.json/datasets folder)")
    evaluate.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50])
    evaluate.add_argument("--max-examples", type=int, help="first N items of each set")
    evaluate.add_argument("--max-new-tokens", type=int, default=256)
    evaluate.add_argument("--max-prompt-length", type=int, default=256)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--greedy", action="store_true", help="greedy decoding (one pass)")
    evaluate.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    evaluate.set_defaults(handler=cmd_eval)

    demo = commands.add_parser("demo-assets", help="build (or show) the embedded demo's data "
                               "and models")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, ValueError) as error:
        print(f"amid-ray {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
