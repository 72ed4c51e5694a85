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


def test_the_cli_starts_offline_on_the_bundled_model_and_keeps_no_failed_start(bundled_sd, workspace, tmp_path,
                                                                                capsys):
    import json

    from studio.cli import main

    config = tmp_path / "finetune.json"
    settings = dict(task="finetune", pretrained_model_name_or_path="bundled:emoji-ddpm", workspace=str(workspace),
                    data={"max_rows": 2}, resolution=resolution_for(bundled_sd), max_train_steps=2,
                    validation_every=0, num_inference_steps=2, device="cpu")
    config.write_text(json.dumps(settings))
    assert main(["finetune", "--config", str(config)]) == 2
    assert "not a Stable Diffusion" in capsys.readouterr().err
    assert list(workspace.iterdir()) == []  # the failed start left no finetune-<time> folder
    config.write_text(json.dumps(dict(settings, pretrained_model_name_or_path=bundled_sd, run_name="cli")))
    assert main(["finetune", "--config", str(config)]) == 0
    assert (workspace / "cli" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_dreambooth_with_a_rare_token_runs(ctx, bundled_sd, tmp_path):
    folder = red_hearts(tmp_path / "subject", count=4)
    for caption in folder.glob("*.txt"):
        caption.unlink()  # DreamBooth images need no captions: the instance prompt names them
    use_folder(ctx, folder, 4)
    values = quick(default_values(), method="dreambooth-lora", instance_prompt="a sks heart",
                   class_prompt="a heart", with_prior_preservation=True, num_class_images=2,
                   validation_prompts="", run_name="sks")
    start_finetune(ctx, values)
    snap = finish(ctx)
    assert snap.status == "finished", snap.error
    first, last = (np.asarray(_image(path)) for path in (snap.samples[0][1], snap.samples[-1][1]))
    assert np.abs(first.astype(int) - last).max() > 0  # the instance prompt's image changed with training
    card = (Path(snap.run_dir) / "lora" / "README.md").read_text()
    assert "instance_prompt: a sks heart" in card and "of emoji-sd" in card  # studio.model_cards


def _image(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


# ----------------------------------------------------------------------------- Generate
@pytest.mark.parametrize("which", ["sd", "ddpm"])
def test_generate_loads_a_bundled_model_fast_and_every_scheduler_runs(ctx, bundled_sd, which):
    from studio.generate import generate

    reference = bundled_sd if which == "sd" else "bundled:emoji-ddpm"
    manager = ctx.pipelines
    manager.load("bundled:emoji-ddpm" if which == "sd" else bundled_sd)  # the first load also pays for imports
    loaded = manager.load(reference)
    # well under a second on an idle core; the bound leaves room for a machine shared with other jobs
    assert loaded.load_seconds < 3.0, loaded.load_seconds
    assert loaded.kind == ("sd" if which == "sd" else "unconditional")
    names = manager.scheduler_names()
    assert names[0] == DEFAULT_SCHEDULER and {"Euler a", "DPM++ 2M Karras", "UniPC", "DDIM"} <= set(names)
    pictures = set()
    for name in names:
        result = generate(manager, GenerateConfig(model=reference, prompt="red heart", num_inference_steps=2,
                                                  seed=1, scheduler=name), save=False)
        image = np.asarray(result.images[0].image)
        assert image.shape == (*loaded.size[::-1], 3) and np.isfinite(image).all(), name
        pictures.add(image.tobytes())
    assert len(pictures) > len(names) // 2  # the samplers really differ


def test_a_fine_tuned_lora_loads_in_generate_with_a_scale_and_round_trips(ctx, bundled_sd, workspace, tmp_path):
    from studio.generate import generate
    from studio.pnginfo import config_updates, parse_parameters, read_png_parameters

    hearts = red_hearts(tmp_path / "hearts")
    use_folder(ctx, hearts, 10)
    steps = 40 if real_bundled_sd() else 4
    start_finetune(ctx, quick(default_values(), max_train_steps=steps, validation_every=0, run_name="hearts"))
    snap = finish(ctx)
    assert snap.status == "finished", snap.error
    cfg = GenerateConfig(model=bundled_sd, prompt="a red heart", num_inference_steps=8, seed=7, lora="hearts",
                         scheduler="DPM++ 2M")
    manager = ctx.pipelines
    base = generate(manager, cfg.replace(lora_scale=0.0), save=False)
    tuned = generate(manager, cfg.replace(lora_scale=1.0))
    half = generate(manager, cfg.replace(lora_scale=0.5), save=False)
    plain = generate(manager, cfg.replace(lora=""), save=False)
    pix = [np.asarray(r.images[0].image).astype(int) for r in (base, tuned, half, plain)]
    assert (pix[0] == pix[3]).all()  # scale 0 is the bundled model itself
    assert np.abs(pix[1] - pix[0]).mean() > np.abs(pix[2] - pix[0]).mean() > 0  # the scale scales the change
    if real_bundled_sd():  # a trained model: the LoRA pulls its hearts toward the person's hearts
        target = np.stack([np.asarray(_image(str(p))).astype(int) for p in sorted(hearts.glob("*.png"))]).mean(0)
        assert np.abs(pix[1] - target).mean() < np.abs(pix[0] - target).mean()
    # the PNG's parameters name the bundled model and the LoRA, and remake the same picture
    from studio.model_names import NameLookup

    text = read_png_parameters(tuned.images[0].path)
    assert "Model: emoji-sd" in text and "<lora:hearts-kohya:1>" in text  # A1111's names (studio.model_names)
    updates, notes = config_updates(parse_parameters(text), NameLookup(workspace))
    assert notes == [] and updates["model"] == bundled_sd and Path(updates["lora"]).name == "hearts"
    again = generate(manager, GenerateConfig().replace(**updates), save=False)
    assert (np.asarray(again.images[0].image).astype(int) == pix[1]).all()
    # "Open in Generate": the run itself as the model is the bundled model with its LoRA at 1.0
    loaded = manager.load(str(workspace / "hearts"))
    assert loaded.ref.kind == "lora-run" and loaded.label == "run hearts (LoRA on emoji-sd (bundled))"
    opened = generate(manager, cfg.replace(model=str(workspace / "hearts"), lora=""), save=False)
    assert (np.asarray(opened.images[0].image).astype(int) == pix[1]).all()


def test_switching_models_frees_the_last_one_without_a_full_collection_unless_a_cycle_holds_it(
        ctx, bundled_sd, monkeypatch):
    import gc
    import weakref

    manager = ctx.pipelines
    collections = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or real_collect(*a))
    unet = weakref.ref(manager.load(bundled_sd).pipe.unet)
    manager.load("bundled:emoji-ddpm")
    assert unet() is None and collections == []  # freed by its last reference going: no 0.5 s gc pass
    pipe = manager.load(bundled_sd).pipe
    pipe.unet.owner = pipe  # a reference cycle (as hooks or adapters can make)
    unet = weakref.ref(pipe.unet)
    del pipe
    manager.load("bundled:emoji-ddpm")
    assert unet() is None and len(collections) == 1  # the cycle was collected before the next model loaded


def test_online_a_hub_id_is_first_class_and_then_listed_as_cached(settings, local_hub, bundled_sd, tiny_sd_stand_in,
                                                                    workspace, tmp_path):
    from dataclasses import replace

    from hub_server import files_of

    from studio.base_models import finetune_base_choices, native_resolution

    ctx = StudioContext(replace(settings, offline=False))
    try:
        use_folder(ctx, red_hearts(tmp_path / "hearts", count=2, size=16), 2)
        with pytest.raises(ModelError, match="not found on the Hugging Face Hub"):
            start_finetune(ctx, quick(default_values(), pretrained_model_name_or_path="acme/missing"))
        assert list(workspace.iterdir()) == []
        local_hub.add_repo("acme/small-sd", files_of(tiny_sd_stand_in))
        values = quick(default_values(), pretrained_model_name_or_path="acme/small-sd", resolution=16,
                       max_train_steps=2, run_name="from-hub")
        start_finetune(ctx, values)  # downloads the base, then trains
        snap = finish(ctx)
        assert snap.status == "finished", snap.error
        assert ("acme/small-sd (cached)", "acme/small-sd") in finetune_base_choices(workspace)
        assert native_resolution("acme/small-sd") == 16  # read from the cached configs
    finally:
        import shutil

        from huggingface_hub import constants

        ctx.jobs.stop_all()
        shutil.rmtree(Path(constants.HF_HUB_CACHE) / "models--acme--small-sd", ignore_errors=True)
