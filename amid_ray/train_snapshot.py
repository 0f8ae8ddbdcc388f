"""Ray Train's record of a run's checkpoints, kept recoverable.

Ray Train (2.60) lists a run's checkpoints and their metrics in `checkpoint_manager_snapshot.json`
in the run folder and rewrites that file in place after each checkpoint. A write that fails
half-way (the storage device full) leaves it empty or cut, and every later start of the run fails
in Ray's controller ("CheckpointManagerInitializationError: Expecting value"): the checkpoints
are on disk, but the run cannot resume from them.

So `SnapshotKeeper`, a Train callback on the controller, copies the record after each checkpoint
once it reads as JSON (the checkpoint manager writes it before user callbacks run), and
`repair_snapshot`, called before a run starts, puts that copy back in place of a record that does
not read. Both only act on storage this process sees as a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train

from amid_ray.atomic import write_text_atomic

#: Ray Train's record of a run's checkpoints, in the run folder.
SNAPSHOT = "checkpoint_manager_snapshot.json"
#: Our copy of the last record that read as JSON, beside it.
LAST_GOOD = "checkpoint_manager_snapshot.last-good.json"
#: Where an unreadable record is moved, for inspection.
UNREADABLE = "checkpoint_manager_snapshot.unreadable.json"


def _readable(path: Path) -> str | None:
    """The file's text if it holds a JSON object, else None."""
    try:
        text = path.read_text()
        return text if isinstance(json.loads(text), dict) else None
    except (OSError, ValueError):
        return None


class SnapshotKeeper(ray.train.UserCallback):
    """Keeps `LAST_GOOD` equal to the run's last readable checkpoint record."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: ray.train.Checkpoint | None) -> None:
        if checkpoint is None:
            return
        text = _readable(self.run_dir / SNAPSHOT)
        if text is None:
            return
        # Storage full: the previous copy stays, which is what a resume then needs.
        with contextlib.suppress(OSError):
            write_text_atomic(self.run_dir / LAST_GOOD, text)


def repair_snapshot(run_dir: str | Path, log: Callable[[str], None] = print) -> None:
    """Before a run (re)starts: replace an unreadable checkpoint record by the last readable copy
    (the unreadable one is kept as `UNREADABLE`); without a copy, move it aside so that the run
    starts afresh instead of failing. Says what it did through `log`."""
    run_dir = Path(run_dir)
    snapshot = run_dir / SNAPSHOT
    if not snapshot.is_file() or _readable(snapshot) is not None:
        return
    os.replace(snapshot, run_dir / UNREADABLE)
    good = _readable(run_dir / LAST_GOOD)
    if good is None:
        log(f"WARNING: Ray Train's checkpoint record {snapshot} could not be read and has no "
            f"readable copy: the run starts afresh (moved to {UNREADABLE}; the checkpoint "
            "folders stay)")
        return
    write_text_atomic(snapshot, good)
    log(f"WARNING: Ray Train's checkpoint record {snapshot} could not be read (cut by a failed "
        f"write); restored the copy taken after the last checkpoint (the unreadable one is "
        f"{UNREADABLE})")
