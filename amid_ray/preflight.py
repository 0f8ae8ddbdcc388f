"""Checks that refuse a bad run or search before Ray starts, each with a `ConfigError`.

What the configuration parser cannot see from the file alone is checked here, cheaply: the
models' tokenizers and configs (their weights are never loaded), the data files and the rows left
after the train/dev split, the storage and tracking folders, the tracking server and the Ray
address (each reachable within seconds), and what this machine can give a local Ray. A Hub id is
fetched into the Hugging Face cache first, a model's weights included, so that workers sharing the
cache (HF_HOME) find it there; with HF_HUB_OFFLINE=1 it must be cached already. `local_ray_lock`
keeps a second local Ray of amid-ray from starting beside a running one.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import importlib.metadata
import os
import re
import socket
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from amid_ray.config import SEARCH_FILE, ConfigError, ResourcesConfig, RunConfig
from amid_ray.data import DataError, InstructionExample, load_examples
from amid_ray.lm_corpus import load_lm_blocks
from amid_ray.models import (
    ModelError,
    check_same_tokenizer,
    load_tokenizer,
    model_location,
    pretrained_location,
    validate_keep_layers,
)
from amid_ray.remote_storage import exists, is_uri, join, probe_writable
from amid_ray.sources import (
    cache_dir,
    data_path,
    eval_data_path,
    eval_model_path,
    load_train_dev,
    model_path,
)

#: Files of which a model folder must hold one to have a tokenizer (without any, transformers
#: builds a tokenizer with a single token and training runs on garbage).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")
#: Files of which a model folder must hold one to have weights.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: Seconds a TCP connection to the Ray cluster or a tracking database may take.
CONNECT_TIMEOUT_S = 4.0
#: Seconds the tracking server's health endpoint may take to answer.
HTTP_TIMEOUT_S = 5.0
#: Where a command-line value or an environment variable comes from, in error messages.
COMMAND_LINE, ENVIRONMENT = "command line", "environment"
#: Port of `ray://` addresses that give none (the Ray client server's default).
RAY_CLIENT_PORT = 10001
#: Schemes of the tracking stores MLflow itself provides ("": a folder, as `file:`).
MLFLOW_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql",
                  "databricks", "databricks-uc", "uc")
#: What a tracking URI may be, for error messages.
TRACKING_URI_FORMS = ("expected an MLflow tracking URI: http(s)://host:port (a tracking server), "
                      "sqlite:////path/mlflow.db, postgresql://, mysql:// or mssql:// (a "
                      "database), file:///path or a folder, databricks")
#: Default ports of the SQL databases MLflow can track to.
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
#: Query parameters whose values are secrets (tokens, keys, signatures of signed URLs).
SECRET_PARAMETER = re.compile(r"token|secret|passw|pwd|key|sig|credential|auth", re.IGNORECASE)


def preflight_run(run: RunConfig, *, address: str | None = None,
                  tracking_uri: str | None = None, new_search_dir: Path | None = None) -> None:
    """Refuse `run` with a ConfigError if it cannot work; nothing is written, Ray is not touched.

    `address` is the `--address` flag; without it the address is `resources.address`, then
    $RAY_ADDRESS, as `cluster.connect` chooses it. `tracking_uri` is the `--tracking-uri` flag of a
    search; a new search without one checks $MLFLOW_TRACKING_URI if set (its default store, a file
    in the search folder, is covered by the storage check). `new_search_dir` is the folder a new
    search would create (`search.search_dir_for(run)`): it must not exist yet; None for a
    training run or a resumed search. Cheap checks come first, the models and data last.
    `demo` sources are read from the demo's cache, built first if absent (the CLI builds it
    before, so call this after `_prepare_demo`).
    """
    check_storage(run, new_search_dir)
    if tracking_uri is not None:
        check_tracking_uri(tracking_uri, source=COMMAND_LINE, key="--tracking-uri")
    elif new_search_dir is not None and os.environ.get("MLFLOW_TRACKING_URI"):
        check_tracking_uri(os.environ["MLFLOW_TRACKING_URI"], source=ENVIRONMENT,
                           key="MLFLOW_TRACKING_URI")
    effective, source, key = ray_address(run, address)
    if effective is None or effective == "local":
        check_local_resources(run.resources, run.source)
    else:
        check_ray_address(effective, source=source, key=key)
    tokenizer = check_models(run)
    check_data(run, tokenizer)


def ray_address(run: RunConfig, address: str | None) -> tuple[str | None, str, str]:
    """The Ray address a run connects to and where it was given: `(address, source, key)`.

    The flag wins over `resources.address`, which wins over $RAY_ADDRESS (`cluster.connect`'s
    order); None means a local Ray started by this process.
    """
    if address is not None:  # an empty flag is refused by check_ray_address, not ignored
        return address, COMMAND_LINE, "--address"
    if run.resources.address:
        return run.resources.address, run.source, "resources.address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], ENVIRONMENT, "RAY_ADDRESS"
    return None, run.source, "resources.address"


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelFacts:
    """What the checks read of one model source: its tokenizer and config, not its weights."""

    key: str  # the configuration key that names the model, e.g. "models.teacher"
    source: str  # as configured ("demo", "smollm2", a path, a Hub id)
    location: str  # the folder or .gguf file it stands for (a Hub id's: in the Hugging Face cache)
    tokenizer: PreTrainedTokenizerBase
    logits: int  # logits per position (the config's vocab_size)
    positions: int | None  # longest sequence the model takes (None: the config does not say)
    layers: int | None  # decoder layers


def read_model(source: str, *, role: str, config_source: str) -> ModelFacts:
    """Tokenizer and config of the teacher or student `source`, refused with a ConfigError
    (key `models.<role>`) when the folder lacks a tokenizer or weights or cannot be read."""
    key = f"models.{role}"

    def refuse(allowed: str) -> ConfigError:
        return ConfigError(config_source, key, source, allowed)

    try:
        location = Path(model_path(source, role))
    except ModelError as error:
        raise refuse(str(error)) from None
    config, tokenizer = _read_pretrained(location, refuse)
    text = config.get_text_config()
    positions = getattr(text, "n_positions", None) or getattr(
        text, "max_position_embeddings", None)
    return ModelFacts(key=key, source=source, location=str(location), tokenizer=tokenizer,
                      logits=int(text.vocab_size), positions=positions,
                      layers=getattr(text, "num_hidden_layers", None))


def _read_pretrained(location: Path, refuse: Callable[[str], ConfigError]
                     ) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """Config and tokenizer of the model folder or .gguf file at `location`; `refuse(what is
    allowed)` makes the error when it lacks a tokenizer or weights or cannot be read."""
    try:
        folder, extra = pretrained_location(location)
    except ModelError as error:
        raise refuse(str(error)) from None
    if not extra:  # a folder, not a .gguf file (which holds its tokenizer and weights)
        _check_model_files(folder, refuse)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, **extra)
        tokenizer = load_tokenizer(location)
    except ModelError as error:
        raise refuse(str(error)) from None
    except Exception as error:  # whatever transformers raises for a damaged folder or file
        raise refuse(f"cannot be read as a model ({type(error).__name__}: {error})") from None
    return config, tokenizer


def _check_model_files(folder: Path, refuse) -> None:
    names = {path.name for path in folder.iterdir()}
    if not names.intersection(TOKENIZER_FILES):
        raise refuse(f"{folder} has no tokenizer (none of {list(TOKENIZER_FILES)}); save the "
                     "tokenizer beside the model (tokenizer.save_pretrained(folder))")
    if not names.intersection(WEIGHT_FILES):
        raise refuse(f"{folder} has no weights (none of {list(WEIGHT_FILES)}); save the model "
                     "with save_pretrained")
    for shard in sorted(folder.glob("*.safetensors")):
        try:  # reads the header only; a truncated file does not cover what it lists
            with safe_open(str(shard), framework="pt"):
                pass
        except Exception as error:  # safetensors' own error type is not public
            raise refuse(f"{shard.name} is damaged ({error}); save the model again") from None


def check_models(run: RunConfig) -> PreTrainedTokenizerBase:
    """Read the run's teacher and student (tokenizers and configs) and check them as a pair
    (`check_model_pair`). Returns the teacher's tokenizer, the run's."""
    teacher = read_model(run.models.teacher, role="teacher", config_source=run.source)
    student = None
    if run.models.student != "derive":
        student = read_model(run.models.student, role="student", config_source=run.source)
    check_model_pair(run, teacher, student)
    return teacher.tokenizer


def check_model_pair(run: RunConfig, teacher: ModelFacts, student: ModelFacts | None) -> None:
    """Teacher and student share one vocabulary and logits width, and take sequences of
    `data.max_length` tokens; the student has room for answers of `eval.max_new_tokens` (and
    `sgo.max_new_tokens`) after a prompt of `data.max_prompt_length`. `student` None: derived
    from the teacher (`models.student_layers` must name teacher layers)."""
    source, layers = run.source, run.models.student_layers
    _check_fits(teacher, run)
    if student is None:
        try:
            validate_keep_layers(layers or [], teacher.layers or 0)
        except ModelError as error:
            raise ConfigError(source, "models.student_layers", layers,
                              str(error)) from None
        _check_generation_fits(teacher, run)
        return
    try:
        check_same_tokenizer(teacher.tokenizer, student.tokenizer)
    except ModelError as error:
        raise ConfigError(source, student.key, student.source,
                          f"{error} (teacher: {teacher.location})") from None
    if student.logits != teacher.logits:
        raise ConfigError(source, student.key, student.source,
                          f"produces {student.logits} logits per position but the teacher "
                          f"({teacher.location}) produces {teacher.logits}: the loss compares "
                          f"them id by id; build the student with vocab_size={teacher.logits}")
    _check_fits(student, run)
    _check_generation_fits(student, run)


def _check_fits(model: ModelFacts, run: RunConfig) -> None:
    tokens = len(model.tokenizer)
    if model.logits < tokens:
        raise ConfigError(run.source, model.key, model.source,
                          f"produces {model.logits} logits per position, fewer than the {tokens} "
                          "tokens of its tokenizer: build it with vocab_size=len(tokenizer)")
    if model.positions is not None and run.data.max_length > model.positions:
        raise ConfigError(run.source, "data.max_length", run.data.max_length,
                          f"must not exceed the {model.positions} positions of the {model.key} "
                          f"({model.location}); at most {model.positions}")


def _check_generation_fits(student: ModelFacts, run: RunConfig) -> None:
    """Generated answers follow prompts of up to `data.max_prompt_length` tokens."""
    if student.positions is None:
        return
    room = student.positions - run.data.max_prompt_length
    asked = [("eval.max_new_tokens", run.eval.max_new_tokens)]
    if run.sgo.enabled:
        asked.append(("sgo.max_new_tokens", run.sgo.max_new_tokens))
    for key, value in asked:
        if value > room:
            raise ConfigError(run.source, key, value,
                              f"with data.max_prompt_length = {run.data.max_prompt_length}, the "
                              f"{student.positions} positions of the student "
                              f"({student.location}) leave room for at most {room} new tokens")


# --------------------------------------------------------------------------- data


def check_data(run: RunConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """The data files read as instruction data; after the train/dev split every worker gets one
    micro-batch (`train.batch_size × resources.num_workers` training rows) and there is a dev
    row; with an LM loss, the corpus fills one micro-batch of `data.max_length`-token blocks."""
    data, source = run.data, run.source
    sources = [("data.train", data.train, "train")]
    if data.dev is not None:
        sources.append(("data.dev", data.dev, "dev"))
    for key, value, split in sources:
        try:
            load_examples(data_path(value, split))
        except DataError as error:
            raise ConfigError(source, key, value, f"cannot be read: {error}") from None
    try:
        train, dev = load_train_dev(data, run.train.seed)
    except ValueError as error:  # dev_size larger than the training file
        raise ConfigError(source, "data.dev_size", data.dev_size, str(error)) from None
    need = run.train.batch_size * run.resources.num_workers
    if len(train) < need:
        raise ConfigError(
            source, "data.train", data.train,
            f"{len(train)} training rows are left after the dev split (data.dev, data.dev_size, "
            f"data.max_train_examples), fewer than one micro-batch on every worker: "
            f"train.batch_size = {run.train.batch_size} × resources.num_workers = "
            f"{run.resources.num_workers} = {need}; give more rows or lower them")
    if not dev:
        key, value = ("data.dev", data.dev) if data.dev is not None else ("data.dev_size",
                                                                          data.dev_size)
        raise ConfigError(source, key, value, "leaves no dev rows; evaluation rounds need at "
                          "least one")
    if run.train.lm_weight > 0 and data.lm_corpus is not None:
        _check_lm_corpus(run, tokenizer, need)


def _check_lm_corpus(run: RunConfig, tokenizer: PreTrainedTokenizerBase, need: int) -> None:
    corpus, length = run.data.lm_corpus, run.data.max_length
    try:
        blocks = len(load_lm_blocks(corpus, tokenizer, length, max_blocks=need))
    except DataError as error:
        blocks, problem = 0, str(error)
    except UnicodeDecodeError as error:  # a .txt corpus is decoded as it is read
        raise ConfigError(run.source, "data.lm_corpus", corpus,
                          f"cannot be read: not UTF-8 text ({error.reason}); save it as "
                          "UTF-8") from None
    else:
        problem = f"fills {blocks} blocks of data.max_length = {length} tokens"
    if blocks < need:
        raise ConfigError(run.source, "data.lm_corpus", corpus,
                          f"{problem}; one micro-batch on every worker needs {need} "
                          f"(train.batch_size × resources.num_workers)")


# --------------------------------------------------------------------------- storage


def check_storage(run: RunConfig, new_search_dir: Path | None = None) -> None:
    """`resources.storage` is a folder this process can write in (or can create), or a URI
    (`s3://…`) it can write an object under; and a new search does not exist there yet."""
    storage = run.resources.storage
    if is_uri(storage):
        _check_storage_uri(run, storage, new_search=new_search_dir is not None)
        return
    check_writable_folder(Path(storage).expanduser(), source=run.source,
                          key="resources.storage", value=storage)
    if new_search_dir is None or not new_search_dir.exists():
        return
    held = (f"it holds {sorted(path.name for path in new_search_dir.iterdir())}"
            if new_search_dir.is_dir() else "a file")
    raise ConfigError(run.source, "name", run.name,
                      f"{new_search_dir} already exists ({held}); continue that search with "
                      f"`amid-ray resume {new_search_dir}`, or choose another name (--name)")


def _check_storage_uri(run: RunConfig, storage: str, *, new_search: bool) -> None:
    try:
        probe_writable(storage)
        taken = new_search and exists(join(storage, run.name, SEARCH_FILE))
    except (OSError, ValueError) as error:  # unknown scheme, no bucket, no credentials, …
        raise ConfigError(run.source, "resources.storage", storage,
                          f"cannot be written ({error}); check the bucket and the credentials "
                          "(AWS_* variables, AWS_ENDPOINT_URL for S3-compatible servers)"
                          ) from None
    if taken:
        location = join(storage, run.name)
        raise ConfigError(run.source, "name", run.name,
                          f"a search already exists at {location}; continue it with "
                          f"`amid-ray resume {location}`, or choose another name (--name)")


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else the closest of its parents that does."""
    while not path.exists():
        path = path.parent
    return path


