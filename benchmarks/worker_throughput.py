"""Training tokens/s of the distillation step: a 1-worker Ray Train run versus a plain loop.

Both sides train the same student against the same teacher on the same batches with the same
settings. The Ray side is `amid_ray.training.run_training` (the real `train_loop_per_worker`,
one worker reserving all cores but one by default: Ray's own processes need a core of their
own, as on any node sized for its workers; `--cpus-per-worker` with every core shows what
sharing costs); the plain side is the same step as an ordinary
PyTorch loop in this process, built from the worker's own pieces (`micro_batches`,
`distillation_losses`, the AdamW parameter groups, `learning_rate_factor`, clipping, the same
`.item()` calls per micro-batch), with `torch.set_num_threads` equal to what a probe measures
inside a Ray Train worker with the same resources.

What is counted is what the worker reports as `tokens_per_s`: the attention-mask tokens of every
micro-batch of a report window over the wall time of that window. A run of `2 * steps` steps
with `eval.every = steps` has two windows:

- window 1 starts once the models are loaded and the data encoded, and includes the first
  step's warm-up (first allocations, lazy initialisation);
- window 2 starts after the first evaluation round and checkpoint: steady-state steps only.
  The comparison uses window 2 on both sides.

The plain side's seconds are measured; the Ray side's are tokens / reported tokens/s (the
token count of a window is the same on both sides: same batch stream). Each window's training
loss is printed too: equal losses show both sides did the same computation.

Each repeat has one Ray run and one plain run, in alternating order; the plain loop runs only
when no Ray process is left. A background monitor samples /proc every 0.5 s and prints, for
window 2, how many cores the training process, Ray's other processes (and the driver), and
processes outside this benchmark kept busy: on a shared machine other work competes for the
same cores, so repeats where it did are marked and summarised apart. Before each measurement
the benchmark waits (up to `--quiet-wait` s) for the machine to be quiet.

Run: `python benchmarks/worker_throughput.py [--steps 8] [--repeats 2] [--workdir DIR]`.
Experiments: `--worker-env KEY=VALUE` adds environment variables for the Ray workers (the
project's `cluster.connect` is called with its worker environment extended by them);
`--system-env KEY=VALUE` sets them while Ray starts, so Ray's own processes (raylet, GCS,
dashboard and its agent) inherit them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from amid_ray.config import RunConfig, config_from_dict  # noqa: E402

WORLD_SEED = 0


# --------------------------------------------------------------------------- machine load


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks used so far) for every process readable in /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def _descendants(table: dict[int, tuple[int, int]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


#: What the CPU monitor tells apart.
CPU_GROUPS = ("trainer", "ray_helpers", "others")


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _label(pid: int) -> str:
    """A short name for one of Ray's processes: its title, script or program."""
    if pid == os.getpid():
        return "driver (this process)"
    words = _command(pid).split()
    if not words:
        return "?"
    if words[0].startswith(("ray::", "ray-dashboard-")):
        return words[0]
    script = next((word for word in words[1:] if word.endswith(".py")), None)
    if script:
        return Path(script).name
    if "-c" in words:
        return f"{Path(words[0]).name} -c"
    return Path(words[0]).name


