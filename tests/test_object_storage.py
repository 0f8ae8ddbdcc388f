"""Searches stored at a URI, against a real S3 API on 127.0.0.1 (moto's server): the mirror of
the driver's files, the checks before Ray, and a search whose driver is SIGKILLed and resumed
from the bucket alone."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow_helpers import tracking_summary
from s3_helpers import object_keys, s3_server

from amid_ray.cli import main as cli_main
from amid_ray.config import config_from_dict
from amid_ray.errors import ConfigError
from amid_ray.metrics import ROUGE_L
from amid_ray.preflight import check_storage
from amid_ray.remote_storage import Mirror, download_folder, staging_folder
from amid_ray.results import TrialRecord, dev_scores
from amid_ray.search import open_search_folder, search_results
from amid_ray.worker import DEV_SCORES_FILE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bucket():
    with s3_server() as (_, name):
        yield name


def _folder(root: Path) -> Path:
    (root / "records").mkdir(parents=True)
    (root / "search.yaml").write_text("name: s\n")
    (root / "records" / "asha.json").write_text("{}")
    (root / "trials" / "t1").mkdir(parents=True)  # Ray Train's: written to the store directly
    (root / "trials" / "t1" / "big.bin").write_bytes(b"x" * 10)
    (root / ".best.partial-1").mkdir()  # an atomic write in progress
    (root / ".best.partial-1" / "config.json").write_text("{}")
    return root


def test_the_mirror_sends_new_and_changed_files_only(bucket, tmp_path):
    local = _folder(tmp_path / "search")
    mirror = Mirror(local, f"s3://{bucket}/m1/search")
    assert mirror.push() == 2
    assert object_keys(bucket, "m1/") == ["m1/search/records/asha.json", "m1/search/search.yaml"]
    assert mirror.push() == 0  # nothing changed
    (local / "records" / "asha.json").write_text('{"rung": 1}')
    assert mirror.push() == 1
    copy = tmp_path / "copy"
    assert download_folder(f"s3://{bucket}/m1/search", copy) == 2
    assert (copy / "records" / "asha.json").read_text() == '{"rung": 1}'


def test_a_trials_dev_scores_are_read_from_the_bucket_or_found_missing(bucket):
    import boto3

    folder = f"{bucket}/scores/trial_1/checkpoint_000001"
    boto3.client("s3").put_object(Bucket=bucket, Key=f"scores/trial_1/checkpoint_000001/"
                                  f"{DEV_SCORES_FILE}", Body=json.dumps({ROUGE_L: [0.5, 0.25]}))

    def record(checkpoint):
        return TrialRecord("t1", {}, "finished", 0.4, 1.0, 1, 1, checkpoint)

    assert dev_scores(record(f"s3://{folder}/hf")) == [0.5, 0.25]
    assert dev_scores(record(f"s3://{bucket}/scores/trial_2/checkpoint_000001/hf")) is None


def test_failed_uploads_are_said_once_and_retried(bucket, tmp_path, capsys):
    local = _folder(tmp_path / "search")
    mirror = Mirror(local, f"s3://{bucket}/m5/search")
    with mirror.running(every_s=0.1):
        mirror.root = "no-such-bucket-here/search"  # the store refuses every upload meanwhile
        (local / "search.yaml").write_text("name: changed\n")
        time.sleep(1.0)
        said = capsys.readouterr().err
        mirror.root = f"{bucket}/m5/search"  # back: the next push sends what was missed
    assert said.count("uploading the search's files to") == 1 and "retrying every 0.1 s" in said
    copy = tmp_path / "copy"
    download_folder(f"s3://{bucket}/m5/search", copy)
    assert (copy / "search.yaml").read_text() == "name: changed\n"


def test_a_sqlite_store_is_sent_as_a_consistent_snapshot(bucket, tmp_path):
    local = tmp_path / "search"
    local.mkdir()
    database = sqlite3.connect(local / "optuna.db")
    database.execute("CREATE TABLE trials (id INTEGER)")
    database.executemany("INSERT INTO trials VALUES (?)", [(i,) for i in range(100)])
    database.commit()
    database.execute("INSERT INTO trials VALUES (100)")  # open, uncommitted transaction
    try:
        Mirror(local, f"s3://{bucket}/m2/search").push()
    finally:
        database.rollback()
        database.close()
    copy = tmp_path / "copy"
    download_folder(f"s3://{bucket}/m2/search", copy)
    sent = sqlite3.connect(copy / "optuna.db")
    assert sent.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert sent.execute("SELECT COUNT(*) FROM trials").fetchone() == (100,)  # committed only
    sent.close()


def test_a_search_comes_back_from_the_store_without_its_trials(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AMID_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{bucket}/m3/search"
    Mirror(_folder(tmp_path / "search"), uri).push()
    stale = staging_folder(uri)
    stale.mkdir(parents=True)
    (stale / "left-over").write_text("from an earlier driver")
    local = open_search_folder(uri)
    assert local == stale and local.is_relative_to(tmp_path / "cache")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "records/asha.json", "search.yaml"]  # fresh: nothing left over, no trials
    with pytest.raises(ConfigError, match="not a search: search.yaml is missing"):
        open_search_folder(f"s3://{bucket}/m3/nothing-here")


def test_storage_that_cannot_be_written_or_holds_the_search_is_refused(bucket, tmp_path):
    def run(storage: str):
        return config_from_dict({"name": "search", "resources": {"storage": storage}},
                                "space.yaml")

    with pytest.raises(ConfigError) as caught:
        check_storage(run("s3://no-such-bucket-here/runs"), tmp_path / "new")
    assert caught.value.key == "resources.storage" and "cannot be written" in str(caught.value)
    Mirror(_folder(tmp_path / "search"), f"s3://{bucket}/m4/search").push()
    with pytest.raises(ConfigError) as caught:
        check_storage(run(f"s3://{bucket}/m4"), tmp_path / "new")
    assert caught.value.key == "name"
    assert f"amid-ray resume s3://{bucket}/m4/search" in str(caught.value)
    check_storage(run(f"s3://{bucket}/m4"))  # a run (not a new search) may reuse the storage


# --------------------------------------------------------------------------- end to end


def _remote_trials(bucket: str, prefix: str) -> dict[str, list[str]]:
    """Trial id → its checkpoint folders, as the bucket holds them."""
    trials: dict[str, set[str]] = {}
    for key in object_keys(bucket, f"{prefix}/trials/"):
        parts = key[len(prefix) + len("/trials/"):].split("/")
        if len(parts) > 2 and parts[1].startswith("checkpoint_"):
            trials.setdefault(parts[0], set()).add(parts[1])
    return {trial: sorted(folders) for trial, folders in trials.items()}


@pytest.mark.slow
def test_a_search_on_s3_survives_a_driver_sigkill_and_ends_in_the_bucket(
        bucket, tiny_world, search_config, tmp_path, monkeypatch, capsys):
    space = search_config(tiny_world, tmp_path, "on-s3", num_samples=2, max_concurrent=1,
                          scheduler=None)
    space["train"]["max_steps"] = 4
    space["resources"]["storage"] = f"s3://{bucket}/runs"
    config = tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(space, sort_keys=False))
    uri, prefix = f"s3://{bucket}/runs/on-s3", "runs/on-s3"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "AMID_RAY_CACHE": str(tmp_path / "cache")}
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "tune_amid.py"), "--config", str(config)], cwd=tmp_path,
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Killed once the second trial has a checkpoint in the bucket: the first has ended, and
        # the mirror (every 5 s) has had time to send Tune's record of it.
        deadline = time.monotonic() + 600
        while len(_remote_trials(bucket, prefix)) < 2:
            assert driver.poll() is None, "the search ended before it could be interrupted"
            assert time.monotonic() < deadline, "no second trial in the bucket"
            time.sleep(0.5)
        time.sleep(6)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    assert not (tmp_path / "amid_runs").exists()  # nothing of the search outside the bucket

    resumed = subprocess.run([sys.executable, "-m", "amid_ray.cli", "resume", uri],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert f"best checkpoint exported to {uri}/best" in resumed.stdout
    assert summary["num_trials"] == 2
    assert (summary["search_dir"], summary["best_checkpoint"]) == (uri, f"{uri}/best")

    keys = object_keys(bucket, prefix)
    assert f"{prefix}/best/config.json" in keys and f"{prefix}/best/model.safetensors" in keys
    assert f"{prefix}/search.yaml" in keys and any("experiment_state-" in k for k in keys)
    trials = _remote_trials(bucket, prefix)
    assert len(trials) == 2 and all(folders for folders in trials.values())

    # `amid-ray best` from the bucket alone, in a fresh cache (another machine, as far as the
    # local copy goes): each trial ran its 2 rounds once, with no restart from step 0.
    monkeypatch.setenv("AMID_RAY_CACHE", str(tmp_path / "elsewhere"))
    assert cli_main(["best", uri]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best_checkpoint"] == (
        f"{uri}/best")
    outcome = search_results(uri)
    assert sorted(r.trial_id for r in outcome.records) == sorted(trials)
    for record in outcome.records:
        assert [row["step"] for row in record.history] == [2, 4]
        assert record.best_checkpoint.startswith(f"{uri}/trials/{record.trial_id}/checkpoint_")
    tracked = tracking_summary(summary["tracking_uri"], open_search_folder(uri))
    assert sorted(c["trial_id"] for c in tracked["children"]) == sorted(trials)
    assert all(c["status"] == "FINISHED" for c in tracked["children"])
