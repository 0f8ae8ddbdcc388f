"""The pure parts of a search and its results, without Ray: trial verdicts and records, the best
trial, the export to best/ (a process killed at every step of it), the table, the summary, the
study for plots, the search folder and the count of trials."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution

from amid_ray.atomic import aside_name, recover_folder
from amid_ray.config import ConfigError, config_from_dict
from amid_ray.results import (
    BEST_DIR,
    ERROR,
    FINISHED,
    NOT_STARTED,
    STOPPED_EARLY,
    SearchOutcome,
    TrialRecord,
    best_trial,
    creation_index,
    dev_scores,
    effective_settings,
    export_best,
    format_trials_table,
    selection_confidence,
    study_from_trials,
    trial_record,
    trial_verdict,
)
from amid_ray.search import (
    SEARCH_FILE,
    fixed_points,
    load_search_file,
    load_tracking_uri,
    save_search_file,
    save_tracking_uri,
    search_dir_for,
    search_location,
    search_spec,
    total_trials,
)
from amid_ray.training import TrainOutcome
from amid_ray.worker import DEV_SCORES_FILE

MAX_STEPS = 6


def record(trial_id: str, rouge: float | None, checkpoint: str | None = "ckpt", *,
           params: dict | None = None, val_loss: float | None = None, steps: int | None = None,
           status: str = FINISHED) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, params=params or {}, status=status, best_rougeL=rouge,
                       best_val_loss=val_loss, best_step=None, steps=steps,
                       best_checkpoint=checkpoint)


# --------------------------------------------------------------------------- verdicts, records


@pytest.mark.parametrize(("tune_status", "steps", "verdict"), [
    ("ERROR", MAX_STEPS, ERROR),  # an error wins even after the last step
    ("ERROR", None, ERROR),
    ("TERMINATED", None, NOT_STARTED),
    ("TERMINATED", MAX_STEPS, FINISHED),
    ("TERMINATED", MAX_STEPS + 2, FINISHED),
    ("TERMINATED", 4, STOPPED_EARLY),
    ("RUNNING", MAX_STEPS, FINISHED),  # Train ran to the end before Tune heard of it
    ("RUNNING", 4, "running"),  # an interrupted search
    ("PENDING", 2, "pending"),
])
def test_a_trial_verdict_follows_tune_status_and_steps_reached(tune_status, steps, verdict):
    assert trial_verdict(tune_status, steps, MAX_STEPS) == verdict


def test_a_trial_record_comes_from_its_train_outcome():
    history = [{"step": 2, "rougeL": 10.0, "val_loss": 2.5},
               {"step": 4, "rougeL": 12.5, "val_loss": 2.25}]
    outcome = TrainOutcome(result_dir="/r", best_checkpoint="/r/ckpt_1/model",
                           best_metrics={"step": 4, "rougeL": 12.5, "val_loss": 2.25},
                           history=history)
    got = trial_record("t1", {"amid.alpha": -2.0}, "TERMINATED", outcome, MAX_STEPS)
    assert got == TrialRecord(trial_id="t1", params={"amid.alpha": -2.0}, status=STOPPED_EARLY,
                              best_rougeL=12.5, best_val_loss=2.25, best_step=4, steps=4,
                              best_checkpoint="/r/ckpt_1/model", history=history)
    assert got.history == history
    assert got.table_row() == {k: v for k, v in vars(got).items() if k != "history"}


def test_a_trial_that_never_reported_has_an_empty_record():
    got = trial_record("t2", {}, "ERROR", None, MAX_STEPS)
    assert (got.status, got.best_rougeL, got.best_val_loss, got.best_step, got.steps,
            got.best_checkpoint, got.history) == (ERROR, None, None, None, None, None, [])


@pytest.mark.parametrize(("tag", "index"), [
    ("3_amid.alpha=-1.2000", 3), ("12_amid.preset=kd", 12), ("1", 1), ("baseline", 0), ("", 0)])
def test_trials_are_ordered_by_the_index_their_tag_starts_with(tag, index):
    assert creation_index(tag) == index


# --------------------------------------------------------------------------- the best trial


def test_the_best_trial_is_the_rouge_argmax_among_trials_with_a_checkpoint():
    records = [record("a", 3.0), record("b", 7.5), record("c", None),
               record("d", 9.0, checkpoint=None), record("e", 7.25)]
    assert best_trial(records).trial_id == "b"


def test_a_tie_goes_to_the_trial_created_first():
    assert best_trial([record("a", 1.0), record("b", 4.0), record("c", 4.0)]).trial_id == "b"


@pytest.mark.parametrize("records", [
    [], [record("a", None)], [record("a", 5.0, checkpoint=None)], [record("a", 5.0, "")]])
def test_no_best_trial_without_a_scored_checkpoint(records):
    assert best_trial(records) is None


# --------------------------------------------------------------------------- export to best/


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def model_folder(folder: Path, tag: str, extra: str | None = None) -> dict[str, bytes]:
    """A small model-like folder (a nested one included); returns its files."""
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text(f'{{"tag": "{tag}"}}')
    (folder / "model.safetensors").write_bytes(tag.encode() * 4096)
    (folder / "tokenizer" / "vocab.json").write_text(f'["{tag}"]')
    if extra:
        (folder / extra).write_text(tag)
    return files_of(folder)


def test_export_copies_the_checkpoint_and_replaces_the_old_best(tmp_path):
    old = model_folder(tmp_path / "search" / BEST_DIR, "old", extra="stale.txt")
    new = model_folder(tmp_path / "ckpt", "new")
    assert "stale.txt" in old
    target = export_best(record("t", 1.0, str(tmp_path / "ckpt")), tmp_path / "search")
    assert target == tmp_path / "search" / BEST_DIR
    assert files_of(target) == new
    assert sorted(os.listdir(tmp_path / "search")) == [BEST_DIR]  # nothing staged is left


def test_an_export_that_fails_leaves_the_old_best(tmp_path, monkeypatch):
    old = model_folder(tmp_path / "search" / BEST_DIR, "old")
    model_folder(tmp_path / "ckpt", "new")
    copied = []
    copy_file = shutil.copyfile

    def copy_one_then_fail(source, destination, **kwargs):
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(source)
        return copy_file(source, destination, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy_one_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_best(record("t", 1.0, str(tmp_path / "ckpt")), tmp_path / "search")
    assert len(copied) == 1
    assert files_of(tmp_path / "search" / BEST_DIR) == old
    assert sorted(os.listdir(tmp_path / "search")) == [BEST_DIR]


#: File-system changes an export makes; the process is killed just before the n-th one.
FILE_SYSTEM_CHANGES = ((os, "rename"), (os, "replace"), (os, "mkdir"), (os, "unlink"),
                       (os, "rmdir"), (shutil, "copyfile"))
KILLED, COMPLETED, RAISED = 70, 71, 72


def export_killed_before(change: int, checkpoint: Path, search_dir: Path) -> bool:
    """Export in a forked process that dies (`os._exit`: no cleanup, like SIGKILL) just before
    its `change`-th file-system change; True if it died, False if the export completed."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            made = 0

            def dying(original):
                def change_or_die(*args, **kwargs):
                    nonlocal made
                    made += 1
                    if made == change:
                        os._exit(KILLED)
                    return original(*args, **kwargs)
                return change_or_die

            for module, name in FILE_SYSTEM_CHANGES:
                setattr(module, name, dying(getattr(module, name)))
            export_best(record("t", 1.0, str(checkpoint)), search_dir)
            os._exit(COMPLETED)
        except BaseException:
            os._exit(RAISED)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (KILLED, COMPLETED), f"the export raised (exit code {code})"
    return code == KILLED


