"""Data-parallel training for real: ``torchrun --nproc_per_node 2 -m studio train`` on CPU (gloo).

Both processes train on different shards of each batch; gradients are averaged, so
their final weights are identical; only rank 0 writes the (single) run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from test_cli import env, write_config

from studio.runs import RunDir


@pytest.mark.slow
def test_two_processes_share_gradients_on_different_shards(tmp_path, workspace):
    config = write_config(tmp_path / "run.json", workspace, run_name="ddp", max_train_steps=3, save_every=2)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "studio", "train", "--config", str(config)],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished: finished 3 steps") == 1, proc.stdout  # rank 0 reports, once
    runs = [p.name for p in workspace.iterdir() if not p.name.startswith(".")]
    assert runs == ["ddp"]
    run = RunDir(workspace / "ddp")
    ranks = json.loads((run.logs_dir / "processes.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # gradients were synchronised
    assert len(ranks[0]["first_batch"]) == 4
    assert not set(ranks[0]["first_batch"]) & set(ranks[1]["first_batch"])  # different shards
    state = json.loads((run.checkpoints_dir / "step-00000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    steps = [e for e in run.read_events() if e.kind == "step"]
    assert [e.step for e in steps] == [1, 2, 3] and steps[0].images_per_s > 0
    assert (run.model_dir / "model_index.json").is_file()
    assert Path(run.sample_path(3)).is_file()
    assert os.environ.get("RANK") is None  # the test process itself is not part of the group

    # resume the 2-process run from its latest checkpoint (each process gets its own RNG state back)
    data = json.loads(run.config_path.read_text())
    data["max_train_steps"] = 5
    longer = tmp_path / "longer.json"
    longer.write_text(json.dumps(data))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "studio", "train", "--config", str(longer), "--resume", "latest"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [e.step for e in run.read_events() if e.kind == "step"] == [1, 2, 3, 4, 5]
    ranks = json.loads((run.logs_dir / "processes.json").read_text())
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
