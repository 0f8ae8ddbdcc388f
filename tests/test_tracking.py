"""MLflow tracking of a search: a real Ray Tune run, a real SQLite tracking store, a resume;
the callback's hooks and the end-of-search publishing driven directly."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import optuna
import pytest
import ray
from mlflow import MlflowClient
from mlflow_helpers import tracking_summary
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial
from ray import tune

from amid_ray.mlflow_runs import (
    PARENT_RUN_FILE,
    SearchRuns,
    default_artifact_location,
    default_tracking_uri,
    short_param_names,
)
from amid_ray.publish import finish_search, sync_trial, write_study_plots
from amid_ray.tracking import MLflowSearchTracker, result_step

MAX_STEPS = 4
ALPHAS = (-3.0, 0.0, 1.0)
FAILS_ONCE = 0.0  # this trial raises at step 2 on its first attempt, then is resumed
STOPPED = 1.0  # the stopper ends this trial after step 2
PARAM_KEYS = ("amid.alpha", "amid.divergence", "amid.ab_alpha", "train.lr")
SECRETS = {"MLFLOW_TRACKING_USERNAME": "alice-secret", "MLFLOW_TRACKING_PASSWORD": "pw-secret",
           "MLFLOW_TRACKING_TOKEN": "token-secret"}
MODEL_NAME = "amid-student"


def _trial(config: dict) -> None:
    """A stand-in for the AMiD trial: reports step, rougeL and val_loss each eval round."""
    alpha = config["amid.alpha"]
    failed_once = Path(config["test.marker_dir"]) / f"failed_{alpha}"
    for step in range(1, MAX_STEPS + 1):
        if alpha == FAILS_ONCE and step == 2 and not failed_once.exists():
            failed_once.touch()
            raise RuntimeError("simulated lost worker")
        tune.report({"step": step, "rougeL": 0.1 * step - 0.01 * alpha, "val_loss": 2.0 / step,
                     "lr": "cosine"})


def _stop(trial_id: str, result: dict) -> bool:
    return result["config"]["amid.alpha"] == STOPPED and result["step"] >= 2


def _runs(tracking_uri: str, search_dir: Path) -> SearchRuns:
    return SearchRuns(
        tracking_uri, "amid-search", search_dir,
        search_space={"amid.alpha": {"grid": list(ALPHAS)}, "train.lr": 1e-3},
        max_steps=MAX_STEPS, param_keys=PARAM_KEYS,
    )


def _children_by_alpha(summary: dict) -> dict[float, dict]:
    return {float(child["params"]["alpha"]): child for child in summary["children"]}


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
        for name, value in SECRETS.items():
            patch.setenv(name, value)
        tuner = tune.Tuner(
            _trial,
            param_space={"amid.alpha": tune.grid_search(list(ALPHAS)), "train.lr": 1e-3,
                         "amid.divergence": "kl", "test.marker_dir": str(root)},
            run_config=tune.RunConfig(name="tune", storage_path=str(root / "ray"), stop=_stop,
                                      callbacks=[MLflowSearchTracker(_runs(uri, search_dir))],
                                      verbose=0),
        )
        tuner.fit()
        after_fit = tracking_summary(uri, search_dir)
        # A new driver: the tracker comes back unpickled from Tune's experiment state.
        tune.Tuner.restore(str(root / "ray" / "tune"), _trial, resume_errored=True).fit()
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
def finished(search) -> SimpleNamespace:
    """finish_search from a third driver, after a driver died leaving two children RUNNING."""
    client = MlflowClient(search.uri)
    children = _children_by_alpha(search.after_resume)
    for alpha in (-3.0, STOPPED):
        client.update_run(children[alpha]["run_id"], status="RUNNING")
    model_dir = search.root / "best_checkpoint"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    (model_dir / "model.safetensors").write_bytes(b"\0" * 64)
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


def test_param_names_are_short_unless_they_collide():
    assert short_param_names(["amid.alpha", "amid.lam", "train.lr", "amid.ab_alpha"]) == {
        "amid.alpha": "alpha", "amid.lam": "lam", "train.lr": "lr", "amid.ab_alpha": "ab_alpha"}
    assert short_param_names(["amid.alpha", "sgo.alpha"]) == {
        "amid.alpha": "amid.alpha", "sgo.alpha": "sgo.alpha"}


def test_nested_and_dotted_configs_give_the_same_params(tmp_path):
    runs = _runs(default_tracking_uri(tmp_path), tmp_path)
    nested = {"amid": {"alpha": -3.0, "divergence": "kl", "order": "pr"}, "train.lr": 1e-3}
    dotted = {"amid.alpha": -3.0, "amid.divergence": "kl", "amid.order": "pr", "train.lr": 1e-3}
    expected = {"alpha": "-3.0", "divergence": "kl", "lr": "0.001"}  # only the PARAM_KEYS
    assert runs.trial_params(nested) == runs.trial_params(dotted) == expected


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
        assert child["params"]["divergence"] == "kl"
        assert float(child["params"]["lr"]) == 1e-3
        assert "ab_alpha" not in child["params"] and "marker_dir" not in child["params"]
        assert set(child["metrics"]) == {"rougeL", "val_loss"}
    curves = _children_by_alpha(summary)
    assert [step for step, _ in curves[-3.0]["metrics"]["rougeL"]] == [1, 2, 3, 4]
    assert curves[-3.0]["metrics"]["val_loss"] == [(1, 2.0), (2, 1.0), (3, 2 / 3), (4, 0.5)]
    assert [step for step, _ in curves[STOPPED]["metrics"]["rougeL"]] == [1, 2]
    assert not (search.root / "mlruns").exists()


@pytest.mark.slow
def test_children_end_as_their_trials_ended(search):
    children = _children_by_alpha(search.after_fit)
    assert children[-3.0]["status"] == "FINISHED"
    assert children[-3.0]["tags"]["stopped_early"] == "false"
    assert children[STOPPED]["status"] == "KILLED"
    assert children[STOPPED]["tags"]["stopped_early"] == "true"
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
    assert not any(secret in logged for secret in SECRETS.values())


@pytest.mark.slow
def test_finish_search_writes_the_results_onto_the_parent(search, finished):
    parent = finished.summary["parent"]
    assert parent["status"] == "FINISHED"
    assert parent["params"] == {"best.alpha": "-3.0", "best.divergence": "kl", "best.lr": "0.001"}
    assert parent["metrics"]["best_rougeL"] == [(0, finished.best["rougeL"])]
    assert parent["metrics"]["num_trials"] == [(0, len(ALPHAS))]
    assert parent["tags"]["best_trial_id"] == finished.best["trial_id"]
    parent_id = finished.summary["parent_run_id"]
    root = {item.path for item in finished.client.list_artifacts(parent_id)}
    assert {"search_space.yaml", "best_config.json", "trials.csv", "plots", "best_model"} <= root
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
    assert version.source.endswith("/best_model")
    logged = Path(urlparse(version.source).path)
    assert sorted(path.name for path in logged.iterdir()) == ["config.json", "model.safetensors"]
    assert (logged / "config.json").read_text() == (finished.model_dir / "config.json").read_text()


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
        tracker.on_trial_complete(0, [], trial)  # Tune stopped both after step 2: KILLED
    sync_trial(tracker.runs, "ran-on", rows, "finished")  # its Train run reached the last step
    sync_trial(_runs(uri, search_dir), "one-more", rows[:3], "stopped early")  # a new driver
    children = {c["trial_id"]: c for c in tracking_summary(uri, search_dir)["children"]}
    ran_on, one_more = children["ran-on"], children["one-more"]
    assert ran_on["metrics"]["val_loss"] == [(r["step"], r["val_loss"]) for r in rows]
    assert (ran_on["status"], ran_on["tags"]["stopped_early"]) == ("FINISHED", "false")
    assert [step for step, _ in one_more["metrics"]["rougeL"]] == [1, 2, 3]
    assert (one_more["status"], one_more["tags"]["stopped_early"]) == ("KILLED", "true")


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
    assert (child["status"], child["tags"]["stopped_early"]) == ("FINISHED", "false")
    assert child["params"] == {"alpha": "1.0"}


def test_finish_search_from_a_new_driver_ends_leftovers_and_registers_the_best(tmp_path):
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
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    best = {"trial_id": "done", "rougeL": 40.0,
            "config": {"amid": {"alpha": 1.0}, "train": {"lr": 1e-3}}}
    version = finish_search(_runs(uri, search_dir), best=best,
                            trials_table=[{"trial_id": "done"}, {"trial_id": "cut"}],
                            optuna_study=None, best_model_dir=model_dir,
                            registered_model_name=MODEL_NAME)
    summary = tracking_summary(uri, search_dir)
    ends = {c["trial_id"]: (c["status"], c["tags"]["stopped_early"], c["tags"]["status_inferred"])
            for c in summary["children"]}
    assert ends == {"done": ("FINISHED", "false", "true"), "cut": ("KILLED", "true", "true")}
    parent = summary["parent"]
    assert parent["status"] == "FINISHED"
    assert parent["params"] == {"best.alpha": "1.0", "best.lr": "0.001"}
    assert parent["metrics"] == {"best_rougeL": [(0, 40.0)], "num_trials": [(0, 2.0)]}
    assert parent["tags"]["best_trial_id"] == "done"
    aliased = MlflowClient(uri).get_model_version_by_alias(MODEL_NAME, "best")
    assert (aliased.version, aliased.run_id) == (version.version, summary["parent_run_id"])


def test_study_plots_are_skipped_with_a_note_below_two_trials(tmp_path):
    study = optuna.create_study()
    study.add_trial(create_trial(params={"x": 1.0}, distributions={"x": FloatDistribution(0, 2)},
                                 value=0.5))
    assert write_study_plots(study, tmp_path) == []
    assert "fewer than 2 complete trials" in (tmp_path / "skipped.txt").read_text()
