"""Preflight: every bad model, data file, folder, address or resource request is refused before
Ray starts, with a ConfigError naming the key and the value; a good run passes and writes
nothing. Fast: tokenizers and configs of tiny models, local sockets, no Ray."""

from __future__ import annotations

import base64
import http.server
import importlib.metadata
import multiprocessing
import os
import signal
import socket
import threading
from pathlib import Path

import pytest
import torch
from model_helpers import tiny_gpt2
from transformers import AutoTokenizer

from amid_ray import preflight
from amid_ray.config import ConfigError, RunConfig, config_from_dict, set_dotted
from amid_ray.data import load_examples
from amid_ray.models import save_model
from amid_ray.preflight import (
    ModelFacts,
    check_data,
    check_local_resources,
    check_model_pair,
    check_models,
    check_ray_address,
    check_storage,
    check_tracking_uri,
    local_ray_lock,
    preflight_run,
    read_model,
    redact_uri,
)

SOURCE = "run.yaml"
GPT2_TOKENS = 50257


@pytest.fixture(autouse=True)
def no_environment_defaults(monkeypatch):
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def make_run(tiny_world, tmp_path):
    """A run over the tiny world with dotted-key changes applied, as if read from run.yaml."""

    def make(**changes) -> RunConfig:
        raw = {
            "name": "tiny",
            "models": {"teacher": tiny_world["teacher"], "student": tiny_world["student"]},
            "data": {"train": tiny_world["train"], "dev": tiny_world["dev"], "max_length": 96,
                     "max_prompt_length": 72},
            "train": {"batch_size": 4, "max_steps": 6},
            "eval": {"every": 2, "num_examples": 4, "max_new_tokens": 6, "batch_size": 4},
            "resources": {"num_workers": 1, "cpus_per_worker": 1,
                          "storage": str(tmp_path / "runs")},
        }
        for key, value in changes.items():
            set_dotted(raw, key.replace("__", "."), value, source="test")
        return config_from_dict(raw, SOURCE)

    return make


def refused(call, *, key: str, value) -> str:
    """The message of the ConfigError `call()` raises, after checking it names key and value."""
    with pytest.raises(ConfigError) as caught:
        call()
    error = caught.value
    assert (error.key, error.value) == (key, value)
    message = str(error)
    assert f"{key} = {value!r}" in message
    return message


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- the whole run


