"""``python -m studio train``: the headless entry, its errors, exit codes, resume and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio import cli
from studio.config.train import TrainConfig
from studio.runs import RunDir

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, workspace: Path, **changes) -> Path:
    """A tiny-UNet, 8 px, emoji-subset training config as JSON."""
    values = dict(
        data={"source": "emoji", "max_rows": 8}, workspace=str(workspace), resolution=8, train_batch_size=4,
        max_train_steps=3, learning_rate=1e-3, lr_scheduler="constant", lr_warmup_steps=0,
        block_out_channels=[8, 16], layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D"], num_samples=4, sample_inference_steps=2,
        sample_every=0, save_every=0, device="cpu",
    )
    values.update(changes)
    path.write_text(json.dumps(values), encoding="utf-8")
    return path


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def test_train_runs_in_process_and_resumes_latest(tmp_path, workspace, capsys):
    config = write_config(tmp_path / "run.json", workspace, run_name="cli")
    assert cli.main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("finished: finished 3 steps")
    run = RunDir(workspace / "cli")
    assert (run.model_dir / "model_index.json").is_file()
    # the run's own config.json is a valid config; continue it for 2 more steps
    data = json.loads(run.config_path.read_text())
    data["max_train_steps"] = 5
    longer = tmp_path / "longer.json"
    longer.write_text(json.dumps(data))
    assert cli.main(["train", "--config", str(longer), "--resume", "latest"]) == 0
    steps = [e.step for e in run.read_events() if e.kind == "step"]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("content, message", [
    (None, "Config file not found"),
    ("{not json", "is not valid JSON"),
    ('{"task": "finetune"}', "is a 'finetune' config"),
    ('{"learning_rate": -1}', "Learning rate must be a number above 0"),
    ('{"lerning_rate": 1}', "Unknown setting(s) for TrainConfig: lerning_rate"),
])
def test_bad_config_exits_2_without_a_traceback(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_mistyped_resume_path_exits_with_a_message(tmp_path, workspace, capsys):
    config = write_config(tmp_path / "run.json", workspace)
    assert cli.main(["train", "--config", str(config), "--resume", str(tmp_path / "no-such-checkpoint")]) == 2
    err = capsys.readouterr().err
    assert "Checkpoint not found" in err and "Traceback" not in err


def test_every_command_row_resolves():
    for name, (config_path, runner_path) in cli.COMMANDS.items():
        assert isinstance(cli._load(config_path), type)
        assert callable(cli._load(runner_path))
    assert cli.COMMANDS["train"][0] == "studio.config.train:TrainConfig"
    assert cli.main(["nonsense"]) == 2


def test_python_dash_m_studio_with_ctrl_c_stops_with_a_checkpoint(tmp_path, workspace):
    config = write_config(tmp_path / "run.json", workspace, run_name="headless", max_train_steps=100_000)
    proc = subprocess.Popen([sys.executable, "-m", "studio", "train", "--config", str(config)], cwd=tmp_path,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = workspace / "headless" / "events.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if events.is_file() and '"kind": "step"' in events.read_text():
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.startswith("stopped: stopped at step"), (out, err)
    assert "loss=" in err  # the tqdm bar (on stderr) shows the smoothed loss
    final = RunDir(workspace / "headless").read_events()[-1]
    assert final.kind == "stopped" and Path(final.path, "COMPLETE.json").is_file()
