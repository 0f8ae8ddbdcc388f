"""MLflow tracking of a search: a real Ray Tune run, a real SQLite tracking store, a resume;
the callback's hooks and the end-of-search publishing driven directly."""

from __future__ import annotations

import copy
import dataclasses
import getpass
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import optuna
import pytest
import ray
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from mlflow_helpers import tracking_summary
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial
from ray import tune

from amid_ray.config import PRESET_RECIPES, RunConfig, apply_overrides, config_from_dict
from amid_ray.losses import PRESETS
from amid_ray.mlflow_runs import (
    EXPERIMENT_KIND_TAG,
    PARENT_RUN_FILE,
    STOPPED_AT_STEP_TAG,
    STOPPED_EARLY_TAG,
    SearchRuns,
    default_artifact_location,
    default_tracking_uri,
    param_value,
    read_experiment_id,
    read_parent_run_id,
)
from amid_ray.publish import finish_search, sync_trial, write_study_plots
from amid_ray.search_space import PRESET_KEY
from amid_ray.tracking import MLflowSearchTracker, result_step

MAX_STEPS = 4
ALPHAS = (-3.0, 0.0, 1.0)
FAILS_ONCE = 0.0  # this trial raises at step 2 on its first attempt, then is resumed
STOPPED = 1.0  # the stopper ends this trial after step 2
PARAM_KEYS = ("amid.alpha", "amid.divergence", "amid.ab_alpha", "train.lr")
#: The base configuration of the searches here (named demo sources: no files needed).
BASE = {"name": "amid-search", "data": {"max_length": 96, "max_prompt_length": 72},
        "train": {"lr": 1e-3, "max_steps": MAX_STEPS}, "amid": {"alpha": 0.5},
        "eval": {"every": 1},
        "search": {"params": {"amid.alpha": {"type": "grid", "values": list(ALPHAS)}}}}
USERNAME = "alice"  # the tracking server's user: MLflow records it as `mlflow.user`
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "pw-secret", "MLFLOW_TRACKING_TOKEN": "token-secret"}
MODEL_NAME = "amid-student"


def _base() -> dict:
    return config_from_dict(copy.deepcopy(BASE), "BASE").to_dict()


def _setting_names() -> set[str]:
    """Every setting of a run configuration by dotted name, read off the dataclasses."""
    names = set()
    for field in dataclasses.fields(RunConfig):
        if field.metadata.get("internal") or field.name == "search":
            continue
        if field.default_factory is dataclasses.MISSING:
            names.add(field.name)
        else:
            names |= {f"{field.name}.{setting.name}"
                      for setting in dataclasses.fields(field.default_factory)}
    return names


def _trial(config: dict, marker_dir: str) -> None:
    """A stand-in for the AMiD trial: reports step, rougeL and val_loss each eval round."""
    alpha = config["amid.alpha"]
    failed_once = Path(marker_dir) / f"failed_{alpha}"
    for step in range(1, MAX_STEPS + 1):
        if alpha == FAILS_ONCE and step == 2 and not failed_once.exists():
            failed_once.touch()
            raise RuntimeError("simulated lost worker")
        tune.report({"step": step, "rougeL": 0.1 * step - 0.01 * alpha, "val_loss": 2.0 / step,
                     "lr": "cosine"})


def _stop(trial_id: str, result: dict) -> bool:
    return result["config"]["amid.alpha"] == STOPPED and result["step"] >= 2


def _runs(tracking_uri: str, search_dir: Path, base: dict | None = None) -> SearchRuns:
    return SearchRuns(tracking_uri, "amid-search", search_dir,
                      base_config=_base() if base is None else base, max_steps=MAX_STEPS,
                      param_keys=PARAM_KEYS)


def _children_by_alpha(summary: dict) -> dict[float, dict]:
    return {float(child["params"]["amid.alpha"]): child for child in summary["children"]}


def _all_tags(uri: str, run_id: str) -> dict[str, str]:
    """A run's tags, MLflow's own (`mlflow.*`) included."""
    return dict(MlflowClient(uri).get_run(run_id).data.tags)