def test_a_good_run_passes_and_writes_nothing(make_run, tmp_path):
    run = make_run()
    search_dir = tmp_path / "runs" / "tiny"
    preflight_run(run, new_search_dir=search_dir)
    # A refused start must leave no folder behind, so the checks themselves create none.
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_whole_run_is_refused_at_its_first_bad_part(make_run, tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    refused(lambda: preflight_run(make_run(**{"data.max_length": 256})),
            key="resources.storage", value=str(tmp_path / "runs"))


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def odd_models(tiny_world, tmp_path_factory) -> dict[str, str]:
    """Student folders that cannot be distilled into from the tiny world's teacher."""
    root = tmp_path_factory.mktemp("odd_models")
    tokenizer = AutoTokenizer.from_pretrained(tiny_world["teacher"])
    folders = {}

    bigger = AutoTokenizer.from_pretrained(tiny_world["teacher"])
    bigger.add_tokens(["<task>", "<answer>"])
    save_model(tiny_gpt2(bigger), bigger, root / "bigger_vocabulary")
    folders["bigger_vocabulary"] = str(root / "bigger_vocabulary")

    save_model(tiny_gpt2(tokenizer, vocab_size=50304), tokenizer, root / "wider_logits")
    folders["wider_logits"] = str(root / "wider_logits")

    save_model(tiny_gpt2(tokenizer, vocab_size=50000), tokenizer, root / "narrower_logits")
    folders["narrower_logits"] = str(root / "narrower_logits")

    tiny_gpt2(tokenizer).save_pretrained(root / "no_tokenizer")
    folders["no_tokenizer"] = str(root / "no_tokenizer")

    save_model(tiny_gpt2(tokenizer), tokenizer, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    folders["truncated"] = str(root / "truncated")

    tokenizer.save_pretrained(root / "no_weights")
    tiny_gpt2(tokenizer).config.save_pretrained(root / "no_weights")
    folders["no_weights"] = str(root / "no_weights")
    return folders


@pytest.fixture(scope="module")
def facts(tiny_world, odd_models) -> dict[str, ModelFacts]:
    """Each model read once (tokenizers take most of a second to load)."""
    roles = {"teacher": "teacher", "student": "student", "bigger_vocabulary": "student",
             "wider_logits": "student", "narrower_logits": "teacher"}
    paths = tiny_world | odd_models
    return {name: read_model(paths[name], role=role, config_source=SOURCE)
            for name, role in roles.items()}


def test_matching_models_return_the_teachers_tokenizer(make_run):
    tokenizer = check_models(make_run())
    assert len(tokenizer) == GPT2_TOKENS
    assert tokenizer.eos_token_id == GPT2_TOKENS - 1


def test_what_is_read_of_a_model(facts, tiny_world):
    teacher = facts["teacher"]
    assert (teacher.key, teacher.source, teacher.location) == (
        "models.teacher", tiny_world["teacher"], tiny_world["teacher"])
    assert (teacher.logits, teacher.positions, teacher.layers) == (GPT2_TOKENS, 128, 2)
    assert facts["student"].layers == 1


def test_a_student_with_another_vocabulary_is_refused(make_run, odd_models):
    student = odd_models["bigger_vocabulary"]
    message = refused(lambda: check_models(make_run(**{"models.student": student})),
                      key="models.student", value=student)
    assert f"teacher tokenizer has {GPT2_TOKENS} tokens but student tokenizer has " \
           f"{GPT2_TOKENS + 2}" in message


def test_a_student_with_other_logits_is_refused(make_run, facts, odd_models):
    student = odd_models["wider_logits"]
    run = make_run(**{"models.student": student})
    message = refused(lambda: check_model_pair(run, facts["teacher"], facts["wider_logits"]),
                      key="models.student", value=student)
    assert "produces 50304 logits per position but the teacher" in message
    assert f"produces {GPT2_TOKENS}" in message


def test_a_model_with_fewer_logits_than_tokens_is_refused(make_run, facts, odd_models):
    teacher = odd_models["narrower_logits"]
    run = make_run(**{"models.teacher": teacher})
    message = refused(lambda: check_model_pair(run, facts["narrower_logits"], facts["student"]),
                      key="models.teacher", value=teacher)
    assert f"50000 logits per position, fewer than the {GPT2_TOKENS} tokens" in message


@pytest.mark.parametrize(("folder", "problem"), [
    ("no_tokenizer", "has no tokenizer"),
    ("no_weights", "has no weights"),
    ("truncated", "model.safetensors is damaged"),
])
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_a_broken_model_folder_is_refused(odd_models, folder, problem, role):
    path = odd_models[folder]
    message = refused(lambda: read_model(path, role=role, config_source=SOURCE),
                      key=f"models.{role}", value=path)
    assert problem in message


def test_a_broken_student_is_refused_by_the_whole_check(make_run, odd_models):
    path = odd_models["no_tokenizer"]
    refused(lambda: check_models(make_run(**{"models.student": path})),
            key="models.student", value=path)


def test_a_model_source_that_is_not_a_model_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF but not really")
    message = refused(lambda: read_model(str(fake), role="teacher", config_source=SOURCE),
                      key="models.teacher", value=str(fake))
    assert "cannot be read as a model" in message
    notes = tmp_path / "notes.txt"
    notes.write_text("")
    message = refused(lambda: read_model(str(notes), role="student", config_source=SOURCE),
                      key="models.student", value=str(notes))
    assert "is a file but not a .gguf file" in message


def test_max_length_beyond_the_models_positions_is_refused(make_run, facts):
    pair = (facts["teacher"], facts["student"])
    message = refused(lambda: check_model_pair(make_run(**{"data.max_length": 129}), *pair),
                      key="data.max_length", value=129)
    assert "the 128 positions of the models.teacher" in message
    assert "at most 128" in message
    check_model_pair(make_run(**{"data.max_length": 128}), *pair)  # the boundary itself fits


def test_generation_beyond_the_students_positions_is_refused(make_run, facts):
    pair = (facts["teacher"], facts["student"])
    # 72 prompt tokens leave 128 - 72 = 56 positions for generated tokens.
    message = refused(lambda: check_model_pair(make_run(**{"eval.max_new_tokens": 57}), *pair),
                      key="eval.max_new_tokens", value=57)
    assert "leave room for at most 56 new tokens" in message
    check_model_pair(make_run(**{"eval.max_new_tokens": 56}), *pair)
    sgo = make_run(**{"sgo.enabled": True, "sgo.max_new_tokens": 60})
    refused(lambda: check_model_pair(sgo, *pair), key="sgo.max_new_tokens", value=60)


def test_a_derived_student_keeps_only_teacher_layers(make_run, facts):
    derive = {"models.student": "derive"}
    check_model_pair(make_run(**derive, **{"models.student_layers": [1]}), facts["teacher"], None)
    run = make_run(**derive, **{"models.student_layers": [0, 2]})
    message = refused(lambda: check_model_pair(run, facts["teacher"], None),
                      key="models.student_layers", value=[0, 2])
    assert "outside 0..1 (the teacher has 2 layers)" in message


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def tokenizer(tiny_world):
    return AutoTokenizer.from_pretrained(tiny_world["teacher"])


def _first_rows(source: str, target: Path, rows: int) -> str:
    target.write_text("".join(Path(source).read_text().splitlines(keepends=True)[:rows]))
    return str(target)


def test_good_data_passes(make_run, tokenizer):
    check_data(make_run(), tokenizer)


def test_too_few_rows_for_one_batch_is_refused(make_run, tiny_world, tokenizer, tmp_path):
    train = _first_rows(tiny_world["train"], tmp_path / "three.jsonl", 3)
    message = refused(lambda: check_data(make_run(**{"data.train": train}), tokenizer),
                      key="data.train", value=train)
    assert "3 training rows" in message
    assert "train.batch_size = 4 × resources.num_workers = 1 = 4" in message
    # Two workers of two rows need four rows as well; three workers of one need three.
    refused(lambda: check_data(make_run(**{"data.train": train, "train.batch_size": 2,
                                           "resources.num_workers": 2}), tokenizer),
            key="data.train", value=train)
    check_data(make_run(**{"data.train": train, "train.batch_size": 1,
                           "resources.num_workers": 3}), tokenizer)


def test_rows_are_counted_after_the_dev_split(make_run, tiny_world, tokenizer):
    # 64 training rows, 61 held out for dev: 3 are left for a batch of 4.
    changes = {"data.dev": None, "data.dev_size": 61}
    message = refused(lambda: check_data(make_run(**changes), tokenizer),
                      key="data.train", value=tiny_world["train"])
    assert "3 training rows are left" in message
    check_data(make_run(**{"data.dev": None, "data.dev_size": 60}), tokenizer)
    message = refused(lambda: check_data(make_run(**{"data.dev": None, "data.dev_size": 65}),
                                         tokenizer),
                      key="data.dev_size", value=65)
    assert "dev_size must be in [0, 64]" in message


def test_an_empty_dev_file_is_refused(make_run, tokenizer, tmp_path):
    empty = tmp_path / "dev.jsonl"
    empty.write_text("")
    message = refused(lambda: check_data(make_run(**{"data.dev": str(empty)}), tokenizer),
                      key="data.dev", value=str(empty))
    assert "no dev rows" in message


@pytest.mark.parametrize("key", ["train", "dev"])
def test_a_malformed_data_file_is_refused(make_run, tiny_world, tokenizer, tmp_path, key):
    broken = tmp_path / f"{key}.jsonl"
    broken.write_text(Path(tiny_world[key]).read_text().splitlines()[0] + "\n{not json\n")
    message = refused(lambda: check_data(make_run(**{f"data.{key}": str(broken)}), tokenizer),
                      key=f"data.{key}", value=str(broken))
    assert f"{key}.jsonl: line 2" in message


def test_an_lm_corpus_too_short_for_one_batch_is_refused(make_run, tiny_world, tokenizer,
                                                         tmp_path):
    lm = {"train.lm_weight": 1.0}
    check_data(make_run(**lm, **{"data.lm_corpus": tiny_world["corpus"]}), tokenizer)
    short = tmp_path / "short.txt"
    # 3 blocks of 96 tokens, and a batch of 4 needs 4: each paragraph is 100 tokens.
    short.write_text("\n\n".join(" x" * 99 for _ in range(3)))
    message = refused(lambda: check_data(make_run(**lm, **{"data.lm_corpus": str(short)}),
                                         tokenizer),
                      key="data.lm_corpus", value=str(short))
    assert "fills 3 blocks of data.max_length = 96 tokens" in message
    assert "needs 4" in message
    short.write_text("")
    message = refused(lambda: check_data(make_run(**lm, **{"data.lm_corpus": str(short)}),
                                         tokenizer),
                      key="data.lm_corpus", value=str(short))
    assert "0 tokens cannot fill one block of 96" in message


def test_an_lm_corpus_that_is_not_utf8_is_refused(make_run, tokenizer, tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(b"Un caf\xe9 noir.\n")  # Latin-1 é
    run = make_run(**{"train.lm_weight": 1.0, "data.lm_corpus": str(corpus)})
    message = refused(lambda: check_data(run, tokenizer), key="data.lm_corpus",
                      value=str(corpus))
    assert "cannot be read: not UTF-8 text (invalid continuation byte)" in message


# --------------------------------------------------------------------------- storage


def test_storage_that_is_a_file_is_refused(make_run, tmp_path):
    storage = tmp_path / "runs"
    storage.write_text("")
    message = refused(lambda: check_storage(make_run(**{"resources.storage": str(storage)})),
                      key="resources.storage", value=str(storage))
    assert "is a file; give a folder" in message
    below = str(storage / "deeper")
    message = refused(lambda: check_storage(make_run(**{"resources.storage": below})),
                      key="resources.storage", value=below)
    assert f"cannot be created: {storage} is a file" in message


def test_storage_nobody_may_write_is_refused(make_run):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, where no one may create files")
    message = refused(lambda: check_storage(make_run(**{"resources.storage": "/proc/amid"})),
                      key="resources.storage", value="/proc/amid")
    assert "cannot write in /proc" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_storage_is_refused(make_run, tmp_path):
    storage = tmp_path / "read_only"
    storage.mkdir()
    storage.chmod(0o555)
    try:
        message = refused(lambda: check_storage(make_run(**{"resources.storage": str(storage)})),
                          key="resources.storage", value=str(storage))
    finally:
        storage.chmod(0o755)
    assert f"cannot write in {storage}" in message


def test_an_existing_search_folder_is_refused(make_run, tmp_path):
    search_dir = tmp_path / "runs" / "tiny"
    check_storage(make_run(), search_dir)
    search_dir.mkdir(parents=True)
    (search_dir / "search.yaml").write_text("name: tiny\n")
    message = refused(lambda: check_storage(make_run(), search_dir),
                      key="name", value="tiny")
    assert f"{search_dir} already exists (it holds ['search.yaml'])" in message
    assert f"amid-ray resume {search_dir}" in message
    check_storage(make_run())  # a training run resumes its own folder


# --------------------------------------------------------------------------- tracking URI


class _Health(http.server.BaseHTTPRequestHandler):
    """A stand-in tracking server: /health (under an optional prefix) answers `status`."""

    status = 200
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.seen.append((self.path, self.headers.get("Authorization")))
        code = self.status if self.path.endswith("/health") else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    _Health.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    _Health.status = 200


def test_a_tracking_server_that_answers_passes(health_server, monkeypatch):
    port = health_server.server_address[1]
    check_tracking_uri(f"http://127.0.0.1:{port}/mlflow/", source="command line",
                       key="--tracking-uri")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    check_tracking_uri(f"http://127.0.0.1:{port}", source="command line",
                       key="--tracking-uri")
    expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert _Health.seen == [("/mlflow/health", None), ("/health", expected)]


@pytest.mark.parametrize(("status", "problem"), [
    (404, "answered HTTP 404: the server is not an MLflow tracking server"),
    (401, "answered HTTP 401: the server refuses these credentials"),
    (503, "answered HTTP 503: the server is not healthy"),
])
def test_a_tracking_server_that_refuses_is_refused(health_server, status, problem):
    _Health.status = status
    uri = f"http://127.0.0.1:{health_server.server_address[1]}"
    message = refused(lambda: check_tracking_uri(uri, source="command line",
                                                 key="--tracking-uri"),
                      key="--tracking-uri", value=uri)
    assert problem in message


@pytest.mark.parametrize(("uri", "advice"), [
    ("http://bob:hunter2@127.0.0.1:5000", "MLFLOW_TRACKING_PASSWORD"),
    ("https://mlflow.example/?token=hunter2", "MLFLOW_TRACKING_TOKEN"),
    ("postgresql+psycopg2://bob:hunter2@db:5432/mlflow", "PGPASSWORD"),
    ("mysql://bob:hunter2@db/mlflow", "the driver's own configuration file"),
])
def test_a_tracking_uri_with_a_secret_is_refused_without_showing_it(uri, advice):
    # Refused before any connection: the search folder would store it, logs would show it.
    message = refused(lambda: check_tracking_uri(uri, source="command line",
                                                 key="--tracking-uri"),
                      key="--tracking-uri", value=redact_uri(uri))
    assert "carries a secret" in message and advice in message
    assert "hunter2" not in message and "bob" not in message


def test_a_user_name_alone_is_not_a_secret():
    uri = f"postgresql://bob@127.0.0.1:{closed_port()}/mlflow"
    message = refused(lambda: check_tracking_uri(uri, source="command line",
                                                 key="--tracking-uri"),
                      key="--tracking-uri", value=redact_uri(uri))
    assert "the postgresql tracking database is not reachable" in message


def test_the_environments_tracking_uri_is_checked_for_a_new_search(make_run, tmp_path,
                                                                   monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    refused(lambda: preflight_run(make_run(), new_search_dir=tmp_path / "runs" / "tiny"),
            key="MLFLOW_TRACKING_URI", value=uri)


def test_tracking_files_and_databases(tmp_path):
    check = {"source": "command line", "key": "--tracking-uri"}
    check_tracking_uri(f"sqlite:///{tmp_path}/new/mlflow.db", **check)
    check_tracking_uri(tmp_path.as_uri() + "/mlruns", **check)
    check_tracking_uri(str(tmp_path / "mlruns"), **check)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    uri = f"sqlite:///{blocker}/mlflow.db"
    message = refused(lambda: check_tracking_uri(uri, **check), key="--tracking-uri", value=uri)
    assert f"{blocker} is a file; give a folder" in message
    uri = f"sqlite:///{blocker}/deeper/mlflow.db"
    message = refused(lambda: check_tracking_uri(uri, **check), key="--tracking-uri", value=uri)
    assert f"cannot be created: {blocker} is a file" in message
    uri = f"postgresql://127.0.0.1:{closed_port()}/mlflow"
    message = refused(lambda: check_tracking_uri(uri, **check), key="--tracking-uri", value=uri)
    assert "the postgresql tracking database is not reachable" in message


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://alice:s3cret@mlflow.example:5000/p?x=1&token=abc#top",
     "http://***@mlflow.example:5000/p?x=1&token=***#top"),
    ("https://TOKEN123@host/", "https://***@host/"),
    ("postgresql+psycopg2://user:pass@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
    ("https://host/path?api_key=K&sig=S&X-Amz-Credential=C&page=2&auth=",
     "https://host/path?api_key=***&sig=***&X-Amz-Credential=***&page=2&auth="),
    ("http://a:b@host?password=p", "http://***@host?password=***"),
    ("sqlite:////tmp/search/mlflow.db", "sqlite:////tmp/search/mlflow.db"),
    ("file:///tmp/mlruns", "file:///tmp/mlruns"),
    ("/tmp/mlruns", "/tmp/mlruns"),
    ("databricks", "databricks"),
    ("http://host:5000", "http://host:5000"),
])
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown


def test_an_empty_tracking_uri_or_one_mlflow_cannot_store_to_is_refused():
    check = {"source": "command line", "key": "--tracking-uri"}
    assert "is empty" in refused(lambda: check_tracking_uri("", **check), key="--tracking-uri",
                                 value="")
    message = refused(lambda: check_tracking_uri("bogus://somewhere", **check),
                      key="--tracking-uri", value="bogus://somewhere")
    assert "MLflow has no tracking store for the scheme 'bogus'" in message
    # Redacted like any other URI.
    refused(lambda: check_tracking_uri("bogus://u:pw@host", **check), key="--tracking-uri",
            value="bogus://***@host")


def test_the_scheme_of_a_tracking_store_plugin_is_left_to_mlflow(monkeypatch):
    plugin = importlib.metadata.EntryPoint("mystore", "mystore.plugin:Store",
                                           "mlflow.tracking_store")
    real = importlib.metadata.entry_points

    def entry_points(**selection):
        return [plugin] if selection == {"group": "mlflow.tracking_store"} else real(**selection)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    check = {"source": "command line", "key": "--tracking-uri"}
    check_tracking_uri("mystore://anywhere", **check)
    refused(lambda: check_tracking_uri("otherstore://x", **check), key="--tracking-uri",
            value="otherstore://x")


def test_a_store_to_read_must_exist_and_one_to_write_need_not(tmp_path):
    read = {"source": "tracking_uri", "key": "tracking_uri", "existing": True}
    database = f"sqlite:///{tmp_path}/mlflow.db"
    message = refused(lambda: check_tracking_uri(database, **read), key="tracking_uri",
                      value=database)
    assert f"{tmp_path}/mlflow.db does not exist: nothing was logged there" in message
    for folder in (str(tmp_path / "mlruns"), (tmp_path / "mlruns").as_uri()):
        message = refused(lambda folder=folder: check_tracking_uri(folder, **read),
                          key="tracking_uri", value=folder)
        assert f"{tmp_path / 'mlruns'} is not one: nothing was logged there" in message
        check_tracking_uri(folder, source="command line", key="--tracking-uri")
    check_tracking_uri(database, source="command line", key="--tracking-uri")
    (tmp_path / "mlflow.db").write_bytes(b"")
    (tmp_path / "mlruns").mkdir()
    for uri in (database, str(tmp_path / "mlruns"), (tmp_path / "mlruns").as_uri()):
        check_tracking_uri(uri, **read)


# --------------------------------------------------------------------------- Ray address


def test_an_address_where_nothing_listens_is_refused_quickly():
    address = f"127.0.0.1:{closed_port()}"
    message = refused(lambda: check_ray_address(address, source="command line",
                                                key="--address"),
                      key="--address", value=address)
    assert f"cannot connect to {address}" in message
    assert "the Ray cluster is not reachable" in message
    refused(lambda: check_ray_address(f"ray://{address}", source="command line",
                                      key="--address"),
            key="--address", value=f"ray://{address}")


def test_an_address_that_listens_passes():
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        port = head.getsockname()[1]
        check_ray_address(f"127.0.0.1:{port}", source="command line", key="--address")
        check_ray_address(f"ray://127.0.0.1:{port}", source="command line", key="--address")
    check_ray_address("auto", source="command line", key="--address")


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "headnode", "host:port",
                                     "127.0.0.1:70000", ":6379"])
