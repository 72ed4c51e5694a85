"""kill -9 at the worst moments of a CLI training run, then resume: it must finish.

The run is a real ``python -m studio train`` subprocess whose file writers are wrapped
so that the process SIGKILLs itself in the middle of one chosen write (a sample grid
right after its checkpoint, or a checkpoint file half written), exactly as a kill -9
or a power cut at that instant would leave the disk.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from studio.checkpoints import list_checkpoints
from studio.runs import RunDir
from test_cli import env, write_config

pytestmark = pytest.mark.slow

#: Runs the CLI with Image.save / torch.save wrapped to SIGKILL the process inside the
#: write of the file whose name contains argv[1] (after writing argv[2] bytes of it).
KILLER = r"""
import os, signal, sys
target, keep = sys.argv[1], int(sys.argv[2])

def die(fp):
    with open(fp, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n"[:keep] if keep < 8 else os.urandom(keep))
        fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

from PIL import Image
real_image_save = Image.Image.save
def image_save(self, fp, *args, **kwargs):
    if target in os.path.basename(str(fp)):
        die(fp)
    return real_image_save(self, fp, *args, **kwargs)
Image.Image.save = image_save

import torch
real_torch_save = torch.save
def torch_save(obj, f, *args, **kwargs):
    if target in str(f):
        die(f)
    return real_torch_save(obj, f, *args, **kwargs)
torch.save = torch_save

from studio.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _run(args: list[str], cwd: Path, killer: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    command = ([sys.executable, "-c", KILLER, *map(str, killer), *args] if killer
               else [sys.executable, "-m", "studio", *args])
    return subprocess.run(command, capture_output=True, text=True, env=env(), cwd=cwd, timeout=600)


def test_kill_during_a_sample_write_then_resume_finishes(tmp_path, workspace):
    config = write_config(tmp_path / "run.json", workspace, run_name="k9", max_train_steps=4, save_every=2,
                          sample_every=2)
    killed = _run(["train", "--config", str(config), "--quiet"], tmp_path, killer=("step-000002.png", 0))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = RunDir(workspace / "k9")
    assert [c.step for c in list_checkpoints(run.checkpoints_dir) if c.valid] == [2]
    # The checkpoint of step 2 is written before its grid, so resume does not draw that grid again:
    # a damaged grid there is what used to crash every later resume (in progress.gif).
    resumed = _run(["train", "--config", str(config), "--resume", "latest", "--quiet"], tmp_path)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    assert resumed.stdout.startswith("finished: finished 4 steps")
    assert (run.samples_dir / "progress.gif").is_file() and (run.model_dir / "model_index.json").is_file()
    assert [e.step for e in run.read_events() if e.kind == "step"][-2:] == [3, 4]


def test_kill_during_a_checkpoint_write_then_resume_finishes(tmp_path, workspace):
    config = write_config(tmp_path / "run.json", workspace, run_name="k9c", max_train_steps=6, save_every=2,
                          sample_every=0)
    killed = _run(["train", "--config", str(config), "--quiet"], tmp_path, killer=("step-00000004", 100))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = RunDir(workspace / "k9c")
    assert [c.step for c in list_checkpoints(run.checkpoints_dir) if c.valid] == [2]
    assert list(run.checkpoints_dir.glob(".tmp-step-00000004-*"))  # the half-written one
    resumed = _run(["train", "--config", str(config), "--resume", "latest", "--quiet"], tmp_path)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    assert "resumed at step 2" in json.dumps([e.message for e in run.read_events()])
    assert [c.step for c in list_checkpoints(run.checkpoints_dir) if c.valid] == [4, 6]
    assert not list(run.checkpoints_dir.glob(".tmp-*"))
