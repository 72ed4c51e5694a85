"""The bundled emoji DDPM and starting a Train run from pretrained weights (``init_from``)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.bundled import BUNDLED_MODELS, bundled_models, find_bundled
from studio.config.data import DataConfig
from studio.config.train import TrainConfig
from studio.errors import ConfigError
from studio.unet_presets import unet_kwargs

EMOJI = BUNDLED_MODELS["emoji-ddpm"]
DOWN, UP = ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")


def make_pretrained(folder: Path, resolution: int = 8, prediction_type: str = "epsilon", seed: int = 1) -> Path:
    """A tiny (8, 16) DDPMPipeline saved as safetensors, as a finished studio run would export it."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**unet_kwargs(resolution, (8, 16), 1, DOWN, UP, 8))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(prediction_type=prediction_type, beta_schedule="linear")
                 ).save_pretrained(folder, safe_serialization=True)
    return folder


def config(workspace: Path, **changes) -> TrainConfig:
    values = dict(data=DataConfig(source="emoji", max_rows=8), workspace=str(workspace), resolution=8,
                  train_batch_size=4, max_train_steps=2, learning_rate=1e-3, lr_scheduler="constant",
                  lr_warmup_steps=0, num_samples=1, sample_inference_steps=1, sample_every=0, save_every=0,
                  device="cpu", seed=0)
    values.update(changes)
    return TrainConfig(**values)


def test_the_bundled_model_loads_with_plain_diffusers_and_samples():
    from diffusers import DDPMPipeline

    assert EMOJI.available, f"{EMOJI.path} must hold the bundled pipeline"
    pipe = DDPMPipeline.from_pretrained(str(EMOJI.path))
    assert pipe.unet.config.sample_size == 32
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 32, 32, 3) and float(images.std()) > 0
    weights = sum(p.stat().st_size for p in EMOJI.path.rglob("*") if p.is_file())
    assert weights <= 25 * 1024 ** 2 and not list(EMOJI.path.rglob("*.bin"))
    card = (EMOJI.path / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "license: cc-by-4.0" in card and "library_name: diffusers" in card


def test_the_bundled_model_draws_emoji_faces():
    """Most fixed-seed samples are yellow discs on white (the first model drew colour mixtures: 2 of 8)."""
    from diffusers import DDIMScheduler, DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(EMOJI.path))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=8, num_inference_steps=25, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    yellow_centre = ((r > 0.75) & (g > 0.55) & (b < 0.45))[:, 8:24, 8:24].mean(axis=(1, 2))
    white = (r > 0.85) & (g > 0.85) & (b > 0.85)
    white_corners = np.concatenate([white[:, :4, :4], white[:, :4, -4:], white[:, -4:, :4], white[:, -4:, -4:]],
                                   axis=1).mean(axis=(1, 2))
    faces = (yellow_centre > 0.3) & (white_corners > 0.8)
    assert faces.sum() >= 4, (yellow_centre.round(2), white_corners.round(2))


def test_generate_lists_bundled_models_first_and_resolves_them_offline(workspace):
    from studio.model_refs import model_choices, resolve_reference

    choices = model_choices(workspace)
    assert [value for _, value in choices[:2]] == ["bundled:emoji-sd", "bundled:emoji-ddpm"]  # the table's order
    assert all("emoji" in label for label, _ in choices[:2])
    ref = resolve_reference("bundled:emoji-ddpm", workspace, offline=True)
    assert ref.kind == "folder" and Path(ref.location) == EMOJI.path
    assert resolve_reference("emoji-ddpm", workspace, offline=True).location == str(EMOJI.path)
    assert find_bundled("bundled:nope") is None and [m.name for m in bundled_models("ddpm")][0] == "emoji-ddpm"


def test_init_from_takes_the_architecture_and_schedule_from_the_model(workspace):
    make_pretrained(Path(workspace) / "pre", prediction_type="epsilon")
    cfg = config(workspace, init_from="pre", prediction_type="v_prediction", attention_head_dim=32)
    assert cfg.block_out_channels == (8, 16) and cfg.down_block_types == DOWN and cfg.attention_head_dim == 8
    assert cfg.prediction_type == "epsilon" and cfg.preset == "custom"
    with pytest.raises(ConfigError, match="trained at 8 px but this run is set to 16 px"):
        config(workspace, init_from="pre", resolution=16)
    bundled = TrainConfig(init_from="bundled:emoji-ddpm", workspace=str(workspace))
    assert bundled.resolution == 32 and bundled.block_out_channels == (32, 64, 64)


def test_init_from_is_confined_and_refuses_pickles(workspace, tmp_path):
    outside = make_pretrained(tmp_path / "outside")
    with pytest.raises(ConfigError, match="outside the workspace"):
        config(workspace, init_from=str(outside))
    pickled = make_pretrained(Path(workspace) / "pickled")
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ConfigError, match="only pickle weights"):
        config(workspace, init_from="pickled")
    with pytest.raises(ConfigError, match="not found"):
        config(workspace, init_from="no-such-run")
    with pytest.raises(ConfigError, match="No bundled model named 'nope'"):
        config(workspace, init_from="bundled:nope")