def test_a_malformed_address_is_refused(address):
    message = refused(lambda: check_ray_address(address, source="command line",
                                                key="--address"),
                      key="--address", value=address)
    assert "expected host:port" in message


def test_the_address_is_taken_from_flag_then_config_then_environment(make_run, monkeypatch):
    port = closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    refused(lambda: preflight_run(make_run()), key="RAY_ADDRESS", value=f"127.0.0.1:{port}")
    configured = make_run(**{"resources.address": f"localhost:{port}"})
    with pytest.raises(ConfigError) as caught:
        preflight_run(configured)
    assert (caught.value.source, caught.value.key) == (SOURCE, "resources.address")
    refused(lambda: preflight_run(configured, address=f"127.0.0.2:{port}"), key="--address",
            value=f"127.0.0.2:{port}")


def test_an_empty_address_flag_is_refused_not_taken_for_none(make_run):
    assert preflight.ray_address(make_run(), "") == ("", "command line", "--address")
    message = refused(lambda: preflight_run(make_run(), address=""), key="--address", value="")
    assert "is empty; expected host:port" in message


# --------------------------------------------------------------------------- resources


def test_more_cpus_than_this_machine_has_are_refused_locally(make_run):
    cpus = os.cpu_count()
    run = make_run(**{"resources.cpus_per_worker": cpus + 1})
    message = refused(lambda: check_local_resources(run.resources, SOURCE),
                      key="resources.cpus_per_worker", value=float(cpus + 1))
    assert f"more CPUs than the {cpus} of this machine" in message
    run = make_run(**{"resources.num_workers": cpus + 1, "train.batch_size": 1})
    message = refused(lambda: check_local_resources(run.resources, SOURCE),
                      key="resources.num_workers", value=cpus + 1)
    assert f"needs {cpus + 1} CPUs, but this machine has {cpus}" in message
    assert f"at most {cpus} workers" in message
    run = make_run(**{"resources.num_workers": cpus, "resources.cpus_per_worker": 0.5})
    check_local_resources(run.resources, SOURCE)
    run = make_run(**{"resources.num_workers": 2 * cpus + 1, "resources.cpus_per_worker": 0.5})
    message = refused(lambda: check_local_resources(run.resources, SOURCE),
                      key="resources.num_workers", value=2 * cpus + 1)
    assert f"at most {2 * cpus} workers" in message


