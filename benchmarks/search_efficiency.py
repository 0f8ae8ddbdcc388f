"""Does a model-based search with early stopping find the grid's best student for less compute?

On the embedded demo world (teacher, student and data of `search_spaces/demo.yaml`) this compares
four ways of choosing the AMiD objective, all at λ = 0.1 and order pr:

- grid: the paper's sweep, α ∈ {-5, -3, -1, -0.5, 0, 0.5, 1} × divergence {kl, ab}, every trial
  to the full budget;
- tpe, gp, random: the product's Optuna samplers (`amid_ray.sampling.make_sampler`, with the
  product's start-up default) over α ~ U[-5, 1] × {kl, ab}, with the product's ASHA rule
  (rungs in optimizer steps, grace = eval.every · grace_rounds, reduction factor 2, one bracket,
  metric best dev ROUGE-L); one search per search seed, each stopped from sampling once it has
  spent `--search-budget` × the grid's compute.

Before that, 3 training seeds of α = -3, kl measure the seed noise the differences between
configurations must exceed. Trials run one at a time in this process, without Ray
(`train_session.LocalSession`); ASHA's decision is taken in the report callback. Each trial's
best-dev-round model is scored once on the demo test split (greedy, as `evaluation.evaluate`);
the test score never takes part in any choice.

Compute is counted in student optimizer steps, and in teacher forward tokens (the padded
training batches the teacher reads). A search's best-so-far curve is, after each trial, the test
ROUGE-L of the trial with the best dev ROUGE-L so far, against the compute spent so far. The
headline is the compute a method needs until that curve comes within 0.5 ROUGE-L of the grid's
own dev-selected test score, as a fraction of the grid's compute.

Every finished trial is appended at once to the results file (JSON lines); a restarted run skips
finished trials and rebuilds each search's Optuna study by replaying its recorded trials (the
seeded sampler proposes the same points again, which is checked), so it continues as an
uninterrupted run would. `--report` only prints the table, the PNG and the JSON line.

Run: `OMP_NUM_THREADS=1 python benchmarks/search_efficiency.py` (about 2 h on one CPU core);
`--smoke` for a minutes-long check into separate files; `--help` for the settings.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from amid_ray.config import config_from_dict, point_config, read_yaml, set_dotted
from amid_ray.data import load_examples
from amid_ray.evaluation import GenerationSettings, evaluate
from amid_ray.metrics import BEST_ROUGE_L, ROUGE_L, STEP, VAL_LOSS
from amid_ray.models import load_causal_lm
from amid_ray.sampling import DefineByRun, make_sampler
from amid_ray.sources import demo_assets
from amid_ray.train_session import LocalSession
from amid_ray.worker import MODEL_DIR, DistillationWorker

REPO = Path(__file__).resolve().parents[1]
DEMO_SPACE = REPO / "search_spaces" / "demo.yaml"
RESULTS = REPO / "benchmarks" / "results"

GRID_ALPHAS = (-5.0, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0)
DIVERGENCES = ("kl", "ab")
NOISE_POINT = {"amid.alpha": -3.0, "amid.divergence": "kl"}
NOISE_SEEDS = (10, 11, 12)  # 10: the demo's training seed, which every other trial uses
SEARCH_METHODS = ("tpe", "gp", "random")
#: How close to the grid's selected test ROUGE-L a search must come to count as "reached".
TOLERANCE = 0.5


@dataclass(frozen=True)
class Settings:
    """Everything that decides the trials; a results file holds one setting only."""

    max_steps: int
    eval_every: int
    dev_examples: int
    test_examples: int | None  # None: the whole test split
    grid_alphas: tuple[float, ...]
    divergences: tuple[str, ...]
    noise_seeds: tuple[int, ...]
    search_seeds: tuple[int, ...]
    methods: tuple[str, ...]
    search_budget: float  # fraction of the grid's compute each search may spend
    #: The searches' nominal size (as many trials as the grid has points by default): it sets
    #: the samplers' random start-up, `search_space.default_startup_trials(num_samples)`.
    num_samples: int

    @property
    def grid_points(self) -> list[dict[str, Any]]:
        return [{"amid.alpha": a, "amid.divergence": d}
                for d in self.divergences for a in self.grid_alphas]

    @property
    def grid_steps(self) -> int:
        return len(self.grid_points) * self.max_steps


#: The per-trial budget, from a pilot on one core (α=-3 kl, seeds 10/11/12, and 3 other points):
#: a 320-step trial takes ~90 s on an idle core (0.22 s a step, ~1.5 s an evaluation round on
#: 140 dev items, ~3 s model loading and test scoring), so the whole benchmark (~79 full trials'
#: worth of steps plus the stopped trials' overheads) fits in about 2 h. Shorter trials barely
#: move the student (test ROUGE-L ~4 at the start); at 320 steps the seed noise of one
#: configuration (test ROUGE-L sd 0.6) is still as large as the differences between the four
#: configurations tried, while dev ROUGE-L (best over rounds) separated them (seed sd 0.14).
DEFAULTS = Settings(max_steps=320, eval_every=40, dev_examples=140, test_examples=None,
                    grid_alphas=GRID_ALPHAS, divergences=DIVERGENCES, noise_seeds=NOISE_SEEDS,
                    search_seeds=(0, 1, 2), methods=SEARCH_METHODS, search_budget=0.5,
                    num_samples=14)
SMOKE = Settings(max_steps=4, eval_every=2, dev_examples=4, test_examples=16,
                 grid_alphas=(-3.0, 1.0), divergences=("kl",), noise_seeds=(10, 11),
                 search_seeds=(0,), methods=SEARCH_METHODS, search_budget=2.0, num_samples=6)


# --------------------------------------------------------------------------- the results file


class Results:
    """The JSON-lines results file: a settings line, then one line per finished trial."""

    def __init__(self, path: Path, settings: Settings):
        self.path = path
        self.trials: list[dict[str, Any]] = []
        saved = None
        if path.is_file():
            text = path.read_text()
            if text and not text.endswith("\n"):  # a write cut short by a kill: drop its tail
                text = text[: text.rfind("\n") + 1]
                path.write_text(text)
                print(f"[results] dropped an unfinished last line of {path}", flush=True)
            for number, line in enumerate(text.splitlines(), start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: that trial reruns
                    print(f"[results] ignoring unreadable line {number} of {path}", flush=True)
                    continue
                if row.get("kind") == "settings":
                    saved = row["settings"]
                else:
                    self.trials.append(row)
        wanted = json.loads(json.dumps(asdict(settings)))
        if saved is not None and saved != wanted:
            changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
            before, now = [saved.get(k) for k in changed], [wanted[k] for k in changed]
            raise SystemExit(f"{path} was made with other settings ({changed}: {before}, now "
                             f"{now}); use another --results file or the same settings")
        if saved is None:
            self._append({"kind": "settings", "settings": wanted})

    def _append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, row: dict[str, Any]) -> None:
        self._append(row)
        self.trials.append(row)

    def of(self, method: str, seed: int) -> list[dict[str, Any]]:
        rows = [r for r in self.trials if r["method"] == method and r["seed"] == seed]
        return sorted(rows, key=lambda r: r["trial"])


def load_settings(path: Path) -> Settings:
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "settings":
            raw = row["settings"]
            return Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    raise SystemExit(f"{path} has no settings line: not a results file of this benchmark")


# --------------------------------------------------------------------------- ASHA


class ASHARungs:
    """Ray's asynchronous successive halving with one bracket (`ASHAScheduler(brackets=1)`), as
    the product configures it (`early_stopping.make_scheduler`), for trials run one at a time.

    Rungs sit at grace·rf^k optimizer steps for k = 0 … ⌊log(max/grace)/log(rf)⌋. A trial's first
    result at or past a rung it has no record at is compared with that rung's records: with
    `mode` max it stops when value < the (1 - 1/rf)·100 percentile (linear interpolation) of the
    values earlier trials recorded there; its value is then recorded. Results at max_steps end
    the trial anyway and take no decision.
    """

    def __init__(self, *, grace_steps: int, reduction_factor: int, max_steps: int, mode: str):
        count = int(np.log(max_steps / grace_steps) / np.log(reduction_factor) + 1)
        self.milestones = [grace_steps * reduction_factor ** k for k in reversed(range(count))]
        self.recorded: dict[int, dict[str, float]] = {m: {} for m in self.milestones}
        self.factor, self.max_steps = reduction_factor, max_steps
        self.sign = 1.0 if mode == "max" else -1.0

    def should_stop(self, trial_id: str, step: int, value: float) -> bool:
        if step >= self.max_steps:
            return False
        for milestone in self.milestones:  # highest first
            recorded = self.recorded[milestone]
            if step < milestone or trial_id in recorded:
                continue
            signed = self.sign * value
            stop = bool(recorded) and signed < np.nanpercentile(
                list(recorded.values()), (1 - 1 / self.factor) * 100)
            recorded[trial_id] = signed
            return stop
        return False


class StoppedByASHA(Exception):
    """Raised from the report callback to end a trial at a rung."""


# --------------------------------------------------------------------------- one trial


@dataclass
class World:
    """What every trial shares: the demo's base configuration (a plain mapping) and test set."""

    base: dict[str, Any]
    test: list


