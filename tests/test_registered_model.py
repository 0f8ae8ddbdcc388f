"""The end of a search as a user finds it in MLflow (real SQLite store, no Ray): the best model
registered as a `transformers` model that loads and generates, the runs the UI lists, checked
through the REST API of a real `amid-ray ui` server and, where a headless Chromium is installed,
in the browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from transformers import AutoModelForCausalLM, AutoTokenizer

from amid_ray.config import config_from_dict
from amid_ray.data import load_examples
from amid_ray.mlflow_runs import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    SearchRuns,
    default_tracking_uri,
    runs_page_url,
)
from amid_ray.publish import BEST_ALIAS, BEST_MODEL_NAME, finish_search
from amid_ray.search_space import PRESET_KEY
from amid_ray.tracking import MLflowSearchTracker

MODEL_NAME = "amid-tiny"
EXPERIMENT = "tiny-search"
MAX_STEPS = 4
MAX_NEW_TOKENS = 6  # the search's eval.max_new_tokens: the served model's default
#: Per trial: its point and the (rougeL, val_loss) it reports at steps 1, 2, ...
TRIALS = {
    "full0001": ({"amid.alpha": -1.5, "amid.lam": 0.25, "train.lr": 2e-3},
                 [(10.0, 3.0), (30.0, 2.5), (30.0, 2.0), (20.0, 1.5)]),
    "stop0002": ({"amid.alpha": 0.5, "amid.lam": 0.1, "train.lr": 1e-3},
                 [(5.0, 3.5), (6.0, 3.2)]),
    "fail0003": ({PRESET_KEY: "kd"}, [(1.0, 4.0)]),
}
BEST = "full0001"


def _base(world: dict[str, str]) -> dict:
    raw = {"name": EXPERIMENT,
           "models": {"teacher": world["teacher"], "student": world["student"]},
           "data": {"train": world["train"], "dev": world["dev"], "max_length": 96,
                    "max_prompt_length": 72},
           "train": {"max_steps": MAX_STEPS},
           "eval": {"every": 1, "max_new_tokens": MAX_NEW_TOKENS},
           "search": {"params": {"amid.alpha": {"type": "uniform", "low": -3.0, "high": 3.0}}}}
    return config_from_dict(raw, "test").to_dict()


def _report(tracker: MLflowSearchTracker, trial_id: str) -> None:
    point, curve = TRIALS[trial_id]
    trial = SimpleNamespace(trial_id=trial_id, config=point, last_result={})
    tracker.on_trial_start(0, [], trial)
    for step, (rouge, loss) in enumerate(curve, start=1):
        tracker.on_trial_result(0, [], trial, {"step": step, "rougeL": rouge, "val_loss": loss})
    if trial_id.startswith("fail"):
        tracker.on_trial_error(0, [], trial)
    else:
        tracker.on_trial_complete(0, [], trial)


@pytest.fixture(scope="module")
def published(tiny_world, tmp_path_factory) -> SimpleNamespace:
    """A finished search: three trials (run to the end, stopped early by the scheduler, failed)
    tracked through the callback's hooks, then `finish_search` with the tiny student as the best
    checkpoint."""
    from amid_ray.search import save_tracking_uri

    search_dir = tmp_path_factory.mktemp("published") / "search"
    search_dir.mkdir()
    uri = default_tracking_uri(search_dir)
    save_tracking_uri(search_dir, uri)
    runs = SearchRuns(uri, EXPERIMENT, search_dir, base_config=_base(tiny_world),
                      max_steps=MAX_STEPS, param_keys=["amid.alpha", "train.lr"])
    tracker = MLflowSearchTracker(runs)
    tracker.setup()
    for trial_id in TRIALS:
        _report(tracker, trial_id)
    best = {"trial_id": BEST, "rougeL": 30.0, "config": TRIALS[BEST][0]}
    version = finish_search(runs, best=best, trials_table=[{"trial_id": t} for t in TRIALS],
                            optuna_study=None, best_model_dir=Path(tiny_world["student"]),
                            registered_model_name=MODEL_NAME)
    return SimpleNamespace(uri=uri, search_dir=search_dir, version=version,
                           parent_id=runs.parent_run_id, experiment_id=runs.experiment_id,
                           student=Path(tiny_world["student"]), dev=tiny_world["dev"])


@pytest.fixture
def registry(published, monkeypatch):
    """MLflow's global tracking URI (which `models:/` URIs resolve through) on the store."""
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", published.uri)
    return published


def _prompts(published, count: int) -> list[str]:
    return [example.prompt for example in load_examples(published.dev, limit=count)]


def _greedy_answers(folder: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of the model in `folder`, by transformers alone: the new tokens decoded,
    without surrounding whitespace (as `amid_ray.evaluation` reads answers)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                        skip_special_tokens=True).strip())
    return answers


