"""Fine-tune checkpoints are data, not code; each process resumes its own random state.

A crafted checkpoint (a pickle whose ``__reduce__`` writes a canary file) is refused
with a clear message and never runs; two processes stopped and resumed train exactly
the weights one straight two-process run trains.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.checkpoints import save_checkpoint
from studio.errors import CheckpointError
from test_finetune import make_cfg, run_train
from tiny_pipelines import tiny_sd  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this runs ``exec``: it writes the canary file."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return exec, (f"open({str(self.canary)!r}, 'w').write('code ran')",)


def _craft_checkpoint(run_root: Path, source: Path, poisoned: str, canary: Path) -> Path:
    """A complete, checksummed checkpoint newer than ``source`` whose ``poisoned`` file is a hostile pickle."""
    def write(folder: Path) -> None:
        for f in source.iterdir():
            if f.name not in ("COMPLETE.json", "ema.safetensors", "rng.safetensors", poisoned):
                shutil.copy2(f, folder / f.name)
        if poisoned == "rng.pt":
            torch.save({"torch": torch.get_rng_state(), "evil": _Payload(canary)}, folder / "rng.pt")
        else:
            torch.save({"shadow_params": [], "evil": _Payload(canary)}, folder / poisoned)
        if poisoned != "rng.pt":  # the old layout's RNG file, so the checkpoint is complete without rng.safetensors
            torch.save({"torch": torch.get_rng_state(), "data": torch.Generator().get_state(),
                        "noise": torch.Generator().get_state()}, folder / "rng.pt")

    return save_checkpoint(run_root / "checkpoints", 9, write, keep=10)


@pytest.mark.parametrize("poisoned", ["ema.pt", "optimizer.pt"])
def test_a_checkpoint_whose_pickle_would_run_code_is_refused_unrun(tiny_sd, workspace, tmp_path, poisoned):
    cfg = make_cfg(tiny_sd, workspace, method="full", use_ema=True, max_train_steps=1, validation_every=0,
                   checkpoint_every=1, run_name="victim", checkpoints_total_limit=5)
    run, _ = run_train(cfg)
    good = run.checkpoints_dir / "step-00000001"
    canary = tmp_path / "canary.txt"
    _craft_checkpoint(run.root, good, poisoned, canary)
    with pytest.raises(CheckpointError, match=f"Refused to load step-00000009/{poisoned}") as info:
        run_train(cfg.replace(resume="latest", max_train_steps=2))
    assert not canary.exists()
    assert "could run code" in info.value.user_message
    assert (good / "ema.safetensors").is_file() and not (good / "ema.pt").exists()  # EMA is stored as data


def test_old_layout_torch_files_still_resume_when_they_hold_only_tensors(tiny_sd, workspace):
    """A checkpoint from before the safetensors EMA/RNG files (ema.pt, rng.pt of plain tensors) resumes."""
    cfg = make_cfg(tiny_sd, workspace, method="full", use_ema=True, max_train_steps=1, validation_every=0,
                   checkpoint_every=1, run_name="old", checkpoints_total_limit=5)
    run, _ = run_train(cfg)
    good = run.checkpoints_dir / "step-00000001"
    from safetensors import safe_open

    with safe_open(str(good / "ema.safetensors"), framework="pt") as fh:
        ema = json.loads(fh.metadata()["state"])
        ema["shadow_params"] = [fh.get_tensor(f"shadow.{i}") for i in range(len(list(fh.keys())))]
    rng = {k.split(".", 1)[1]: v for k, v in load_file(str(good / "rng.safetensors")).items()}

    def write(folder: Path) -> None:
        for f in good.iterdir():
            if f.name not in ("COMPLETE.json", "ema.safetensors", "rng.safetensors"):
                shutil.copy2(f, folder / f.name)
        torch.save(ema, folder / "ema.pt")
        torch.save(rng, folder / "rng.pt")

    save_checkpoint(run.checkpoints_dir, 1, write, keep=5)
    run, events = run_train(cfg.replace(resume="latest", max_train_steps=2))
    assert events[-1].kind == "finished" and [e.step for e in events if e.kind == "step"] == [2]


@pytest.mark.slow
def test_two_processes_resume_each_with_its_own_random_state(tiny_sd, workspace, tmp_path):
    """Straight 2-process run to step 4 == the same run resumed from its step-2 checkpoint.

    Before the fix every rank got rank 0's RNG state back, so after resume both ranks drew
    the same noise and timesteps and the weights went elsewhere.
    """
    from conftest import free_port

    cfg = make_cfg(tiny_sd, workspace, max_train_steps=4, validation_every=0, checkpoint_every=2,
                   run_name="ddp", train_batch_size=1, random_flip=True, caption_dropout=0.3,
                   checkpoints_total_limit=3)
    config = tmp_path / "finetune.json"
    cfg.to_json(config)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def torchrun(*extra: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), "-m", "studio", "finetune", "--config", str(config), "--quiet", *extra],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun()
    run = workspace / "ddp"
    weights = run / "lora" / "pytorch_lora_weights.safetensors"
    straight = load_file(str(weights))
    step2 = run / "checkpoints" / "step-00000002"
    rng = load_file(str(step2 / "rng.safetensors"))
    assert not torch.equal(rng["rank0.noise"], rng["rank1.noise"])  # each rank's own state was saved
    weights.unlink()
    torchrun("--resume", str(step2))
    resumed = load_file(str(weights))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_train_checkpoint_whose_pickle_would_run_code_is_refused_unrun(workspace, tmp_path):
    """The DDPM trainer's ``training_state.pt`` gets the same treatment."""
    import studio.trainers.ddpm as ddpm
    from test_ddpm_trainer import tiny_config

    run = ddpm.train(tiny_config(workspace, max_train_steps=1, run_name="victim"))
    good = run.checkpoints_dir / "step-00000001"
    canary = tmp_path / "canary.txt"

    def write(folder: Path) -> None:
        for f in good.iterdir():
            if f.name not in ("COMPLETE.json", "training_state.pt"):
                shutil.copy2(f, folder / f.name)
        torch.save({"step": 1, "evil": _Payload(canary)}, folder / "training_state.pt")

    save_checkpoint(run.checkpoints_dir, 9, write, keep=10)
    with pytest.raises(CheckpointError, match="Refused to load step-00000009/training_state.pt"):
        ddpm.train(tiny_config(workspace, max_train_steps=2, run_name="victim", resume="latest"))
    assert not canary.exists()