def demo_world(settings: Settings) -> World:
    """The demo's base run with this benchmark's per-trial budget, and its test split."""
    assets = demo_assets(progress=True)
    raw = read_yaml(DEMO_SPACE)
    raw.pop("search", None)
    for key, value in {"train.max_steps": settings.max_steps, "eval.every": settings.eval_every,
                       "eval.num_examples": settings.dev_examples, "train.log_every": 0}.items():
        set_dotted(raw, key, value, source="search_efficiency")
    test = load_examples(assets.test_file)
    if settings.test_examples is not None:
        test = test[: settings.test_examples]
    return World(base=raw, test=test)


def search_run(world: World, settings: Settings, method: str, seed: int):
    """The RunConfig of one search: the demo's run with this benchmark's search section."""
    raw = copy.deepcopy(world.base)
    raw["search"] = {
        "num_samples": settings.num_samples, "max_concurrent": 1, "seed": seed,
        "scheduler": {"type": "asha", "grace_rounds": 1, "reduction_factor": 2},
        "sampler": {"type": method},
        "params": {"amid.alpha": {"type": "uniform", "low": -5.0, "high": 1.0},
                   "amid.divergence": {"type": "categorical", "values": list(DIVERGENCES)}},
    }
    return config_from_dict(raw, f"search_efficiency {method} seed {seed}")