def test_training_starts_from_the_pretrained_weights_and_fine_tunes(workspace):
    from safetensors.torch import load_file

    from studio.checkpoints import list_checkpoints
    from studio.trainers.ddpm import train

    pre = make_pretrained(Path(workspace) / "pre")
    pretrained = load_file(str(pre / "unet" / "diffusion_pytorch_model.safetensors"))

    stop = threading.Event()  # stop before the first step: the step-0 checkpoint holds the starting weights

    def events(event):
        if event.kind == "status" and event.message == "training":
            stop.set()

    run = train(config(workspace, init_from="pre", run_name="start"), events, stop)
    start = load_file(str(list_checkpoints(run.checkpoints_dir)[-1].path / "unet.safetensors"))
    assert start.keys() == pretrained.keys()
    assert all(torch.equal(start[k], pretrained[k]) for k in pretrained)

    run = train(config(workspace, init_from="pre", run_name="tuned"))
    tuned = load_file(str(run.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    changed = [k for k in pretrained if not torch.equal(tuned[k], pretrained[k])]
    assert changed and all(torch.allclose(tuned[k], pretrained[k], atol=0.05) for k in pretrained)
    assert run.read_config()["init_from"] == "pre"


def test_init_from_a_finished_run_by_name_and_the_train_tab_offers_it(workspace):
    from studio.pretrained import init_from_choices
    from studio.trainers.ddpm import train

    make_pretrained(Path(workspace) / "pre")
    train(config(workspace, init_from="pre", run_name="first", max_train_steps=1))
    cfg = config(workspace, init_from="first")
    assert cfg.block_out_channels == (8, 16)
    values = [value for _, value in init_from_choices(workspace)]
    assert values[:2] == ["", "bundled:emoji-ddpm"] and "first" in values


# ----------------------------------------------------------------------------- the pretrained model's noise schedule
def rewrite_scheduler(folder: Path, **changes) -> None:
    """Edit the pretrained model's scheduler_config.json (a value None removes the key, as older diffusers wrote)."""
    import json

    path = folder / "scheduler" / "scheduler_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data), encoding="utf-8")


def test_a_run_keeps_the_pretrained_models_whole_noise_schedule_and_says_so(workspace):
    """Timesteps, beta schedule, beta_start/end and the target all come from the model (its weights mean
    something only there); today's trainer left beta_start/end at diffusers' defaults."""
    import json

    from studio.trainers.ddpm import train

    pre = make_pretrained(Path(workspace) / "pre", prediction_type="epsilon")
    rewrite_scheduler(pre, num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.00085,
                      beta_end=0.012)
    schedule = {"num_train_timesteps": 500, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    cfg = config(workspace, init_from="pre", run_name="kept", prediction_type="v_prediction",
                 beta_schedule="linear", num_train_timesteps=1000)
    events = []
    run = train(cfg, events.append)
    assert events[-1].kind == "finished"
    exported = json.loads((run.model_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    assert {k: exported[k] for k in schedule} == schedule  # trained (and sampled) on the model's schedule
    said = [e.message for e in events if e.kind == "status" and e.message.startswith("starting from")]
    assert said == ["starting from the weights of pre and its noise schedule (500 timesteps, scaled_linear betas "
                    "0.00085 to 0.012, epsilon target)"]
    assert cfg.noise_schedule() == schedule
    assert run.read_config()["beta_end"] == 0.012  # config.json records it: a resume trains on the same schedule


def test_an_older_scheduler_config_means_diffusers_defaults_not_the_presets(workspace):
    """A scheduler_config.json without prediction_type/betas (older diffusers) is read as diffusers reads it
    (epsilon, 0.0001 to 0.02), not left at the preset's v_prediction."""
    pre = make_pretrained(Path(workspace) / "pre", prediction_type="v_prediction")
    rewrite_scheduler(pre, prediction_type=None, beta_start=None, beta_end=None, num_train_timesteps=None)
    assert TrainConfig(workspace=str(workspace)).prediction_type == "v_prediction"  # the default preset's
    assert config(workspace, init_from="pre").prediction_type == "epsilon"
    cfg = config(workspace, init_from="pre", beta_start=0.001, beta_end=0.03, num_train_timesteps=200)
    assert cfg.noise_schedule() == {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                    "beta_schedule": "linear", "prediction_type": "epsilon"}


def test_a_noise_schedule_the_trainer_cannot_reproduce_is_refused_in_one_line(workspace):
    pre = make_pretrained(Path(workspace) / "pre")
    for changes, named in [({"trained_betas": [0.001] * 1000}, "its own list of betas"),
                           ({"rescale_betas_zero_snr": True}, "zero-terminal-SNR rescaling"),
                           ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
                           ({"prediction_type": "flow"}, "prediction_type 'flow'"),
                           ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start 0.5, beta_end 0.1")]:
        make_pretrained(pre)
        rewrite_scheduler(pre, **changes)
        with pytest.raises(ConfigError, match="pre was trained with a noise schedule the Train tab cannot "
                                              "reproduce") as refused:
            config(workspace, init_from="pre")
        assert named in refused.value.user_message and "\n" not in refused.value.user_message
    import shutil

    make_pretrained(pre)
    shutil.rmtree(pre / "scheduler")
    with pytest.raises(ConfigError, match="no scheduler/scheduler_config.json, so the noise schedule"):
        config(workspace, init_from="pre")
    # a resumed run keeps its own config.json: the model is not read again
    assert config(workspace, init_from="pre", resume="latest").init_from == "pre"


def test_the_schedule_defaults_are_diffusers_own():
    import inspect

    from diffusers import DDIMScheduler, DDPMScheduler

    from studio.pretrained import SCHEDULE_DEFAULTS

    for cls in (DDPMScheduler, DDIMScheduler):
        params = inspect.signature(cls.__init__).parameters
        assert {name: params[name].default for name in SCHEDULE_DEFAULTS} == SCHEDULE_DEFAULTS
    assert TrainConfig().beta_start == SCHEDULE_DEFAULTS["beta_start"]
    assert TrainConfig().beta_end == SCHEDULE_DEFAULTS["beta_end"]