def test_the_best_model_loads_as_a_transformers_pipeline_that_generates(registry):
    pipeline = mlflow.transformers.load_model(f"models:/{MODEL_NAME}@best")
    assert type(pipeline).__name__ == "TextGenerationPipeline"
    (prompt,) = _prompts(registry, 1)
    (expected,) = _greedy_answers(registry.student, [prompt], MAX_NEW_TOKENS)
    (out,) = pipeline(prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                      return_full_text=False)
    assert out["generated_text"].strip() == expected
    assert len(expected) > 0


def test_the_best_models_pyfunc_answers_prompts(registry):
    """Greedy answers up to the search's eval.max_new_tokens, the prompt left out; a caller's
    params change the length."""
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@best")
    prompts = _prompts(registry, 2)
    answers = model.predict(prompts)
    assert answers == _greedy_answers(registry.student, prompts, MAX_NEW_TOKENS)
    assert all(isinstance(answer, str) and answer for answer in answers)
    short = model.predict(prompts[:1], params={"max_new_tokens": 2})
    assert short == _greedy_answers(registry.student, prompts[:1], 2)
    assert answers[0].startswith(short[0])


def test_the_registered_version_is_the_parents_logged_transformers_model(published):
    client = MlflowClient(published.uri)
    version = client.get_model_version_by_alias(MODEL_NAME, "best")
    assert int(version.version) == int(published.version.version) == 1
    assert (version.run_id, version.tags) == (published.parent_id, {"trial_id": BEST})
    (output,) = client.get_run(published.parent_id).outputs.model_outputs  # the UI's Models
    logged = client.get_logged_model(output.model_id)
    assert (logged.name, logged.source_run_id) == (BEST_MODEL_NAME, published.parent_id)
    assert logged.status == LoggedModelStatus.READY
    assert logged.params == {"amid.alpha": "-1.5", "train.lr": "0.002"}
    assert version.source == f"models:/{logged.model_id}"  # the UI links the logged model
    stored = client.get_model_version_download_uri(MODEL_NAME, version.version)
    assert stored == logged.artifact_location
    folder = Path(urllib.parse.urlparse(stored).path)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    assert mlmodel["flavors"]["transformers"]["task"] == "text-generation"
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.transformers"
    assert mlmodel["model_id"] == logged.model_id
    assert (folder / "model" / "config.json").read_text() == (
        published.student / "config.json").read_text()
    assert (folder / "components" / "tokenizer" / "tokenizer.json").is_file()
    assert f"trial `{BEST}`, best dev ROUGE-L 30.00" in (folder / "model_card.md").read_text()
    requirements = (folder / "requirements.txt").read_text().split()
    import transformers

    assert f"transformers=={transformers.__version__}" in requirements
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements


def test_the_experiment_is_a_model_training_one(published):
    experiment = MlflowClient(published.uri).get_experiment(published.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND == "custom_model_development"


def test_runs_page_url_asks_the_ui_for_its_model_training_view_of_the_runs():
    assert runs_page_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=amid-ray"
        "&workflowType=machine_learning")


def test_the_experiment_holds_the_runs_view_the_page_opens(published):
    """The runs table's columns: the model, the headline metrics, the searched params and how
    trials ended."""
    tags = MlflowClient(published.uri).get_experiment(published.experiment_id).tags
    assert json.loads(tags["mlflow.sharedViewState.amid-ray"]) == {"selectedColumns": [
        "attributes.`Models`", "metrics.`rougeL`", "metrics.`val_loss`", "metrics.`best_step`",
        "params.`amid.alpha`", "params.`train.lr`", "tags.`amid_ray.stopped_early`",
        "tags.`amid_ray.stopped_at_step`"]}


