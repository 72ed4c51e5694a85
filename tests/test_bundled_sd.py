"""Offline from the first click: the bundled text-to-image model in Fine-tune and Generate.

Every test here works on ``bundled:emoji-sd`` (fixture ``bundled_sd``): the bundled emoji
SD itself when it is in assets/models, else a tiny SD registered in its place. Nothing is
downloaded (HF_HUB_OFFLINE=1, the app is launched with --offline settings).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from studio.config.data import DataConfig
from studio.config.generate import GenerateConfig
from studio.context import DatasetChoice, StudioContext
from studio.errors import ModelError
from studio.schedulers import DEFAULT_SCHEDULER
from tabs.finetune import default_values, resolution_for, start_finetune
from tiny_pipelines import bundled_sd, real_bundled_sd, tiny_sd_stand_in  # noqa: F401  (fixtures)


@pytest.fixture
def ctx(settings):
    context = StudioContext(settings)
    yield context
    context.jobs.stop_all()


def use_folder(ctx: StudioContext, folder: Path, count: int) -> None:
    """What the Dataset tab does when a person picks a local folder."""
    ctx.dataset.set(DatasetChoice(DataConfig(source="folder", path=str(folder)), folder.name, count, True))


def red_hearts(folder: Path, count: int = 10, size: int = 32) -> Path:
    """``count`` captioned images of a red heart on white: the person's own small dataset."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        r = size // 4 + i % 3
        c = size // 2
        draw.ellipse((c - 2 * r, c - r, c, c + r // 2), fill=(220, 20, 40))
        draw.ellipse((c, c - r, c + 2 * r, c + r // 2), fill=(220, 20, 40))
        draw.polygon([(c - 2 * r + 1, c), (c + 2 * r - 1, c), (c, c + 2 * r)], fill=(220, 20, 40))
        image.save(folder / f"heart-{i}.png")
        (folder / f"heart-{i}.txt").write_text("a red heart")
    return folder


def finish(ctx: StudioContext, timeout: float = 180.0):
    job = ctx.jobs.latest("finetune")
    assert job is not None and job.wait(timeout), "fine-tune did not end in time"
    return job.snapshot()


def quick(values: dict, **changes) -> dict:
    """A short run at the model's own size: a few steps, two-step validation."""
    values.update(max_train_steps=4, validation_every=2, num_inference_steps=2, checkpoint_every=0,
                  validation_prompts="a red heart", learning_rate=1e-3)
    values.update(changes)
    return values


# ----------------------------------------------------------------------------- Fine-tune
def test_start_offline_defaults_to_the_bundled_model_and_trains(ctx, bundled_sd, workspace, tmp_path):
    values = default_values()
    assert values["pretrained_model_name_or_path"] == bundled_sd
    assert values["resolution"] == resolution_for(bundled_sd) and values["resolution"] <= 64
    use_folder(ctx, red_hearts(tmp_path / "hearts"), 10)
    message, run_path, _ = start_finetune(ctx, quick(values, run_name="first-click"))
    assert message.startswith("Started first-click: lora on bundled:emoji-sd")
    snap = finish(ctx)
    assert snap.status == "finished", snap.error
    assert [step for step, _ in snap.samples] == [0, 2, 4]  # validation images as it trains
    assert (Path(run_path) / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_a_start_that_cannot_load_its_base_leaves_no_run_folder(ctx, bundled_sd, workspace):
    ctx.dataset.set(DatasetChoice(DataConfig(max_rows=4), "4 emoji", 4, True))
    with pytest.raises(ModelError, match="not in the Hugging Face cache and the studio is offline"):
        start_finetune(ctx, quick(default_values(), pretrained_model_name_or_path="someone/not-cached"))
    with pytest.raises(ModelError, match="not found"):
        start_finetune(ctx, quick(default_values(), pretrained_model_name_or_path=str(workspace / "nope")))
    assert list(workspace.iterdir()) == []
    # a base that resolves but is no SD pipeline fails in the job, and its folder goes too
    start_finetune(ctx, quick(default_values(), pretrained_model_name_or_path="bundled:emoji-ddpm",
                              run_name="ddpm-base"))
    snap = finish(ctx)
    assert snap.status == "failed" and "not a Stable Diffusion" in snap.error
    assert not (workspace / "ddpm-base").exists()
