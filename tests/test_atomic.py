"""Atomic writes: the target is either the old file or the complete new one, never a fragment."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from wsi_mil.atomic import (
    atomic_directory,
    atomic_open,
    atomic_path,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_write_text_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "card.json"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second ünïcode")
    assert target.read_text(encoding="utf-8") == "second ünïcode"
    assert sorted(p.name for p in target.parent.iterdir()) == ["card.json"]


def test_failure_mid_write_keeps_old_content_and_removes_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), atomic_open(target) as stream:
        stream.write("half a ta")
        raise Boom
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    target = tmp_path / "weights.bin"
    with atomic_path(target) as temp:
        assert temp.parent == tmp_path and temp != target
        assert not target.exists()
        temp.write_bytes(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"

    with pytest.raises(ValueError), atomic_path(target) as temp:
        temp.write_bytes(b"partial")
        raise ValueError("writer failed")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_new_files_get_umask_permissions_not_private_ones(tmp_path):
    target = tmp_path / "out.bin"
    write_bytes_atomic(target, b"x")
    assert target.stat().st_mode & 0o044, "group/other read bits should follow the umask, not mkstemp's 0o600"


def test_json_encodes_numpy_and_refuses_nan(tmp_path):
    target = tmp_path / "status.json"
    write_json_atomic({"tiles": np.int64(3), "coords": np.arange(2), "path": tmp_path}, target)
    assert json.loads(target.read_text()) == {"tiles": 3, "coords": [0, 1], "path": str(tmp_path)}
    with pytest.raises(ValueError):
        write_json_atomic({"x": math.nan}, target)
    assert json.loads(target.read_text())["tiles"] == 3


def test_read_modes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_open(tmp_path / "x", "r"):
        pass


def test_csv_newlines_pass_through_unchanged(tmp_path):
    with atomic_open(tmp_path / "t.csv", "w", newline="") as stream:
        stream.write("a,b\r\n1,2\r\n")
    assert (tmp_path / "t.csv").read_bytes() == b"a,b\r\n1,2\r\n"


def test_atomic_directory_replaces_the_folder_at_once_or_not_at_all(tmp_path):
    target = tmp_path / "jobs" / "abc"
    with atomic_directory(target) as staging:
        assert not target.exists() and staging.parent == target.parent
        (staging / "result.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["result.json"]

    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "half.json").write_text("{")
        raise RuntimeError("the job failed while writing")
    assert [p.name for p in target.iterdir()] == ["result.json"]
    assert [p.name for p in target.parent.iterdir()] == ["abc"]

    with atomic_directory(target) as staging:
        (staging / "new.json").write_text("[]")
    assert [p.name for p in target.iterdir()] == ["new.json"]
