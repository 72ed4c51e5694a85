"""The Fine-tune tab: its plain functions with plain values, and the launched app through gradio_client."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from studio.config.data import DataConfig
from studio.context import DatasetChoice, StudioContext
from studio.errors import CheckpointError, ConfigError, JobError
from studio.jobs import Snapshot
from tabs.finetune import (
    INPUT_NAMES,
    build_config,
    cli_command,
    config_json,
    default_values,
    render,
    resume_latest,
    start_finetune,
    stop_finetune,
)
from tiny_pipelines import tiny_sd  # noqa: F401  (fixture)


def tiny_values(base: Path, **changes) -> dict:
    values = default_values()
    values.update(pretrained_model_name_or_path=str(base), resolution=16, max_train_steps=3, validation_every=2,
                  num_inference_steps=2, checkpoint_every=0, validation_prompts="a smiling face")
    values.update(changes)
    return values


@pytest.fixture
def ctx(settings):
    context = StudioContext(settings)
    context.dataset.set(DatasetChoice(DataConfig(max_rows=4), "4 emoji", 4, True))
    yield context
    context.jobs.stop_all()


def wait_until_done(ctx, timeout: float = 120.0):
    job = ctx.jobs.latest("finetune")
    assert job is not None and job.wait(timeout), "fine-tune did not end in time"
    return job.snapshot()


# ----------------------------------------------------------------------------- plain functions
def test_widget_values_become_a_config(ctx, tiny_sd):
    values = tiny_values(tiny_sd, lora_target_modules="to_q, to_v ,", validation_prompts="a cat\n\n a dog ",
                         max_train_steps=7.0, learning_rate="0.0002")
    assert set(values) == set(INPUT_NAMES)
    from tabs.finetune import SECTIONS

    laid_out = [name for _, _, names in SECTIONS for name in names]
    assert sorted(laid_out) == sorted(INPUT_NAMES)  # every setting has exactly one widget
    cfg = build_config(values, ctx)
    assert cfg.lora_target_modules == ("to_q", "to_v") and cfg.validation_prompts == ("a cat", "a dog")
    assert cfg.max_train_steps == 7 and isinstance(cfg.max_train_steps, int) and cfg.learning_rate == 2e-4
    assert cfg.data == DataConfig(max_rows=4) and cfg.workspace == str(ctx.workspace) and cfg.device == "cpu"
    with pytest.raises(ConfigError, match="whole number"):
        build_config(tiny_values(tiny_sd, max_train_steps=2.5), ctx)
    with pytest.raises(ConfigError, match="multiple of 8"):
        build_config(tiny_values(tiny_sd, resolution=20), ctx)
    with pytest.raises(ConfigError, match="Choose a base model"):
        build_config(tiny_values(""), ctx)
    assert config_json(tiny_values(""), ctx).startswith("// Choose a base model")
    assert '"method": "lora"' in config_json(values, ctx)


def test_render_shows_progress_errors_and_images(tmp_path):
    assert "press Start" in render(None).status
    image = tmp_path / "step-000000.png"
    image.write_bytes(b"png")
    snap = Snapshot(job_id=1, name="ft", task="finetune", run_dir=str(tmp_path), status="running", phase="training",
                    step=5, total=10, losses=[(4, 0.5, 0.6), (5, 0.25, 0.55)], images_per_s=2.0, eta_s=125,
                    samples=[(0, str(image)), (4, str(tmp_path / "gone.png"))], warnings=["Random crop ..."])
    view = render(snap)
    assert "step 5/10" in view.status and "loss 0.5500" in view.status and "ETA 2m 05s" in view.status
    assert "Note: Random crop" in view.status and view.running and view.run_path == str(tmp_path)
    assert view.gallery == [(str(image), "step 0 (base model)")]  # a vanished file is not shown
    assert (5, 0.25, "loss") in view.losses and (5, 0.55, "smoothed") in view.losses
    failed = render(Snapshot(job_id=1, name="ft", task="finetune", run_dir="", status="failed",
                             error="Out of memory while fine-tuning. Try: ..."))
    assert "Error: Out of memory" in failed.status and not failed.running
    stopped = render(Snapshot(job_id=1, name="ft", task="finetune", run_dir="", status="stopped", result_path="/c"))
    assert "Resume latest" in stopped.status
    assert cli_command(tmp_path / "run") == f"python -m studio finetune --config {tmp_path}/run/config.json --resume latest"


def test_start_stop_resume_as_the_buttons_do(ctx, tiny_sd, workspace):
    message, run_path, command = start_finetune(ctx, tiny_values(tiny_sd, max_train_steps=40, validation_every=0,
                                                                 run_name="tabrun"))
    assert message.startswith("Started tabrun") and run_path == str(workspace / "tabrun")
    assert "--resume latest" in command
    # one job per device: a second start is refused by name and leaves no empty run folder
    with pytest.raises(JobError, match="tabrun"):
        start_finetune(ctx, tiny_values(tiny_sd, run_name="second"))
    assert not (workspace / "second").exists()
    deadline = time.time() + 60
    while ctx.jobs.latest("finetune").snapshot().step < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert "Stopping tabrun" in stop_finetune(ctx)
    snap = wait_until_done(ctx)
    assert snap.status == "stopped" and Path(snap.result_path).is_dir()
    stopped_at = snap.step
    message, _, _ = resume_latest(ctx)
    assert message.startswith("Resuming tabrun")
    snap = wait_until_done(ctx)
    assert snap.status == "finished", snap.error
    # the resumed job's curve is the whole run (history from events.jsonl), each step once
    steps = [p[0] for p in snap.losses]
    assert steps[0] == 1 and stopped_at + 1 in steps and steps == sorted(set(steps)) and snap.step == 40
    assert (workspace / "tabrun" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert stop_finetune(ctx) == "No fine-tune is running."


def test_resume_without_a_checkpoint_is_a_clear_error(ctx):
    with pytest.raises(CheckpointError, match="No fine-tune run with a checkpoint"):
        resume_latest(ctx)


# ----------------------------------------------------------------------------- launched app
@pytest.mark.integration
def test_finetune_through_gradio_client(launched_app, client, tiny_sd, workspace):
    app, _ = launched_app
    app.studio_context.dataset.set(DatasetChoice(DataConfig(max_rows=4), "4 emoji", 4, True))
    values = tiny_values(tiny_sd, run_name="api-run")
    status, run_path, command = client.predict(*[values[n] for n in INPUT_NAMES], api_name="/start_finetune")
    assert status.startswith("Started api-run") and run_path.endswith("api-run") and "python -m studio finetune" in command
    deadline = time.time() + 120
    while time.time() < deadline:
        status, plot, gallery, run_path = client.predict(api_name="/finetune_status")
        if "finished" in status.splitlines()[0] or "failed" in status:
            break
        time.sleep(0.5)
    assert "api-run: finished" in status and "Open it in Generate" in status, status
    assert len(gallery) == 3 and gallery[-1]["caption"] == "step 0 (base model)"
    assert all(Path(item["image"] if isinstance(item["image"], str) else item["image"]["path"]).is_file()
               for item in gallery)
    # a bad setting comes back as a message, not a traceback
    bad = tiny_values(tiny_sd, resolution=20)
    status, _, _ = client.predict(*[bad[n] for n in INPUT_NAMES], api_name="/start_finetune")
    assert status.startswith("Not started: Resolution must be a multiple of 8")
    # Open in Generate puts the run into the Generate tab's model box
    assert (workspace / "api-run" / "lora").is_dir()