def point_run(world: World, point: dict[str, Any], train_seed: int = 10):
    """The RunConfig of one point (dotted keys) of the space, trained with `train_seed`."""
    raw = copy.deepcopy(world.base)
    for key, value in {**point, "train.seed": train_seed}.items():
        set_dotted(raw, key, value, source="search_efficiency point")
    return config_from_dict(raw, f"search_efficiency point {point}")


def test_score(model_dir: Path, world: World, run) -> dict[str, float]:
    """Greedy ROUGE-L and exact match of a saved model on the demo test split."""
    model, tokenizer = load_causal_lm(model_dir)
    model.eval()
    generation = GenerationSettings(max_new_tokens=run.eval.max_new_tokens,
                                    max_prompt_length=run.data.max_prompt_length,
                                    batch_size=run.eval.batch_size).as_greedy()
    scores = evaluate(model, tokenizer, {"test": world.test}, generation,
                      seeds=[run.eval.seed]).to_dict()["sets"]["test"]
    return {"test_rougeL": scores["rouge_l"]["mean"],
            "test_exact_match": scores["exact_match"]["mean"]}


def run_trial(world: World, run, *,
              decide: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Train one configuration in this process; `decide(metrics)` True stops it (ASHA).

    Returns its evaluation rounds, the steps it ran, its best dev ROUGE-L and the test scores of
    its best-dev round's model.
    """
    began = time.perf_counter()
    curve: list[dict[str, float]] = []
    tokens = [0]
    stopped = False
    with tempfile.TemporaryDirectory(prefix="search-efficiency-") as scratch:
        best_model = Path(scratch) / "best"

        def on_report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
            if not curve or metrics[ROUGE_L] > max(r["rougeL"] for r in curve):
                shutil.rmtree(best_model, ignore_errors=True)
                shutil.copytree(checkpoint / MODEL_DIR, best_model)
            curve.append({"step": metrics[STEP], "rougeL": metrics[ROUGE_L],
                          "best_rougeL": metrics[BEST_ROUGE_L], "val_loss": metrics[VAL_LOSS],
                          "teacher_tokens": tokens[0]})
            if decide is not None and decide(metrics):
                raise StoppedByASHA

        with contextlib.redirect_stdout(io.StringIO()):  # the worker's per-round lines
            worker = DistillationWorker(run, LocalSession(on_report))
            collate = worker.collate

            def counting_collate(encoded):
                batch = collate(encoded)
                tokens[0] += batch["input_ids"].numel()  # what the teacher's forward reads
                return batch

            worker.collate = counting_collate
            try:
                worker.train()
            except StoppedByASHA:
                stopped = True
        scores = test_score(best_model, world, run)
    best = max(curve, key=lambda r: r["rougeL"])  # first of equals: the checkpoint kept above
    return {"steps": curve[-1]["step"], "stopped_early": stopped, "curve": curve,
            "best_dev_rougeL": best["rougeL"], "best_step": best["step"],
            "teacher_tokens": curve[-1]["teacher_tokens"], **scores,
            "wall_s": time.perf_counter() - began}


# --------------------------------------------------------------------------- the phases


class Clock:
    """Progress lines with the time since the run started."""

    def __init__(self) -> None:
        self.began = time.perf_counter()

    def say(self, text: str) -> None:
        elapsed = int(time.perf_counter() - self.began)
        print(f"[{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}] {text}",
              flush=True)


def _describe(point: dict[str, Any]) -> str:
    return f"α={point['amid.alpha']:+.2f} {point['amid.divergence']}"


def _trial_line(row: dict[str, Any]) -> str:
    how = f"stopped at step {row['steps']} (ASHA)" if row["stopped_early"] else \
        f"{row['steps']} steps"
    return (f"{_describe(row['params'])}: {how}, best dev ROUGE-L {row['best_dev_rougeL']:.2f} "
            f"@ {row['best_step']}, test {row['test_rougeL']:.2f} ({row['wall_s']:.0f} s)")


def run_noise_and_grid(world: World, settings: Settings, results: Results, clock: Clock) -> None:
    """The seed-noise trials, then the grid (its α=-3 kl point is the noise trial of seed 10)."""
    for number, seed in enumerate(settings.noise_seeds):
        if results.of("noise", seed):
            continue
        row = run_trial(world, point_run(world, NOISE_POINT, seed))
        row = {"method": "noise", "seed": seed, "trial": number, "params": NOISE_POINT,
               "train_seed": seed, **row}
        results.add(row)
        clock.say(f"[noise seed {seed}] {_trial_line(row)}")
    done = {(r["params"]["amid.alpha"], r["params"]["amid.divergence"])
            for r in results.of("grid", 0)}
    for number, point in enumerate(settings.grid_points):
        if (point["amid.alpha"], point["amid.divergence"]) in done:
            continue
        same = [r for r in results.of("noise", 10) if r["params"] == point]
        if same:  # the identical run (same config, same seed) was the noise trial
            row = {**same[0], "reused_from": "noise seed 10"}
        else:
            row = run_trial(world, point_run(world, point))
        row = {**row, "method": "grid", "seed": 0, "trial": number, "params": point,
               "train_seed": 10}
        results.add(row)
        clock.say(f"[grid {number + 1}/{len(settings.grid_points)}] {_trial_line(row)}")


def _same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-12) if isinstance(a[k], float) else a[k] == b[k]
        for k in a)


def run_search(world: World, settings: Settings, results: Results, clock: Clock, method: str,
               seed: int) -> None:
    """One search: the product's sampler proposes, ASHA stops, until the budget is spent.

    Recorded trials are replayed into a fresh study (same seeded sampler, same history, so the
    same proposals) and their curves into fresh rungs, then the search goes on from there.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = search_run(world, settings, method, seed)
    spec, base = run.search_spec, run.to_dict()
    rule = spec.scheduler
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    define = DefineByRun(spec, base)
    rungs = ASHARungs(grace_steps=rule.grace_rounds * settings.eval_every,
                      reduction_factor=rule.reduction_factor, max_steps=settings.max_steps,
                      mode=rule.mode)
    recorded = results.of(method, seed)
    budget = settings.search_budget * settings.grid_steps
    spent, number = 0, 0
    while spent < budget:
        trial = study.ask()
        define(trial)
        params = dict(trial.params)
        trial_id = str(trial.number)
        if number < len(recorded):
            row = recorded[number]
            if not _same_params(params, row["params"]):
                raise SystemExit(f"{method} seed {seed}: replaying trial {number}, the sampler "
                                 f"proposed {params} but the results file has {row['params']}; "
                                 "the run cannot continue this search (delete its lines)")
            stop = next((r["step"] for r in row["curve"]
                         if rungs.should_stop(trial_id, r["step"], r[rule.metric])), None)
            if stop != (row["steps"] if row["stopped_early"] else None):
                raise SystemExit(f"{method} seed {seed}: replaying trial {number}, ASHA stops "
                                 f"it at {stop}, the results file at {row['steps']} "
                                 f"(stopped: {row['stopped_early']}); delete this search's lines")
        else:
            row = run_trial(world, point_config(base, params, f"{method} trial {number}"),
                            decide=lambda m, t=trial_id: rungs.should_stop(t, m["step"],
                                                                           m[rule.metric]))
            row = {"method": method, "seed": seed, "trial": number, "params": params,
                   "train_seed": 10, "startup": number < spec.startup_trials, **row}
            results.add(row)
        for round_ in row["curve"]:
            trial.report(round_[rule.metric], round_["step"])
        # As the product's searcher: the last reported value, a stopped trial's included.
        study.tell(trial, row["curve"][-1][rule.metric])
        spent += row["steps"]
        number += 1
        if number > len(recorded):
            origin = "random" if method == "random" else \
                "random start-up" if row["startup"] else "the sampler's model"
            clock.say(f"[{method} seed {seed} #{number}, {origin}] {_trial_line(row)}; compute "
                      f"{spent}/{budget:.0f} steps")


# --------------------------------------------------------------------------- the report


def best_so_far(rows: list[dict[str, Any]]) -> list[tuple[int, int, float, float]]:
    """After each trial: (cumulative steps, cumulative teacher tokens, selected test ROUGE-L,
    its dev ROUGE-L), the selected trial being the one with the best dev ROUGE-L so far (the
    earlier of equals)."""
    points, steps, tokens, chosen = [], 0, 0, None
    for row in rows:
        steps += row["steps"]
        tokens += row["teacher_tokens"]
        if chosen is None or row["best_dev_rougeL"] > chosen["best_dev_rougeL"]:
            chosen = row
        points.append((steps, tokens, chosen["test_rougeL"], chosen["best_dev_rougeL"]))
    return points


def reached_at(curve: list[tuple[int, int, float, float]], target: float) -> int | None:
    """The compute (steps) after which the selected test ROUGE-L is first >= target."""
    return next((steps for steps, _, test, _ in curve if test >= target), None)


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values),
            "range": max(values) - min(values)}