def check_writable_folder(folder: Path, *, source: str, key: str, value: str) -> None:
    """`folder` is a folder, or can be created, and a file can be written in it (or in the
    folder it would be created in); refused with a ConfigError naming `key` and `value`.
    Leaves nothing behind."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(source, key, value, f"{folder} is a file; give a folder")
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(source, key, value,
                          f"cannot be created: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".amid-ray-write-check-")
    except OSError as error:
        raise ConfigError(source, key, value,
                          f"cannot write in {existing} ({error.strerror}); give a folder this "
                          "user can write in") from None
    os.close(handle)
    os.unlink(probe)


# --------------------------------------------------------------------------- tracking


def tracking_schemes() -> set[str]:
    """URI schemes MLflow can track to here: its own (`MLFLOW_SCHEMES`) and those of installed
    tracking-store plugins (entry points `mlflow.tracking_store`)."""
    plugins = importlib.metadata.entry_points(group="mlflow.tracking_store")
    return set(MLFLOW_SCHEMES) | {plugin.name for plugin in plugins}


def check_tracking_uri(uri: str, *, source: str, key: str, existing: bool = False) -> None:
    """The MLflow tracking store answers: a server's `/health` within a few seconds, a database
    server's port, a `sqlite:` file's folder or a `file:` / plain folder writable. Empty URIs and
    schemes MLflow has no store for are refused; `databricks` and plugins' schemes are left to
    MLflow. `existing`: the store is to be read (`amid-ray ui`), so a `sqlite:` file or a folder
    must exist already."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    shown = redact_uri(uri)
    if not uri.strip():
        raise ConfigError(source, key, uri, f"is empty; {TRACKING_URI_FORMS}")
    if carries_secret(uri):
        advice = SECRET_ADVICE.get(scheme, SECRET_ADVICE[""])
        raise ConfigError(source, key, shown, "carries a secret, which the search folder would "
                          f"store and logs would show; {advice}")
    if uri.startswith("databricks"):  # `databricks`, `databricks://profile`, `databricks-uc`
        return
    if scheme not in tracking_schemes():
        raise ConfigError(source, key, shown, f"MLflow has no tracking store for the scheme "
                          f"{scheme!r}; {TRACKING_URI_FORMS}")
    if scheme == "uc" or scheme not in MLFLOW_SCHEMES:  # Unity Catalog, or a plugin's store
        return
    if scheme in ("http", "https"):
        _check_tracking_server(uri, source=source, key=key)
    elif scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            return
        database = Path(path).expanduser()
        if database.is_dir():
            raise ConfigError(source, key, shown, f"{database} is a folder; give a database file")
        if existing and not database.is_file():
            raise ConfigError(source, key, shown, f"{database} does not exist: nothing was "
                              "logged there")
        check_writable_folder(database.parent, source=source, key=key, value=shown)
    elif scheme in ("file", ""):
        folder = Path(parts.path if scheme == "file" else uri).expanduser()
        if existing and not folder.is_dir():
            raise ConfigError(source, key, shown, f"read as a folder of MLflow runs, but "
                              f"{folder.resolve()} is not one: nothing was logged there; "
                              f"{TRACKING_URI_FORMS}")
        check_writable_folder(folder, source=source, key=key, value=shown)
    elif scheme in DATABASE_PORTS:
        port = parts.port or DATABASE_PORTS[scheme]
        check_reachable(parts.hostname or "localhost", port, source=source, key=key, value=shown,
                        what=f"the {scheme} tracking database")


