"""Write-then-rename: a file or folder is either its old complete version or its new one.

Everything is first written under a hidden sibling name (same folder, so the same file system,
where `rename` is atomic) and renamed into place only once complete.

Guarantee, for one writer of a path at a time, against the writing process dying at any point
(an exception, SIGKILL): readers never see a half-written file or folder, and after the crash
(for a folder, once `recover_folder` has run) the path holds the old complete version or the new
one. Nothing is fsynced, so an operating-system crash or power loss may still lose the last
writes.

- Files (`write_text_atomic`, `write_bytes_atomic`): one `os.replace` over the old file; the
  path is never missing. A crash mid-write leaves a hidden `.NAME.partial-*` file that nothing
  reads. `create_text_atomic` writes a file only where none is, the first of racing writers
  winning.
- Folders (`atomic_folder`): a folder cannot be renamed over a non-empty one, so replacing one
  takes three steps: rename the old folder aside (`.NAME.old`), rename the new one in, delete
  the old one. Between the two renames the path is missing for an instant. A crash there leaves
  `.NAME.old` and no `NAME`; `recover_folder` (which `atomic_folder` runs first) renames it back,
  so the old version returns. A crash while deleting the old folder leaves the new `NAME` and a
  partly deleted `.NAME.old`, which `recover_folder` removes. Staging folders of interrupted
  builds (`.NAME.partial-*`) hold nothing anyone reads and are removed by `recover_folder` too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

PARTIAL = "partial"
ASIDE = "old"


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` (creating its folder), replacing any old file in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _partial_name(path)
    try:
        # Mode "xb", not mkstemp: the file gets the usual permissions (umask), not owner-only.
        with staging.open("xb") as handle:
            handle.write(data)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return path


def create_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> bool:
    """Write `text` to `path` only if no file is there, whole or not at all, even when several
    writers race: True if this call created it, False if one was there first. (A hard link of
    the complete staging file: creating a link fails where the name exists.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _partial_name(path)
    try:
        with staging.open("x", encoding=encoding) as handle:
            handle.write(text)
        os.link(staging, path)
        return True
    except FileExistsError:
        return False
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` (creating its folder), replacing any old file in one rename."""
    return write_bytes_atomic(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Build a folder in a hidden staging sibling, yielded empty; swap it in on success.

    On leaving the block normally, the staging folder becomes `target`, replacing an existing
    `target` (old aside, new in, old deleted). On an exception the staging folder is deleted and
    `target` is untouched. See the module docstring for what a crash leaves and how it is
    recovered; only one writer of `target` may run at a time.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(
            f"{target} exists and is not a folder; atomic_folder replaces folders only"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    staging = _partial_name(target)
    # Plain mkdir (not mkdtemp, which is owner-only) keeps the usual permissions.
    staging.mkdir()
    try:
        yield staging
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def recover_folder(target: str | Path) -> None:
    """Finish what a crashed `atomic_folder` left next to `target`: old or new, never none.

    `.NAME.old` without `NAME` (crash between the two renames) is renamed back to `NAME`;
    `.NAME.old` beside `NAME` (crash while deleting it) is deleted, as are staging folders
    `.NAME.partial-*`. Only safe while no other process writes `target`.
    """
    target = Path(target)
    aside = aside_name(target)
    if aside.exists():
        if target.exists():
            shutil.rmtree(aside)
        else:
            aside.rename(target)
    for leftover in target.parent.glob(f".{target.name}.{PARTIAL}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def aside_name(target: Path) -> Path:
    """Where `atomic_folder` moves the old `target` while the new one is renamed in."""
    return target.with_name(f".{target.name}.{ASIDE}")


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    aside = aside_name(target)
    target.rename(aside)
    try:
        staging.rename(target)
    except BaseException:
        aside.rename(target)  # still alive: put the old version back now, not at the next start
        raise
    # The new folder is in place; an old one that resists deletion is retried by recover_folder.
    shutil.rmtree(aside, ignore_errors=True)


def _partial_name(path: Path) -> Path:
    """A hidden, unique sibling of `path` to build it in."""
    return path.with_name(f".{path.name}.{PARTIAL}-{uuid.uuid4().hex[:12]}")
