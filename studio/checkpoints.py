"""Atomic checkpoints: write to a temp folder, fsync, rename, then mark complete.

A checkpoint is a folder ``checkpoints/step-00000100/`` holding whatever the
trainer writes (``accelerator.save_state`` output, EMA weights, a JSON of counters)
plus ``COMPLETE.json``: the step and every file's size and SHA-256. A folder
without that marker, or whose files no longer match it, is not a checkpoint:
resume falls back to the previous valid one and says so. Old checkpoints are pruned
only after the new one is complete, so a crash at any moment leaves at least one
valid checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from studio.errors import CheckpointError

MARKER = "COMPLETE.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class CheckpointInfo:
    """A checkpoint folder and whether it passed validation."""

    step: int
    path: Path
    valid: bool
    problem: str = ""


def checkpoint_dir_name(step: int) -> str:
    """``step-00000100``: zero-padded so names sort by step."""
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], keep: int = 2) -> Path:
    """Write a checkpoint atomically and prune older ones afterwards.

    Args:
        root: The run's ``checkpoints/`` folder.
        step: Optimisation step the state belongs to.
        write: Writes the state into the (empty, temporary) folder it is given.
        keep: Complete checkpoints to keep (>= 1); older ones are deleted after success.

    Returns:
        The final checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    tmp = root / f".tmp-{checkpoint_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        _fsync_tree(tmp)
        if final.exists():  # a previous attempt at this step (e.g. after a crash): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        marker = final / MARKER
        marker_tmp = final / (MARKER + ".tmp")
        marker_tmp.write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
        with open(marker_tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(marker_tmp, marker)
        _fsync_dir(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep)
    return final


def validate_checkpoint(path: str | Path, verify_hashes: bool = True) -> str:
    """Return "" when ``path`` is a complete, intact checkpoint, else the problem."""
    path = Path(path)
    marker = path / MARKER
    if not path.is_dir():
        return "folder is missing"
    if not marker.is_file():
        return "it was never completed (no COMPLETE.json: the save was interrupted)"
    files = read_marker(marker)
    if files is None:
        return "its COMPLETE.json is unreadable"
    for rel, meta in files.items():
        f = path / rel
        try:
            inside = f.resolve().is_relative_to(path.resolve())
        except (OSError, ValueError):
            inside = False
        if not inside:
            return f"its COMPLETE.json lists {rel!r}, outside the checkpoint"
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{rel} has the wrong size (truncated or overwritten)"
        if verify_hashes and _sha256(f) != meta["sha256"]:
            return f"{rel} is damaged (checksum mismatch)"
    return ""


def read_marker(marker: Path) -> dict[str, dict] | None:
    """The ``files`` table of a COMPLETE.json, or None when it is unreadable in any way.

    Anything but ``{"files": {name: {"size": int, "sha256": 64 hex}}}`` (bad bytes, bad
    JSON, a list, a missing or mistyped field) counts as unreadable, so resume falls
    back to an older checkpoint instead of crashing on it.
    """
    try:
        data = json.loads(marker.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return None
    for rel, meta in files.items():
        if not (isinstance(rel, str) and rel and isinstance(meta, dict)
                and type(meta.get("size")) is int and isinstance(meta.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", meta["sha256"])):
            return None
    return files


def list_checkpoints(root: str | Path, verify_hashes: bool = False) -> list[CheckpointInfo]:
    """Every ``step-N`` folder under ``root``, oldest first, with its validity."""
    root = Path(root)
    if not root.is_dir():
        return []
    infos = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            problem = validate_checkpoint(child, verify_hashes)
            infos.append(CheckpointInfo(int(m.group(1)), child, not problem, problem))
    return sorted(infos, key=lambda i: i.step)


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints, and stale temp folders.

    Incomplete folders newer than the newest complete one are left alone (they may be
    being written); those older are removed.
    """
    root = Path(root)
    keep = max(1, int(keep))
    infos = list_checkpoints(root)
    complete = [i for i in infos if i.valid]
    for info in complete[:-keep]:
        shutil.rmtree(info.path, ignore_errors=True)
    if complete:
        newest = complete[-1].step
        for info in infos:
            if not info.valid and info.step < newest:
                shutil.rmtree(info.path, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def find_latest_valid(root: str | Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest intact checkpoint, warning about each damaged newer one skipped."""
    for info in reversed(list_checkpoints(root)):
        problem = validate_checkpoint(info.path, verify_hashes=True)
        if not problem:
            return info.path
        if warn is not None:
            warn(f"Checkpoint {info.path.name} is unusable ({problem}); falling back to an older one.")
    return None


def resolve_resume(resume: str, checkpoints_root: str | Path,
                   warn: Callable[[str], None] | None = None) -> Path | None:
    """Turn a resume request into a checkpoint folder.

    Args:
        resume: "" (start fresh), "latest", or a path to a checkpoint folder.
        checkpoints_root: The run's ``checkpoints/`` folder (used for "latest").
        warn: Receives a message for every damaged checkpoint skipped.

    Returns:
        The checkpoint folder, or None for a fresh start.

    Raises:
        CheckpointError: "latest" with no valid checkpoint, or a path that is missing or
            damaged. A mistyped path is an error, never a silent fresh start.
    """
    resume = (resume or "").strip()
    if not resume:
        return None
    if resume == "latest":
        found = find_latest_valid(checkpoints_root, warn)
        if found is None:
            raise CheckpointError(f"No usable checkpoint to resume from in {checkpoints_root}.",
                                  "The run ended before its first checkpoint: start it again under the same "
                                  "name (its folder is reused), or pick a checkpoint folder.")
        return found
    path = Path(resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"Checkpoint not found: {path}.", "Check the path, or use 'latest'.")
    problem = validate_checkpoint(path, verify_hashes=True)
    if problem:
        raise CheckpointError(f"Checkpoint {path} cannot be used: {problem}.",
                              "Use 'latest' to fall back to the newest intact checkpoint.")
    return path