def _artifact_text(uri: str, run_id: str, path: str) -> str:
    folder = Path(urlparse(MlflowClient(uri).get_run(run_id).info.artifact_uri).path)
    return (folder / path).read_text()


@pytest.fixture(scope="module")
def local_ray():
    # Trial actors unpickle `_trial` by module name: let them import this test module.
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def search(local_ray, tmp_path_factory) -> SimpleNamespace:
    """A 3-trial search (one finishes, one is stopped, one fails), then a resume of it."""
    root = tmp_path_factory.mktemp("tracking")
    search_dir = root / "search"
    uri = default_tracking_uri(search_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for name, value in {**SECRETS, "MLFLOW_TRACKING_USERNAME": USERNAME}.items():
            patch.setenv(name, value)
        trainable = tune.with_parameters(_trial, marker_dir=str(root))
        tuner = tune.Tuner(
            trainable,
            param_space={"amid.alpha": tune.grid_search(list(ALPHAS)), "train.lr": 1e-3,
                         "amid.divergence": "kl"},
            run_config=tune.RunConfig(name="tune", storage_path=str(root / "ray"), stop=_stop,
                                      callbacks=[MLflowSearchTracker(_runs(uri, search_dir))],
                                      verbose=0),
        )
        tuner.fit()
        after_fit = tracking_summary(uri, search_dir)
        # A new driver: the tracker comes back unpickled from Tune's experiment state.
        tune.Tuner.restore(str(root / "ray" / "tune"), trainable, resume_errored=True).fit()
        after_resume = tracking_summary(uri, search_dir)
    return SimpleNamespace(root=root, search_dir=search_dir, uri=uri, after_fit=after_fit,
                           after_resume=after_resume)


def _study(summary: dict) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    space = {"amid.alpha": FloatDistribution(-5.0, 5.0)}
    for alpha, child in _children_by_alpha(summary).items():
        study.add_trial(create_trial(params={"amid.alpha": alpha}, distributions=space,
                                     value=child["metrics"]["rougeL"][-1][1]))
    return study


@pytest.fixture(scope="module")
def finished(search, tiny_world) -> SimpleNamespace:
    """finish_search from a third driver, after a driver died leaving two children RUNNING."""
    client = MlflowClient(search.uri)
    children = _children_by_alpha(search.after_resume)
    for alpha in (-3.0, STOPPED):
        client.update_run(children[alpha]["run_id"], status="RUNNING")
    model_dir = Path(tiny_world["student"])
    best_child = children[-3.0]
    best = {"trial_id": best_child["trial_id"], "rougeL": best_child["metrics"]["rougeL"][-1][1],
            "config": {"amid": {"alpha": -3.0, "divergence": "kl"}, "train": {"lr": 1e-3}}}
    table = [{"trial_id": child["trial_id"], "alpha": alpha, "status": child["status"]}
             for alpha, child in children.items()]
    version = finish_search(_runs(search.uri, search.search_dir), best=best, trials_table=table,
                            optuna_study=_study(search.after_resume),
                            best_model_dir=model_dir, registered_model_name=MODEL_NAME)
    return SimpleNamespace(client=client, version=version, model_dir=model_dir, best=best,
                           summary=tracking_summary(search.uri, search.search_dir))


def test_default_store_lives_in_the_search_folder(tmp_path):
    assert default_tracking_uri(tmp_path / "s") == f"sqlite:///{tmp_path.resolve()}/s/mlflow.db"


def test_artifacts_stay_local_unless_a_server_stores_them(tmp_path):
    assert default_artifact_location("http://127.0.0.1:5000", tmp_path) is None
    local = (tmp_path.resolve() / "mlartifacts").as_uri()
    assert default_artifact_location(default_tracking_uri(tmp_path), tmp_path) == local
    assert default_artifact_location("postgresql://db/mlflow", tmp_path) == local


@pytest.fixture(scope="module")
def shared_uri(tmp_path_factory) -> str:
    """One SQLite tracking store for the fast tests that take `store`: making one takes
    seconds."""
    return default_tracking_uri(tmp_path_factory.mktemp("store"))


@pytest.fixture
def store(shared_uri, tmp_path) -> SimpleNamespace:
    """The shared tracking store and a search folder of this test's own."""
    return SimpleNamespace(uri=shared_uri, search_dir=tmp_path / "search")


def test_nested_and_dotted_configs_give_the_same_searched_params(tmp_path):
    runs = _runs(default_tracking_uri(tmp_path), tmp_path)
    nested = {"amid": {"alpha": -3.0, "divergence": "kl", "order": "pr"}, "train.lr": 1e-3}
    dotted = {"amid.alpha": -3.0, "amid.divergence": "kl", "amid.order": "pr", "train.lr": 1e-3}
    expected = {"amid.alpha": "-3.0", "amid.divergence": "kl", "train.lr": "0.001"}
    assert runs.searched_params(nested) == runs.searched_params(dotted) == expected


@pytest.mark.parametrize("value", [None, True, False, 40, -3.0, 0.001, 3e-4, 1e-5, [0, 3, 6],
                                   "kl", "/data/dolly train.jsonl"])
def test_a_param_value_reads_back_through_set_as_the_value(value):
    """What a run shows is what `--set key=VALUE` (a YAML scalar) gives back."""
    raw: dict = {}
    apply_overrides(raw, [f"train.x={param_value(value)}"])
    assert raw["train"]["x"] == value


def test_a_value_past_mlflows_limit_is_cut_with_a_note(store, monkeypatch):
    long = "0123456789" * 700
    cut = param_value(long)
    assert len(cut) == MAX_PARAM_VAL_LENGTH == 6000
    assert cut.startswith(long[:5000]) and cut.endswith("[cut: 7000 characters]")
    runs = _runs(store.uri, store.search_dir)
    run = runs.client.create_run(runs.experiment_id)
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")  # a store that refuses them
    with pytest.raises(MlflowException, match="exceeds the maximum length"):
        runs.client.log_param(run.info.run_id, "long", long)
    runs.log_missing_params(run, {"long": cut})
    assert runs.client.get_run(run.info.run_id).data.params["long"] == cut


def test_more_params_than_one_mlflow_request_holds_are_all_logged(store):
    """MLflow takes at most 100 params per request; a configuration may have more."""
    runs = _runs(store.uri, store.search_dir)
    run = runs.client.create_run(runs.experiment_id)
    params = {f"section.key_{index:03d}": str(index) for index in range(250)}
    runs.log_missing_params(run, params)
    assert runs.client.get_run(run.info.run_id).data.params == params


def _start_trials(tracker: MLflowSearchTracker, points: dict[str, dict]) -> dict[str, str]:
    """Start a trial per (trial id, point) through the tracker's hook; their child run ids."""
    tracker.setup()
    for trial_id, point in points.items():
        tracker.on_trial_start(0, [], SimpleNamespace(trial_id=trial_id, config=point,
                                                      last_result={}))
    return {trial_id: tracker.runs.find_child(trial_id).info.run_id for trial_id in points}


def test_a_child_logs_its_trials_whole_configuration(store, tmp_path, tiny_world, search_config):
    """Every setting under its dotted name with the trial's value, the file it runs from, and a
    name that says what it trains (the hooks driven directly, real SQLite store)."""
    base = config_from_dict(search_config(tiny_world, tmp_path / "runs", "tiny"), "t").to_dict()
    uri = store.uri
    point = {"amid.alpha": -1.934, "amid.lam": 0.3, "amid.divergence": "ab",
             "amid.ab_alpha": 0.4, "train.lr": 2e-3}
    tracker = MLflowSearchTracker(_runs(uri, store.search_dir, base))
    (run_id,) = _start_trials(tracker, {"a1b2c3d4": point}).values()
    run = MlflowClient(uri).get_run(run_id)
    params = run.data.params
    assert set(params) == _setting_names()
    assert {key: params[key] for key in point} == {
        "amid.alpha": "-1.934", "amid.lam": "0.3", "amid.divergence": "ab",
        "amid.ab_alpha": "0.4", "train.lr": "0.002"}
    assert (params["data.max_length"], params["train.batch_size"], params["eval.every"]) == (
        "96", "4", "2")
    assert params["models.teacher"] == tiny_world["teacher"]
    assert (params["amid.preset"], params["models.student_layers"]) == ("null", "null")
    assert run.info.run_name == "amid α=-1.93 λ=0.3 ab/pr (a1b2c3d4)"
    written = yaml.safe_load(_artifact_text(uri, run_id, "config.yaml"))
    assert "search" not in written
    assert (written["amid"]["alpha"], written["train"]["lr"]) == (-1.934, 2e-3)
    # The artifact is a run configuration that trains the trial again.
    assert config_from_dict(written, "config.yaml").to_dict() == {**written, "search": None}


def test_a_baseline_child_logs_its_preset_resolved(store, tmp_path, tiny_world, search_config):
    base = config_from_dict(search_config(tiny_world, tmp_path / "runs", "tiny"), "t").to_dict()
    uri = store.uri
    tracker = MLflowSearchTracker(_runs(uri, store.search_dir, base))
    (run_id,) = _start_trials(tracker, {"f00d0001": {PRESET_KEY: "srkl"}}).values()
    run = MlflowClient(uri).get_run(run_id)
    resolved = {f"amid.{key}": param_value(value)
                for key, value in PRESETS["srkl"].as_kwargs().items()}
    assert resolved["amid.lam"] == "0.9"  # SRKL's mixture, not the base's lam 0.1
    assert {key: run.data.params[key] for key in resolved} == resolved
    recipe = {key: param_value(value) for key, value in PRESET_RECIPES["srkl"].items()
              if key != "train.lm_weight"}  # LM loss only with a corpus; this search has none
    assert {key: run.data.params[key] for key in recipe} == recipe
    assert run.data.params["sgo.enabled"] == "true"
    assert run.info.run_name == "srkl (f00d0001)"


def test_a_refused_point_is_logged_unchecked_without_stopping_the_search(store, caplog):
    uri = store.uri
    tracker = MLflowSearchTracker(_runs(uri, store.search_dir))
    with caplog.at_level(logging.WARNING, logger="amid_ray.mlflow_runs"):
        (run_id,) = _start_trials(tracker, {"bad": {"amid.alpha": 2.0, "train.lr": -1}}).values()
    assert "train.lr = -1" in caplog.text
    params = MlflowClient(uri).get_run(run_id).data.params
    assert (params["train.lr"], params["amid.alpha"], params["data.max_length"]) == (
        "-1", "2.0", "96")


def test_the_parent_logs_the_base_configuration(store):
    uri = store.uri
    runs = _runs(uri, store.search_dir)
    run = MlflowClient(uri).get_run(runs.parent_run_id)
    params = run.data.params
    assert set(params) == _setting_names()
    assert (params["amid.alpha"], params["train.lr"], params["data.max_length"]) == (
        "0.5", "0.001", "96")
    written = yaml.safe_load(_artifact_text(uri, runs.parent_run_id, "config.yaml"))
    assert written == _base()  # the search section included: it runs the search again
    assert written["search"]["params"] == BASE["search"]["params"]
    space = yaml.safe_load(_artifact_text(uri, runs.parent_run_id, "search_space.yaml"))
    assert space == written["search"]


def test_a_password_in_a_url_is_never_logged(store):
    base = _base()
    base["search"]["storage"] = "postgresql://optuna:pg-secret@db:5432/studies"
    uri = store.uri
    tracker = MLflowSearchTracker(_runs(uri, store.search_dir, base))
    (child_id,) = _start_trials(tracker, {"t1": {"amid.alpha": 1.0}}).values()
    parent_id = tracker.runs.parent_run_id
    logged = [_artifact_text(uri, run_id, name) for run_id, name in (
        (parent_id, "config.yaml"), (parent_id, "search_space.yaml"), (child_id, "config.yaml"))]
    assert not any("pg-secret" in text for text in logged)
    assert "postgresql://***@db:5432/studies" in logged[0]


def test_the_search_folder_names_its_parent_run_and_experiment(store):
    assert read_parent_run_id(store.search_dir) is None
    assert read_experiment_id(store.search_dir) is None
    runs = _runs(store.uri, store.search_dir)
    parent_id = runs.parent_run_id  # the parent run is made when first asked for
    assert read_parent_run_id(store.search_dir) == parent_id
    assert read_experiment_id(store.search_dir) == runs.experiment_id
    assert MlflowClient(store.uri).get_experiment(runs.experiment_id).name == "amid-search"


def test_the_experiment_is_marked_model_training_unless_marked_already(store, tmp_path):
    """MLflow's UI tells model-training experiments from GenAI ones by a tag; a user's choice
    stays."""
    client = MlflowClient(store.uri)
    artifacts = (tmp_path / "artifacts").as_uri()
    client.create_experiment("kind-unmarked", artifact_location=artifacts)  # an older search's
    client.create_experiment("kind-genai", artifact_location=artifacts,
                             tags={EXPERIMENT_KIND_TAG: "genai_development"})
    names = ("kind-unmarked", "kind-genai", "kind-new")
    for name in names:
        SearchRuns(store.uri, name, tmp_path / name, base_config=_base(), max_steps=MAX_STEPS,
                   param_keys=PARAM_KEYS).parent()
    kinds = {name: client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)
             for name in names}
    assert kinds == {"kind-unmarked": "custom_model_development",
                     "kind-genai": "genai_development", "kind-new": "custom_model_development"}