def test_a_cluster_is_not_bound_by_this_machines_cpus(make_run):
    run = make_run(**{"resources.cpus_per_worker": os.cpu_count() + 1})
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        preflight_run(run, address=f"127.0.0.1:{head.getsockname()[1]}")


def test_gpus_this_machine_lacks_are_refused_locally(make_run, monkeypatch):
    run = make_run(**{"resources.gpus_per_worker": 1, "resources.num_workers": 2,
                      "train.batch_size": 1})
    for gpus in (0, 1):
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        message = refused(lambda: check_local_resources(run.resources, SOURCE),
                          key="resources.gpus_per_worker", value=1.0)
        assert f"needs 2 GPUs, but this machine has {gpus}" in message
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_local_resources(run.resources, SOURCE)


# --------------------------------------------------------------------------- eval


def test_an_eval_model_is_read_before_its_weights(tiny_world, odd_models):
    assert preflight.check_eval_model(tiny_world["student"]) == Path(tiny_world["student"])
    for folder, problem in [("no_tokenizer", "has no tokenizer"),
                            ("no_weights", "has no weights"), ("truncated", "is damaged")]:
        message = refused(lambda folder=folder: preflight.check_eval_model(odd_models[folder]),
                          key="--model", value=odd_models[folder])
        assert message.startswith("command line: --model = ") and problem in message
    message = refused(lambda: preflight.check_eval_model(tiny_world["dev"]), key="--model",
                      value=tiny_world["dev"])
    assert "is a file but not a .gguf file" in message