def test_a_process_killed_at_any_step_of_an_export_leaves_a_complete_best(tmp_path):
    checkpoint = tmp_path / "ckpt"
    new = model_folder(checkpoint, "new")
    search_dir = tmp_path / "search"
    best = search_dir / BEST_DIR
    seen = []
    change = 0
    while True:
        change += 1
        shutil.rmtree(search_dir, ignore_errors=True)
        old = model_folder(best, "old", extra="stale.txt")
        if not export_killed_before(change, checkpoint, search_dir):
            break
        # Between the two renames only the old folder, set aside, exists: still complete.
        left = best if best.is_dir() else aside_name(best)
        assert files_of(left) in (old, new), f"killed before change {change}"
        recover_folder(best)  # what the next export, or a resumed search, does first
        seen.append("new" if files_of(best) == new else "old")
        assert files_of(best) == (new if seen[-1] == "new" else old)
        assert sorted(os.listdir(search_dir)) == [BEST_DIR]
    assert files_of(best) == new and sorted(os.listdir(search_dir)) == [BEST_DIR]
    assert change > len(new) + 2  # the copy of each file and both renames were interrupted
    assert seen[0] == "old" and seen[-1] == "new"
    assert seen == sorted(seen, key=["old", "new"].index)  # old until the swap, new after it


