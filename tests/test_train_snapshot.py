"""Ray Train's checkpoint record mended before a run starts (no Ray needed: files only)."""

from __future__ import annotations

import json

from amid_ray.train_snapshot import LAST_GOOD, SNAPSHOT, UNREADABLE, repair_snapshot

RECORD = {"ray_version": "2.60.0", "checkpoint_results": [{"checkpoint_dir_name": "c1"}]}


def test_a_readable_record_is_left_alone(tmp_path):
    (tmp_path / SNAPSHOT).write_text(json.dumps(RECORD))
    (tmp_path / LAST_GOOD).write_text(json.dumps({"older": True}))
    said = []
    repair_snapshot(tmp_path, said.append)
    assert json.loads((tmp_path / SNAPSHOT).read_text()) == RECORD and said == []


def test_a_cut_record_is_replaced_by_the_last_readable_copy(tmp_path):
    cut = json.dumps(RECORD)[:20]
    (tmp_path / SNAPSHOT).write_text(cut)
    (tmp_path / LAST_GOOD).write_text(json.dumps(RECORD))
    said = []
    repair_snapshot(tmp_path, said.append)
    assert json.loads((tmp_path / SNAPSHOT).read_text()) == RECORD
    assert (tmp_path / UNREADABLE).read_text() == cut
    assert len(said) == 1 and "restored the copy" in said[0]


def test_an_empty_record_without_a_copy_is_moved_aside(tmp_path):
    (tmp_path / SNAPSHOT).write_text("")
    said = []
    repair_snapshot(tmp_path, said.append)
    assert not (tmp_path / SNAPSHOT).exists() and (tmp_path / UNREADABLE).is_file()
    assert len(said) == 1 and "starts afresh" in said[0]


def test_no_record_is_nothing_to_do(tmp_path):
    said = []
    repair_snapshot(tmp_path / "new-run", said.append)
    assert said == [] and not (tmp_path / "new-run").exists()


def test_the_record_is_the_file_ray_train_writes():
    # Ray's name lives in a private module; a Ray upgrade that renamed the file would turn the
    # repair into a silent no-op, so the copy is checked against Ray's own constant.
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert SNAPSHOT == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