def test_eval_sets_are_read_named_and_never_empty(tiny_world, tmp_path):
    dev = Path(tiny_world["dev"])
    sets = preflight.read_eval_sets([str(dev)], limit=3)
    assert list(sets) == [dev.stem] and sets[dev.stem] == load_examples(dev)[:3]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    message = refused(lambda: preflight.read_eval_sets([str(dev), str(empty)]), key="--data",
                      value=str(empty))
    assert "has no rows" in message
    missing = str(tmp_path / "missing.jsonl")
    message = refused(lambda: preflight.read_eval_sets([missing]), key="--data", value=missing)
    assert f"cannot be read: {missing}: no such file or folder" in message
    twin = tmp_path / "copy" / dev.name
    twin.parent.mkdir()
    twin.write_bytes(dev.read_bytes())
    message = refused(lambda: preflight.read_eval_sets([str(dev), str(twin)]), key="--data",
                      value=str(twin))
    assert f"the report would call it {dev.stem!r}" in message


# --------------------------------------------------------------------------- one local Ray

_FORK = multiprocessing.get_context("fork")


def _hold_lock(path: Path, held, release, die: bool) -> None:
    with local_ray_lock(path):
        held.set()
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        release.wait(30)


def _start_holder(path: Path, *, die: bool = False):
    held, release = _FORK.Event(), _FORK.Event()
    holder = _FORK.Process(target=_hold_lock, args=(path, held, release, die))
    holder.start()
    assert held.wait(30)
    return holder, release