def _git_head(folder: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def test_parent_and_children_carry_the_standard_context_tags(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USERNAME)
    uri = store.uri
    tracker = MLflowSearchTracker(_runs(uri, store.search_dir))
    children = _start_trials(tracker, {"t1": {"amid.alpha": 1.0}, "t2": {PRESET_KEY: "kd"}})
    # The checkout of the package: pytest's entry point lies in the (git-ignored) virtualenv.
    commit = _git_head(Path(__file__).resolve().parents[1] / "amid_ray")
    for run_id in [tracker.runs.parent_run_id, *children.values()]:
        tags = _all_tags(uri, run_id)
        assert tags["mlflow.user"] == USERNAME
        assert tags["mlflow.source.name"] == sys.argv[0]
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags.get("mlflow.source.git.commit") == commit
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    (third,) = _start_trials(tracker, {"t3": {"amid.alpha": 2.0}}).values()
    assert _all_tags(uri, third)["mlflow.user"] == getpass.getuser()


def test_a_result_step_is_its_step_else_tunes_report_count():
    assert result_step({"step": 40, "training_iteration": 2}) == 40
    assert result_step({"training_iteration": 2}) == 2
    assert result_step({"step": True}) is None
    assert result_step({"step": "40"}) is None
    assert result_step({}) is None


@pytest.mark.slow
def test_every_trial_is_a_child_with_its_params_and_curves(search):
    summary = search.after_fit
    assert len(summary["children"]) == len(ALPHAS)
    for child in summary["children"]:
        assert child["tags"]["trial_id"] == child["trial_id"]
        assert set(child["params"]) == _setting_names()
        assert child["params"]["amid.divergence"] == "kl"
        assert float(child["params"]["train.lr"]) == 1e-3
        assert child["params"]["data.max_length"] == "96"
        assert child["params"]["amid.ab_alpha"] == "0.2"  # the default, unsearched
        assert set(child["metrics"]) == {"rougeL", "val_loss"}
    curves = _children_by_alpha(summary)
    assert [step for step, _ in curves[-3.0]["metrics"]["rougeL"]] == [1, 2, 3, 4]
    assert curves[-3.0]["metrics"]["val_loss"] == [(1, 2.0), (2, 1.0), (3, 2 / 3), (4, 0.5)]
    assert [step for step, _ in curves[STOPPED]["metrics"]["rougeL"]] == [1, 2]
    assert not (search.root / "mlruns").exists()


@pytest.mark.slow
def test_each_run_holds_its_configuration_and_context(search):
    """A child's config.yaml is its trial's run configuration, the parent's the base one; both
    carry MLflow's context tags (the user: the tracking server's username)."""
    summary, client = search.after_resume, MlflowClient(search.uri)
    for alpha, child in _children_by_alpha(summary).items():
        written = yaml.safe_load(_artifact_text(search.uri, child["run_id"], "config.yaml"))
        assert (written["amid"]["alpha"], written["amid"]["divergence"]) == (alpha, "kl")
        assert (written["train"]["lr"], written["data"]["max_length"]) == (1e-3, 96)
        assert client.get_run(child["run_id"]).info.run_name == (
            f"amid α={alpha:.3g} λ=0.1 kl/pr ({child['trial_id']})")
        assert _all_tags(search.uri, child["run_id"])["mlflow.user"] == USERNAME
    parent = summary["parent"]
    assert (parent["params"]["amid.alpha"], parent["params"]["data.max_length"]) == ("0.5", "96")
    written = yaml.safe_load(_artifact_text(search.uri, summary["parent_run_id"], "config.yaml"))
    assert written == _base()
    parent_tags = _all_tags(search.uri, summary["parent_run_id"])
    assert (parent_tags["mlflow.user"], parent_tags["mlflow.source.type"]) == (USERNAME, "LOCAL")


@pytest.mark.slow
def test_children_end_as_their_trials_ended(search):
    children = _children_by_alpha(search.after_fit)
    assert children[-3.0]["status"] == "FINISHED"
    assert children[-3.0]["tags"][STOPPED_EARLY_TAG] == "false"
    assert STOPPED_AT_STEP_TAG not in children[-3.0]["tags"]
    # Stopped by the scheduler: a normal outcome, not a kill.
    assert children[STOPPED]["status"] == "FINISHED"
    assert children[STOPPED]["tags"][STOPPED_EARLY_TAG] == "true"
    assert children[STOPPED]["tags"][STOPPED_AT_STEP_TAG] == "2"
    assert children[FAILS_ONCE]["status"] == "FAILED"


@pytest.mark.slow
def test_a_resumed_search_reuses_its_parent_and_children(search):
    before, after = search.after_fit, search.after_resume
    assert after["parent_run_id"] == before["parent_run_id"]
    assert after["parent"]["status"] == "RUNNING"
    assert len(MlflowClient(search.uri).search_runs([after["experiment_id"]])) == 1 + len(ALPHAS)
    assert ({c["trial_id"]: c["run_id"] for c in after["children"]}
            == {c["trial_id"]: c["run_id"] for c in before["children"]})
    resumed = _children_by_alpha(after)[FAILS_ONCE]
    assert resumed["status"] == "FINISHED"
    assert [step for step, _ in resumed["metrics"]["rougeL"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_no_credential_is_logged(search):
    summary = search.after_resume
    logged = json.dumps([summary["parent"], *summary["children"]])
    logged += (search.search_dir / PARENT_RUN_FILE).read_text()
    for run_id in [summary["parent_run_id"], *(c["run_id"] for c in summary["children"])]:
        logged += json.dumps(_all_tags(search.uri, run_id))
        logged += _artifact_text(search.uri, run_id, "config.yaml")
    assert not any(secret in logged for secret in SECRETS.values())


@pytest.mark.slow
def test_finish_search_writes_the_results_onto_the_parent(search, finished):
    parent = finished.summary["parent"]
    assert parent["status"] == "FINISHED"
    best = {key: value for key, value in parent["params"].items() if key.startswith("best.")}
    assert best == {"best.amid.alpha": "-3.0", "best.amid.divergence": "kl",
                    "best.train.lr": "0.001"}
    assert set(parent["params"]) - set(best) == _setting_names()
    assert parent["metrics"]["best_rougeL"] == [(0, finished.best["rougeL"])]
    assert parent["metrics"]["num_trials"] == [(0, len(ALPHAS))]
    assert parent["tags"]["best_trial_id"] == finished.best["trial_id"]
    parent_id = finished.summary["parent_run_id"]
    root = {item.path for item in finished.client.list_artifacts(parent_id)}
    # The best model is the parent's logged model (test_the_best_checkpoint_is_...), not a file.
    assert {"search_space.yaml", "best_config.json", "trials.csv", "plots"} <= root
    plots = {Path(item.path).name for item in finished.client.list_artifacts(parent_id, "plots")}
    assert plots == {"optimization_history.png", "param_importances.png",
                     "parallel_coordinate.png"}


@pytest.mark.slow
def test_finish_search_ends_leftover_children_as_they_really_ended(finished):
    children = _children_by_alpha(finished.summary)
    assert {alpha: child["status"] for alpha, child in children.items()} == {
        -3.0: "FINISHED", FAILS_ONCE: "FINISHED", STOPPED: "KILLED"}
    assert children[-3.0]["tags"]["status_inferred"] == "true"


@pytest.mark.slow
def test_the_best_checkpoint_is_a_registered_version_aliased_best(finished):
    version = finished.client.get_model_version_by_alias(MODEL_NAME, "best")
    assert version.version == finished.version.version
    assert version.run_id == finished.summary["parent_run_id"]
    parent = finished.client.get_run(version.run_id)
    (output,) = parent.outputs.model_outputs
    assert version.source == f"models:/{output.model_id}"
    location = finished.client.get_logged_model(output.model_id).artifact_location
    logged = Path(urlparse(location).path)
    assert {"MLmodel", "model", "components"} <= {path.name for path in logged.iterdir()}
    assert (logged / "model" / "config.json").read_text() == (
        finished.model_dir / "config.json").read_text()


def test_sync_trial_logs_rounds_tune_never_relayed_and_corrects_the_end(tmp_path):
    """A stopped trial's Train run can finish rounds after Tune's last result; the child run
    is brought in line with the Train history (the hooks driven directly, real SQLite store)."""
    search_dir = tmp_path / "search"
    uri = default_tracking_uri(search_dir)
    tracker = MLflowSearchTracker(_runs(uri, search_dir))
    tracker.setup()
    rows = [{"step": step, "rougeL": 0.1 * step, "val_loss": 2.0 / step}
            for step in range(1, MAX_STEPS + 1)]
    ends = {"ran-on": "finished", "one-more": "stopped early"}
    for trial_id in ends:
        trial = SimpleNamespace(trial_id=trial_id, config={"amid.alpha": 1.0}, last_result={})
        tracker.on_trial_start(0, [], trial)
        for row in rows[:2]:
            tracker.on_trial_result(0, [], trial, row)
        tracker.on_trial_complete(0, [], trial)  # Tune stopped both after step 2
    sync_trial(tracker.runs, "ran-on", rows, "finished")  # its Train run reached the last step
    sync_trial(_runs(uri, search_dir), "one-more", rows[:3], "stopped early")  # a new driver
    children = {c["trial_id"]: c for c in tracking_summary(uri, search_dir)["children"]}
    ran_on, one_more = children["ran-on"], children["one-more"]
    assert ran_on["metrics"]["val_loss"] == [(r["step"], r["val_loss"]) for r in rows]
    assert (ran_on["status"], ran_on["tags"][STOPPED_EARLY_TAG]) == ("FINISHED", "false")
    assert STOPPED_AT_STEP_TAG not in ran_on["tags"]  # the stop seen at step 2 is taken back
    assert [step for step, _ in one_more["metrics"]["rougeL"]] == [1, 2, 3]
    assert (one_more["status"], one_more["tags"][STOPPED_EARLY_TAG],
            one_more["tags"][STOPPED_AT_STEP_TAG]) == ("FINISHED", "true", "3")


def test_a_pickled_tracker_finds_its_runs_again(tmp_path):
    """Tune pickles its callbacks with the experiment: the tracker a new driver unpickles reuses
    the parent and the trial's child run, and logs only the steps MLflow does not hold yet."""
    search_dir = tmp_path / "search"
    uri = default_tracking_uri(search_dir)
    tracker = MLflowSearchTracker(_runs(uri, search_dir))
    tracker.setup()
    trial = SimpleNamespace(trial_id="t1", config={"amid.alpha": 1.0}, last_result={})
    tracker.on_trial_start(0, [], trial)
    for step in (1, 2):
        tracker.on_trial_result(0, [], trial, {"step": step, "rougeL": 10.0 * step})
    revived = pickle.loads(pickle.dumps(tracker))
    revived.setup()
    revived.on_trial_start(0, [], trial)
    for step in range(1, MAX_STEPS + 1):  # the resumed trial re-reports steps it had reported
        revived.on_trial_result(0, [], trial, {"step": step, "rougeL": 10.0 * step})
    revived.on_trial_complete(0, [], trial)
    summary = tracking_summary(uri, search_dir)
    assert len(MlflowClient(uri).search_runs([summary["experiment_id"]])) == 2
    (child,) = summary["children"]
    assert child["metrics"]["rougeL"] == [(step, 10.0 * step) for step in range(1, MAX_STEPS + 1)]
    assert (child["status"], child["tags"][STOPPED_EARLY_TAG]) == ("FINISHED", "false")
    assert child["params"]["amid.alpha"] == "1.0"
    assert set(child["params"]) == _setting_names()


def test_finish_search_from_a_new_driver_ends_leftovers_and_registers_the_best(tmp_path,
                                                                               tiny_world):
    """A driver died leaving two children RUNNING, one at the last step; a new driver's
    finish_search ends them as their logged steps show and publishes the best on the parent
    (hooks and publishing driven directly, real SQLite store)."""
    search_dir = tmp_path / "search"
    uri = default_tracking_uri(search_dir)
    tracker = MLflowSearchTracker(_runs(uri, search_dir))
    tracker.setup()
    for trial_id, last_step in {"done": MAX_STEPS, "cut": 2}.items():
        trial = SimpleNamespace(trial_id=trial_id, config={"amid.alpha": 1.0}, last_result={})
        tracker.on_trial_start(0, [], trial)
        for step in range(1, last_step + 1):
            tracker.on_trial_result(0, [], trial, {"step": step, "rougeL": 10.0 * step})
    model_dir = Path(tiny_world["student"])
    best = {"trial_id": "done", "rougeL": 40.0,
            "config": {"amid": {"alpha": 1.0}, "train": {"lr": 1e-3}}}
    version = finish_search(_runs(uri, search_dir), best=best,
                            trials_table=[{"trial_id": "done"}, {"trial_id": "cut"}],
                            optuna_study=None, best_model_dir=model_dir,
                            registered_model_name=MODEL_NAME)
    summary = tracking_summary(uri, search_dir)
    ends = {c["trial_id"]: (c["status"], c["tags"][STOPPED_EARLY_TAG],
                            c["tags"]["status_inferred"]) for c in summary["children"]}
    # The search ended without the cut trial: a kill, not a stop by the scheduler.
    assert ends == {"done": ("FINISHED", "false", "true"), "cut": ("KILLED", "false", "true")}
    parent = summary["parent"]
    assert parent["status"] == "FINISHED"
    best_params = {key: value for key, value in parent["params"].items()
                   if key.startswith("best.")}
    assert best_params == {"best.amid.alpha": "1.0", "best.train.lr": "0.001"}
    assert parent["params"]["amid.alpha"] == "0.5"  # the base configuration's
    # The best trial's headline metrics, read off its curve: best ROUGE-L 40 at step 4.
    assert parent["metrics"] == {"best_rougeL": [(0, 40.0)], "num_trials": [(0, 2.0)],
                                 "rougeL": [(0, 40.0)], "best_step": [(0, 4.0)]}
    assert parent["tags"]["best_trial_id"] == "done"
    aliased = MlflowClient(uri).get_model_version_by_alias(MODEL_NAME, "best")
    assert (aliased.version, aliased.run_id) == (version.version, summary["parent_run_id"])


def test_study_plots_are_skipped_with_a_note_below_two_trials(tmp_path):
    study = optuna.create_study()
    study.add_trial(create_trial(params={"x": 1.0}, distributions={"x": FloatDistribution(0, 2)},
                                 value=0.5))
    assert write_study_plots(study, tmp_path) == []
    assert "fewer than 2 complete trials" in (tmp_path / "skipped.txt").read_text()