class CpuMonitor:
    """Samples, in a background thread, how many cores each group of processes keeps busy.

    - trainer: the process that trains (this one for the plain loop, the Ray Train worker for a
      Ray run);
    - ray_helpers: every other process this benchmark started (raylet, GCS, dashboard, the Train
      controller, idle workers), plus this process while a Ray run is on (the driver);
    - others: everything else on the machine (on a shared machine, other people's work).
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []  # (time, cores since the last)
        self.helpers: list[tuple[float, dict[str, float]]] = []  # the same, per Ray helper
        #: True while the plain loop runs beside an idle Ray run (its worker is then a helper).
        self.plain_beside_ray = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _group(self, pid: int, ours: set[int]) -> str:
        if pid not in ours:
            return "others"
        if pid == os.getpid():
            # This process trains in the plain loop; during a Ray run it is the driver.
            return "trainer" if len(ours) == 1 or self.plain_beside_ray else "ray_helpers"
        if "RayTrainWorker" in _command(pid) and not self.plain_beside_ray:
            return "trainer"
        return "ray_helpers"

    def _run(self) -> None:
        ticks_per_s = os.sysconf("SC_CLK_TCK")
        previous, before = _process_table(), time.perf_counter()
        while not self._stop.wait(self.interval):
            current, now = _process_table(), time.perf_counter()
            ours = _descendants(current, os.getpid())
            cores = dict.fromkeys(CPU_GROUPS, 0.0)
            helpers: dict[str, float] = {}
            for pid, (_, used) in current.items():
                ticks = used - previous.get(pid, (0, 0))[1]
                if not ticks:
                    continue
                group, busy = self._group(pid, ours), ticks / ticks_per_s / (now - before)
                cores[group] += busy
                if group == "ray_helpers":
                    label = _label(pid)  # not cached: Ray's workers exec and retitle
                    helpers[label] = helpers.get(label, 0.0) + busy
            self.samples.append((now, cores))
            self.helpers.append((now, helpers))
            previous, before = current, now

    @staticmethod
    def wait_for_no_children(timeout: float = 30.0) -> None:
        """Until the processes this one started (Ray's) are gone, so none competes."""
        deadline = time.monotonic() + timeout
        while len(_descendants(_process_table(), os.getpid())) > 1:
            if time.monotonic() > deadline:
                print("WARNING: Ray processes still alive after shutdown", file=sys.stderr)
                return
            time.sleep(0.2)

    def wait_until_quiet(self, limit: float, timeout: float, span: float = 5.0) -> bool:
        """Wait (at most `timeout` s) until other processes have used under `limit` cores on
        average over the last `span` seconds; says whether they did."""
        deadline = time.perf_counter() + timeout
        while True:
            now = time.perf_counter()
            recent = [cores["others"] for moment, cores in self.samples if moment > now - span]
            if len(recent) >= span / self.interval - 1 and statistics.fmean(recent) < limit:
                return True
            if now > deadline:
                return False
            time.sleep(self.interval)

    def helper_average(self, start: float, end: float) -> dict[str, float]:
        """Mean cores per Ray helper process (by name) over the samples taken in (start, end]."""
        inside = [helpers for moment, helpers in self.helpers if start < moment <= end]
        totals: dict[str, float] = {}
        for helpers in inside:
            for label, busy in helpers.items():
                totals[label] = totals.get(label, 0.0) + busy / len(inside)
        return totals

    def average(self, start: float, end: float) -> dict[str, float]:
        """Mean cores per group over the samples taken in (start, end]."""
        inside = [cores for moment, cores in self.samples if start < moment <= end]
        if not inside:
            return {}
        return {group: statistics.fmean(c[group] for c in inside) for group in CPU_GROUPS}


# --------------------------------------------------------------------------- models and data


def build_world(workdir: Path, args: argparse.Namespace) -> dict[str, str]:
    """Teacher, student (real GPT-2 tokenizer) and demo-task data, reused when already built."""
    from amid_ray.demo import fresh_gpt2, load_gpt2_tokenizer, write_demo_splits
    from amid_ray.models import save_model

    key = (f"t{args.teacher_layers}x{args.teacher_width}-s{args.student_layers}x"
           f"{args.student_width}-p{args.n_positions}-n{args.train_examples}")
    root = workdir / f"world-{key}"
    paths = {"teacher": root / "teacher", "student": root / "student",
             "train": root / "data" / "train.jsonl", "dev": root / "data" / "dev.jsonl"}
    if not all(path.exists() for path in paths.values()):
        tokenizer = load_gpt2_tokenizer(workdir / "tokenizer")
        for role, layers, width, seed in (
            ("teacher", args.teacher_layers, args.teacher_width, 1),
            ("student", args.student_layers, args.student_width, 2),
        ):
            model = fresh_gpt2(tokenizer, n_layer=layers, n_embd=width,
                               n_head=max(1, width // 64), n_positions=args.n_positions,
                               seed=seed)
            save_model(model, tokenizer, paths[role])
        write_demo_splits(root / "data", n_train=args.train_examples, n_dev=16, n_test=8,
                          seed=WORLD_SEED)
    return {role: str(path) for role, path in paths.items()}


def run_config(world: dict[str, str], args: argparse.Namespace, storage: Path,
               name: str) -> RunConfig:
    """Two report windows of `steps` steps; evaluation rounds as cheap as the config allows."""
    return config_from_dict({
        "name": name,
        "models": {"teacher": world["teacher"], "student": world["student"]},
        "data": {"train": world["train"], "dev": world["dev"], "max_length": args.max_length,
                 "max_prompt_length": args.max_length * 3 // 4},
        "train": {"batch_size": args.batch_size, "max_steps": 2 * args.steps,
                  "grad_accum": args.grad_accum, "lr": 5e-4},
        "eval": {"every": args.steps, "num_examples": 2, "max_new_tokens": 2, "batch_size": 2,
                 "greedy": True},
        "resources": {"num_workers": 1, "cpus_per_worker": args.cpus_per_worker,
                      "storage": str(storage), "keep_checkpoints": 2, "max_failures": 0},
    })


# --------------------------------------------------------------------------- measurements


@dataclass
class Window:
    steps: int
    tokens: int
    seconds: float
    loss: float
    end: float = 0.0  # perf_counter at the window's end (plain loop only)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Measurement:
    mode: str
    windows: list[Window] = field(default_factory=list)
    threads: int | None = None
    wall_s: float | None = None
    started: float = 0.0
    #: perf_counter interval of the compared (last) window, and cores used per group in it.
    compared: tuple[float, float] | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    helpers: dict[str, float] = field(default_factory=dict)


def plain_run(run: RunConfig, threads: int) -> Measurement:
    """The worker's training loop without Ray: same loading, seeding, batches, step and counting."""
    from amid_ray.data import TrainingCollator, encode_example
    from amid_ray.models import freeze_teacher
    from amid_ray.schedule import learning_rate_factor, micro_batches
    from amid_ray.sources import load_models, load_train_dev
    from amid_ray.worker import Objective, _optimizer, distillation_losses

    started = time.perf_counter()
    torch.set_num_threads(threads)
    seed = run.train.seed  # rank 0
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    teacher, student, tokenizer = load_models(run.models)
    teacher = freeze_teacher(teacher, torch.float32)  # teacher_dtype "auto" on CPU
    train_examples, _ = load_train_dev(run.data, seed)
    encoded_train = [
        encode_example(tokenizer, example, max_length=run.data.max_length,
                       max_prompt_length=run.data.max_prompt_length)
        for example in train_examples
    ]
    collate = TrainingCollator(tokenizer.pad_token_id)
    objective = Objective.of(run)
    student.train()
    optimizer = _optimizer(student, run.train.lr, run.train.weight_decay)
    batches = micro_batches(len(encoded_train), run.train.batch_size, seed=seed, rank=0,
                            world_size=1)
    train, device = run.train, torch.device("cpu")
    result = Measurement("plain", threads=torch.get_num_threads())

    step = 0
    loss, tokens, window_steps, start = 0.0, 0, 0, time.perf_counter()
    while step < train.max_steps:
        factor = learning_rate_factor(step, warmup=train.warmup_steps, total=train.max_steps,
                                      schedule=train.schedule)
        for group in optimizer.param_groups:
            group["lr"] = train.lr * factor
        optimizer.zero_grad(set_to_none=True)
        for _ in range(train.grad_accum):
            batch = {k: v.to(device)
                     for k, v in collate([encoded_train[i] for i in next(batches)]).items()}
            losses = distillation_losses(student, teacher, batch, objective, autocast_dtype=None)
            (losses.total / train.grad_accum).backward()
            loss += losses.total.item() / train.grad_accum
            _ = losses.distil.item()
            tokens += int(batch["attention_mask"].sum())
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), train.max_grad_norm)
        optimizer.step()
        step += 1
        window_steps += 1
        if step % run.eval.every == 0 or step == train.max_steps:
            elapsed = time.perf_counter() - start
            result.windows.append(Window(window_steps, tokens, elapsed, loss / window_steps,
                                         end=start + elapsed))
            loss, tokens, window_steps, start = 0.0, 0, 0, time.perf_counter()
    result.wall_s, result.started = time.perf_counter() - started, started
    last = result.windows[-1]
    result.compared = (last.end - last.seconds, last.end)
    return result


def _probe_loop(config: dict[str, Any]) -> None:
    import ray.train

    facts = {
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "niceness": os.nice(0),
    }
    Path(config["out"]).write_text(json.dumps(facts))
    ray.train.report({"done": 1})


def probe_worker(run: RunConfig, out: Path) -> dict[str, Any]:
    """Thread settings inside a Ray Train worker with the run's resources (same scaling config
    as `build_trainer`), written by the worker to a local file."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from amid_ray.training import build_trainer

    scaling = build_trainer(run).scaling_config
    TorchTrainer(
        _probe_loop,
        train_loop_config={"out": str(out)},
        scaling_config=scaling,
        run_config=ray.train.RunConfig(name=f"{run.name}-probe",
                                       storage_path=run.resources.storage),
    ).fit()
    return json.loads(out.read_text())


def token_windows(run: RunConfig) -> list[tuple[int, int]]:
    """(steps, attention-mask tokens) of each report window, from the worker's batch stream."""
    from amid_ray.data import TrainingCollator, encode_example
    from amid_ray.models import load_causal_lm
    from amid_ray.schedule import micro_batches
    from amid_ray.sources import load_train_dev

    _, tokenizer = load_causal_lm(run.models.teacher)
    examples, _ = load_train_dev(run.data, run.train.seed)
    encoded = [encode_example(tokenizer, example, max_length=run.data.max_length,
                              max_prompt_length=run.data.max_prompt_length)
               for example in examples]
    collate = TrainingCollator(tokenizer.pad_token_id)
    batches = micro_batches(len(encoded), run.train.batch_size, seed=run.train.seed, rank=0,
                            world_size=1)
    windows, steps, tokens = [], 0, 0
    for step in range(1, run.train.max_steps + 1):
        for _ in range(run.train.grad_accum):
            tokens += int(collate([encoded[i] for i in next(batches)])["attention_mask"].sum())
        steps += 1
        if step % run.eval.every == 0 or step == run.train.max_steps:
            windows.append((steps, tokens))
            steps, tokens = 0, 0
    return windows


def _idle_loop(config: dict[str, Any]) -> None:
    import ray.train

    Path(config["started"]).touch()
    while not Path(config["stop"]).exists():
        time.sleep(1.0)
    ray.train.report({"done": 1})


def plain_beside_idle_ray(run: RunConfig, threads: int, monitor: CpuMonitor,
                          folder: Path) -> Measurement:
    """The plain loop in this process while Ray is up with a 1-worker Train run (same scaling
    config, same helper actors) whose worker only waits: Ray's background cost without Ray in
    the training path. Needs a connected Ray."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from amid_ray.training import build_trainer

    started, stop = folder / f"{run.name}-idle-started", folder / f"{run.name}-idle-stop"
    trainer = TorchTrainer(
        _idle_loop,
        train_loop_config={"started": str(started), "stop": str(stop)},
        scaling_config=build_trainer(run).scaling_config,
        run_config=ray.train.RunConfig(name=f"{run.name}-idle",
                                       storage_path=run.resources.storage),
    )
    with ThreadPoolExecutor(1) as pool:
        fitting = pool.submit(trainer.fit)
        while not started.exists():
            if fitting.done():
                fitting.result()  # raises what went wrong
                raise RuntimeError("the idle Ray run ended before it started")
            time.sleep(0.2)
        monitor.plain_beside_ray = True
        try:
            result = plain_run(run, threads)
        finally:
            monitor.plain_beside_ray = False
            stop.touch()
        fitting.result()
    result.mode = "plain+ray"
    return result


def ray_run(run: RunConfig, windows: list[tuple[int, int]]) -> Measurement:
    """`run_training` with one worker; each window's tokens/s as the worker reported it."""
    from amid_ray.training import run_training
    from amid_ray.worker import HISTORY_FILE

    started = time.perf_counter()
    outcome = run_training(run)
    wall = time.perf_counter() - started
    result = Measurement("ray", wall_s=wall, started=started)
    if len(outcome.history) != len(windows):
        raise RuntimeError(f"the Ray run reported {len(outcome.history)} windows, expected "
                           f"{len(windows)}: {outcome.history}")
    for row, (steps, tokens) in zip(outcome.history, windows, strict=True):
        # The worker reports tokens/s only; the window's token count follows from the batches.
        result.windows.append(Window(steps, tokens, tokens / row["tokens_per_s"],
                                     row["train_loss"]))
    # When the last window ran, for the CPU monitor: it ended just before the last evaluation
    # round, whose checkpoint's history file is written right after it (a fraction of a second).
    histories = sorted(Path(outcome.result_dir).glob(f"checkpoint_*/{HISTORY_FILE}"),
                       key=lambda path: path.stat().st_mtime)
    if histories:
        clock_offset = time.time() - time.perf_counter()
        end = histories[-1].stat().st_mtime - clock_offset
        result.compared = (end - result.windows[-1].seconds, end)
    return result


def check_same(plain: Measurement, ray_side: Measurement) -> None:
    """Both sides must have trained on the same tokens with the same losses."""
    for index, (mine, theirs) in enumerate(zip(plain.windows, ray_side.windows, strict=True)):
        if mine.tokens != theirs.tokens or mine.steps != theirs.steps:
            raise RuntimeError(f"window {index + 1}: plain and Ray saw different batches")
        if abs(mine.loss - theirs.loss) > 1e-3 * max(1.0, abs(mine.loss)):
            print(f"WARNING: window {index + 1}: plain loss {mine.loss:.6f} differs from the "
                  f"Ray run's {theirs.loss:.6f}: not the same computation?", file=sys.stderr)


# --------------------------------------------------------------------------- report


def machine_info() -> list[str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import ray

    return [
        f"machine: {platform.machine()} {model}, os.cpu_count()={os.cpu_count()}, "
        f"affinity={len(os.sched_getaffinity(0))}",
        f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
        f"driver OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
    ]


def print_table(measurements: list[tuple[int, Measurement]]) -> None:
    header = (f"{'mode':9} {'rep':>3} {'window':>6} {'steps':>5} {'tokens':>7} {'seconds':>8} "
              f"{'tokens/s':>9} {'loss':>8} {'threads':>7} {'trainer':>7} {'helpers':>7} "
              f"{'others':>6} {'tok/core-s':>10} {'wall_s':>7}")
    print(header)
    print("-" * len(header))
    for rep, measurement in measurements:
        threads = "-" if measurement.threads is None else str(measurement.threads)
        for index, window in enumerate(measurement.windows, start=1):
            last = index == len(measurement.windows)
            cpu = measurement.cpu if last else {}
            cores = [f"{cpu[group]:.2f}" if group in cpu else "" for group in CPU_GROUPS]
            per_core = (f"{window.tokens_per_s / cpu['trainer']:.1f}"
                        if cpu.get("trainer") else "")
            wall = f"{measurement.wall_s:7.1f}" if last else ""
            print(f"{measurement.mode:9} {rep:>3} {index:>6} {window.steps:>5} "
                  f"{window.tokens:>7} {window.seconds:>8.2f} {window.tokens_per_s:>9.1f} "
                  f"{window.loss:>8.4f} {threads:>7} {cores[0]:>7} {cores[1]:>7} "
                  f"{cores[2]:>6} {per_core:>10} {wall:>7}")


def summarize(measurements: list[tuple[int, Measurement]], quiet_limit: float) -> None:
    """X/plain of the compared window per repeat, and medians over all and over quiet repeats
    (those where other processes kept fewer than `quiet_limit` cores busy in every mode)."""
    pairs: dict[int, dict[str, Measurement]] = {}
    for rep, measurement in measurements:
        pairs.setdefault(rep, {})[measurement.mode] = measurement

    def rate(measurement: Measurement) -> float:
        return measurement.windows[-1].tokens_per_s

    def quiet(pair: dict[str, Measurement]) -> bool:
        return all(m.cpu.get("others", math.inf) < quiet_limit for m in pair.values())

    quiet_pairs = [pair for pair in pairs.values() if quiet(pair)]
    modes = [mode for mode in next(iter(pairs.values())) if mode != "plain"]
    for mode in modes:
        print(f"{mode}/plain per repeat (window 2): " + ", ".join(
            f"{rate(pair[mode]) / rate(pair['plain']):.1%}" + ("" if quiet(pair) else " (busy)")
            for pair in pairs.values()))
    for label, chosen in (("all repeats", list(pairs.values())),
                          (f"quiet repeats (others < {quiet_limit} cores in every mode)",
                           quiet_pairs)):
        if not chosen:
            print(f"{label}: none")
            continue
        medians = {mode: statistics.median(rate(pair[mode]) for pair in chosen)
                   for mode in ["plain", *modes]}
        print(f"{label}, median tokens/s of window 2: " + ", ".join(
            f"{mode} {value:.1f}" for mode, value in medians.items()))
        for mode in modes:
            print(f"    {mode}/plain = {medians[mode] / medians['plain']:.1%}"
                  + ("  (target >= 95%)" if mode == "ray" else ""))


def print_helpers(ray_runs: list[Measurement]) -> None:
    """Which of Ray's processes kept cores busy while the worker trained (mean over runs)."""
    totals: dict[str, float] = {}
    for run in ray_runs:
        for label, busy in run.helpers.items():
            totals[label] = totals.get(label, 0.0) + busy / len(ray_runs)
    busiest = sorted(totals.items(), key=lambda item: -item[1])
    print("Ray helper processes during window 2 (cores, mean over Ray runs): " + ", ".join(
        f"{label} {busy:.3f}" for label, busy in busiest if busy >= 0.001))


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--worker-env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per window")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-width", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-width", type=int, default=128)
    parser.add_argument("--n-positions", type=int, default=256)
    parser.add_argument("--train-examples", type=int, default=512)
    parser.add_argument("--cpus-per-worker", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                        help="the Ray worker's CPU reservation (default: all cores but one, "
                             "left to Ray's own processes)")
    parser.add_argument("--plain-threads", type=int, default=None,
                        help="torch threads of the plain loop (default: the Ray worker's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="cache of models and data (default: a temporary folder)")
    parser.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable for the Ray workers (experiment)")
    parser.add_argument("--system-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable for Ray's own processes, set while "
                        "Ray starts (experiment)")
    parser.add_argument("--plain-beside-ray", action="store_true",
                        help="also run the plain loop while Ray is up with an idle 1-worker "
                        "Train run: Ray's background cost alone (diagnosis)")
    parser.add_argument("--quiet-limit", type=float, default=0.25,
                        help="cores that other processes may use in a 'quiet' measurement")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="seconds to wait, before each measurement, for a quiet machine")
    args = parser.parse_args()
    if args.max_length > args.n_positions:
        parser.error("--max-length must not exceed --n-positions")

    import ray

    from amid_ray import cluster

    extra_env, system_env = parse_env(args.worker_env), parse_env(args.system_env)
    experiment = bool(extra_env or system_env)

    def start_ray(with_experiment: bool) -> None:
        saved = cluster.WORKER_ENV
        extra = system_env if with_experiment else {}
        saved_environ = {key: os.environ.get(key) for key in extra}
        if with_experiment:
            cluster.WORKER_ENV = {**saved, **extra_env}  # connect() reads it when called
        os.environ.update(extra)  # Ray's own processes inherit this process's environment
        try:
            cluster.connect(num_cpus=os.cpu_count(), quiet=True)
        finally:
            cluster.WORKER_ENV = saved
            for key, value in saved_environ.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    measurements: list[tuple[int, Measurement]] = []
    probes: dict[str, dict[str, Any]] = {}  # what a Ray worker sees, per Ray mode
    with tempfile.TemporaryDirectory(prefix="amid-throughput-") as scratch, \
            CpuMonitor() as monitor:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        world = build_world(workdir, args)
        storage = Path(scratch) / "ray_storage"

        def plain_threads() -> int:
            return args.plain_threads or probes["ray"]["torch_threads"]

        def measure(mode: str, rep: int) -> Measurement:
            # Every Ray run has its own name: the same name would resume the earlier run.
            run = run_config(world, args, storage, f"throughput-{rep}-{mode.replace('+', '-')}")
            if mode == "plain":
                return plain_run(run, plain_threads())
            start_ray(with_experiment=mode == "ray+env")
            try:
                if mode == "plain+ray":
                    return plain_beside_idle_ray(run, plain_threads(), monitor, Path(scratch))
                if mode not in probes:  # a Ray mode's first session learns the worker's setup
                    probes[mode] = probe_worker(run, Path(scratch) / f"probe-{mode}.json")
                result = ray_run(run, windows)
                result.mode, result.threads = mode, probes[mode]["torch_threads"]
                return result
            finally:
                ray.shutdown()
                monitor.wait_for_no_children()  # no Ray process left for the plain loop

        # Each repeat measures every mode, in alternating order, so that slow drifts in the
        # machine's speed hit all alike; the very first is a Ray run (the probe).
        modes = ["ray", "plain"] + ["ray+env"] * experiment + ["plain+ray"] * args.plain_beside_ray
        windows = token_windows(run_config(world, args, storage, "tokens"))  # same every repeat
        for rep in range(args.repeats):
            results: dict[str, Measurement] = {}
            for mode in modes if rep % 2 == 0 else modes[::-1]:
                monitor.wait_until_quiet(args.quiet_limit, args.quiet_wait)
                result = results[mode] = measure(mode, rep)
                if result.compared is not None:
                    result.cpu = monitor.average(*result.compared)
                    result.helpers = monitor.helper_average(*result.compared)
                print(f"[repeat {rep}] {mode}: window 2 {result.windows[-1].tokens_per_s:.1f} "
                      "tokens/s, cores "
                      + ", ".join(f"{k}={v:.2f}" for k, v in result.cpu.items())
                      + "".join(f"; {label} {busy:.3f}" for label, busy in sorted(
                          result.helpers.items(), key=lambda item: -item[1])[:5]),
                      file=sys.stderr, flush=True)
            for mode in modes:
                if mode != "plain":
                    check_same(results["plain"], results[mode])
            measurements += [(rep, results[mode]) for mode in modes]

    print()
    print(f"distillation step throughput: 1 Ray Train worker vs plain PyTorch "
          f"({args.repeats} repeats)")
    for line in machine_info():
        print(line)
    for mode, probe in probes.items():
        print(f"{mode} worker ({args.cpus_per_worker} CPUs reserved): " + ", ".join(
            f"{key}={value}" for key, value in probe.items()))
    if experiment:
        print(f"ray+env = a Ray run with extra worker env {extra_env} and extra Ray system env "
              f"{system_env} (experiment); ray = the project's settings")
    threads = args.plain_threads or probes["ray"]["torch_threads"]
    print(f"plain loop: torch.set_num_threads({threads}), niceness {os.nice(0)}")
    print(f"teacher {args.teacher_layers}x{args.teacher_width}, student "
          f"{args.student_layers}x{args.student_width}, vocab 50257, batch {args.batch_size} x "
          f"accum {args.grad_accum}, max_length {args.max_length}, {args.steps} steps/window")
    print("window 1 includes the first step's warm-up; window 2 is steady state (compared).")
    print("cores kept busy during window 2 (sampled every 0.5 s) by: trainer = the training "
          "process; helpers = Ray's")
    print("other processes and the driver; others = processes outside this benchmark (other "
          "work on a shared machine);")
    print("tok/core-s = tokens/s per trainer core: the step's efficiency apart from its CPU share")
    if args.plain_beside_ray:
        print("plain+ray = the plain loop while Ray is up with an idle 1-worker Train run (same "
              "scaling config)")
    print()
    print_table(measurements)
    print()
    summarize(measurements, args.quiet_limit)
    print_helpers([m for _, m in measurements if m.mode == "ray"])
    probe = probes["ray"]
    if probe["niceness"] > os.nice(0):
        print(f"NOTE: the Ray worker runs at niceness {probe['niceness']} (this process and the "
              f"plain loop: {os.nice(0)}); Ray's own processes and anything else on the machine "
              "preempt it (Ray's `worker_niceness`, env RAY_worker_niceness)")
    if probe["torch_threads"] < args.cpus_per_worker:
        print(f"NOTE: the Ray worker runs torch with {probe['torch_threads']} threads although "
              f"it reserves {args.cpus_per_worker} CPUs")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
