"""The command line's one error path: every error a user can cause is one line naming what is
wrong, exit code 2, before any work (and before Ray starts); an internal error says so."""

from __future__ import annotations

import pytest
import yaml

from amid_ray import cli


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["tune", "--resume", "somewhere", "--num-samples", "3"],
     "amid-ray tune: error: --num-samples cannot be used with --resume"),
    (["tune", "--resume", "somewhere", "--set", "train.lr=1e-3"],
     "amid-ray tune: error: --set cannot be used with --resume"),
    (["tune", "--num-samples", "0"], "argument --num-samples: 0 is below 1"),
    (["tune", "--name", ""], "name = '': must be a folder name"),
    (["tune", "--name", ".."], "name = '..': must be a folder name"),
    (["tune", "--set", "train.lr=[1"], "--set: train.lr"),
    (["eval", "--model", "x", "--data", "y", "--max-examples", "-1"],
     "argument --max-examples: -1 is below 1"),
    (["eval", "--model", "x", "--data", "y", "--seeds", "ten"],
     "argument --seeds: 'ten' is not a whole number"),
    (["ui", ".", "--host", "0.0.0.0"], "is not a search folder"),
    (["resume", "nowhere"], "nowhere: (search folder) = 'nowhere': not a search folder"),
    (["best", "nowhere"], "not a search folder: search.yaml is missing"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_eval_refuses_a_json_target_before_evaluating(capsys, tmp_path):
    code, err = run_cli(capsys, "eval", "--model", "no-model", "--data", "no-data",
                        "--json", str(tmp_path))
    assert code == 2 and f"--json {tmp_path} is a folder" in err
    code, err = run_cli(capsys, "eval", "--model", "m", "--data", "d",
                        "--json", str(tmp_path / "missing" / "report.json"))
    assert code == 2 and "does not exist" in err


def test_ui_on_an_open_host_needs_insecure(capsys, tmp_path):
    (tmp_path / "tracking_uri").write_text(f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, err = run_cli(capsys, "ui", str(tmp_path), "--host", "0.0.0.0")
    assert code == 2 and "without authentication" in err and "--insecure" in err


def test_resume_refuses_a_folder_without_tune_state(capsys, tmp_path, tiny_world, search_config):
    search = tmp_path / "half"
    search.mkdir()
    config = search_config(tiny_world, tmp_path, "half")
    (search / "search.yaml").write_text(yaml.safe_dump(config))
    code, err = run_cli(capsys, "resume", str(search))
    assert code == 2
    assert "has no Ray Tune state (it holds ['search.yaml']): no trials yet" in err


def test_an_internal_error_says_it_is_a_bug_and_where_the_traceback_is(capsys, monkeypatch,
                                                                       tmp_path):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "ERROR_LOG", tmp_path / "last-error.log")
    monkeypatch.setattr(cli, "cmd_demo", broken)
    code, err = run_cli(capsys, "demo-assets")
    assert code == 1
    assert "internal error: RuntimeError: boom" in err and "This is a bug" in err
    assert "RuntimeError: boom" in (tmp_path / "last-error.log").read_text()


@pytest.mark.parametrize("command", ["train", "teacher-cache"])
def test_no_config_means_the_shipped_demo_space(capsys, command):
    # The built-in defaults are the paper's (512 tokens), which the demo models' 256 positions
    # cannot hold: without --config these commands must read the demo's own file.
    code, err = run_cli(capsys, command, "--set", "train.lr=-1")
    assert code == 2
    assert "demo.yaml with --set: train.lr = -1.0" in err


def test_an_unknown_flag_is_reported_by_its_command(capsys):
    code, err = run_cli(capsys, "tune", "--lr", "1e-3")
    assert code == 2
    assert err.startswith("usage: amid-ray tune ")
    assert err.strip().splitlines()[-1] == "amid-ray tune: error: unrecognized arguments: --lr 1e-3"


@pytest.mark.parametrize("command", ["train", "teacher-cache", "tune"])
def test_an_empty_config_file_is_refused_not_taken_for_the_defaults(capsys, monkeypatch, tmp_path,
                                                                    command):
    from amid_ray import sources

    def no_demo(*args, **kwargs):
        raise AssertionError("the demo was built for an empty file")

    monkeypatch.setattr(sources, "demo_assets", no_demo)
    empty = tmp_path / "run.yaml"
    empty.write_text("# to do\n")
    code, err = run_cli(capsys, command, "--config", str(empty))
    needs = "search" if command == "tune" else "models.teacher"
    assert code == 2
    assert err == (f"amid-ray {command}: error: {empty}: {needs} = None: the file is empty (or "
                   f"holds only comments), so it gives no {needs}; fill it in "
                   "(search_spaces/demo.yaml is an example)\n")


@pytest.fixture
def mlflow_server(monkeypatch):
    """The commands `amid-ray ui` would start, recorded instead of run."""
    import subprocess

    started = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: started.append(command) or 0)
    return started


@pytest.mark.parametrize(("stored", "problem"), [
    ("", "tracking_uri = '': is empty"),
    ("::garbage::", "tracking_uri = '::garbage::': read as a folder of MLflow runs"),
    ("bogus://x", "no tracking store for the scheme 'bogus'"),
    ("sqlite:///{folder}/mlflow.db", "mlflow.db does not exist: nothing was logged there"),
])
def test_ui_refuses_a_stored_tracking_uri_it_cannot_serve(capsys, tmp_path, monkeypatch,
                                                          mlflow_server, stored, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tracking_uri").write_text(stored.format(folder=tmp_path))
    code, err = run_cli(capsys, "ui", str(tmp_path))
    assert code == 2 and mlflow_server == []
    assert err.startswith(f"amid-ray ui: error: {tmp_path / 'tracking_uri'}: ") and problem in err


def test_ui_serves_the_stored_database(capsys, tmp_path, mlflow_server):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "tracking_uri").write_text(uri)
    (tmp_path / "mlflow.db").write_bytes(b"")
    code, _ = run_cli(capsys, "ui", str(tmp_path), "--port", "5123")
    assert code == 0 and len(mlflow_server) == 1
    command = mlflow_server[0]
    assert command[command.index("--backend-store-uri") + 1] == uri
    assert command[command.index("--port") + 1] == "5123"