def asha_agrees(settings: Settings, rows: list[dict[str, Any]]) -> bool:
    """Whether the recorded stops equal those the independent reference rule predicts from the
    recorded curves (tests/asha_reference.py)."""
    sys.path.insert(0, str(REPO / "tests"))
    from asha_reference import asha_stop_rounds

    curves = [[r["best_rougeL"] for r in row["curve"]] for row in rows]
    predicted = asha_stop_rounds(curves, grace=1, factor=2,
                                 max_rounds=settings.max_steps // settings.eval_every, mode="max")
    actual = [len(row["curve"]) if row["stopped_early"] else None for row in rows]
    return predicted == actual


def report(results: Results, settings: Settings, png: Path) -> dict[str, Any]:
    """Print the tables, save the curves (PNG and CSV), return the headline figures."""
    grid = results.of("grid", 0)
    noise = [r for s in settings.noise_seeds for r in results.of("noise", s)]
    if len(grid) < len(settings.grid_points):
        raise SystemExit(f"the grid has {len(grid)}/{len(settings.grid_points)} trials in "
                         f"{results.path}: nothing to compare with yet")
    grid_steps = sum(r["steps"] for r in grid)
    grid_tokens = sum(r["teacher_tokens"] for r in grid)
    grid_curve = best_so_far(grid)
    grid_best = grid_curve[-1][2]
    target = grid_best - TOLERANCE

    batch = read_yaml(DEMO_SPACE)["train"]["batch_size"]
    print(f"per trial: {settings.max_steps} steps x batch {batch}, evaluation "
          f"every {settings.eval_every} steps on {settings.dev_examples} dev items; test: "
          f"{settings.test_examples or 'all'} test items, greedy")
    print(f"grid compute: {grid_steps} student steps, {grid_tokens:,} teacher forward tokens")
    print()
    print("seed noise (α=-3 kl, training seeds "
          f"{[r['train_seed'] for r in noise]}) and the grid's spread over configurations:")
    headline: dict[str, Any] = {"settings": asdict(settings), "grid_steps": grid_steps,
                                "grid_teacher_tokens": grid_tokens,
                                "grid_selected_test_rougeL": grid_best}
    for label, rows in (("noise", noise), ("grid", grid)):
        if len(rows) < 2:
            continue
        dev = _spread([r["best_dev_rougeL"] for r in rows])
        test = _spread([r["test_rougeL"] for r in rows])
        headline[f"{label}_dev"], headline[f"{label}_test"] = dev, test
        print(f"  {label:6} dev ROUGE-L mean {dev['mean']:6.2f} sd {dev['sd']:5.2f} range "
              f"{dev['range']:5.2f} | test mean {test['mean']:6.2f} sd {test['sd']:5.2f} range "
              f"{test['range']:5.2f}")
    for split in ("dev", "test") if "noise_test" in headline else ():
        exceeds = headline[f"grid_{split}"]["sd"] > headline[f"noise_{split}"]["sd"]
        headline[f"{split}_spread_exceeds_noise"] = exceeds
        verdict = "exceeds" if exceeds else "does NOT exceed"
        print(f"  {split}: the spread over configurations (sd) {verdict} the seed noise (sd)")
    print()
    print(f"{'grid point':14} {'best dev':>8} {'@step':>5} {'test':>6}")
    for row in grid:
        print(f"{_describe(row['params']):14} {row['best_dev_rougeL']:8.2f} {row['best_step']:5d} "
              f"{row['test_rougeL']:6.2f}")
    chosen = max(grid, key=lambda r: r["best_dev_rougeL"])
    print(f"grid selects {_describe(chosen['params'])} by dev: test ROUGE-L {grid_best:.2f}; "
          f"target {target:.2f} (within {TOLERANCE})")
    print()

    curves: dict[tuple[str, int], list] = {("grid", 0): grid_curve}
    print(f"{'method':7} {'seed':>4} {'trials':>6} {'stopped':>7} {'steps':>6} {'x grid':>6} "
          f"{'teacher tok':>11} {'final test':>10} {'reached at (x grid)':>19} "
          f"{'ASHA = reference':>16}")
    methods: dict[str, Any] = {}
    for method in settings.methods:
        fractions: list[float | None] = []
        finals = []
        for seed in settings.search_seeds:
            rows = results.of(method, seed)
            if not rows:
                continue
            curve = best_so_far(rows)
            curves[(method, seed)] = curve
            at = reached_at(curve, target)
            fractions.append(None if at is None else at / grid_steps)
            finals.append(curve[-1][2])
            agree = asha_agrees(settings, rows)
            shown = "not reached" if at is None else f"{at / grid_steps:.3f}"
            print(f"{method:7} {seed:4d} {len(rows):6d} "
                  f"{sum(r['stopped_early'] for r in rows):7d} {curve[-1][0]:6d} "
                  f"{curve[-1][0] / grid_steps:6.2f} {curve[-1][1]:11,d} {curve[-1][2]:10.2f} "
                  f"{shown:>19} {'yes' if agree else 'NO':>16}")
        if fractions:
            # "not reached" counts as infinitely late, so the median is honest about misses.
            ordered = sorted(math.inf if f is None else f for f in fractions)
            median = statistics.median(ordered)
            methods[method] = {"median_fraction": None if math.isinf(median) else median,
                               "per_seed": fractions, "final_test": finals,
                               "goal_met": median <= 0.25}
            shown = "not reached" if math.isinf(median) else f"{median:.3f}"
            print(f"{method:7} median fraction of grid compute to reach the target: {shown}")
    headline["methods"] = methods
    _save_curves(curves, grid_steps, target, png)
    return headline


def _save_curves(curves: dict[tuple[str, int], list], grid_steps: int, target: float,
                 png: Path) -> None:
    csv = png.with_suffix(".csv")
    lines = ["method,seed,steps,fraction_of_grid,teacher_tokens,selected_test_rougeL,"
             "selected_dev_rougeL"]
    for (method, seed), curve in curves.items():
        lines += [f"{method},{seed},{s},{s / grid_steps:.4f},{t},{test:.4f},{dev:.4f}"
                  for s, t, test, dev in curve]
    csv.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: curves only in {csv}")
        return
    colours = {"grid": "black", "tpe": "tab:blue", "gp": "tab:orange", "random": "tab:green"}
    styles = ["-", "--", ":"]
    figure, axes = plt.subplots(figsize=(8, 5))
    for (method, seed), curve in curves.items():
        xs = [s / grid_steps for s, *_ in curve]
        ys = [test for _, _, test, _ in curve]
        axes.step(xs, ys, where="post", marker="o", markersize=2.5,
                  color=colours.get(method, "grey"),
                  linestyle=styles[seed % len(styles)], linewidth=2 if method == "grid" else 1.2,
                  label=method if method == "grid" else f"{method} + ASHA, seed {seed}")
    axes.axhline(target, color="red", linestyle="--", linewidth=0.8,
                 label=f"grid's selected test ROUGE-L − {TOLERANCE}")
    axes.axvline(0.25, color="grey", linestyle=":", linewidth=0.8, label="goal: 0.25 × grid")
    axes.set_xlabel(f"compute (student optimizer steps) as a fraction of the grid's {grid_steps}")
    axes.set_ylabel("test ROUGE-L of the trial selected by dev")
    axes.set_title("Best so far vs compute on the demo world")
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    print(f"curves: {png} and {csv}")


# --------------------------------------------------------------------------- main


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Resumable: rerun the same command after an interruption. Results: "
               "benchmarks/results/search_efficiency.{jsonl,png,csv} (smoke: "
               "search_efficiency_smoke.*).")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny setting (2 grid points, 1 search seed, 4 steps) into "
                             "search_efficiency_smoke.*, to check the script in minutes")
    parser.add_argument("--report", action="store_true",
                        help="only print the table and save the PNG/CSV from the results file")
    parser.add_argument("--results", type=Path, help="results file (JSON lines)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps of a full trial")
    parser.add_argument("--eval-every", type=int, help="steps between evaluation rounds (rungs)")
    parser.add_argument("--dev-examples", type=int, help="dev items per evaluation round")
    parser.add_argument("--search-budget", type=float,
                        help="compute of each search as a fraction of the grid's")
    parser.add_argument("--search-seeds", type=int, nargs="+", help="one search per seed")
    parser.add_argument("--methods", nargs="+", choices=SEARCH_METHODS, help="samplers to run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    defaults = SMOKE if args.smoke else DEFAULTS
    stem = "search_efficiency_smoke" if args.smoke else "search_efficiency"
    path = args.results or RESULTS / f"{stem}.jsonl"
    png = path.with_suffix(".png")
    if args.report:
        if not path.is_file():
            raise SystemExit(f"no results file {path}: run the benchmark first")
        settings = load_settings(path)
        print(json.dumps(report(Results(path, settings), settings, png)))
        return
    chosen = {"max_steps": args.max_steps, "eval_every": args.eval_every,
              "dev_examples": args.dev_examples, "search_budget": args.search_budget,
              "search_seeds": None if args.search_seeds is None else tuple(args.search_seeds),
              "methods": None if args.methods is None else tuple(args.methods)}
    settings = Settings(**{**asdict(defaults),
                           **{k: v for k, v in chosen.items() if v is not None}})
    if settings.max_steps % settings.eval_every:
        raise SystemExit(f"--max-steps {settings.max_steps} must be a multiple of --eval-every "
                         f"{settings.eval_every} (rungs and rounds line up)")


    torch.set_num_threads(args.threads)
    clock = Clock()
    results = Results(path, settings)
    clock.say(f"settings {asdict(settings)}; results {path}; {len(results.trials)} trials "
              "already recorded")
    world = demo_world(settings)
    run_noise_and_grid(world, settings, results, clock)
    full = [r["wall_s"] for r in results.trials if r["method"] == "grid" and "reused_from" not in r]
    if full:
        searches = len(settings.search_seeds) * len(settings.methods)
        left = searches * settings.search_budget * len(settings.grid_points)
        each = statistics.fmean(full)
        clock.say(f"searches: {searches} x {settings.search_budget} x the grid's compute, about "
                  f"{left:.0f} full trials' worth; at {each:.0f} s per full trial about "
                  f"{left * each / 60:.0f} min plus the stopped trials' "
                  "start-up and test scoring (less for searches already recorded)")
    for seed in settings.search_seeds:
        for method in settings.methods:
            run_search(world, settings, results, clock, method, seed)
    clock.say("all trials done")
    print(json.dumps(report(results, settings, png)))


if __name__ == "__main__":
    main()
