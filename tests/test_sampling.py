"""The sampler section and the Optuna side of a search: start-up length, baselines in the study,
the study in a database, intermediate values at the run's own step. No Ray is started."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from amid_ray.config import ConfigError, config_from_dict
from amid_ray.sampling import (
    DefineByRun,
    RunStepOptunaSearch,
    baseline_point,
    make_sampler,
    study_storage_url,
)
from amid_ray.search_space import default_startup_trials

SPACE = {
    "num_samples": 6,
    "baselines": ["kd", "abkd"],
    "params": {
        "amid.alpha": {"type": "uniform", "low": -5.0, "high": 1.0},
        "amid.lam": {"type": "uniform", "low": 0.05, "high": 0.95},
        "amid.divergence": {"type": "categorical", "values": ["kl", "ab"]},
        "amid.ab_alpha": {"type": "uniform", "low": 0.1, "high": 0.9,
                          "when": {"amid.divergence": "ab"}},
        "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3},
    },
}


def _run(search=SPACE):
    return config_from_dict({"train": {"lr": 3e-4}, "search": search})


def _drive(spec, base, trials: int, sampler) -> tuple[optuna.Study, list[int]]:
    """Ask/tell `trials` points as Tune would (one at a time); returns the study and the
    numbers of the trials for which the random start-up sampler was consulted."""
    random_calls: list[int] = []
    random_sampler = sampler._random_sampler
    original = random_sampler.sample_independent

    def spy(study, trial, name, distribution):
        random_calls.append(trial.number)
        return original(study, trial, name, distribution)

    random_sampler.sample_independent = spy
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for name in spec.baselines:
        study.enqueue_trial(baseline_point(spec, base, name))
    space = DefineByRun(spec, base)
    for number in range(trials):
        trial = study.ask()
        space(trial)
        study.tell(trial, float(number % 3))
    return study, sorted(set(random_calls))


def test_a_six_trial_search_uses_the_model_for_its_last_points():
    run = _run()
    spec = run.search_spec
    assert spec.startup_trials == default_startup_trials(6) == 2
    study, random_trials = _drive(spec, run.to_dict(), 6, make_sampler(spec))
    assert not {4, 5} & set(random_trials), random_trials
    # The spy sees random start-up where there is one: Optuna's default start-up of 10 trials
    # leaves every sampled point of a 6-trial search random.
    default = optuna.samplers.TPESampler(seed=0, multivariate=True, group=True)
    _, random_default = _drive(spec, run.to_dict(), 6, default)
    assert {2, 3, 4, 5} <= set(random_default)


def test_baselines_are_trials_of_the_study_with_their_effective_settings():
    run = _run()
    spec = run.search_spec
    study, _ = _drive(spec, run.to_dict(), 3, make_sampler(spec))
    kd, abkd = study.trials[0].params, study.trials[1].params
    # kd: forward KL = kl, pr, lam 0 (outside the sampled range, still recorded); the base lr.
    assert kd == {"amid.alpha": -1.0, "amid.lam": 0.0, "amid.divergence": "kl",
                  "train.lr": 3e-4}
    # abkd: the ab divergence, so its conditional ab_alpha is part of the point.
    assert abkd["amid.divergence"] == "ab" and abkd["amid.ab_alpha"] == 0.2
    assert abkd["amid.lam"] == 0.0


def test_a_baseline_value_the_space_cannot_hold_is_left_out():
    search = dict(SPACE, baselines=["srkl"],
                  params={"amid.order": {"type": "categorical", "values": ["pr", "rp"]},
                          "amid.alpha": {"type": "uniform", "low": -5.0, "high": 1.0}})
    run = _run(search)
    # srkl compares in order qr, which the space does not offer: only alpha is recorded.
    assert baseline_point(run.search_spec, run.to_dict(), "srkl") == {"amid.alpha": -1.0}


@pytest.mark.parametrize(("sampler", "kind"), [
    ("random", optuna.samplers.RandomSampler), ("gp", optuna.samplers.GPSampler),
    ({"type": "tpe", "n_startup_trials": 5, "multivariate": True, "group": False},
     optuna.samplers.TPESampler),
])
def test_sampler_section_picks_the_sampler(sampler, kind):
    spec = _run(dict(SPACE, sampler=sampler)).search_spec
    made = make_sampler(spec)
    assert isinstance(made, kind)
    if isinstance(sampler, dict):
        assert spec.startup_trials == 5 and made._n_startup_trials == 5


@pytest.mark.parametrize(("sampler", "key", "message"), [
    ("cmaes", "search.sampler", "must be one of ['tpe', 'gp', 'random']"),
    ({"type": "gp", "group": True}, "search.sampler", "unknown fields ['group']"),
    ({"type": "tpe", "n_startup_trials": -1}, "search.sampler.n_startup_trials", ">= 0"),
    ({"type": "tpe", "multivariate": False}, "search.sampler.group", "needs multivariate"),
])
def test_sampler_section_errors(sampler, key, message):
    with pytest.raises(ConfigError) as caught:
        _run(dict(SPACE, sampler=sampler))
    assert caught.value.key == key and message in str(caught.value)


def test_the_study_lives_in_a_database_and_gets_intermediate_values_per_run_step(tmp_path):
    run = _run()
    spec = run.search_spec
    url = study_storage_url(spec, tmp_path)
    assert url == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"
    searcher = RunStepOptunaSearch(space=DefineByRun(spec, run.to_dict()), metric="best_rougeL",
                                   mode="max", sampler=make_sampler(spec),
                                   storage=optuna.storages.RDBStorage(url), study_name="s1")
    searcher.set_search_properties(None, None, {})
    searcher.suggest("t1")
    # A trial resumed from its checkpoint: Tune's iteration restarts at 1, the run's step not.
    for iteration, step, value in [(1, 10, 0.5), (2, 20, 0.7), (1, 30, 0.9)]:
        searcher.on_trial_result("t1", {"training_iteration": iteration, "step": step,
                                        "best_rougeL": value})
    searcher.on_trial_complete("t1", {"best_rougeL": 0.9, "step": 30})
    # A trial stopped at its first rung: Tune hands that result to on_trial_complete only.
    searcher.suggest("t2")
    searcher.on_trial_complete("t2", {"training_iteration": 1, "step": 10, "best_rougeL": 0.2})
    loaded = optuna.load_study(study_name="s1", storage=url)
    first, stopped = loaded.trials
    assert first.intermediate_values == {10: 0.5, 20: 0.7, 30: 0.9}
    assert first.value == 0.9 and first.state == optuna.trial.TrialState.COMPLETE
    assert stopped.intermediate_values == {10: 0.2} and stopped.value == 0.2
    with pytest.raises(ConfigError, match="search.storage"):
        _run(dict(SPACE, storage="/tmp/optuna.db"))
    with pytest.raises(ConfigError, match="carries a password") as refused:
        _run(dict(SPACE, storage="postgresql://bob:hunter2@db/optuna"))
    assert "hunter2" not in str(refused.value) and "postgresql://bob:***@db" in str(refused.value)


def test_optuna_dashboard_serves_the_search_study(tmp_path):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed")
    run = _run()
    url = study_storage_url(run.search_spec, tmp_path)
    study = optuna.create_study(study_name="demo-search", storage=url, direction="maximize")
    study.enqueue_trial(baseline_point(run.search_spec, run.to_dict(), "kd"))
    trial = study.ask()
    DefineByRun(run.search_spec, run.to_dict())(trial)
    study.tell(trial, 4.2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = Path(sys.executable).with_name("optuna-dashboard")  # the installed console script
    server = subprocess.Popen(
        [str(command), url, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, answer = time.monotonic() + 60, None
        while answer is None and time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies",
                                            timeout=5) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert answer is not None, "optuna-dashboard did not answer on 127.0.0.1"
        (listed,) = answer["study_summaries"]
        assert listed["study_name"] == "demo-search"
    finally:
        server.terminate()
        server.wait(timeout=30)
