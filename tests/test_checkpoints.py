"""Atomic checkpoints: marker, pruning after success, damaged fallback, resume paths."""

from __future__ import annotations

import json

import pytest

from studio.checkpoints import (MARKER, find_latest_valid, list_checkpoints, resolve_resume, save_checkpoint,
                                validate_checkpoint)
from studio.errors import CheckpointError


def _writer(payload: bytes):
    def write(folder):
        (folder / "state.bin").write_bytes(payload)
        (folder / "sub").mkdir()
        (folder / "sub" / "meta.json").write_text(json.dumps({"n": len(payload)}))
    return write


def test_save_is_complete_and_pruned_after_success(tmp_path):
    for step in (10, 20, 30):
        path = save_checkpoint(tmp_path, step, _writer(bytes([step]) * 100), keep=2)
        assert (path / MARKER).is_file() and validate_checkpoint(path) == ""
    assert [c.step for c in list_checkpoints(tmp_path)] == [20, 30]
    assert not list(tmp_path.glob(".tmp-*"))


def test_failed_write_leaves_previous_checkpoints_alone(tmp_path):
    save_checkpoint(tmp_path, 1, _writer(b"a"), keep=1)

    def broken(folder):
        (folder / "half").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, broken, keep=1)
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob(".tmp-*"))


def test_damaged_newest_falls_back_with_a_warning(tmp_path):
    save_checkpoint(tmp_path, 1, _writer(b"good" * 10), keep=3)
    newest = save_checkpoint(tmp_path, 2, _writer(b"good" * 10), keep=3)
    (newest / "state.bin").write_bytes(b"bad!" * 10)  # same size, different bytes
    warnings: list[str] = []
    found = find_latest_valid(tmp_path, warnings.append)
    assert found is not None and found.name == "step-00000001"
    assert len(warnings) == 1 and "step-00000002" in warnings[0] and "checksum" in warnings[0]


def test_interrupted_save_without_marker_is_not_a_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, _writer(b"a"), keep=3)
    torn = tmp_path / "step-00000002"
    torn.mkdir()
    (torn / "state.bin").write_bytes(b"half")
    warnings: list[str] = []
    assert find_latest_valid(tmp_path, warnings.append).name == "step-00000001"
    assert "interrupted" in warnings[0]


def test_resume_requests(tmp_path):
    assert resolve_resume("", tmp_path) is None
    with pytest.raises(CheckpointError, match="No usable checkpoint"):
        resolve_resume("latest", tmp_path)
    path = save_checkpoint(tmp_path, 5, _writer(b"z"), keep=1)
    assert resolve_resume("latest", tmp_path) == path
    assert resolve_resume(str(path), tmp_path) == path
    with pytest.raises(CheckpointError, match="not found"):
        resolve_resume(str(tmp_path / "step-0000005"), tmp_path)  # a typo is an error, not a fresh start
    (path / "sub" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        resolve_resume(str(path), tmp_path)
