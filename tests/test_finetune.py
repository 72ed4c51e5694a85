"""The Stable Diffusion fine-tune trainer on a tiny SD pipeline: LoRA, full, DreamBooth, cache, resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.config.data import DataConfig
from studio.config.finetune import FinetuneConfig
from studio.errors import ConfigError, DataError, ModelError, StudioError
from studio.events import Event
from tiny_pipelines import tiny_ddpm, tiny_sd, tiny_sd_v  # noqa: F401  (fixtures)


def make_cfg(base: Path, workspace: Path, **changes) -> FinetuneConfig:
    """Four emoji at 16 px, three steps, two-step validation: seconds on one core."""
    values = dict(pretrained_model_name_or_path=str(base), data=DataConfig(max_rows=4), resolution=16,
                  max_train_steps=3, validation_every=2, num_inference_steps=2, checkpoint_every=0,
                  workspace=str(workspace), device="cpu", validation_prompts=("a smiling face",), seed=3)
    values.update(changes)
    return FinetuneConfig(**values)


def run_train(cfg: FinetuneConfig, stop: threading.Event | None = None, on_event=None):
    from studio.trainers.text_to_image import train

    events: list[Event] = []

    def sink(event: Event) -> None:
        events.append(event)
        if on_event is not None:
            on_event(event)

    run = train(cfg, sink, stop or threading.Event())
    return run, events


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


# ----------------------------------------------------------------------------- config
def test_config_validates_with_actionable_messages(tmp_path):
    base = dict(pretrained_model_name_or_path="some/model", workspace=str(tmp_path))
    with pytest.raises(ConfigError, match="multiple of 8"):
        FinetuneConfig(**base, resolution=500)
    with pytest.raises(ConfigError, match="instance prompt"):
        FinetuneConfig(**base, method="dreambooth-lora")
    with pytest.raises(ConfigError, match="class prompt"):
        FinetuneConfig(**base, method="dreambooth-lora", instance_prompt="sks dog", with_prior_preservation=True)
    with pytest.raises(ConfigError, match="bitsandbytes"):
        FinetuneConfig(**base, use_8bit_adam=True)
    with pytest.raises(ConfigError, match="full fine-tunes only"):
        FinetuneConfig(**base, use_ema=True)
    with pytest.raises(ConfigError, match="kohya/A1111 file"):
        FinetuneConfig(**base, save_single_file=True)
    with pytest.raises(ConfigError, match="LoRA methods"):
        FinetuneConfig(**base, method="full", train_text_encoder=True)
    with pytest.raises(ConfigError, match="base model"):
        FinetuneConfig(workspace=str(tmp_path))
    cfg = FinetuneConfig(**base, method="dreambooth-full", instance_prompt="sks dog", use_ema=True,
                         validation_prompts=["a", " ", "b"])
    assert cfg.validation_prompts == ("a", "b")
    again = FinetuneConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and isinstance(again.data, DataConfig)


def test_images_without_captions_and_no_instance_prompt_are_refused(tiny_sd, workspace, tmp_path):
    from PIL import Image

    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(folder / f"{i}.png")
    cfg = make_cfg(tiny_sd, workspace, data=DataConfig(source="folder", path=str(folder)))
    with pytest.raises(DataError, match="no caption and no instance prompt"):
        run_train(cfg)
    # the same images train with one instance prompt for all
    run, events = run_train(cfg.replace(instance_prompt="a blue square", max_train_steps=1, validation_every=0))
    assert kinds(events)[-1] == "finished"


def test_a_pipeline_that_is_not_stable_diffusion_is_refused(tiny_ddpm, workspace):
    run_dir = None
    with pytest.raises(ModelError, match="not a Stable Diffusion"):
        run_train(make_cfg(tiny_ddpm, workspace))
    run_dir = next(workspace.iterdir())
    failed = [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["kind"] == "failed"]
    assert failed and "Traceback" not in failed[0]["message"]


# ----------------------------------------------------------------------------- LoRA
def test_lora_trains_validates_and_exports_both_layouts(tiny_sd, workspace):
    from diffusers import UNet2DConditionModel

    cfg = make_cfg(tiny_sd, workspace, rank=4, lora_alpha=8, random_flip=True, caption_dropout=0.2,
                   snr_gamma=5.0, noise_offset=0.05, lr_scheduler="cosine", lr_warmup_steps=1,
                   prediction_type="v_prediction")
    run, events = run_train(cfg)
    assert any(e.message == "training (v_prediction target)" for e in events)
    assert kinds(events)[-1] == "finished", events[-1]
    losses = [e.loss for e in events if e.kind == "step"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # validation images: the base model at step 0, then every 2 steps and at the end
    samples = [e for e in events if e.kind == "samples"]
    assert [e.step for e in samples] == [0, 2, 3]
    assert all(Path(e.path).is_file() for e in samples) and "(base model)" in samples[0].message
    # the LoRA weights moved away from their initial zeros (B starts at zero)
    lora = load_file(str(run.lora_dir / "pytorch_lora_weights.safetensors"))
    ups = [v for k, v in lora.items() if k.endswith("up.weight")]
    assert ups and all(float(v.abs().max()) > 0 for v in ups)
    kohya = load_file(str(run.lora_dir / f"{run.name}-kohya.safetensors"))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert float(kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 8.0
    # the base UNet itself was not modified on disk
    assert isinstance(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"), UNet2DConditionModel)
    card = (run.lora_dir / "README.md").read_text()
    assert "base_model" not in card and str(tiny_sd) not in card and "samples/step-000000.png" in card  # a local base
    assert (run.lora_dir / "samples" / "step-000003.png").is_file()
    config = json.loads(run.config_path.read_text())
    assert config["task"] == "finetune" and config["pretrained_model_name_or_path"] == str(tiny_sd)


def test_exported_lora_loads_back_into_the_base_pipeline(tiny_sd, workspace):
    from diffusers import StableDiffusionPipeline

    cfg = make_cfg(tiny_sd, workspace, max_train_steps=2, validation_every=0, learning_rate=1e-2)
    run, _ = run_train(cfg)

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a smiling face", height=16, width=16, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        return torch.from_numpy(out.images)

    base = StableDiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True)
    before = image(base)
    base.load_lora_weights(run.lora_dir)
    with_lora = image(base)
    assert not torch.allclose(before, with_lora, atol=1e-4)
    # the kohya/A1111 file, read by diffusers' own kohya loader, gives the same images
    other = StableDiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True)
    other.load_lora_weights(run.lora_dir, weight_name=f"{run.name}-kohya.safetensors")
    assert torch.allclose(image(other), with_lora, atol=1e-5)
    # the Generate tab's loader takes the run folder itself: base model from config.json + the LoRA
    from studio.models import load_pipeline

    assert torch.allclose(image(load_pipeline(str(run.root), "cpu", workspace=workspace)), with_lora, atol=1e-5)


def test_text_encoder_lora_and_random_crop_fall_back_to_per_step_encoding(tiny_sd, workspace, monkeypatch):
    from diffusers import AutoencoderKL

    calls = {"encode": 0}
    original = AutoencoderKL.encode

    def counting(self, x, *args, **kwargs):
        if x.device.type != "meta":  # the memory plan (studio/budget.py) simulates one encode on meta
            calls["encode"] += 1
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    cfg = make_cfg(tiny_sd, workspace, train_text_encoder=True, center_crop=False, max_train_steps=2,
                   validation_every=0, text_encoder_lr=5e-4)
    run, events = run_train(cfg)
    assert kinds(events)[-1] == "finished"
    warnings = " ".join(e.message for e in events if e.kind == "warning")
    assert "Random crop" in warnings and "text encoder is training" in warnings
    assert calls["encode"] == 2  # one VAE encode per step, no cache
    kohya = load_file(str(run.lora_dir / f"{run.name}-kohya.safetensors"))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert not any(k.startswith("lora_te1_") for k in kohya)


# ----------------------------------------------------------------------------- cache
def test_second_run_reads_the_latent_cache_without_a_vae_encode(tiny_sd, workspace, monkeypatch):
    from diffusers import AutoencoderKL

    calls = {"encode": 0}
    original = AutoencoderKL.encode

    def counting(self, x, *args, **kwargs):
        if x.device.type != "meta":  # the memory plan (studio/budget.py) simulates one encode on meta
            calls["encode"] += 1
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    cfg = make_cfg(tiny_sd, workspace, max_train_steps=2, validation_every=0, random_flip=True)
    _, first = run_train(cfg)
    assert calls["encode"] == 2  # four images, encoded once per orientation, in one batch each
    calls["encode"] = 0
    _, second = run_train(cfg)
    assert calls["encode"] == 0
    assert any("loaded from cache" in e.message for e in second)
    # a different resolution is a different cache
    run_train(cfg.replace(resolution=24, max_train_steps=1))
    assert calls["encode"] == 2


# ----------------------------------------------------------------------------- full, resume
def test_full_finetune_with_ema_exports_a_pipeline(tiny_sd_v, workspace):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tiny_sd = tiny_sd_v  # a v-prediction base: its scheduler's prediction_type is used
    cfg = make_cfg(tiny_sd, workspace, method="full", use_ema=True, learning_rate=1e-3, max_train_steps=2,
                   validation_every=0, save_single_file=True)
    run, events = run_train(cfg)
    assert kinds(events)[-1] == "finished"
    assert any(e.message == "training (v_prediction target)" for e in events)
    pipe = StableDiffusionPipeline.from_pretrained(run.model_dir, use_safetensors=True)
    from studio.trainers.text_to_image import load_base_pipeline

    assert load_base_pipeline(str(run.root), workspace).unet.config == pipe.unet.config  # a run is a base too
    before = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    changed = [not torch.equal(a, b) for a, b in zip(before.parameters(), pipe.unet.parameters())]
    assert any(changed)
    assert (run.model_dir / "README.md").is_file()
    # the single-file checkpoint (original SD layout, fp16) reads back through diffusers' own reader
    single = StableDiffusionPipeline.from_single_file(str(run.model_dir / f"{run.name}.safetensors"),
                                                      config=str(run.model_dir), local_files_only=True)
    for a, b in zip(pipe.unet.state_dict().values(), single.unet.state_dict().values()):
        assert torch.equal(a.half().float(), b.float())


def test_stop_then_resume_latest_is_bit_exact(tiny_sd, workspace):
    cfg = make_cfg(tiny_sd, workspace, max_train_steps=4, validation_every=0, random_flip=True,
                   caption_dropout=0.3, gradient_accumulation_steps=2, train_batch_size=2,
                   lr_scheduler="linear", run_name="straight")
    straight, _ = run_train(cfg)

    stop = threading.Event()
    resumed_cfg = cfg.replace(run_name="interrupted")
    run, events = run_train(resumed_cfg, stop, on_event=lambda e: stop.set() if e.kind == "step" and e.step == 2 else None)
    assert kinds(events)[-1] == "stopped" and events[-1].step == 2 and Path(events[-1].path).is_dir()
    assert not run.lora_dir.exists()
    run, events = run_train(resumed_cfg.replace(resume="latest"))
    assert kinds(events)[-1] == "finished"
    assert [e.step for e in events if e.kind == "step"] == [3, 4]
    a = load_file(str(straight.lora_dir / "pytorch_lora_weights.safetensors"))
    b = load_file(str(run.lora_dir / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_before_anything_is_saved(tiny_sd, workspace, monkeypatch):
    from studio.trainers import text_to_image

    real = text_to_image._Trainer.loss_on

    def broken(self, *args):
        return real(self, *args) * float("nan")

    monkeypatch.setattr(text_to_image._Trainer, "loss_on", broken)
    with pytest.raises(StudioError, match="loss became nan"):
        run_train(make_cfg(tiny_sd, workspace, checkpoint_every=1))
    run = next(workspace.glob("finetune-*"))
    assert not any((run / "checkpoints").glob("step-*")) and not (run / "lora").exists()


# ----------------------------------------------------------------------------- DreamBooth
def test_dreambooth_with_prior_preservation(tiny_sd, workspace):
    cfg = make_cfg(tiny_sd, workspace, method="dreambooth-lora", instance_prompt="a sks emoji",
                   class_prompt="an emoji", with_prior_preservation=True, num_class_images=2,
                   max_train_steps=2, validation_every=0, validation_prompts=())
    run, events = run_train(cfg)
    assert kinds(events)[-1] == "finished"
    assert sorted(p.name for p in (run.root / "class_images").glob("*.png")) == ["0000.png", "0001.png"]
    assert any("generating 2 class images" in e.message for e in events)
    samples = [e for e in events if e.kind == "samples"]
    assert samples and samples[0].message.startswith("a sks emoji")  # the instance prompt validates
    assert "Trigger words: `a sks emoji`" in (run.lora_dir / "README.md").read_text()


def test_without_the_cache_each_step_encodes_like_the_scripts(tiny_sd, workspace, monkeypatch):
    from diffusers import AutoencoderKL

    calls = {"encode": 0}
    original = AutoencoderKL.encode

    def counting(self, x, *args, **kwargs):
        if x.device.type != "meta":  # the memory plan (studio/budget.py) simulates one encode on meta
            calls["encode"] += 1
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    cfg = make_cfg(tiny_sd, workspace, method="dreambooth-full", instance_prompt="a sks emoji",
                   class_prompt="an emoji", with_prior_preservation=True, num_class_images=2, cache_latents=False,
                   max_train_steps=2, validation_every=0, learning_rate=1e-4)
    run, events = run_train(cfg)
    assert kinds(events)[-1] == "finished", events[-1]
    # the two class images are encoded once (they never change); the instance images every step
    assert calls["encode"] == 1 + 2
    assert not any("loaded from cache" in e.message or "caching latents" in e.message for e in events)


# ----------------------------------------------------------------------------- messages
def test_out_of_memory_advice_fits_the_settings(tmp_path):
    from studio.trainers.text_to_image import _is_oom, out_of_memory_error

    cfg = FinetuneConfig(pretrained_model_name_or_path="m", method="full", train_batch_size=4, resolution=512)
    err = out_of_memory_error(cfg, RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    for tip in ("LoRA", "gradient checkpointing", "smaller batch", "lower the resolution"):
        assert tip in err.user_message
    assert _is_oom(RuntimeError("CUDA out of memory")) and not _is_oom(RuntimeError("shape mismatch"))
    lora = FinetuneConfig(pretrained_model_name_or_path="m", gradient_checkpointing=True, resolution=256)
    assert "LoRA" not in out_of_memory_error(lora, MemoryError()).user_message


def test_push_to_hub_offline_says_so(tmp_path, monkeypatch):
    from studio.trainers.text_to_image import push_to_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = push_to_hub(tmp_path, "me/my-lora")
    assert message.startswith("Not pushed to the Hub: the studio is offline") and "hf upload me/my-lora" in message


# ----------------------------------------------------------------------------- headless
def test_cli_finetune_resumes_a_run_from_its_config_json(tiny_sd, workspace, tmp_path, capsys):
    from studio import cli

    cfg = make_cfg(tiny_sd, workspace, max_train_steps=2, validation_every=0, checkpoint_every=1, run_name="cli")
    config = tmp_path / "finetune.json"
    cfg.to_json(config)
    assert cli.main(["finetune", "--config", str(config), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("finished: finished 2 steps")
    # the run's own config.json names the run: with --resume latest it continues there
    saved = json.loads((workspace / "cli" / "config.json").read_text())
    assert saved["run_name"] == "cli" and saved["task"] == "finetune" and saved["resume"] == ""
    longer = tmp_path / "longer.json"
    longer.write_text(json.dumps({**saved, "max_train_steps": 3}))
    assert cli.main(["finetune", "--config", str(longer), "--resume", "latest", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("finished: finished 3 steps")
    events = [json.loads(line) for line in (workspace / "cli" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "step"] == [1, 2, 3]
    assert any(e["kind"] == "status" and e["message"].startswith("resumed from step-00000002") for e in events)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**cfg.to_dict(), "resolution": 12}))
    assert cli.main(["finetune", "--config", str(bad)]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_two_processes_train_one_lora_on_different_shards(tiny_sd, workspace, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import free_port

    cfg = make_cfg(tiny_sd, workspace, max_train_steps=3, validation_every=0, run_name="ddp", train_batch_size=2)
    config = tmp_path / "finetune.json"
    cfg.to_json(config)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "studio", "finetune", "--config", str(config), "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished: finished 3 steps") == 1, proc.stdout
    run = workspace / "ddp"
    ranks = json.loads((run / "logs" / "processes.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # gradients were averaged
    assert not set(ranks[0]["first_batch"]) & set(ranks[1]["first_batch"])  # each saw its own images
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (run / "events.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == [1, 2, 3]


# ----------------------------------------------------------------------------- SDXL
def make_tiny_sdxl(path: Path) -> Path:
    """A tiny StableDiffusionXLPipeline (two CLIP encoders, text_time conditioning) saved to ``path``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tiny_pipelines import TINY_VOCAB_SIZE, make_tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=16)
    text = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer=make_tiny_tokenizer(),
        tokenizer_2=make_tiny_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
        image_encoder=None, feature_extractor=None)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def test_sdxl_lora_trains_and_both_exports_load_back(workspace, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    base = make_tiny_sdxl(tmp_path / "tiny-sdxl")
    cfg = make_cfg(base, workspace, max_train_steps=2, validation_every=0, learning_rate=1e-2, random_flip=True,
                   caption_dropout=0.5)
    run, events = run_train(cfg)
    assert kinds(events)[-1] == "finished", events[-1]
    assert [e.step for e in events if e.kind == "samples"] == [0, 2]
    kohya = load_file(str(run.lora_dir / f"{run.name}-kohya.safetensors"))
    # kohya names SDXL UNet modules in the original layout
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert not any(k.startswith("lora_unet_down_blocks") for k in kohya)

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return torch.from_numpy(pipe("a smiling face", height=16, width=16, num_inference_steps=2, output_type="np",
                                     generator=torch.Generator().manual_seed(0)).images)

    base_pipe = StableDiffusionXLPipeline.from_pretrained(base, use_safetensors=True)
    before = image(base_pipe)
    base_pipe.load_lora_weights(run.lora_dir)
    trained = image(base_pipe)
    assert not torch.allclose(before, trained, atol=1e-4)
    other = StableDiffusionXLPipeline.from_pretrained(base, use_safetensors=True)
    other.load_lora_weights(run.lora_dir, weight_name=f"{run.name}-kohya.safetensors")
    assert torch.allclose(image(other), trained, atol=1e-5)
    # and the kohya file converts back to the trained tensors
    from peft.utils import get_peft_model_state_dict

    from studio.lora_export import load_kohya

    unet_back, _, _ = load_kohya(run.lora_dir / f"{run.name}-kohya.safetensors", base_pipe.unet, sdxl=True)
    assert len(unet_back) == len(kohya) * 2 // 3
    from studio.models import load_pipeline  # the Generate tab's loader: SDXL base + the run's LoRA

    assert torch.allclose(image(load_pipeline(str(run.root), "cpu", workspace=workspace)), trained, atol=1e-5)
    card = (run.lora_dir / "README.md").read_text()
    assert "stable-diffusion-xl" in card and "StableDiffusionXLPipeline.from_pretrained" in card
    with pytest.raises(ConfigError, match="only the UNet trains"):
        run_train(cfg.replace(train_text_encoder=True))