# --------------------------------------------------------------------------- table and summary


@pytest.fixture(scope="module")
def base():
    return config_from_dict({"train": {"lr": 5e-4, "max_steps": MAX_STEPS},
                             "amid": {"alpha": -3.0, "lam": 0.1, "divergence": "kl",
                                      "order": "pr"}}, "test")


def test_effective_settings_resolve_a_preset_and_apply_a_point(base):
    assert effective_settings(base, {"amid.preset": "rkl"}) == {
        "preset": "rkl", "alpha": -1.0, "lam": 1.0, "divergence": "kl", "order": "qr",
        "lr": 5e-4}
    point = {"amid.alpha": 0.5, "amid.lam": 0.25, "amid.divergence": "ab", "train.lr": 2e-3}
    assert effective_settings(base, point) == {
        "preset": None, "alpha": 0.5, "lam": 0.25, "divergence": "ab", "order": "pr",
        "lr": 2e-3}


def test_the_trials_table_shows_effective_settings_and_results(base):
    records = [
        record("a_00001", 12.5, params={"amid.preset": "kd"}, val_loss=2.25, steps=6),
        record("a_00002", None, None, params={"amid.alpha": 0.5, "train.lr": 2e-3},
               steps=None, status=NOT_STARTED),
        record("a_00003", 7.125, params={"amid.lam": 0.25}, val_loss=3.0, steps=2,
               status=STOPPED_EARLY),
    ]
    assert format_trials_table(base, records).splitlines() == [
        "trial        method   alpha   lam div ord       lr  rougeL  val_loss steps  status",
        "-" * 82,
        "a_00001      kd          -1     0 kl  pr  5.00e-04   12.50    2.2500     6  finished",
        "a_00002      amid       0.5   0.1 kl  pr  2.00e-03       -         -     -  not started",
        "a_00003      amid        -3  0.25 kl  pr  5.00e-04    7.12    3.0000     2  stopped early",
    ]


def test_the_summary_names_the_best_and_where_everything_is(tmp_path):
    best = record("t2", 12.5, "/s/trials/t2/ckpt/model", params={"amid.alpha": 0.5})
    settings = {"preset": None, "alpha": 0.5, "lam": 0.1, "divergence": "kl", "order": "pr",
                "lr": 5e-4}
    outcome = SearchOutcome(search_dir=tmp_path, records=[record("t1", 3.0), best], best=best,
                            best_dir=tmp_path / BEST_DIR, best_settings=settings,
                            tracking_uri="sqlite:///x.db", table="")
    assert outcome.summary() == {
        "best_checkpoint": str(tmp_path / BEST_DIR), "best_config": settings,
        "best_trial": "t2", "rougeL": 12.5, "num_trials": 2, "tracking_uri": "sqlite:///x.db",
        "search_dir": str(tmp_path)}
    assert outcome.best_details() == {
        "trial_id": "t2", "config": {"amid.alpha": 0.5}, "settings": settings, "rougeL": 12.5,
        "checkpoint": "/s/trials/t2/ckpt/model"}