def _check_tracking_server(uri: str, *, source: str, key: str) -> None:
    parts = urlsplit(uri)
    shown = redact_uri(uri)
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    health = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    request = urllib.request.Request(health, headers=_tracking_auth(parts))
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S, context=_tls_context()):
            return
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            hint = ("refuses these credentials; set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        elif error.code == 404:
            hint = "is not an MLflow tracking server (it has no /health)"
        else:
            hint = "is not healthy"
        problem = f"{redact_uri(health)} answered HTTP {error.code}: the server {hint}"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        problem = (f"no MLflow server answered {redact_uri(health)} within {HTTP_TIMEOUT_S:g} s "
                   f"({reason})")
    raise ConfigError(source, key, shown, f"{problem}; start the server (`mlflow server`) or "
                      "fix the URI")


def _tracking_auth(parts) -> dict[str, str]:
    """Headers MLflow would send: basic auth from its environment (the user may be in the URI;
    a password there is refused), else a token."""
    user = parts.username or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return {}


def _tls_context() -> ssl.SSLContext:
    """TLS as MLflow's client is told to do it by its environment variables."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))


#: Where a tracking URI's secret goes instead, by scheme ("": any other).
SECRET_ADVICE = {
    "http": "give it in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
            "MLFLOW_TRACKING_TOKEN, which MLflow reads itself",
    "https": "give it in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
             "MLFLOW_TRACKING_TOKEN, which MLflow reads itself",
    "postgresql": "give the password in PGPASSWORD or ~/.pgpass, which the driver reads itself",
    "": "give it through the environment or the driver's own configuration file",
}


def carries_secret(uri: str) -> bool:
    """A password in the user info or a token-like query parameter (what `redact_uri` hides;
    a user name alone is not a secret)."""
    parts = urlsplit(uri)
    return parts.password is not None or any(
        value and SECRET_PARAMETER.search(name)
        for name, _, value in (field.partition("=") for field in parts.query.split("&")))


def redact_uri(uri: str) -> str:
    """`uri` fit to print: credentials (`user:password@`) and the values of token-like query
    parameters (`token`, `api_key`, `sig`, …) replaced by `***`; anything else unchanged."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    authority_end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
                        default=len(rest))
    authority, tail = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    path, hash_mark, fragment = tail.partition("#")
    path, question_mark, query = path.partition("?")
    if query:
        fields = []
        for field in query.split("&"):
            name, equals, value = field.partition("=")
            secret = equals and value and SECRET_PARAMETER.search(name)
            fields.append(f"{name}=***" if secret else field)
        query = "&".join(fields)
    return f"{scheme}://{authority}{path}{question_mark}{query}{hash_mark}{fragment}"