# --------------------------------------------------------------------------- the UI server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def ui_server(published, tmp_path_factory):
    """`amid-ray ui` on the finished search, on a free port of 127.0.0.1."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ui") / "server.log"
    with log.open("w") as stream:
        # Its own process group: `amid-ray ui` runs `mlflow server`, which runs its workers.
        server = subprocess.Popen(
            [sys.executable, "-m", "amid_ray.cli", "ui", str(published.search_dir), "--port",
             str(port)], stdout=stream, stderr=subprocess.STDOUT, cwd=log.parent,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"amid-ray ui did not serve {url}:\n{log.read_text()}")
                time.sleep(0.5)
        yield SimpleNamespace(url=url, api=f"{url}/api/2.0/mlflow", **vars(published))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_the_ui_server_lists_the_runs_as_a_user_sees_them(ui_server):
    """What the runs page is built from, read through the server's REST API."""
    query = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
    experiment = _get(f"{ui_server.api}/experiments/get-by-name?{query}")["experiment"]
    tags = {tag["key"]: tag["value"] for tag in experiment["tags"]}
    assert tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    found = _post(f"{ui_server.api}/runs/search",
                  {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    runs = {}
    for run in found:
        run_tags = {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
        metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
        runs[run_tags.get("trial_id", "parent")] = (run["info"], run_tags, metrics)
    assert set(runs) == {"parent", *TRIALS}
    parent_info, _, parent_metrics = runs["parent"]
    assert (parent_info["run_name"], parent_info["status"]) == ("search", "FINISHED")
    assert parent_metrics == {"best_rougeL": 30.0, "rougeL": 30.0, "best_step": 2.0,
                              "val_loss": 2.5, "num_trials": 3.0}
    endings = {trial_id: (info["status"], tags.get("amid_ray.stopped_early"),
                          tags.get("amid_ray.stopped_at_step"))
               for trial_id, (info, tags, _) in runs.items() if trial_id != "parent"}
    assert endings == {"full0001": ("FINISHED", "false", None),
                       "stop0002": ("FINISHED", "true", "2"),
                       "fail0003": ("FAILED", "false", None)}
    names = {trial_id: info["run_name"] for trial_id, (info, _, _) in runs.items()}
    assert names["full0001"] == "amid α=-1.5 λ=0.25 kl/pr (full0001)"
    assert names["fail0003"] == "kd (fail0003)"
    assert all(tags["mlflow.parentRunId"] == parent_info["run_id"]
               for trial_id, (_, tags, _) in runs.items() if trial_id != "parent")
    assert runs["stop0002"][2] == {"rougeL": 6.0, "val_loss": 3.2}  # the last points
    query = urllib.parse.urlencode({"name": MODEL_NAME, "alias": "best"})
    version = _get(f"{ui_server.api}/registered-models/alias?{query}")["model_version"]
    assert (version["version"], version["run_id"]) == ("1", parent_info["run_id"])


# --------------------------------------------------------------------------- in a browser

#: Where the browser test leaves its screenshots (default: the test's temporary folder).
SCREENSHOTS_ENV = "AMID_RAY_SCREENSHOTS"
#: Headless Chromium builds the browser test looks for (Debian: `chromium-headless-shell`).
CHROMIUM_BINARIES = ("chromium-headless-shell", "chromium", "chromium-browser")


def _chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    for name in CHROMIUM_BINARIES:
        if path := shutil.which(name):
            return path
    pytest.skip(f"no headless Chromium installed (none of {', '.join(CHROMIUM_BINARIES)} on "
                "PATH; Debian: apt-get install chromium-headless-shell)")


@pytest.mark.slow
def test_the_ui_opens_on_the_runs_of_the_search_in_a_browser(ui_server, tmp_path):
    """The runs page `runs_page_url` names, in headless Chromium: the parent with its trials
    nested under it, a trial's ROUGE-L chart and the registered model."""
    chromium = _chromium()  # skips without playwright or a browser: import it only after
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 2400, "height": 1000})
        try:
            page.goto(runs_page_url(ui_server.url, ui_server.experiment_id))
            parent = page.locator('[role="row"]', has_text="search").first
            expect(parent).to_be_visible(timeout=60_000)
            assert "/runs?" in page.url and "workflowType=machine_learning" in page.url
            for column in ("attributes.`Models`", "metrics.`rougeL`", "metrics.`val_loss`",
                           "metrics.`best_step`", "params.`amid.alpha`"):
                expect(page.locator(f'[role="columnheader"][col-id="{column}"]')).to_be_visible()
            expect(page.locator('[role="gridcell"][col-id="attributes.`Models`"]',
                                has_text=BEST_MODEL_NAME)).to_be_visible()
            page.screenshot(path=shots / "runs.png")
            # The parent's expand button: its trials are nested under it.
            parent.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').click()
            for trial_id in TRIALS:
                expect(page.get_by_text(f"({trial_id})")).to_be_visible(timeout=30_000)
            page.screenshot(path=shots / "runs_expanded.png")
            page.get_by_text(f"({BEST})").click()
            page.get_by_text("Model metrics", exact=True).click()
            for chart in ("rougeL", "val_loss"):
                expect(page.get_by_text(chart, exact=True).first).to_be_visible(timeout=30_000)
            page.screenshot(path=shots / "trial_metrics.png")
            page.goto(f"{ui_server.url}/#/models/{MODEL_NAME}")
            expect(page.get_by_text("Version 1").first).to_be_visible(timeout=30_000)
            expect(page.get_by_text(f"@ {BEST_ALIAS}").first).to_be_visible()
            page.screenshot(path=shots / "registered_model.png")
        except Exception:
            page.screenshot(path=shots / "failure.png", full_page=True)
            raise
        finally:
            browser.close()