def test_a_search_without_a_best_says_so(tmp_path):
    outcome = SearchOutcome(search_dir=tmp_path, records=[record("t1", None)], best=None,
                            best_dir=None, best_settings=None, tracking_uri=None, table="")
    assert outcome.summary() == {
        "best_checkpoint": None, "best_config": None, "best_trial": None, "rougeL": None,
        "num_trials": 1, "tracking_uri": None, "search_dir": str(tmp_path)}
    assert outcome.best_details() == {}


# --------------------------------------------------------------------------- study for plots


def sampled_space(**search) -> dict:
    return {"params": {"amid.alpha": {"type": "uniform", "low": -5.0, "high": 3.0},
                       "amid.lam": {"type": "uniform", "low": 0.05, "high": 0.5},
                       "amid.divergence": {"type": "categorical", "values": ["kl", "ab"]}},
            "baselines": ["kd"], **search}


def test_the_study_holds_the_sampled_trials_with_a_rouge():
    spec = config_from_dict({"search": sampled_space()}, "test").search_spec
    records = [
        # A baseline, with its effective values of the searched keys (lam 0 is out of range).
        record("base", 4.0, params={"amid.preset": "kd", "amid.alpha": -1.0, "amid.lam": 0.0}),
        record("s1", 6.5, params={"amid.alpha": -1.5, "amid.divergence": "ab", "train.lr": 1e-3}),
        record("s2", None, params={"amid.alpha": 2.0, "amid.divergence": "kl"}),
        record("s3", 3.25, params={"amid.alpha": 0.5}),
    ]
    study = study_from_trials(spec, records)
    assert [(t.params, t.value) for t in study.trials] == [
        ({"amid.alpha": -1.5, "amid.divergence": "ab"}, 6.5), ({"amid.alpha": 0.5}, 3.25)]
    assert study.trials[0].distributions == {
        "amid.alpha": FloatDistribution(-5.0, 3.0),
        "amid.divergence": CategoricalDistribution(["kl", "ab"])}
    assert study.direction.name == "MAXIMIZE"


def test_no_study_without_a_scored_sampled_trial():
    spec = config_from_dict({"search": sampled_space()}, "test").search_spec
    assert study_from_trials(spec, [record("base", 4.0, params={"amid.preset": "kd"}),
                                    record("s1", None, params={"amid.alpha": 1.0})]) is None


# --------------------------------------------------------------------------- the search


def test_a_grid_runs_its_baselines_then_every_combination():
    grid = {"params": {"amid.alpha": {"type": "grid", "values": [-3.0, 0.0, 1.0]},
                       "amid.lam": {"type": "grid", "values": [0.1, 0.5]}},
            "baselines": ["kd"], "num_samples": 2}
    spec = config_from_dict({"search": grid}, "test").search_spec
    points = fixed_points(spec)
    assert points[0] == {"amid.preset": "kd"}
    assert sorted(tuple(p.values()) for p in points[1:]) == [
        (alpha, lam) for alpha in (-3.0, 0.0, 1.0) for lam in (0.1, 0.5)]
    assert total_trials(spec) == 1 + 3 * 2  # num_samples does not apply to a grid


def test_baselines_alone_run_each_once_and_a_sampled_space_num_samples():
    baselines = config_from_dict({"search": {"baselines": ["kd", "rkl", "abkd"],
                                             "num_samples": 9}}, "test").search_spec
    assert fixed_points(baselines) == [{"amid.preset": name} for name in ("kd", "rkl", "abkd")]
    assert total_trials(baselines) == 3
    sampled = config_from_dict({"search": sampled_space(num_samples=9)}, "test").search_spec
    assert fixed_points(sampled) is None
    assert total_trials(sampled) == 9


def test_a_run_without_a_search_section_cannot_be_searched():
    with pytest.raises(ConfigError, match="a search needs a `search` section"):
        search_spec(config_from_dict({}, "plain.yaml"))