# --------------------------------------------------------------------------- Ray cluster


def check_ray_address(address: str, *, source: str, key: str,
                      timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to the cluster at `address` (`host:port`, `ray://host[:port]`) opens
    within `timeout_s`; `auto` and `local` are Ray's to resolve (it fails fast on them)."""
    if address in ("auto", "local"):
        return
    allowed = "expected host:port (the head's GCS), ray://host:port (Ray client) or auto"
    if not address.strip():
        raise ConfigError(source, key, address, f"is empty; {allowed} (no address: a local "
                          "Ray)")
    scheme, has_scheme, rest = address.partition("://")
    if has_scheme and scheme != "ray":
        raise ConfigError(source, key, address, allowed)
    target = rest if has_scheme else address
    host, colon, port_text = target.rstrip("/").rpartition(":")
    if not colon and has_scheme:
        host, port_text = target.rstrip("/"), str(RAY_CLIENT_PORT)
    host = host.strip("[]")  # an IPv6 literal
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(source, key, address, allowed)
    check_reachable(host, int(port_text), source=source, key=key, value=address,
                    what="the Ray cluster", timeout_s=timeout_s)


def check_reachable(host: str, port: int, *, source: str, key: str, value: str, what: str,
                    timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to `host:port` opens within `timeout_s` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except socket.gaierror as error:
        problem = f"cannot resolve the host {host!r} ({error.strerror})"
    except TimeoutError:
        problem = f"nothing answered at {host}:{port} within {timeout_s:g} s"
    except OSError as error:
        problem = f"cannot connect to {host}:{port} ({error.strerror or error})"
    raise ConfigError(source, key, value, f"{problem}: {what} is not reachable from here; "
                      "check the host and port, and that it is running")


def check_local_resources(resources: ResourcesConfig, source: str) -> None:
    """A local Ray gets this machine's CPUs (`os.cpu_count()`) and GPUs: one run's workers must
    fit in them, or the run waits for resources that never come."""
    cpus = os.cpu_count() or 1
    if resources.cpus_per_worker > cpus:
        raise ConfigError(source, "resources.cpus_per_worker", resources.cpus_per_worker,
                          f"a worker cannot have more CPUs than the {cpus} of this machine, all a "
                          f"local Ray gets; at most {cpus}, or use a cluster (--address)")
    wanted = resources.num_workers * resources.cpus_per_worker
    if wanted > cpus:
        raise ConfigError(source, "resources.num_workers", resources.num_workers,
                          f"with resources.cpus_per_worker = {resources.cpus_per_worker:g} a run "
                          f"needs {wanted:g} CPUs, but this machine has {cpus} for a local Ray: "
                          f"at most {int(cpus // resources.cpus_per_worker)} workers, fewer CPUs "
                          "per worker, or a cluster (--address)")
    if resources.gpus_per_worker > 0:
        gpus = torch.cuda.device_count()
        wanted = resources.num_workers * resources.gpus_per_worker
        if wanted > gpus:
            raise ConfigError(source, "resources.gpus_per_worker", resources.gpus_per_worker,
                              f"× resources.num_workers = {resources.num_workers} needs "
                              f"{wanted:g} GPUs, but this machine has {gpus} for a local Ray: "
                              "set gpus_per_worker to 0 for CPUs, or use a cluster (--address)")


# --------------------------------------------------------------------------- eval


def check_eval_model(value: str) -> Path:
    """Where the model of `amid-ray eval --model value` is (a folder or .gguf file; a name of
    `sources.EVAL_MODELS` or a Hub id resolved), after reading its tokenizer and config: refused
    with a ConfigError naming --model when it lacks a tokenizer or weights or cannot be read."""

    def refuse(allowed: str) -> ConfigError:
        return ConfigError(COMMAND_LINE, "--model", value, allowed)

    try:
        location = model_location(eval_model_path(value))
    except ModelError as error:
        raise refuse(str(error)) from None
    _read_pretrained(location, refuse)
    return location


def read_eval_sets(values: Sequence[str], *, limit: int | None = None
                   ) -> dict[str, list[InstructionExample]]:
    """The eval sets of `amid-ray eval --data values`, by the name the report gives them (a
    file's stem, or the name of a demo split such as `demo-dev`), each its first `limit` rows;
    a source that cannot be read, holds no rows or shares its name with another is refused
    with a ConfigError naming --data."""
    sets: dict[str, list[InstructionExample]] = {}
    given: dict[str, str] = {}
    for value in values:
        path = eval_data_path(value)
        name = value if path != value else Path(path).stem
        if name in sets:
            raise ConfigError(COMMAND_LINE, "--data", value,
                              f"the report would call it {name!r}, as it calls {given[name]!r}: "
                              "give each eval set once, under a file name of its own")
        try:
            examples = load_examples(path, limit=limit)
        except DataError as error:
            raise ConfigError(COMMAND_LINE, "--data", value, f"cannot be read: {error}") from None
        if not examples:
            raise ConfigError(COMMAND_LINE, "--data", value,
                              "has no rows; an eval set needs at least one")
        sets[name], given[name] = examples, value
    return sets


# --------------------------------------------------------------------------- one local Ray


def default_lock_path() -> Path:
    """The lock file of amid-ray's local Rays on this machine (in amid-ray's cache)."""
    return cache_dir() / "local-ray.lock"


@contextlib.contextmanager
def local_ray_lock(path: Path | None = None) -> Iterator[Path]:
    """Hold the local-Ray lock for the block, or refuse at once if another process holds it.

    Two local Rays on one machine break each other's trials, so a search or training run that
    starts a local Ray holds this lock while it runs: an exclusive `flock` on a file that
    records the holder's PID. The kernel drops the lock when its holder exits, so a file left
    by a dead process does not block.
    """
    path = default_lock_path() if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+": opening must not erase the PID of a holder before the lock is tried.
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ConfigError(
                str(path), "resources.address", None,
                f"another amid-ray process (PID {holder}) runs a local Ray on this machine, and "
                "two local Rays break each other's trials; wait for it to end (`ps -p "
                f"{holder}`), or start a cluster (`ray start --head`) and give both its "
                "address (--address)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield path