def test_a_lock_held_by_another_process_refuses_and_names_it(tmp_path):
    path = tmp_path / "local-ray.lock"
    holder, release = _start_holder(path)
    try:
        message = refused(lambda: local_ray_lock(path).__enter__(),
                          key="resources.address", value=None)
        assert f"another amid-ray process (PID {holder.pid}) runs a local Ray" in message
        assert message.startswith(str(path))
    finally:
        release.set()
        holder.join(30)
    with local_ray_lock(path):  # free again once its holder ended
        assert path.read_text() == f"{os.getpid()}\n"


def test_a_lock_left_by_a_dead_process_is_taken(tmp_path):
    path = tmp_path / "local-ray.lock"
    holder, _ = _start_holder(path, die=True)
    holder.join(30)
    assert holder.exitcode == -signal.SIGKILL
    assert path.read_text() == f"{holder.pid}\n"  # the dead holder's PID is still there
    with local_ray_lock(path) as held:
        assert held == path
        assert path.read_text() == f"{os.getpid()}\n"


def test_the_lock_excludes_a_second_holder_in_this_process_too(tmp_path):
    path = tmp_path / "local-ray.lock"
    with local_ray_lock(path):
        message = refused(lambda: local_ray_lock(path).__enter__(),
                          key="resources.address", value=None)
        assert f"PID {os.getpid()}" in message
    with local_ray_lock(path):
        pass


def test_the_default_lock_lives_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("AMID_RAY_CACHE", str(tmp_path / "cache"))
    with local_ray_lock() as path:
        assert path == tmp_path / "cache" / "local-ray.lock" == preflight.default_lock_path()
