"""Generation: config checks, seeds, metadata round trip, LoRA, preview, stop, saved files."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from studio.config.generate import GenerateConfig
from studio.errors import ConfigError, ModelError
from studio.generate import generate
from studio.model_names import NameLookup
from studio.pnginfo import config_updates, format_parameters, parse_parameters, read_png_parameters
from tiny_pipelines import bundled_sd, make_tiny_lora, tiny_ddpm, tiny_sd, tiny_sd_stand_in  # noqa: F401  (fixtures)


@pytest.fixture
def manager(workspace):
    from studio.models import PipelineManager

    return PipelineManager("cpu", workspace, offline=True)


def pixels(result, index=0):
    return np.asarray(result.images[index].image).astype(int)


@pytest.mark.parametrize("changes, message", [
    ({"width": 100}, "Width must be a multiple of 8"),
    ({"height": 4}, "Height must be a multiple of 8"),
    ({"width": 8192}, "between 8 and 4096"),
    ({"num_inference_steps": 0}, "Steps"),
    ({"guidance_scale": -1}, "Guidance"),
    ({"seed": -2}, "Seed"),
    ({"batch_size": 0}, "Batch size"),
    ({"batch_count": 1000}, "Batch count"),
    ({"scheduler": "Euler b"}, "Scheduler must be one of"),
    ({"lora_scale": 5}, "LoRA scale"),
])
def test_bad_settings_are_clear_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(**changes)


def test_config_json_round_trip(tmp_path):
    cfg = GenerateConfig(model="a/b", prompt="fox", width=64, height=32, seed=7, scheduler="DPM++ 2M Karras")
    path = tmp_path / "gen.json"
    cfg.to_json(path)
    assert GenerateConfig.from_json(path) == cfg
    with pytest.raises(ConfigError, match="Unknown setting"):
        GenerateConfig.from_dict({"promt": "typo"})


def test_same_seed_same_image_and_batches_reproduce_alone(manager, tiny_sd):
    cfg = GenerateConfig(model=str(tiny_sd), prompt="a red fox", num_inference_steps=2, seed=123,
                         scheduler="Euler a", width=16, height=24)
    first, again = generate(manager, cfg, save=False), generate(manager, cfg, save=False)
    assert first.seeds == [123] and (pixels(first) == pixels(again)).all()
    assert first.images[0].image.size == (16, 24)
    other = generate(manager, cfg.replace(seed=124), save=False)
    assert not (pixels(first) == pixels(other)).all()
    batch = generate(manager, cfg.replace(batch_size=2, batch_count=2), save=False)
    assert batch.seeds == [123, 124, 125, 126]
    assert (pixels(batch, 1) == pixels(other)).all()  # image 2 of the batch == seed 124 alone


def test_random_seed_is_reported_and_reusable(manager, tiny_ddpm):
    result = generate(manager, GenerateConfig(model=str(tiny_ddpm), num_inference_steps=2, seed=-1), save=False)
    again = generate(manager, GenerateConfig(model=str(tiny_ddpm), num_inference_steps=2, seed=result.seed),
                     save=False)
    assert 0 <= result.seed < 2**32 and (pixels(result) == pixels(again)).all()


def test_unconditional_default_matches_diffusers_pipeline(manager, tiny_ddpm):
    import torch

    result = generate(manager, GenerateConfig(model=str(tiny_ddpm), num_inference_steps=3, seed=9), save=False)
    pipe = manager.loaded.pipe
    expected = pipe(num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(9), output_type="np").images
    expected = (expected[0] * 255).round().astype(int)
    assert np.abs(pixels(result) - expected).max() <= 1


def test_images_are_saved_with_parameters_that_round_trip(manager, tiny_sd, workspace):
    cfg = GenerateConfig(model=str(tiny_sd), prompt="a cat, sitting\non a mat", negative_prompt="blurry, dark",
                         num_inference_steps=3, guidance_scale=5.5, seed=42, scheduler="DPM++ 2M Karras")
    result = generate(manager, cfg)
    path = result.images[0].path
    assert path.parent.parent == workspace / "outputs" and path.name.endswith("-42.png")
    text = read_png_parameters(path)
    assert text.splitlines()[-1].startswith("Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, "
                                            "Seed: 42, Size: 16x16, Model hash: ")
    assert str(tiny_sd) not in text  # a name, never a local path
    loaded = manager.loaded
    updates, notes = config_updates(parse_parameters(text),
                                    NameLookup(workspace, (loaded.reference, loaded.png())))
    assert notes == []
    rebuilt = GenerateConfig().replace(**updates)
    assert rebuilt.replace(width=0, height=0) == cfg
    assert (rebuilt.width, rebuilt.height) == (16, 16)
    # and the rebuilt settings make the same picture
    assert (pixels(generate(manager, rebuilt, save=False)) == pixels(result)).all()


def test_reads_automatic1111_parameters():
    text = ("masterpiece, 1girl\nNegative prompt: lowres, bad hands\n"
            'Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3216, Size: 512x768, '
            'Model hash: 9f5b5e2c, Model: anything-v5, Lora hashes: "detail: 1a2b, x: 3c", Version: v1.10.1')
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "masterpiece, 1girl" and parsed["negative_prompt"] == "lowres, bad hands"
    assert parsed["Lora hashes"] == "detail: 1a2b, x: 3c"
    updates, _ = config_updates(parsed)
    assert updates["scheduler"] == "DPM++ 2M Karras" and updates["seed"] == 3216
    assert (updates["width"], updates["height"], updates["num_inference_steps"]) == (512, 768, 28)
    odd, notes = config_updates(parse_parameters("x\nSteps: 5, Sampler: Restart, Seed: 1"))
    assert odd["scheduler"] == "Default (model's own)" and "Restart" in notes[0]
    with pytest.raises(ConfigError, match="no generation parameters"):
        parse_parameters("just a caption")
    assert format_parameters("", "", {"Steps": 2, "Model": 'a, "b"'}).endswith('Model: "a, \\"b\\""')


def test_png_without_parameters_is_explained(tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(ConfigError, match="carries no generation parameters"):
        read_png_parameters(path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="not an image"):
        read_png_parameters(junk)


def test_lora_changes_the_output_and_scale_zero_restores_it(manager, tiny_sd, tmp_path):
    lora = make_tiny_lora(tiny_sd, tmp_path / "lora")
    cfg = GenerateConfig(model=str(tiny_sd), prompt="a cat", num_inference_steps=2, seed=5)
    base = pixels(generate(manager, cfg, save=False))
    full = generate(manager, cfg.replace(lora=str(lora), lora_scale=1.0))
    half = pixels(generate(manager, cfg.replace(lora=str(tmp_path / "lora"), lora_scale=0.5), save=False))
    off = pixels(generate(manager, cfg.replace(lora=str(lora), lora_scale=0.0), save=False))
    after = pixels(generate(manager, cfg, save=False))
    assert np.abs(pixels(full) - base).max() > 0 and np.abs(half - base).max() > 0
    assert (off == base).all() and (after == base).all()
    assert manager.loaded.adapters == {}  # the LoRA no longer chosen was unloaded
    # Switching from one LoRA to another leaves nothing of the first behind.
    other = make_tiny_lora(tiny_sd, tmp_path / "other", seed=1)
    generate(manager, cfg.replace(lora=str(lora)), save=False)
    switched = pixels(generate(manager, cfg.replace(lora=str(other)), save=False))
    assert len(manager.loaded.adapters) == 1
    manager.unload()
    fresh = pixels(generate(manager, cfg.replace(lora=str(other)), save=False))
    assert (switched == fresh).all() and np.abs(fresh - pixels(full)).max() > 0
    text = read_png_parameters(full.images[0].path)
    assert "<lora:pytorch_lora_weights:1>" in text and str(lora) not in text
    # the studio's older PNGs ("Lora: <path>, Lora scale: x") still read back
    old = config_updates(parse_parameters(f"a cat\nSteps: 2, Seed: 5, Lora: {lora}, Lora scale: 0.5"))[0]
    assert (old["lora"], old["lora_scale"]) == (str(lora), 0.5)


def test_lora_errors(manager, tiny_ddpm, tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="takes no LoRA"):
        generate(manager, GenerateConfig(model=str(tiny_ddpm), lora=str(tmp_path)), save=False)
    with pytest.raises(ModelError, match="LoRA not found"):
        generate(manager, GenerateConfig(model=str(tiny_sd), lora=str(tmp_path / "missing.safetensors")),
                 save=False)
    (tmp_path / "old.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="Refused to load old.bin"):
        generate(manager, GenerateConfig(model=str(tiny_sd), lora=str(tmp_path / "old.bin")), save=False)


def test_live_preview_of_a_small_vae_is_the_vae_decode_of_the_latents(manager, bundled_sd):  # noqa: F811
    """The SD latent -> RGB map is wrong for a VAE of its own (the bundled emoji SD's gave blue/pink
    previews of red hearts): a small VAE decodes the preview exactly, so the last preview is the image."""
    seen = []
    result = generate(manager, GenerateConfig(model=bundled_sd, prompt="yellow smiling face", num_inference_steps=4,
                                              seed=3), on_progress=seen.append, save=False, preview_every=1)
    last = [p.preview for p in seen if p.preview is not None][-1]
    image = np.asarray(result.images[0].image.convert("RGB"), dtype=np.float32)
    assert last.size == result.images[0].image.size
    assert np.abs(np.asarray(last, dtype=np.float32) - image).mean() < 2.0


def test_no_model_is_explained(manager):
    with pytest.raises(ModelError, match="No model is loaded"):
        generate(manager, GenerateConfig(prompt="x"), save=False)


@pytest.mark.parametrize("which", ["sd", "ddpm"])
def test_progress_previews_and_stop(manager, tiny_sd, tiny_ddpm, which):
    model = str(tiny_sd if which == "sd" else tiny_ddpm)
    seen = []
    result = generate(manager, GenerateConfig(model=model, prompt="x", num_inference_steps=4, batch_count=2, seed=1),
                      on_progress=seen.append, save=False, preview_every=2)
    steps = [p.step for p in seen if p.message.split(", ")[-1].startswith("step")]
    total = seen[-1].total_steps  # PNDM (the tiny SD default) makes 5 passes of 4 steps, DDPM 4
    assert total == (10 if which == "sd" else 8)
    assert steps == list(range(1, total + 1)) and seen[-1].fraction == 1.0
    previews = [p.preview for p in seen if p.preview is not None]
    assert len(previews) >= 4 and previews[0].mode == "RGB"
    assert len(seen[-1].images) == 2 and not result.stopped

    stop = threading.Event()

    def stop_at_step_two(progress):
        if progress.step == 2:
            stop.set()

    stopped = generate(manager, GenerateConfig(model=model, prompt="x", num_inference_steps=4, batch_count=3, seed=1),
                       on_progress=stop_at_step_two, stop=stop, save=False)
    assert stopped.stopped and stopped.images == [] and "Stopped" in stopped.summary


def test_unconditional_ignores_prompt_and_guidance_in_metadata(manager, tiny_ddpm):
    result = generate(manager, GenerateConfig(model=str(tiny_ddpm), prompt="ignored", num_inference_steps=2, seed=3))
    text = read_png_parameters(result.images[0].path)
    assert text.startswith("\nSteps: 2") and "CFG scale" not in text and "Size: 8x8" in text
    assert Path(result.images[0].path).is_file()


def test_headless_generate_from_a_config_file(tiny_sd, tmp_path, capsys):
    cli = pytest.importorskip("studio.cli")
    config = tmp_path / "gen.json"
    GenerateConfig(model=str(tiny_sd), prompt="a cat", num_inference_steps=2, seed=8, batch_size=2,
                   scheduler="Euler a", device="cpu").to_json(config)
    workspace = tmp_path / "ws"
    assert cli.main(["generate", "--config", str(config), "--workspace", str(workspace), "--quiet"]) == 0
    saved = sorted((workspace / "outputs").rglob("*.png"))
    assert [p.name.split("-")[1] for p in saved] == ["8.png", "9.png"]
    assert "Sampler: Euler a" in read_png_parameters(saved[0])
    assert "finished: 2 images" in capsys.readouterr().out
    no_model = tmp_path / "none.json"
    GenerateConfig(prompt="x").to_json(no_model)
    assert cli.main(["generate", "--config", str(no_model), "--workspace", str(workspace)]) == 2
    assert "names no model" in capsys.readouterr().err


def test_run_cli_reports_each_image(tiny_ddpm, tmp_path):
    from studio.generate import run_cli

    events = []
    folder = run_cli(GenerateConfig(model=str(tiny_ddpm), num_inference_steps=2, seed=1, batch_count=2,
                                    workspace=str(tmp_path), device="cpu"), events.append, threading.Event())
    kinds = [e.kind for e in events]
    assert kinds == ["status", "samples", "samples", "finished"]
    assert all(Path(e.path).parent == folder for e in events if e.kind == "samples")


def test_a_scheduler_that_fails_with_the_pipeline_is_named(manager, tiny_sd, monkeypatch):
    import diffusers

    def refuse(self, *args, **kwargs):
        raise ValueError("The current scheduler class does not support custom sigmas schedules.")

    monkeypatch.setattr(diffusers.UniPCMultistepScheduler, "set_timesteps", refuse)
    with pytest.raises(ConfigError, match="The UniPC scheduler failed with .*custom sigmas.*Pick another"):
        generate(manager, GenerateConfig(model=str(tiny_sd), scheduler="UniPC", num_inference_steps=2), save=False)
    assert generate(manager, GenerateConfig(model=str(tiny_sd), num_inference_steps=2), save=False).images


def test_other_unconditional_pipelines_are_called_as_diffusers_defines_them(manager, tiny_ddpm, tmp_path):
    import torch
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    vqvae = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16),
                    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, layers_per_block=1)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "ldm")
    cfg = GenerateConfig(model=str(tmp_path / "ldm"), num_inference_steps=2, seed=3, batch_size=2)
    result = generate(manager, cfg, save=False)
    assert manager.loaded.kind == "unconditional" and result.seeds == [3, 4]
    assert manager.loaded.size == (8, 8)
    assert result.images[0].image.size == (8, 8)  # decoded by the VQ-VAE, not raw latents
    again = generate(manager, cfg.replace(batch_size=1, seed=4), save=False)
    assert (pixels(again) == pixels(result, 1)).all()
