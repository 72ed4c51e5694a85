"""The Train tab: its pure functions with plain values, and the launched app through gradio_client."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from studio.config.data import DataConfig
from studio.config.train import TrainConfig
from studio.context import DatasetChoice, StudioContext
from studio.errors import CheckpointError, ConfigError, JobError
from studio.jobs import Snapshot
from studio.settings import LaunchSettings
from studio.unet_presets import PRESETS
from tabs import train as tab

#: A tiny run: (8, 16) UNet with attention at level 2, 8 px, a grid of 4 in 2 DDIM steps every 2 steps.
TINY = dict(resolution=8, train_batch_size=4, max_train_steps=100_000, learning_rate=1e-3, lr_warmup_steps=0,
            block_out_channels="8, 16", layers_per_block=1, attention_levels="2", sample_every=2, num_samples=4,
            sample_inference_steps=2, save_every=0)


def tiny_values(**changes):
    values = tab.default_values()
    values.update(TINY)
    values.update(changes)
    return values


@pytest.fixture
def ctx(train_ctx):
    return train_ctx


def wait_for(job, predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = job.snapshot()
        if predicate(snap):
            return snap
        assert job.running or predicate(job.snapshot()), job.snapshot()
        time.sleep(0.1)
    raise AssertionError(f"timed out: {job.snapshot()}")


def test_default_values_build_the_default_config(ctx):
    cfg = tab.build_config(tab.default_values(), ctx)
    assert cfg == TrainConfig(workspace=str(ctx.workspace), device="cpu", data=ctx.dataset.get().config)
    assert set(tab.INPUT_NAMES) == set(tab.default_values())


def test_a_fresh_studio_trains_the_smileys_for_3000_steps_and_says_so_once():
    """The default run: the emoji set's smileys (the set a CPU learns in minutes), 3,000 steps; the
    dataset line names the count once (the starting summary already says "169 images")."""
    from types import SimpleNamespace

    from studio.context import DatasetSelection

    fresh = SimpleNamespace(dataset=DatasetSelection())
    assert fresh.dataset.get().config == DataConfig.starting() == TrainConfig().data
    assert (TrainConfig().data.category, TrainConfig().max_train_steps) == ("smileys & emotion", 3000)
    line = tab.dataset_line(fresh)
    assert line.count("169 images") == 1 and "smileys & emotion" in line
    fresh.dataset.set(DatasetChoice(DataConfig(max_rows=8), "emoji (first 8)", 8, True))
    assert tab.dataset_line(fresh) == "**Dataset:** emoji (first 8) (8 images). Change it in the Dataset tab."


def test_each_preset_fills_the_architecture_widgets():
    for name, preset in PRESETS.items():
        values = tab.default_values()
        values.update(tab.preset_values(name), preset=name, resolution=preset.resolution)
        cfg = tab.build_config(values)
        assert cfg.preset == name and cfg.block_out_channels == preset.block_out_channels


def test_architecture_widgets_name_their_preset():
    for name in PRESETS:
        assert tab.architecture_preset(tab.preset_values(name)) == name
    assert tab.architecture_preset({"block_out_channels": "8, 16", "layers_per_block": 1,
                                    "attention_levels": "2"}) == "custom"
    assert tab.architecture_preset({"block_out_channels": "x"}) == "custom"


def test_architecture_text_becomes_block_types():
    cfg = tab.build_config(tiny_values(block_out_channels="16, 32, 32", attention_levels="1, 3", resolution=16))
    assert cfg.down_block_types == ("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    assert cfg.up_block_types == ("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D")
    assert cfg.preset == "custom"


@pytest.mark.parametrize("changes, message", [
    ({"attention_levels": "3"}, "Attention level 3 does not exist"),
    ({"block_out_channels": "8, sixteen"}, "block_out_channels must be whole numbers"),
    ({"train_batch_size": 2.5}, "Batch size must be a whole number"),
    ({"learning_rate": None}, "Learning rate needs a number"),
    ({"mixed_precision": "fp16"}, "fp16 mixed precision needs a GPU"),
])
def test_bad_widget_values_are_clear_errors(ctx, changes, message):
    with pytest.raises(ConfigError, match=message):
        tab.build_config(tiny_values(**changes), ctx)


def test_model_summary_shows_parameters_and_memory():
    text = tab.model_summary(tab.default_values())
    assert "tiny (CPU demo)" in text and "1.11 M parameters" in text and "Memory plan" in text and "fits" in text
    assert tab.model_summary(tiny_values(attention_levels="9")).startswith("⚠️ Attention level 9")


def test_render_and_loss_frame():
    assert "No training yet" in tab.render(None).status
    snap = Snapshot(job_id=1, name="r", task="train", run_dir="/nowhere", step=5, total=10,
                    losses=[(4, 0.5, 0.6), (5, 0.4, 0.55)], lr=1e-4, images_per_s=12.5, eta_s=75.0,
                    warnings=["fell back"])
    view = tab.render(snap)
    assert view.progress == ("step 5/10 (50%) · loss 0.4500 (raw, mean of last 2 steps; smoothed 0.5500) · "
                             "lr 1.00e-04 · 12.5 img/s · ETA 1m 15s")
    assert "Warning: fell back" in view.status and view.running
    assert sorted(set(curve for _, _, curve in view.losses)) == ["raw loss", "smoothed (EMA)"]
    frame = tab.loss_frame(view.losses, log_scale=True)
    assert list(frame.columns) == ["step", "loss", "curve"] and frame["loss"].iloc[0] == pytest.approx(-0.30103, 1e-4)
    assert tab.loss_frame([]) is None  # an empty frame would fix the plot's field types as text
    failed = Snapshot(job_id=1, name="r", task="train", run_dir="/nowhere", status="failed", error="loss became nan")
    assert "Error: loss became nan" in tab.render(failed).status


def test_cli_command_names_the_run_config(tmp_path):
    assert "python -m studio train --config train.json" in tab.cli_command()
    assert tab.cli_command(str(tmp_path)).startswith(f"python -m studio train --config {tmp_path}/config.json "
                                                     "--resume latest")


def test_start_refuse_stop_resume_through_the_pure_functions(ctx):
    message, folder, command = tab.start_training(ctx, tiny_values(run_name="first"))
    assert message.startswith("Started first") and command.startswith("python -m studio train")
    job = ctx.jobs.latest("train")
    wait_for(job, lambda s: s.step >= 1)
    with pytest.raises(JobError, match="already running on cpu: 'first'"):
        tab.start_training(ctx, tiny_values(run_name="second"))
    assert not (ctx.workspace / "second").exists()  # the refused run left no folder behind
    assert "Stopping first" in tab.stop_training(ctx)
    snap = wait_for(job, lambda s: s.status == "stopped")
    assert Path(snap.result_path, "COMPLETE.json").is_file()
    message, _, _ = tab.resume_latest(ctx, max_train_steps=snap.step + 2)
    assert message.startswith("Resuming first")
    resumed = ctx.jobs.latest("train")
    final = wait_for(resumed, lambda s: s.status == "finished")
    assert final.step == snap.step + 2 and tab.render(final).model_path.endswith("first/model")


def test_fp16_on_an_auto_device_that_is_a_cpu_is_refused_before_any_folder(workspace):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    auto = StudioContext(LaunchSettings(workspace=workspace, device="auto"))
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a GPU"):
        tab.start_training(auto, tiny_values(run_name="half", mixed_precision="fp16"))
    assert not (workspace / "half").exists()


def test_resume_without_a_checkpoint_is_an_error(ctx):
    with pytest.raises(CheckpointError, match="No training run with a checkpoint"):
        tab.resume_latest(ctx)


@pytest.mark.integration
def test_train_tab_end_to_end_through_gradio_client(launched_app, client):
    app, _ = launched_app
    app.studio_context.dataset.set(DatasetChoice(DataConfig(source="emoji", max_rows=8), "emoji (first 8)", 8, True))
    values = tiny_values(run_name="client")
    status, folder, command, *_ = client.predict(*[values[n] for n in tab.INPUT_NAMES], api_name="/start_training")
    assert status.startswith("Started client"), status
    assert folder.endswith("client") and "--resume latest" in command
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, progress, plot, quality, sample, gallery, run_folder, model = client.predict(
            False, "client", api_name="/train_status")
        rows = plot.get("data", []) if isinstance(plot, dict) else []
        curves = {row[-1] for row in quality.get("data", [])} if isinstance(quality, dict) else set()
        if sample and len(rows) >= 4 and "samples" in curves:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"no loss points, sample and quality: {status} {progress} {plot} {quality}")
    assert curves == {"samples", "noise level", "data level"}  # the grid's figure beside both reference lines
    assert progress.startswith("step ") and "loss" in progress
    assert Path(sample).is_file() and run_folder.endswith("client")
    assert "Stopping client" in client.predict(api_name="/stop_training")
    deadline = time.monotonic() + 60
    while "stopped" not in status and time.monotonic() < deadline:
        time.sleep(0.3)
        status, *_ = client.predict(False, "client", api_name="/train_status")
    assert "client: stopped" in status and "Checkpoint saved" in status
    *_, model = client.predict(False, "client", api_name="/train_status")
    assert model.endswith("client/model") and Path(model, "model_index.json").is_file()
    opened = client.predict(model, api_name="/train_open_in_generate")
    assert model in str(opened)  # the Generate tab's model box now holds the run's model
    # a second start while nothing runs is fine; while running it is refused with the job's name
    refused = None
    status, *_ = client.predict(*[tiny_values(run_name="again")[n] for n in tab.INPUT_NAMES],
                                api_name="/start_training")
    assert status.startswith("Started again")
    refused, *_ = client.predict(*[tiny_values(run_name="third")[n] for n in tab.INPUT_NAMES],
                                 api_name="/start_training")
    assert "already running" in refused and "'again'" in refused
    client.predict(api_name="/stop_training")
