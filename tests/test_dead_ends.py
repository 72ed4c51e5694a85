"""Runs that never dead-end: damaged samples and checkpoint markers, restart in place,
run-folder and device locks across processes, and one-line errors with exit code 2 for
what a person can fix (non-UTF-8 files, a BOM, a workspace that is a file, a full disk)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from studio import cli
from studio.checkpoints import MARKER, resolve_resume, save_checkpoint
from studio.errors import ConfigError, JobError, describe_exception
from studio.runs import RunDir
from test_cli import env, write_config

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- samples
def test_progress_gif_survives_a_zero_byte_grid_and_sample_writes_are_atomic(tmp_path):
    from studio.trainers.reporting import save_samples, write_progress_gif

    run = RunDir.create(tmp_path, "train", "gif")
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    save_samples(run, 0, images)
    run.sample_path(50).write_bytes(b"")  # what a kill -9 during grid.save used to leave
    run.sample_path(75).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (run.samples_dir / ".step-000090.png.1234abcd.tmp").write_bytes(b"half")  # a killed atomic write
    save_samples(run, 100, images + 200)
    gif = write_progress_gif(run)
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 2  # the two readable grids; the damaged ones are left out
    assert not list(run.samples_dir.glob(".*.tmp"))
    assert sorted(p.name for p in run.samples_dir.iterdir()) == [
        "progress.gif", "step-000000.png", "step-000050.png", "step-000075.png", "step-000100.png"]


# ----------------------------------------------------------------------------- checkpoint markers
def _two_checkpoints(root: Path) -> tuple[Path, Path]:
    def write(payload):
        return lambda folder: (folder / "state.bin").write_bytes(payload)
    return save_checkpoint(root, 1, write(b"one"), keep=5), save_checkpoint(root, 2, write(b"two"), keep=5)


@pytest.mark.parametrize("marker", [
    b"\xff\xfe\x00 not utf-8", b"[]", b"{}", b"null", b'{"files": []}', b'{"files": {"state.bin": {"size": 3}}}',
    b'{"files": {"state.bin": {"size": "3", "sha256": "' + b"0" * 64 + b'"}}}',
    b'{"files": {"state.bin": {"size": 3, "sha256": 5}}}', b'{"files": {"state.bin": []}}',
    b'{"files": {"../../outside": {"size": 3, "sha256": "' + b"0" * 64 + b'"}}}',
    b"[" * 100000, b"",
])
def test_any_unreadable_complete_json_falls_back_to_the_previous_checkpoint(tmp_path, marker):
    older, newest = _two_checkpoints(tmp_path)
    (newest / MARKER).write_bytes(marker)
    warnings: list[str] = []
    assert resolve_resume("latest", tmp_path, warn=warnings.append) == older
    assert len(warnings) == 1 and newest.name in warnings[0] and "falling back" in warnings[0]


# ----------------------------------------------------------------------------- restart in place, run lock
def test_a_run_that_died_before_its_first_checkpoint_restarts_under_its_name(tmp_path):
    run = RunDir.create(tmp_path, "train", "dead")
    run.write_config("train", {"x": 1})
    run.append_event(__import__("studio.events", fromlist=["Event"]).Event("status", message="loading"))
    (run.checkpoints_dir / "step-00000010").mkdir()  # an interrupted save, no COMPLETE.json
    (run.logs_dir / "error.txt").write_text("Traceback: killed")
    with pytest.raises(Exception, match="start it again under the same name"):
        resolve_resume("latest", run.checkpoints_dir)
    again = RunDir.create(tmp_path, "train", "dead")  # was: "A run named 'dead' already exists"
    assert again.root == run.root and not run.events_path.exists()
    assert not any(run.checkpoints_dir.iterdir())
    assert (run.logs_dir / "previous-error.txt").read_text() == "Traceback: killed"
    # a run with something to resume keeps its name
    save_checkpoint(run.checkpoints_dir, 5, lambda f: (f / "s").write_bytes(b"s"))
    with pytest.raises(ConfigError, match="already exists"):
        RunDir.create(tmp_path, "train", "dead")


def _hold_in_subprocess(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code + "; print('held', flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_processes_never_train_into_one_run_folder(tmp_path, workspace, capsys):
    run = RunDir.create(workspace, "train", "shared")
    holder = _hold_in_subprocess(f"import time; from studio.runs import RunDir; "
                                 f"RunDir({str(run.root)!r}).lock(\"train 'shared'\").acquire()")
    try:
        config = write_config(tmp_path / "run.json", workspace, run_name="shared")
        assert cli.main(["train", "--config", str(config)]) == 2  # restart refused: someone trains there
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: Run folder shared is in use, held by process "
                              f"{holder.pid}: train 'shared'") and "\n" not in err
        from studio.trainers import ddpm
        from test_ddpm_trainer import tiny_config

        with pytest.raises(JobError, match=f"held by process {holder.pid}"):
            ddpm.train(tiny_config(workspace), run=run)
        assert not run.events_path.exists()  # nothing was written into the other process's run
    finally:
        holder.kill()  # kill -9: the lock file stays, naming a dead PID
        holder.wait()
    assert json.loads((run.root / ".lock").read_text())["pid"] == holder.pid
    assert cli.main(["train", "--config", str(config)]) == 0  # a stale lock never blocks


def test_a_cli_run_is_refused_while_another_process_holds_the_device(tmp_path, workspace, capsys):
    holder = _hold_in_subprocess("import time; from studio.locks import device_lock; "
                                 "device_lock('cpu', 'Generate').acquire()")
    try:
        config = write_config(tmp_path / "run.json", workspace, run_name="waits")
        assert cli.main(["train", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"The device cpu is in use, held by process {holder.pid}: Generate" in err
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- one-line errors, exit 2
def _last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip()][-1]


def test_user_fixable_cli_errors_are_one_line_with_exit_2(tmp_path, workspace, capsys):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"resolution": 8, "run_name": "caf\xe9"}')
    as_file = tmp_path / "not-a-folder"
    as_file.write_text("x")
    cfg = write_config(tmp_path / "ws-file.json", as_file)
    missing_data = write_config(tmp_path / "no-data.json", workspace, data={"source": "folder",
                                                                            "path": str(tmp_path / "nope")})
    for config, expected in [(bad, "is not UTF-8"), (cfg, "is a file, not a folder"), (missing_data, "nope")]:
        assert cli.main(["train", "--config", str(config), "--quiet"]) == 2, config
        line = _last_error_line(capsys)
        assert line.startswith("error: ") and expected in line, line


def test_a_full_disk_is_one_line_exit_2_and_loses_nothing(tmp_path, workspace, capsys):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    config = write_config(tmp_path / "run.json", workspace, run_name="full", save_every=2, max_train_steps=2)
    assert cli.main(["train", "--config", str(config), "--quiet"]) == 0
    run = RunDir(workspace / "full")
    kept = sorted(p.name for p in run.checkpoints_dir.iterdir())
    run.events_path.unlink()
    run.events_path.symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
    longer = write_config(tmp_path / "longer.json", workspace, run_name="full", save_every=2, max_train_steps=4)
    capsys.readouterr()
    assert cli.main(["train", "--config", str(longer), "--resume", "latest", "--quiet"]) == 2
    assert _last_error_line(capsys).startswith("error: The disk is full")
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == kept


def test_describe_exception_names_disk_problems_and_strips_ansi():
    import errno

    assert describe_exception(OSError(errno.ENOSPC, "No space left", "/w/x.png")).startswith(
        "The disk is full (/w/x.png).")
    assert "permission denied" in describe_exception(PermissionError(errno.EACCES, "permission denied", "/w"))
    text = describe_exception(RuntimeError("\x1b[31mboom\x1b[0m\x07 done"))
    assert "\x1b" not in text and "\x07" not in text and "boom done" in text


# ----------------------------------------------------------------------------- launch settings
def test_auth_file_with_bom_or_bad_bytes_and_workspace_problems(tmp_path, capsys):
    from studio.settings import LaunchSettings, read_auth_file

    bom = tmp_path / "auth-bom.txt"
    bom.write_bytes("\ufeffalice:secret\n".encode("utf-8"))
    assert read_auth_file(bom) == [("alice", "secret")]  # was ("\ufeffalice", "secret")
    latin = tmp_path / "auth-latin1.txt"
    latin.write_bytes(b"jos\xe9:secret\n")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        read_auth_file(latin)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        LaunchSettings(workspace=a_file)
    with pytest.raises(ConfigError, match="cannot be created"):
        LaunchSettings(workspace=a_file / "below")
    import launch

    for args, expected in [(["--auth-file", str(latin)], "is not UTF-8"),
                           (["--workspace", str(a_file)], "is a file, not a folder")]:
        assert launch.main(args) == 2
        line = _last_error_line(capsys)
        assert line.startswith("error:") and expected in line, line
