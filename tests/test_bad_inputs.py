"""The bad-input drill of issue 13, as a test suite: inputs a new user could give, each run
through the real `amid-ray` entry point in-process (`cli.main`), one wrong thing per case on top
of a good configuration over the tiny world (`tiny_world`).

Every case must end in exit code 2 and one error line `amid-ray <cmd>: error: ...` (argparse's
usage block may precede it) that names where the bad input came from (the file, flag or folder),
the key and the value; no traceback; nothing written under the case's folder (a failed start
leaves no search folder behind). All of it before Ray starts: the functions that would start Ray
(and the demo build, the evaluation, the MLflow server) are replaced by tripwires, so an input
that validation lets through fails its case at once instead of starting Ray. Inputs handled
wrongly today are strict xfails whose reason says what goes wrong.

Fast: configs and tokenizers of tiny models are read, never weights where a config suffices.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from model_helpers import tiny_gpt2
from transformers import AutoTokenizer

from amid_ray import cli, cluster, evaluation, preflight, sources
from amid_ray.config import set_dotted
from amid_ray.models import save_model

#: What stands in for Ray, the demo build, the evaluation and the MLflow server.
LET_THROUGH = "validation let it through"
#: What Tune's state files look like from outside (a pickle header, a JSON snapshot): enough for
#: a resume to get past the folder checks to the one under test.
TUNE_STATE = {"tuner.pkl": b"\x80state", "experiment_state-0.json": "{}"}
#: What a local Ray gets on this machine (preflight's bound on a run's workers).
CPUS = os.cpu_count() or 1

# --------------------------------------------------------------------------- the world of a case


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def odd_models(tiny_world, tmp_path_factory) -> dict[str, str]:
    """Model sources that cannot serve as the tiny world's teacher or student."""
    root = tmp_path_factory.mktemp("odd_models")
    tokenizer = AutoTokenizer.from_pretrained(tiny_world["teacher"])
    bigger = AutoTokenizer.from_pretrained(tiny_world["teacher"])
    bigger.add_tokens(["<task>", "<answer>"])
    save_model(tiny_gpt2(bigger), bigger, root / "bigger_vocabulary")
    save_model(tiny_gpt2(tokenizer, vocab_size=50304), tokenizer, root / "wider_logits")
    tiny_gpt2(tokenizer).save_pretrained(root / "no_tokenizer")
    tokenizer.save_pretrained(root / "no_weights")
    tiny_gpt2(tokenizer).config.save_pretrained(root / "no_weights")
    save_model(tiny_gpt2(tokenizer), tokenizer, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    save_model(tiny_gpt2(tokenizer), tokenizer, root / "garbage_config")
    (root / "garbage_config" / "config.json").write_text("{this is not json")
    (root / "no_config").mkdir()
    tokenizer.save_pretrained(root / "no_config")
    (root / "fake.gguf").write_bytes(b"GGUF but not really")
    return {path.name: str(path) for path in root.iterdir()}


class Drill:
    """One case's folder: the good run over the tiny world, and files written to break it."""

    def __init__(self, world: dict[str, str], odd: dict[str, str], search_config, root: Path):
        self.world, self.odd, self.root = world, odd, root
        self.storage = root / "runs"
        self.config_file = str(root / "run.yaml")
        self._search_config = search_config
        (root / "cwd").mkdir()

    def raw(self, *, search: bool) -> dict[str, Any]:
        """The good configuration: a run, or a run with a search section."""
        raw = self._search_config(self.world, self.storage, "drill")
        if not search:
            del raw["search"]
        return raw

    def config(self, changes: dict[str, Any] | None = None, *, search: bool = False,
               params: dict[str, Any] | None = None, file: Path | None = None) -> str:
        """Write the good configuration with dotted-key `changes` and search `params` entries
        (None removes one) applied; returns the file's path."""
        raw = self.raw(search=search or params is not None)
        for key, value in (changes or {}).items():
            set_dotted(raw, key, value, source="drill")
        for key, spec in (params or {}).items():
            if spec is None:
                raw["search"]["params"].pop(key)
            else:
                raw["search"]["params"][key] = spec
        target = Path(file or self.config_file)
        target.write_text(yaml.safe_dump(raw, sort_keys=False))
        return str(target)

    def file(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    def rows(self, name: str, count: int, split: str = "train") -> str:
        """The first `count` rows of the tiny world's `split` file."""
        lines = Path(self.world[split]).read_text().splitlines(keepends=True)
        return self.file(name, "".join(lines[:count]))

    def search_folder(self, name: str = "old", files: dict[str, str | bytes] | None = None,
                      *, good_search_file: bool = False) -> str:
        """A search folder holding `files` (and the good search.yaml if asked)."""
        folder = self.storage / name
        folder.mkdir(parents=True)
        if good_search_file:
            self.config(search=True, file=folder / "search.yaml")
        for file, content in (files or {}).items():
            self.file(str((folder / file).relative_to(self.root)), content)
        return str(folder)


# --------------------------------------------------------------------------- cases


Argv = Callable[[Drill], list[str]]
Says = Callable[[Drill], tuple[str, ...]]


@dataclass(frozen=True)
class Bad:
    """One bad input: the command line (writing its files), what the error must name, and
    why it is handled wrongly today (None: it is handled right)."""

    category: str
    id: str
    argv: Argv
    says: Says
    known: str | None = None

    @property
    def name(self) -> str:
        return f"{self.category}: {self.id}"


def config_value(category: str, key: str, value: Any, *, cmd: str = "train", id: str = "",
                 also: dict[str, Any] | None = None, named: tuple[str, Any] | None = None,
                 known: str | None = None) -> Bad:
    """`key: value` in the good configuration (and the `also` changes it needs), run with
    `cmd`; the error names the file and `key = value` (or `named`: another key and value)."""
    shown_key, shown_value = named or (key, value)

    def argv(d: Drill) -> list[str]:
        return [cmd, "--config", d.config({key: value, **(also or {})}, search=cmd == "tune")]

    return Bad(category, id or f"{cmd} {key}={value!r}", argv,
               lambda d: (d.config_file, f"{shown_key} = {shown_value!r}"), known)


def search_value(id: str, *, changes: dict[str, Any] | None = None,
                 params: dict[str, Any] | None = None, key: str, value: Any,
                 known: str | None = None) -> Bad:
    """The good search with `changes` and `params` entries; the error names `key = value`."""
    return Bad("search section", id,
               lambda d: ["tune", "--config", d.config(changes, search=True, params=params)],
               lambda d: (d.config_file, f"{key} = {value!r}"), known)


def command(category: str, id: str, argv: Argv, *says: str | Callable[[Drill], str],
            known: str | None = None) -> Bad:
    """A command line; the error names each of `says` (text, or made from the drill)."""
    return Bad(category, id, argv,
               lambda d: tuple(s(d) if callable(s) else s for s in says), known)


def text_file(id: str, content: str | bytes, *says: str, cmd: str = "tune",
              known: str | None = None) -> Bad:
    """A configuration file with this content; the error names the file and each of `says`."""
    return command("YAML files", id, lambda d: [cmd, "--config", d.file("run.yaml", content)],
                   lambda d: d.config_file, *says, known=known)


CONFIG_VALUES = [
    config_value("config values", key, value) for key, value in [
        ("train.lr", float("inf")), ("train.lr", float("nan")), ("train.lr", -1e-3),
        ("train.lr", 0.0), ("train.lr", "fast"), ("train.lr", True), ("train.lr", [1e-3]),
        ("train.min_lr", -1e-5), ("train.min_lr", 0.01),
        ("train.weight_decay", float("nan")), ("train.weight_decay", -0.1),
        ("train.max_steps", 0), ("train.max_steps", "1e25"), ("train.max_steps", 2.5),
        ("train.batch_size", 0), ("train.batch_size", -4), ("train.batch_size", "8"),
        ("train.grad_accum", 0), ("train.warmup_steps", -1), ("train.warmup_steps", 6),
        ("train.schedule", "cosinus"), ("train.max_grad_norm", float("inf")),
        ("train.max_grad_norm", -1.0), ("train.kd_ratio", 1.5), ("train.kd_ratio", -0.1),
        ("train.kd_ratio", float("nan")), ("train.lm_weight", float("nan")),
        ("train.lm_weight", -1.0), ("train.lm_weight", 1.0), ("train.log_every", -1),
        ("train.fused_loss", "yes please"), ("train.seed", 1.5),
        ("amid.alpha", float("nan")), ("amid.alpha", float("inf")), ("amid.lam", 1.5),
        ("amid.lam", -0.1), ("amid.lam", 1.0), ("amid.divergence", "js"),
        ("amid.order", "xx"), ("amid.preset", "bogus"), ("amid.detach_assistant", "nope"),
        ("sgo.scheme", "online"), ("sgo.init_threshold", 2.0), ("sgo.loss_eps", -0.1),
        ("sgo.replay_capacity", 0), ("sgo.replay_schedule", "sometimes"),
        ("sgo.mixed_alpha", float("nan")), ("sgo.max_new_tokens", 0),
        ("taid.t_start", 1.5), ("taid.beta", 2.0),
        ("eval.every", 0), ("eval.num_examples", 0), ("eval.max_new_tokens", 0),
        ("eval.batch_size", -1), ("eval.no_repeat_ngram_size", -1),
        ("eval.greedy", "sometimes"),
        ("data.max_length", 1), ("data.max_prompt_length", 96), ("data.dev_size", 0),
        ("data.max_train_examples", 0),
        ("resources.num_workers", 0), ("resources.cpus_per_worker", 0.0),
        ("resources.cpus_per_worker", float("nan")), ("resources.gpus_per_worker", -1.0),
        ("resources.gpus_per_worker", float("inf")), ("resources.max_failures", -1),
        ("resources.keep_checkpoints", 0),
        ("cache.top_k", 0), ("cache.dtype", "int8"), ("models.teacher_dtype", "fp8"),
        ("models.student_layers", [0]), ("train.lerning_rate", 1e-3),
    ]
] + [
    config_value("config values", "amid.ab_alpha", 0.0, also={"amid.divergence": "ab"}),
    config_value("config values", "sgo.replay_capacity", 2, also={"sgo.enabled": True}),
    config_value("config values", "cache.enabled", True, also={"train.fused_loss": False}),
    config_value("config values", "models.student", "derive", named=("models.student_layers",
                                                                     None)),
    config_value("config values", "trian", {"lr": 1e-3}),
    config_value("config values", "search_spec", {"params": {}}),
    config_value("config values", "train", [1, 2]),
    config_value("config values", "eval", 5),
    config_value("config values", "train.max_steps", 10**25, id="train train.max_steps=10**25"),
    config_value("config values", "train.lr", float("inf"), cmd="tune"),
    config_value("config values", "cache.top_k", 0, cmd="teacher-cache"),
    # What this machine can give a local Ray, and what the models can take (read from their
    # configs and tokenizers).
    config_value("config values", "resources.num_workers", CPUS + 1,
                 also={"train.batch_size": 1}),
    config_value("config values", "resources.num_workers", CPUS + 1, cmd="tune",
                 also={"train.batch_size": 1}),
    config_value("config values", "resources.cpus_per_worker", CPUS + 1.0),
    config_value("config values", "resources.gpus_per_worker", 1.0),
    config_value("config values", "data.max_length", 129),
    config_value("config values", "eval.max_new_tokens", 57),
    config_value("config values", "sgo.max_new_tokens", 60, also={"sgo.enabled": True}),
    config_value("config values", "models.student_layers", [0, 5],
                 also={"models.student": "derive"}),
]

NAMES = [
    config_value("names", "name", name, cmd="tune")
    for name in ["..", ".", "../escape", "a/b", "/abs", "", " ", ".hidden", "-dash",
                 "x" * 200, "na me", 5, None, ["a"]]
] + [
    command("names", f"--name {name!r}",
            lambda d, name=name: ["tune", "--config", d.config(search=True), "--name", name],
            lambda d: d.config_file, f"name = {name!r}")
    for name in ["..", "", "a/b", "../x"]
] + [
    command("names", "--set name=..",
            lambda d: ["tune", "--config", d.config(search=True), "--set", "name=.."],
            lambda d: d.config_file, "name = '..'"),
]

YAML_FILES = [
    text_file("duplicate key", "train:\n  lr: 0.001\n  lr: 0.01\n", "'lr' is given twice"),
    text_file("duplicate section", "train:\n  lr: 0.001\neval:\n  every: 2\ntrain:\n"
              "  max_steps: 3\n", "'train' is given twice"),
    text_file("duplicate name", "name: a\nname: b\n", "'name' is given twice"),
    text_file("duplicate search parameter",
              "search:\n  params:\n    amid.alpha: {type: uniform, low: 0, high: 1}\n"
              "    amid.alpha: {type: uniform, low: 1, high: 2}\n", "'amid.alpha' is given twice"),
    text_file("top-level list", "- train\n- eval\n", "(top level)", "['train', 'eval']"),
    text_file("top-level scalar", "hello\n", "(top level)", "'hello'"),
    text_file("empty file", "", "search = None"),
    text_file("only comments", "# nothing yet\n", "search = None"),
    text_file("only name", "name: drill\n", "search = None"),
    text_file("invalid UTF-8", b"name: caf\xe9\n", "not UTF-8"),
    text_file("unclosed bracket", "train: {lr: 0.001\n", "not valid YAML", "line"),
    text_file("tab indentation", "train:\n\tlr: 0.001\n", "not valid YAML", "line"),
    text_file("empty file on train", "", "models.teacher = None", "empty", cmd="train"),
    command("YAML files", "missing file",
            lambda d: ["train", "--config", str(d.root / "missing.yaml")],
            lambda d: str(d.root / "missing.yaml"), "no such configuration file"),
    command("YAML files", "config is a folder",
            lambda d: ["tune", "--config", str(d.root / "cwd")],
            "--config", lambda d: str(d.root / "cwd")),
    command("YAML files", "unknown shipped name", lambda d: ["tune", "--config", "bogus"],
            "--config", "'bogus'", "shipped"),
]

SEARCH = [
    search_value("search is a list", changes={"search": [1]}, key="search", value=[1]),
    search_value("search is a word", changes={"search": "yes"}, key="search", value="yes"),
    search_value("unknown search key", changes={"search.trials": 4}, key="search.trials",
                 value=4),
    *[search_value(f"num_samples {n!r}", changes={"search.num_samples": n},
                   key="search.num_samples", value=n) for n in (0, -1, "many", 2.5, True)],
    search_value("max_concurrent 0", changes={"search.max_concurrent": 0},
                 key="search.max_concurrent", value=0),
    search_value("max_concurrent '2'", changes={"search.max_concurrent": "2"},
                 key="search.max_concurrent", value="2"),
    search_value("seed -1", changes={"search.seed": -1}, key="search.seed", value=-1),
    search_value("params is a list", changes={"search.params": ["amid.alpha"]},
                 key="search.params", value=["amid.alpha"]),
    search_value("param spec is a number", params={"amid.alpha": 3},
                 key="search.params.amid.alpha", value=3),
    search_value("param without type", params={"amid.alpha": {"low": 0, "high": 1}},
                 key="search.params.amid.alpha.type", value=None),
    search_value("param type normal",
                 params={"amid.alpha": {"type": "normal", "low": 0, "high": 1}},
                 key="search.params.amid.alpha.type", value="normal"),
    search_value("param unknown field",
                 params={"amid.lam": {"type": "uniform", "low": 0.1, "high": 0.5, "step": 0.1}},
                 key="search.params.amid.lam",
                 value={"type": "uniform", "low": 0.1, "high": 0.5, "step": 0.1}),
    search_value("low above high",
                 params={"amid.lam": {"type": "uniform", "low": 0.5, "high": 0.1}},
                 key="search.params.amid.lam", value={"type": "uniform", "low": 0.5, "high": 0.1}),
    search_value("low NaN",
                 params={"amid.alpha": {"type": "uniform", "low": float("nan"), "high": 1.0}},
                 key="search.params.amid.alpha.low", value=float("nan")),
    search_value("high inf",
                 params={"amid.alpha": {"type": "uniform", "low": 0.0, "high": float("inf")}},
                 key="search.params.amid.alpha.high", value=float("inf")),
    search_value("loguniform from 0",
                 params={"train.lr": {"type": "loguniform", "low": 0.0, "high": 1e-3}},
                 key="search.params.train.lr.low", value=0.0),
    search_value("int range of floats",
                 params={"train.batch_size": {"type": "int", "low": 1.5, "high": 4.0}},
                 key="search.params.train.batch_size",
                 value={"type": "int", "low": 1.5, "high": 4.0}),
    search_value("no values",
                 params={"amid.divergence": {"type": "categorical", "values": []}},
                 key="search.params.amid.divergence.values", value=[]),
    search_value("values is a word",
                 params={"amid.divergence": {"type": "categorical", "values": "kl"}},
                 key="search.params.amid.divergence.values", value="kl"),
    search_value("unknown searched key",
                 params={"train.lerning_rate": {"type": "uniform", "low": 0.1, "high": 0.2}},
                 key="search.params.train.lerning_rate", value=0.1),
    search_value("unknown searched section",
                 params={"foo.bar": {"type": "uniform", "low": 0.1, "high": 0.2}},
                 key="search.params.foo.bar", value=0.1),
    search_value("divergence [kl, js]",
                 params={"amid.divergence": {"type": "categorical", "values": ["kl", "js"]},
                         "amid.ab_alpha": None},
                 key="search.params.amid.divergence", value="js"),
    search_value("lr from -0.01",
                 params={"train.lr": {"type": "uniform", "low": -0.01, "high": 0.03}},
                 key="search.params.train.lr", value=-0.01),
    search_value("kd_ratio to 1.5",
                 params={"train.kd_ratio": {"type": "uniform", "low": 0.5, "high": 1.5}},
                 key="search.params.train.kd_ratio", value=1.5),
    search_value("grid [pr, xx]",
                 changes={"search.params": {"amid.order": {"type": "grid",
                                                           "values": ["pr", "xx"]}}},
                 key="search.params.amid.order", value="xx"),
    search_value("preset [kd, bogus]",
                 params={"amid.preset": {"type": "categorical", "values": ["kd", "bogus"]}},
                 key="search.params.amid.preset", value="bogus"),
    search_value("warmup beyond max_steps",
                 params={"train.warmup_steps": {"type": "int", "low": 0, "high": 10}},
                 key="search.params.train.warmup_steps", value=10),
    search_value("lam from -0.5",
                 params={"amid.lam": {"type": "uniform", "low": -0.5, "high": 0.5}},
                 key="search.params.amid.lam", value=[-0.5, 0.5]),
    search_value("lam 1 with order pr",
                 params={"amid.lam": {"type": "categorical", "values": [0.5, 1.0]}},
                 key="search.params", value={"amid.order": "pr", "amid.lam": 1.0}),
    search_value("max_steps 1..4 with warm-up 2",
                 changes={"train.warmup_steps": 2},
                 params={"train.max_steps": {"type": "int", "low": 1, "high": 4}},
                 key="search.params.train.max_steps", value=1),
    search_value("first categorical value invalid",
                 params={"data.max_length": {"type": "categorical", "values": [64, 96]}},
                 key="search.params.data.max_length", value=64),
    search_value("when never matches",
                 params={"amid.ab_alpha": {"type": "uniform", "low": 0.1, "high": 0.9,
                                           "when": {"amid.divergence": "js"}}},
                 key="search.params.amid.ab_alpha.when", value={"amid.divergence": "js"}),
    search_value("when on a range",
                 params={"amid.ab_alpha": {"type": "uniform", "low": 0.1, "high": 0.9,
                                           "when": {"amid.alpha": 1.0}}},
                 key="search.params.amid.ab_alpha.when", value={"amid.alpha": 1.0}),
    search_value("when on an unsearched key",
                 params={"amid.ab_alpha": {"type": "uniform", "low": 0.1, "high": 0.9,
                                           "when": {"train.seed": 1}}},
                 key="search.params.amid.ab_alpha.when", value="train.seed"),
    search_value("when is a word",
                 params={"amid.ab_alpha": {"type": "uniform", "low": 0.1, "high": 0.9,
                                           "when": "ab"}},
                 key="search.params.amid.ab_alpha.when", value="ab"),
    search_value("when in a cycle",
                 changes={"search.params": {
                     "amid.divergence": {"type": "categorical", "values": ["kl", "ab"],
                                         "when": {"amid.order": "pr"}},
                     "amid.order": {"type": "categorical", "values": ["pr", "qr"],
                                    "when": {"amid.divergence": "kl"}}}},
                 key="search.params", value=["amid.divergence", "amid.order"]),
    search_value("baselines {kd: 1}", changes={"search.baselines": {"kd": 1}},
                 key="search.baselines", value={"kd": 1}),
    search_value("baselines srkl", changes={"search.baselines": "srkl"},
                 key="search.baselines", value="srkl"),
    search_value("baselines [bogus]", changes={"search.baselines": ["bogus"]},
                 key="search.baselines", value="bogus"),
    search_value("more baselines than trials",
                 changes={"search.baselines": ["kd", "srkl", "rkl"], "search.num_samples": 2},
                 key="search.num_samples", value=2),
    search_value("scheduler 0", changes={"search.scheduler": 0}, key="search.scheduler",
                 value=0),
    search_value("scheduler true", changes={"search.scheduler": True},
                 key="search.scheduler", value=True),
    search_value("scheduler hyperband", changes={"search.scheduler": "hyperband"},
                 key="search.scheduler", value="hyperband"),
    search_value("scheduler unknown field",
                 changes={"search.scheduler": {"type": "asha", "patience": 3}},
                 key="search.scheduler", value={"type": "asha", "patience": 3}),
    search_value("median with reduction_factor",
                 changes={"search.scheduler": {"type": "median", "reduction_factor": 2}},
                 key="search.scheduler", value={"type": "median", "reduction_factor": 2}),
    search_value("grace_rounds 0", changes={"search.scheduler.grace_rounds": 0},
                 key="search.scheduler.grace_rounds", value=0),
    search_value("reduction_factor 1", changes={"search.scheduler.reduction_factor": 1},
                 key="search.scheduler.reduction_factor", value=1),
    search_value("metric accuracy", changes={"search.scheduler.metric": "accuracy"},
                 key="search.scheduler.metric", value="accuracy"),
    search_value("min_samples 0",
                 changes={"search.scheduler": {"type": "median", "min_samples": 0}},
                 key="search.scheduler.min_samples", value=0),
    search_value("grid mixed with sampled",
                 params={"train.seed": {"type": "grid", "values": [1, 2]}},
                 key="search.params",
                 value=["amid.ab_alpha", "amid.alpha", "amid.divergence", "amid.lam",
                        "train.lr", "train.seed"]),
    search_value("grid with when",
                 changes={"search.params": {
                     "amid.divergence": {"type": "grid", "values": ["kl", "ab"]},
                     "amid.ab_alpha": {"type": "grid", "values": [0.2, 0.5],
                                       "when": {"amid.divergence": "ab"}}}},
                 key="search.params", value=["amid.ab_alpha", "amid.divergence"]),
    search_value("sampler cmaes", changes={"search.sampler": "cmaes"}, key="search.sampler",
                 value={"type": "cmaes"}),
    search_value("sampler unknown field", changes={"search.sampler": {"type": "tpe", "seed": 3}},
                 key="search.sampler", value={"type": "tpe", "seed": 3}),
    search_value("n_startup_trials -1",
                 changes={"search.sampler": {"type": "tpe", "n_startup_trials": -1}},
                 key="search.sampler.n_startup_trials", value=-1),
    search_value("multivariate 'yes'",
                 changes={"search.sampler": {"type": "tpe", "multivariate": "yes"}},
                 key="search.sampler.multivariate", value="yes"),
    search_value("random sampler multivariate",
                 changes={"search.sampler": {"type": "random", "multivariate": True}},
                 key="search.sampler", value={"type": "random", "multivariate": True}),
    search_value("group without multivariate",
                 changes={"search.sampler": {"type": "tpe", "multivariate": False}},
                 key="search.sampler.group", value=True),
    search_value("study storage not a URL", changes={"search.storage": "optuna.db"},
                 key="search.storage", value="optuna.db"),
    search_value("cache with a searched data key", changes={"cache.enabled": True},
                 params={"data.max_length": {"type": "categorical", "values": [80, 96]}},
                 key="cache.enabled", value=True),
]


def _with_search(d: Drill) -> list[str]:
    return ["--config", d.config(search=True)]


CLI_FLAGS = [
    command("CLI flags", "--num-samples 0", lambda d: ["tune", *_with_search(d),
                                                       "--num-samples", "0"],
            "--num-samples", "0 is below 1"),
    command("CLI flags", "--num-samples -3", lambda d: ["tune", *_with_search(d),
                                                        "--num-samples", "-3"],
            "--num-samples", "-3 is below 1"),
    command("CLI flags", "--num-samples many", lambda d: ["tune", *_with_search(d),
                                                          "--num-samples", "many"],
            "--num-samples", "'many'"),
    # Malformed items name the flag; values that do not fit name the file "with --set".
    *[command("CLI flags", f"--set {item}",
              lambda d, item=item: ["tune", *_with_search(d), "--set", item],
              "--set", *shown, known=known)
      for item, shown, known in [
          ("train.lr=[1", ("train.lr = '[1'",), None),
          ("train.lr", ("'train.lr'", "section.key=value"), None),
          ("=5", ("'=5'", "section.key=value"), None),
          ("train.lr.x=1", ("train.lr.x = 1", "'lr' is not a section"), None),
      ]],
    *[command("CLI flags", f"--set {item}",
              lambda d, item=item: ["tune", *_with_search(d), "--set", item],
              lambda d: f"{d.config_file} with --set", *shown)
      for item, shown in [
          ("nosuch.key=1", ("nosuch = {'key': 1}", "unknown section")),
          ("train.lr=abc", ("train.lr = 'abc'",)),
          ("train=5", ("train = 5",)),
          ("train.lr=.inf", ("train.lr = inf",)),
      ]],
    *[command("CLI flags", f"tune --resume with {flag}",
              lambda d, flag=flag, value=value: [
                  "tune", "--resume", d.search_folder(good_search_file=True), flag, value],
              flag, "cannot be used with --resume",
              lambda d: str(d.storage / "old" / "search.yaml"))
      for flag, value in [("--set", "train.lr=1e-3"), ("--num-samples", "3"),
                          ("--name", "other"), ("--storage", "elsewhere"),
                          ("--config", "demo")]],
    command("CLI flags", "unknown flag", lambda d: ["tune", *_with_search(d), "--lr", "1e-3"],
            "unrecognized arguments: --lr 1e-3"),
    command("CLI flags", "--tracking-uri ''",
            lambda d: ["tune", *_with_search(d), "--tracking-uri", ""],
            "--tracking-uri = ''", "empty"),
    command("CLI flags", "--address ''", lambda d: ["train", *_with_search(d), "--address", ""],
            "--address = ''", "expected host:port"),
    command("CLI flags", "--storage is a file",
            lambda d: ["tune", *_with_search(d), "--storage", d.file("runs.txt", "")],
            lambda d: d.config_file, "resources.storage", lambda d: str(d.root / "runs.txt")),
    *[command("CLI flags", f"eval {flag} {value}",
              lambda d, flag=flag, value=value: [
                  "eval", "--model", d.world["student"], "--data", d.world["dev"], flag, value],
              flag, shown)
      for flag, value, shown in [("--max-examples", "-1", "-1 is below 1"),
                                 ("--max-examples", "0", "0 is below 1"),
                                 ("--seeds", "-1", "-1 is below 0"),
                                 ("--batch-size", "0", "0 is below 1"),
                                 ("--max-new-tokens", "x", "'x' is not a whole number"),
                                 ("--max-prompt-length", "1.5", "'1.5' is not a whole number")]],
    command("CLI flags", "eval --json to a folder",
            lambda d: ["eval", "--model", d.world["student"], "--data", d.world["dev"],
                       "--json", str(d.root / "cwd")],
            "--json", lambda d: str(d.root / "cwd"), "is a folder"),
    command("CLI flags", "eval --json in a missing folder",
            lambda d: ["eval", "--model", d.world["student"], "--data", d.world["dev"],
                       "--json", str(d.root / "missing" / "report.json")],
            "--json", lambda d: str(d.root / "missing" / "report.json"), "does not exist"),
    *[command("CLI flags", f"ui --port {port}",
              lambda d, port=port: ["ui", d.search_folder(files={
                  "tracking_uri": f"sqlite:///{d.storage / 'old' / 'mlflow.db'}"}),
                  "--port", port],
              "--port", port)
      for port in ("70000", "-1", "x")],
    command("CLI flags", "ui --host 0.0.0.0",
            lambda d: ["ui", d.search_folder(files={
                "tracking_uri": f"sqlite:///{d.storage / 'old' / 'mlflow.db'}"}),
                "--host", "0.0.0.0"],
            "--host 0.0.0.0", "--insecure"),
    command("CLI flags", "no command", lambda d: [], "the following arguments are required"),
]


def _resume_says(d: Drill) -> str:
    return str(d.storage / "old")


DAMAGED_FOLDERS = [
    *[command("damaged folders", f"{cmd} on {what}",
              lambda d, cmd=cmd, files=files: [*cmd.split(), d.search_folder(files=files)],
              _resume_says, *says, known=known)
      for cmd in ("resume", "tune --resume", "best")
      for what, files, says, known in [
          ("an empty folder", {}, ("search.yaml is missing",), None),
          ("invalid search.yaml", {"search.yaml": "train: {lr: 0.001\n"},
           ("search.yaml", "not valid YAML"), None),
          ("a search.yaml list", {"search.yaml": "- a\n- b\n"},
           ("search.yaml", "(top level)"), None),
          ("a search.yaml of invalid UTF-8", {"search.yaml": b"name: caf\xe9\n"},
           ("search.yaml", "not UTF-8"), None),
      ]],
    *[command("damaged folders", f"{cmd} on a missing folder",
              lambda d, cmd=cmd: [*cmd.split(), str(d.root / "nowhere")],
              lambda d: str(d.root / "nowhere"), "search.yaml is missing")
      for cmd in ("resume", "best")],
    command("damaged folders", "resume on a file",
            lambda d: ["resume", d.file("search.yaml", "name: x\n")],
            lambda d: str(d.root / "search.yaml"), "not a search folder"),
    command("damaged folders", "resume a bad value in search.yaml",
            lambda d: ["resume", d.search_folder(files={
                "search.yaml": yaml.safe_dump(d.raw(search=True) | {"train": {"lr": -1.0}})})],
            lambda d: str(d.storage / "old" / "search.yaml"), "train.lr = -1.0"),
    command("damaged folders", "resume without Tune state",
            lambda d: ["resume", d.search_folder(good_search_file=True)],
            _resume_says, "no Ray Tune state"),
    command("damaged folders", "resume with a garbage tuner.pkl",
            lambda d: ["resume", d.search_folder(files={"tuner.pkl": b"garbage"},
                                                 good_search_file=True)],
            _resume_says, "tuner.pkl"),
    command("damaged folders", "resume of a search.yaml without a search section",
            lambda d: ["resume", d.search_folder(files={
                "search.yaml": yaml.safe_dump(d.raw(search=False)), "tuner.pkl": b"garbage"})],
            lambda d: str(d.storage / "old" / "search.yaml"), "search = None"),
    command("damaged folders", "resume with an unreachable stored tracking URI",
            lambda d: ["resume", d.search_folder(files={
                "tracking_uri": f"http://127.0.0.1:{closed_port()}", **TUNE_STATE},
                good_search_file=True)],
            lambda d: str(d.storage / "old" / "tracking_uri"), "tracking_uri = 'http://127.0.0.1:",
            "no MLflow server answered"),
    command("damaged folders", "best without Tune state",
            lambda d: ["best", d.search_folder(good_search_file=True)],
            _resume_says, "no trials"),
    *[command("damaged folders", f"ui on {what}",
              lambda d, files=files: ["ui", d.search_folder(files=files)],
              _resume_says, "tracking_uri", *says, known=known)
      for what, files, says, known in [
          ("an empty folder", {}, ("not a search folder",), None),
          ("an empty tracking_uri", {"tracking_uri": ""}, ("tracking_uri = ''", "empty"),
           None),
          ("a garbage tracking_uri", {"tracking_uri": "::garbage::"},
           ("tracking_uri = '::garbage::'", "nothing was logged there"), None),
      ]],
    command("damaged folders", "ui on a missing folder",
            lambda d: ["ui", str(d.root / "nowhere")],
            lambda d: str(d.root / "nowhere"), "not a search folder"),
]


def model_source(id: str, role: str, make: Callable[[Drill], str], problem: str,
                 known: str | None = None, cmd: str = "train") -> Bad:
    """`models.<role>` set to what `make` gives; the error names the file, the key and value
    and `problem`."""
    key = f"models.{role}"

    def argv(d: Drill) -> list[str]:
        return [cmd, "--config", d.config({key: make(d)}, search=cmd == "tune")]

    return command("models and data", id, argv, lambda d: d.config_file,
                   lambda d: f"{key} = {make(d)!r}", problem, known=known)


def data_source(id: str, key: str, make: Callable[[Drill], str | None], problem: str,
                also: dict[str, Any] | None = None, named: tuple[str, Any] | None = None,
                known: str | None = None) -> Bad:
    """`key` set to what `make` writes (and the `also` changes); the error names the file,
    `key = <that value>` (or `named`: another key and value) and `problem`."""
    def argv(d: Drill) -> list[str]:
        return ["train", "--config", d.config({key: make(d), **(also or {})})]

    def shown(d: Drill) -> str:
        return "{} = {!r}".format(*named) if named else f"{key} = {make(d)!r}"

    return command("models and data", id, argv, lambda d: d.config_file, shown, problem,
                   known=known)


def _good_jsonl_row() -> str:
    return '{"instruction": "Say hi", "input": "", "output": "hi"}\n'


MODELS_AND_DATA = [
    *[model_source(f"{role} {what}", role, make, problem)
      for role in ("teacher", "student")
      for what, make, problem in [
          ("missing", lambda d: str(d.root / "no-model"), "no such file or folder"),
          ("without tokenizer", lambda d: d.odd["no_tokenizer"], "has no tokenizer"),
          ("without weights", lambda d: d.odd["no_weights"], "has no weights"),
          ("with truncated weights", lambda d: d.odd["truncated"], "is damaged"),
          ("with a garbage config.json", lambda d: d.odd["garbage_config"],
           "cannot be read as a model"),
          ("without config.json", lambda d: d.odd["no_config"], "no config.json"),
          ("a fake .gguf", lambda d: d.odd["fake.gguf"], "cannot be read as a model"),
          ("a text file", lambda d: d.world["train"], "not a .gguf file"),
      ]],
    model_source("student with another vocabulary", "student",
                 lambda d: d.odd["bigger_vocabulary"], "tokenizer has"),
    model_source("student with wider logits", "student", lambda d: d.odd["wider_logits"],
                 "50304 logits"),
    model_source("student with another vocabulary (tune)", "student",
                 lambda d: d.odd["bigger_vocabulary"], "tokenizer has", cmd="tune"),
    model_source("teacher missing (teacher-cache)", "teacher", lambda d: str(d.root / "nope"),
                 "no such file or folder", cmd="teacher-cache"),
    data_source("train missing", "data.train", lambda d: str(d.root / "missing.jsonl"),
                "no such file"),
    data_source("dev missing", "data.dev", lambda d: str(d.root / "missing.jsonl"),
                "no such file"),
    data_source("lm_corpus missing", "data.lm_corpus", lambda d: str(d.root / "corpus.txt"),
                "no such file", also={"train.lm_weight": 1.0}),
    data_source("train malformed", "data.train",
                lambda d: d.file("train.jsonl", _good_jsonl_row() + "{not json\n"), "line 2"),
    data_source("dev malformed", "data.dev",
                lambda d: d.file("dev.jsonl", _good_jsonl_row() + "[1, 2\n"), "line 2"),
    data_source("train empty", "data.train", lambda d: d.file("train.jsonl", ""),
                "0 training rows"),
    data_source("dev empty", "data.dev", lambda d: d.file("dev.jsonl", ""), "no dev rows"),
    data_source("train a .txt file", "data.train", lambda d: d.file("train.txt", "hello\n"),
                "expected a .jsonl or .json file"),
    data_source("train a JSON object", "data.train",
                lambda d: d.file("train.json", '{"instruction": "x"}'), "expected a JSON list"),
    data_source("train rows without output", "data.train",
                lambda d: d.file("train.jsonl", '{"instruction": "Say hi"}\n' * 8),
                "line 1"),
    data_source("train rows not objects", "data.train",
                lambda d: d.file("train.jsonl", "[1, 2]\n" * 8), "expected a JSON object"),
    data_source("train of invalid UTF-8", "data.train",
                lambda d: d.file("train.jsonl", b'{"instruction": "caf\xe9"}\n'),
                "train.jsonl: line 1: not UTF-8 text (byte 0xe9"),
    data_source("too few rows for one batch per worker", "data.train",
                lambda d: d.rows("train.jsonl", 5), "5 training rows",
                also={"resources.num_workers": 2}),
    data_source("too few rows after max_train_examples", "data.train",
                lambda d: d.world["train"], "3 training rows",
                also={"data.max_train_examples": 3}),
    data_source("dev_size beyond the rows", "data.dev", lambda d: None, "dev_size",
                also={"data.dev_size": 100}, named=("data.dev_size", 100)),
    data_source("lm_corpus too short", "data.lm_corpus",
                lambda d: d.file("corpus.txt", "a few words\n"), "cannot fill one block",
                also={"train.lm_weight": 1.0}),
    data_source("lm_corpus without lm_weight", "data.lm_corpus",
                lambda d: d.world["corpus"], "train.lm_weight is 0"),
    command("models and data", "eval --model missing",
            lambda d: ["eval", "--model", str(d.root / "no-model"), "--data", d.world["dev"]],
            lambda d: f"--model = {str(d.root / 'no-model')!r}", "does not exist"),
    command("models and data", "eval --model without tokenizer",
            lambda d: ["eval", "--model", d.odd["no_tokenizer"], "--data", d.world["dev"]],
            lambda d: f"--model = {d.odd['no_tokenizer']!r}", "no tokenizer"),
    command("models and data", "eval --model a data file",
            lambda d: ["eval", "--model", d.world["dev"], "--data", d.world["dev"]],
            lambda d: f"--model = {d.world['dev']!r}", "not a .gguf file"),
    command("models and data", "eval --data missing",
            lambda d: ["eval", "--model", d.world["student"], "--data",
                       str(d.root / "missing.jsonl")],
            lambda d: f"--data = {str(d.root / 'missing.jsonl')!r}", "no such file"),
    command("models and data", "eval --data malformed",
            lambda d: ["eval", "--model", d.world["student"], "--data",
                       d.file("dev.jsonl", "{not json\n")],
            lambda d: f"--data = {str(d.root / 'dev.jsonl')!r}", "dev.jsonl: line 1"),
    command("models and data", "eval --data empty",
            lambda d: ["eval", "--model", d.world["student"], "--data", d.file("dev.jsonl", "")],
            lambda d: f"--data = {str(d.root / 'dev.jsonl')!r}", "no rows"),
]

STORAGE = [
    command("storage", "storage is a file",
            lambda d: ["train", "--config", d.config({"resources.storage": d.file("runs", "")})],
            lambda d: d.config_file, lambda d: f"resources.storage = {str(d.storage)!r}",
            "is a file"),
    command("storage", "storage under a file",
            lambda d: ["tune", "--config", d.config({"resources.storage": str(
                Path(d.file("blocker", "")) / "runs")}, search=True)],
            lambda d: d.config_file, "resources.storage", "blocker",
            lambda d: f"cannot be created: {d.root / 'blocker'} is a file"),
    command("storage", "storage nobody may write",
            lambda d: ["tune", "--config", d.config({"resources.storage": "/proc/amid"},
                                                    search=True)],
            lambda d: d.config_file, "resources.storage = '/proc/amid'", "cannot write in"),
    command("storage", "an existing search",
            lambda d: (d.search_folder("drill", {"search.yaml": "name: drill\n"}),
                       ["tune", *_with_search(d)])[1],
            lambda d: d.config_file, "name = 'drill'", "already exists"),
    command("storage", "an existing search that is a file",
            lambda d: (d.file("runs/drill", ""), ["tune", *_with_search(d)])[1],
            lambda d: d.config_file, "name = 'drill'", "already exists"),
    command("storage", "--storage under a file",
            lambda d: ["tune", *_with_search(d), "--storage",
                       str(Path(d.file("blocker", "")) / "runs")],
            lambda d: d.config_file, "resources.storage", "is a file"),
    command("storage", "empty storage",
            lambda d: ["tune", "--config", d.config({"resources.storage": ""}, search=True)],
            lambda d: d.config_file, "resources.storage = ''", "must name a folder"),
]


def _tune_flag(flag: str, value: Callable[[Drill], str]) -> Argv:
    return lambda d: ["tune", *_with_search(d), flag, value(d)]


def _closed(d: Drill) -> str:
    return f"127.0.0.1:{closed_port()}"


TRACKING_AND_ADDRESS = [
    command("tracking and address", "--tracking-uri closed port",
            _tune_flag("--tracking-uri", lambda d: f"http://{_closed(d)}"),
            "--tracking-uri = 'http://127.0.0.1:", "no MLflow server answered"),
    command("tracking and address", "--tracking-uri sqlite under a file",
            _tune_flag("--tracking-uri",
                       lambda d: f"sqlite:///{d.file('blocker', '')}/mlflow.db"),
            "--tracking-uri = 'sqlite:///", "blocker", "is a file"),
    command("tracking and address", "--tracking-uri postgresql closed port",
            _tune_flag("--tracking-uri", lambda d: f"postgresql://u@{_closed(d)}/mlflow"),
            "--tracking-uri = 'postgresql://***@127.0.0.1:", "not reachable"),
    command("tracking and address", "--tracking-uri with a password",
            _tune_flag("--tracking-uri", lambda d: f"postgresql://u:pw@{_closed(d)}/mlflow"),
            "--tracking-uri = 'postgresql://***@127.0.0.1:", "carries a secret", "PGPASSWORD"),
    command("tracking and address", "--tracking-uri bogus scheme",
            _tune_flag("--tracking-uri", lambda d: "bogus://somewhere"),
            "--tracking-uri = 'bogus://somewhere'", "no tracking store for the scheme 'bogus'"),
    *[command("tracking and address", f"{cmd} --address closed port",
              lambda d, cmd=cmd: [cmd, *_with_search(d), "--address", _closed(d)],
              "--address = '127.0.0.1:", "not reachable")
      for cmd in ("tune", "train", "teacher-cache")],
    command("tracking and address", "resume --address closed port",
            lambda d: ["resume", d.search_folder(files=TUNE_STATE,
                                                 good_search_file=True),
                       "--address", _closed(d)],
            "--address = '127.0.0.1:", "not reachable"),
    command("tracking and address", "resources.address closed port",
            lambda d: ["tune", "--config", d.config({"resources.address": _closed(d)},
                                                    search=True)],
            lambda d: d.config_file, "resources.address = '127.0.0.1:", "not reachable"),
    *[command("tracking and address", f"--address {address}",
              lambda d, address=address: ["train", *_with_search(d), "--address", address],
              f"--address = {address!r}", "expected host:port")
      for address in ("http://127.0.0.1:8265", "headnode", "127.0.0.1:70000")],
]

#: Set in the environment by the case (name, value made from the drill).
ENVIRONMENT_CASES = {
    "MLFLOW_TRACKING_URI closed port": ("MLFLOW_TRACKING_URI", lambda d: f"http://{_closed(d)}"),
    "RAY_ADDRESS closed port": ("RAY_ADDRESS", _closed),
}
ENVIRONMENT = [
    command("tracking and address", id, lambda d: ["tune", *_with_search(d)],
            f"{name} = ", "environment")
    for id, (name, _) in ENVIRONMENT_CASES.items()
]

CASES: list[Bad] = [*CONFIG_VALUES, *NAMES, *YAML_FILES, *SEARCH, *CLI_FLAGS, *DAMAGED_FOLDERS,
                    *MODELS_AND_DATA, *STORAGE, *TRACKING_AND_ADDRESS, *ENVIRONMENT]


# --------------------------------------------------------------------------- running a case


def _tripwire(*args, **kwargs):
    raise AssertionError(LET_THROUGH)


@pytest.fixture(autouse=True)
def before_ray_only(monkeypatch, tmp_path_factory):
    """Tripwires where Ray (or the demo build, an evaluation, the MLflow UI) would start, and
    an environment without a cluster, a tracking server or the Hub."""
    for module, name in [(cluster, "ray_session"), (cluster, "connect"),
                         (preflight, "local_ray_lock"), (sources, "demo_assets"),
                         (evaluation, "evaluate"), (subprocess, "call")]:
        monkeypatch.setattr(module, name, _tripwire)
    monkeypatch.setattr(cli, "ERROR_LOG", tmp_path_factory.mktemp("log") / "last-error.log")
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AMID_RAY_CACHE", str(tmp_path_factory.mktemp("cache")))


def _tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def _error_lines(err: str) -> list[str]:
    """stderr without argparse's usage block (a `usage:` line and its indented continuation)."""
    lines, in_usage = [], False
    for line in err.splitlines():
        if line.startswith("usage:"):
            in_usage = True
        elif not (in_usage and line.startswith(" ")):
            in_usage = False
            if line.strip():
                lines.append(line)
    return lines


def attempt(case: Bad, drill: Drill, capsys, monkeypatch) -> list[str]:
    """Run the case's command; the ways its outcome falls short of a clear error (none: clear)."""
    if case.id in ENVIRONMENT_CASES:
        name, make = ENVIRONMENT_CASES[case.id]
        monkeypatch.setenv(name, make(drill))
    monkeypatch.chdir(drill.root / "cwd")
    argv = case.argv(drill)
    says = case.says(drill)
    before = _tree(drill.root)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err
    problems = []
    if code != 2:
        problems.append(f"exit code {code}")
    if "Traceback" in err:
        problems.append("a traceback")
    lines = _error_lines(err)
    command_name = argv[0] if argv else ""
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines")
    elif not lines[0].startswith(f"amid-ray {command_name}".rstrip() + ": error: "):
        problems.append("not an `amid-ray <cmd>: error:` line")
    problems += [f"does not name {needle!r}" for needle in says if needle not in err]
    left = sorted(_tree(drill.root) - before)
    if left:
        problems.append(f"left behind {left}")
    return [f"{problem}; stderr: {err.strip()!r}" for problem in problems[:1]] + problems[1:]


OUTCOMES: dict[str, list[str]] = {}


@pytest.fixture
def drill(tiny_world, odd_models, search_config, tmp_path) -> Drill:
    return Drill(tiny_world, odd_models, search_config, tmp_path)


def _param(case: Bad):
    marks = [pytest.mark.xfail(strict=True, reason=case.known)] if case.known else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_a_bad_input_gets_one_clear_error_before_ray(case, drill, capsys, monkeypatch):
    problems = attempt(case, drill, capsys, monkeypatch)
    OUTCOMES[case.name] = problems
    assert not problems, "\n".join(problems)


def test_case_ids_are_unique():
    counts = Counter(case.name for case in CASES)
    assert [name for name, count in counts.items() if count > 1] == []


@pytest.mark.parametrize("cmd", ["train", "tune"])
def test_the_good_base_reaches_the_tripwire(cmd, drill, capsys, monkeypatch):
    """Each case differs from a configuration that passes every check: the good one gets as
    far as starting Ray (here the tripwire, an internal error), and writes nothing."""
    monkeypatch.chdir(drill.root / "cwd")
    argv = [cmd, "--config", drill.config(search=cmd == "tune")]
    before = _tree(drill.root)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert f"internal error: AssertionError: {LET_THROUGH}" in err
    assert _tree(drill.root) == before


def test_every_bad_input_but_the_known_ones_gets_a_clear_error(tiny_world, odd_models,
                                                               search_config, tmp_path_factory,
                                                               capsys, monkeypatch):
    """The drill's score, per category: all clear, except the strict xfails (each a known
    defect). Cases not run by the parametrized test in this session (`-k`) are run here."""
    for case in CASES:
        if case.name not in OUTCOMES:
            root = tmp_path_factory.mktemp("case")
            with monkeypatch.context() as patch:
                OUTCOMES[case.name] = attempt(case, Drill(tiny_world, odd_models, search_config,
                                                        root), capsys, patch)
    clear = Counter(case.category for case in CASES if not OUTCOMES[case.name])
    total = Counter(case.category for case in CASES)
    lines = [f"{category:<22} {clear[category]:>3} / {total[category]:<3} clear"
             for category in total]
    lines.append(f"{'all':<22} {sum(clear.values()):>3} / {len(CASES):<3} clear "
                 f"({100 * sum(clear.values()) / len(CASES):.0f} %), "
                 f"{sum(1 for c in CASES if c.known)} known defects (strict xfail)")
    with capsys.disabled():
        print("\nbad-input drill:\n  " + "\n  ".join(lines))
    unclear = sorted(case.name for case in CASES if OUTCOMES[case.name])
    assert unclear == sorted(case.name for case in CASES if case.known)