def test_the_search_folder_is_the_storage_and_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = config_from_dict({"name": "s1", "resources": {"storage": "runs"}}, "test")
    assert search_dir_for(run) == tmp_path.resolve() / "runs" / "s1"
    # At a URI: the search is <storage>/<name> there, its driver's files in a staging folder.
    monkeypatch.setenv("AMID_RAY_CACHE", str(tmp_path / "cache"))
    remote = config_from_dict({"name": "s1", "resources": {"storage": "s3://bucket/runs/"}}, "x")
    assert search_location(remote) == "s3://bucket/runs/s1"
    staging = search_dir_for(remote)
    assert staging.name == "s1" and staging.parent.parent == tmp_path / "cache" / "searches"
    other = config_from_dict({"name": "s1", "resources": {"storage": "s3://other/runs"}}, "x")
    assert search_dir_for(other) != staging  # one staging folder per search URI


def test_the_search_file_gives_back_the_run_it_saved(tmp_path):
    run = config_from_dict({"name": "s1", "train": {"lr": 2e-3},
                            "search": sampled_space(num_samples=5)}, "space.yaml")
    save_search_file(run, tmp_path / "s1")
    again = load_search_file(tmp_path / "s1")
    assert again.to_dict() == run.to_dict()
    assert again.search_spec == run.search_spec
    assert again.source == str(tmp_path / "s1" / SEARCH_FILE)
    assert yaml.safe_load((tmp_path / "s1" / SEARCH_FILE).read_text())["train"]["lr"] == 2e-3
    assert os.listdir(tmp_path / "s1") == [SEARCH_FILE]


def test_a_folder_without_a_search_file_is_not_a_search(tmp_path):
    with pytest.raises(ConfigError, match="not a search folder: search.yaml is missing"):
        load_search_file(tmp_path)


def test_the_tracking_uri_is_kept_in_the_search_folder(tmp_path):
    assert load_tracking_uri(tmp_path) is None
    save_tracking_uri(tmp_path, "http://127.0.0.1:5000")
    assert load_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


# --------------------------------------------------------------------------- confidence


def scored(tmp_path: Path, trial_id: str, scores: list[float], **kwargs) -> TrialRecord:
    """A trial whose best checkpoint holds per-dev-item ROUGE-L `scores`."""
    checkpoint = tmp_path / trial_id / "checkpoint_000001"
    (checkpoint / "model").mkdir(parents=True)
    (checkpoint / DEV_SCORES_FILE).write_text(json.dumps({"rougeL": scores}))
    return record(trial_id, sum(scores) / len(scores), str(checkpoint / "model"), **kwargs)


def test_confidence_tells_a_clear_winner_from_a_tie(tmp_path):
    items = 60
    hard = [float(i % 7) * 5 for i in range(items)]  # the items differ a lot in difficulty
    winner = scored(tmp_path, "win", [v + 3.0 for v in hard])
    close = scored(tmp_path, "close", [v + 3.0 - (0.5 if i % 2 else -0.4) for i, v in
                                        enumerate(hard)])
    baseline = scored(tmp_path, "kd", hard, params={"amid.preset": "kd"})
    records = [baseline, winner, close]
    confidence = selection_confidence(records, best_trial(records))
    assert confidence.items == items
    assert confidence.best.mean == pytest.approx(sum(hard) / items + 3.0)
    runner_up, best_baseline = confidence.rivals
    assert (runner_up.role, runner_up.trial_id) == ("runner-up", "close")
    assert not runner_up.difference.excludes_zero  # +0.05 on average, noise either way
    assert (best_baseline.role, best_baseline.trial_id) == ("best baseline", "kd")
    assert best_baseline.difference.excludes_zero  # 3 points on every item
    assert best_baseline.difference.mean == pytest.approx(3.0)
    text = "\n".join(confidence.lines("win"))
    assert "vs runner-up close" in text and "NOT distinguishable" in text
    summary = confidence.summary()
    assert summary["distinguishable_from_runner_up"] is False
    assert summary["distinguishable_from_best_baseline"] is True


def test_no_confidence_without_per_item_scores(tmp_path):
    plain = record("a", 3.0, str(tmp_path / "nowhere" / "model"))
    assert dev_scores(plain) is None
    assert selection_confidence([plain], plain) is None
    assert selection_confidence([], None) is None
