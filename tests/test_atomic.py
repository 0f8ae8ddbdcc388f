"""amid_ray.atomic: files and folders are the old complete version or the new one, never less.

Crashes are real: a child process writes and is ended with `os._exit` at the chosen point, so no
`except`/`finally` of the helper runs, as after SIGKILL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from amid_ray import atomic
from amid_ray.atomic import (
    aside_name,
    atomic_folder,
    create_text_atomic,
    recover_folder,
    write_bytes_atomic,
    write_text_atomic,
)


def contents(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(folder.iterdir())}


def make_folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def usual_mode(kind: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return kind & ~umask


# --- files ----------------------------------------------------------------------------------------


def test_write_text_creates_the_folder_and_replaces_the_file(tmp_path: Path):
    path = tmp_path / "run" / "search.yaml"
    assert write_text_atomic(path, "naïve: 1\n") == path
    assert path.read_bytes() == "naïve: 1\n".encode()
    write_bytes_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["search.yaml"]
    assert path.stat().st_mode & 0o777 == usual_mode(0o666)


def test_create_writes_only_where_no_file_is_and_the_first_writer_wins(tmp_path: Path):
    path = tmp_path / "cache" / "manifest.json"
    assert create_text_atomic(path, "first") is True
    assert create_text_atomic(path, "second") is False  # as a racing second stage would
    assert path.read_text() == "first"
    assert os.listdir(path.parent) == ["manifest.json"]  # no staging file left either way
    assert path.stat().st_mode & 0o777 == usual_mode(0o666)


def test_a_failed_file_write_keeps_the_old_file_and_no_leftover(tmp_path: Path, monkeypatch):
    path = write_text_atomic(tmp_path / "best.json", "old")

    def refuse(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert os.listdir(tmp_path) == ["best.json"]
    assert path.read_text() == "old"


# --- folders --------------------------------------------------------------------------------------


def test_atomic_folder_builds_a_new_folder(tmp_path: Path):
    target = tmp_path / "models" / "best"
    with atomic_folder(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".best.partial-")
        assert list(staging.iterdir()) == [] and not target.exists()
        (staging / "model.safetensors").write_text("weights")
    assert contents(target) == {"model.safetensors": "weights"}
    assert os.listdir(target.parent) == ["best"]
    assert target.stat().st_mode & 0o777 == usual_mode(0o777)


def test_atomic_folder_replaces_the_old_folder_whole(tmp_path: Path):
    target = make_folder(tmp_path / "best", a="old a", b="old b")
    with atomic_folder(target) as staging:
        (staging / "a").write_text("new a")
    assert contents(target) == {"a": "new a"}
    assert os.listdir(tmp_path) == ["best"]


def test_an_error_while_building_keeps_the_old_folder(tmp_path: Path):
    target = make_folder(tmp_path / "best", a="old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(target) as staging:
        (staging / "a").write_text("half")
        raise KeyboardInterrupt
    assert contents(target) == {"a": "old"}
    assert os.listdir(tmp_path) == ["best"]


def test_a_failed_swap_puts_the_old_folder_back_at_once(tmp_path: Path, monkeypatch):
    target = make_folder(tmp_path / "best", a="old")
    real_rename, renames = Path.rename, []

    def rename(self, other):
        renames.append((self.name, Path(other).name))
        if self.name.startswith(".best.partial-"):  # the new folder moving in
            raise OSError("rename refused")
        return real_rename(self, other)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename refused"), atomic_folder(target) as staging:
        (staging / "a").write_text("new")
    assert [pair[1] for pair in renames] == [".best.old", "best", "best"]
    assert contents(target) == {"a": "old"}
    assert os.listdir(tmp_path) == ["best"]


def test_a_file_in_the_way_is_refused(tmp_path: Path):
    target = tmp_path / "best"
    target.write_text("not a folder")
    with pytest.raises(FileExistsError, match="best exists and is not a folder"), \
            atomic_folder(target):
        pass


# --- crashes --------------------------------------------------------------------------------------

CRASHING_WRITER = """
import os, pathlib, shutil, sys
from amid_ray.atomic import atomic_folder

target, crash_at = pathlib.Path(sys.argv[1]), sys.argv[2]
real_rename, real_rmtree = pathlib.Path.rename, shutil.rmtree

def rename(self, other):
    if crash_at == "before new moves in" and self.name.startswith(".best.partial-"):
        os._exit(9)
    return real_rename(self, other)

def rmtree(path, *args, **kwargs):
    if crash_at == "while deleting old" and pathlib.Path(path).name == ".best.old":
        (pathlib.Path(path) / "a").unlink()  # part of the old folder is gone
        os._exit(9)
    return real_rmtree(path, *args, **kwargs)

pathlib.Path.rename, shutil.rmtree = rename, rmtree
with atomic_folder(target) as staging:
    (staging / "a").write_text("new a")
    if crash_at == "while building":
        os._exit(9)
    (staging / "b").write_text("new b")
"""


def crash_writer(target: Path, crash_at: str) -> None:
    """Replace `target` in a child process that dies at `crash_at`."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASHING_WRITER), str(target),
                           crash_at], capture_output=True, text=True, timeout=60)
    assert done.returncode == 9, done.stderr


@pytest.mark.parametrize(("crash_at", "left", "recovered"), [
    ("while building", {".best.partial-*", "best"}, {"a": "old a", "b": "old b"}),
    ("before new moves in", {".best.partial-*", ".best.old"}, {"a": "old a", "b": "old b"}),
    ("while deleting old", {".best.old", "best"}, {"a": "new a", "b": "new b"}),
])
def test_a_crash_at_any_step_leaves_old_or_new_after_recovery(tmp_path: Path, crash_at: str,
                                                              left: set[str],
                                                              recovered: dict[str, str]):
    target = make_folder(tmp_path / "best", a="old a", b="old b")
    crash_writer(target, crash_at)
    names = {".best.partial-*" if name.startswith(".best.partial-") else name
             for name in os.listdir(tmp_path)}
    assert names == left
    recover_folder(target)
    assert contents(target) == recovered
    assert os.listdir(tmp_path) == ["best"]


def test_the_next_write_recovers_first(tmp_path: Path):
    target = make_folder(tmp_path / "best", a="old a", b="old b")
    crash_writer(target, "before new moves in")
    assert not target.exists() and aside_name(target).is_dir()
    with atomic_folder(target) as staging:
        # Recovery ran before the build: the old version is back while the new one is built.
        assert contents(target) == {"a": "old a", "b": "old b"}
        (staging / "c").write_text("newest")
    assert contents(target) == {"c": "newest"}
    assert os.listdir(tmp_path) == ["best"]


def test_recovery_without_leftovers_changes_nothing(tmp_path: Path):
    target = make_folder(tmp_path / "best", a="old")
    make_folder(tmp_path / "other", a="x")
    recover_folder(target)
    recover_folder(tmp_path / "missing")
    assert sorted(os.listdir(tmp_path)) == ["best", "other"]
    assert contents(target) == {"a": "old"}
