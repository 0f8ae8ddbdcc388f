"""`search.system_metrics`: parsing, and MLflow's system-metrics monitor on a real SQLite store
(the end-to-end search with it on is in test_search_e2e.py)."""

from __future__ import annotations

import time

import psutil
import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from amid_ray.config import config_from_dict
from amid_ray.errors import ConfigError
from amid_ray.mlflow_runs import TRIAL_ID_TAG
from amid_ray.system_metrics import SystemMetricsTarget, find_trial_run, monitoring


@pytest.mark.parametrize(("value", "seconds"), [(True, 10.0), (2.5, 2.5), (1, 1.0),
                                                (False, None), (None, None)])
def test_system_metrics_setting(value, seconds):
    run = config_from_dict({"search": {"system_metrics": value}}, "space.yaml")
    assert run.search_spec.system_metrics_s == seconds


def test_system_metrics_are_off_unless_asked():
    assert config_from_dict({"search": {}}, "space.yaml").search_spec.system_metrics_s is None


@pytest.mark.parametrize("value", [0, -1, float("inf"), "often", [10]])
def test_a_bad_system_metrics_setting_is_named(value):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"search": {"system_metrics": value}}, "space.yaml")
    assert caught.value.key == "search.system_metrics" and "seconds between" in str(caught.value)


def test_the_target_travels_in_the_train_loop_config_and_leaves_it_as_it_was():
    target = SystemMetricsTarget("http://127.0.0.1:5000", "abc123", 2.0)
    base = {"name": "run", "train": {"lr": 1e-3}}
    carried = target.into(base)
    assert base == {"name": "run", "train": {"lr": 1e-3}}  # not modified in place
    assert SystemMetricsTarget.pop_from(carried) == target
    assert carried == base  # what the worker parses is the run configuration alone
    assert SystemMetricsTarget.pop_from(dict(base)) is None


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("search", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(experiment).info.run_id
    child = client.create_run(experiment, tags={MLFLOW_PARENT_RUN_ID: parent,
                                                TRIAL_ID_TAG: "trial_1"}).info.run_id
    return uri, client, experiment, parent, child


def test_a_trials_run_is_found_by_its_tag_under_the_parent(store):
    uri, client, experiment, parent, child = store
    assert find_trial_run(uri, experiment, parent, "trial_1") == child
    with pytest.warns(UserWarning, match="did not appear within 0 s"):
        assert find_trial_run(uri, experiment, parent, "trial_2", timeout_s=0) is None
    other_parent = client.create_run(experiment).info.run_id  # same trial id, other search
    with pytest.warns(UserWarning, match="did not appear"):
        assert find_trial_run(uri, experiment, other_parent, "trial_1", timeout_s=0) is None


def test_the_monitor_logs_this_machines_use_while_the_block_runs(store):
    uri, client, _, _, child = store
    with monitoring(SystemMetricsTarget(uri, child, 0.2)):
        time.sleep(1.5)
    cpu = client.get_metric_history(child, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(child, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 2 and all(0.0 <= m.value <= 100.0 for m in cpu)
    total_mb = psutil.virtual_memory().total / 2**20
    assert memory and all(0.0 < m.value <= total_mb for m in memory)
    steps = [m.step for m in cpu]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    # Stopped with the block: nothing more arrives.
    time.sleep(0.6)
    assert len(client.get_metric_history(child, "system/cpu_utilization_percentage")) == len(cpu)

    # A resumed trial continues the steps where they stopped.
    with monitoring(SystemMetricsTarget(uri, child, 0.2)):
        time.sleep(0.8)
    resumed = client.get_metric_history(child, "system/cpu_utilization_percentage")
    assert len(resumed) > len(cpu) and min(m.step for m in resumed[len(cpu):]) > max(steps)


def test_metrics_that_cannot_be_logged_cost_a_warning_not_the_block(store, caplog):
    uri, *_ = store
    ran = []
    with monitoring(SystemMetricsTarget(uri, "missing", 0.2)):
        time.sleep(0.5)
        ran.append(True)
    assert ran == [True]
    assert any(r.levelname == "WARNING" and "missing" in r.getMessage() for r in caplog.records)
    with monitoring(None):  # off
        ran.append(True)
    assert ran == [True, True]
