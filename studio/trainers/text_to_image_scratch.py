"""Text-to-image from scratch: a small Stable Diffusion trained on captioned images, top to bottom.

``train(cfg, events, stop, run)`` (Train tab mode "text-to-image", or ``python -m studio
train`` with ``"mode": "text-to-image"``) builds the parts of ``studio.small_sd`` and
trains them in two stages on one step counter:

    steps 1 .. vae_steps            the AutoencoderKL on the images (MSE + a small KL term)
    steps vae_steps+1 .. total      the UNet2DConditionModel and CLIP text encoder jointly on the
                                    latents (v- or epsilon-prediction, caption dropout for
                                    classifier-free guidance), EMA of both

Between the stages the dataset is encoded once (each image's latent mean and standard
deviation; every step samples from them) and the latent scaling factor is set to one
over the latents' standard deviation, as Stable Diffusion chose 0.18215. The run folder
is the DDPM trainer's: ``config.json``, ``events.jsonl``, ``samples/step-N.png`` (the
autoencoder's reconstructions, then one row of fixed-seed images per validation prompt),
``checkpoints/`` (atomic, with every weight, optimizer, RNG and the data position, so a
resumed run is bit-exact), ``model/`` (a ``StableDiffusionPipeline``) and ``logs/``.
Each validation grid is scored per prompt against the images whose captions share the
prompt's words (``studio.quality``; lower is better). One process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from studio import small_sd
from studio.checkpoints import resolve_resume, save_checkpoint
from studio.config.text_to_image import MODE, TextToImageConfig
from studio.devices import MODEL_INIT_LOCK, resolve_device
from studio.errors import CheckpointError, DataError, JobError, describe_exception
from studio.events import EventSink, ignore_events
from studio.prompt_steering import PromptQuality
from studio.runs import RunDir, resumable_runs
from studio.trainers.batches import BatchSampler
from studio.trainers.reporting import Reporter, make_grid, write_progress_gif
from studio.trainers.resume import rng_state, set_rng_state, weights_finite

TASK = "train"
LOSS_SMOOTHING = 0.98


class NonFiniteLossError(JobError):
    """The loss became NaN or infinite; the run stopped before saving the bad weights."""


@dataclasses.dataclass
class Models:
    """The trained parts and their optimisation state."""

    tokenizer: Any
    vae: Any
    text_encoder: Any
    unet: Any
    vae_optimizer: Any
    optimizer: Any
    lr_scheduler: Any
    ema: Any

    def diffusion_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.unet.parameters()) + list(self.text_encoder.parameters())


# ----------------------------------------------------------------------------- set-up
def find_resume_run(cfg: TextToImageConfig) -> RunDir:
    """The run a resume request names: a checkpoint's run, ``run_name``, or the newest text-to-image run."""
    if cfg.resume != "latest":
        return RunDir(Path(cfg.resume).expanduser().resolve().parent.parent)
    if cfg.run_name:
        root = Path(cfg.workspace) / cfg.run_name
        if not root.is_dir():
            raise CheckpointError(f"No run named {cfg.run_name!r} in {cfg.workspace} to resume.",
                                  "Check run_name, or leave it empty to resume the newest text-to-image run.")
        return RunDir(root)
    for info in resumable_runs(cfg.workspace, TASK):
        if RunDir(info.path).read_config().get("mode") == MODE:
            return RunDir(info.path)
    raise CheckpointError(f"No text-to-image run with a checkpoint in {cfg.workspace} to resume.",
                          "Start a new run first.")


def load_dataset(cfg: TextToImageConfig, report: Reporter) -> tuple[torch.Tensor, list[str]]:
    """The images (uint8 ``[N, 3, R, R]``, decoded once) and one caption per image ("" when none)."""
    from studio.data import load_tensor_cache

    report("status", message=f"loading {cfg.data.label} at {cfg.resolution} px")
    cache = load_tensor_cache(cfg.data, cfg.resolution, Path(cfg.workspace).expanduser() / ".cache",
                              center_crop=cfg.center_crop)
    if len(cache.pixels) == 0:
        raise DataError("The dataset has no images.", "Pick another dataset in the Dataset tab.")
    captions = [str(c or "") for c in (cache.captions or [""] * len(cache.pixels))]
    if not any(captions):
        raise DataError("This dataset has no captions, and text-to-image training learns from them.",
                        "Pick a captioned dataset (the emoji set, or a folder with .txt or metadata.jsonl "
                        "captions), or train in unconditional mode.")
    return cache.pixels, captions


def build_models(cfg: TextToImageConfig, run: RunDir, captions: list[str], device: torch.device) -> Models:
    """The tokenizer (learnt from the captions, or the run's own on resume), the three models, optimizers, EMA."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    folder = run.root / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        tokenizer = small_sd.load_tokenizer(folder)
    else:
        tokenizer = small_sd.train_tokenizer(captions, folder, cfg.vocab_size, cfg.max_length)
    spec = spec_of(cfg)
    torch.manual_seed(cfg.seed)
    with MODEL_INIT_LOCK:
        vae = small_sd.build_vae(spec).to(device)
        text_encoder = small_sd.build_text_encoder(spec, tokenizer).to(device)
        unet = small_sd.build_unet(spec).to(device)
    vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate, weight_decay=0.0)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)
    ema = EMAModel(params, decay=cfg.ema_max_decay, use_ema_warmup=True, power=cfg.ema_power) if cfg.use_ema else None
    return Models(tokenizer, vae, text_encoder, unet, vae_optimizer, optimizer, lr_scheduler, ema)


def spec_of(cfg: TextToImageConfig) -> small_sd.SmallSDSpec:
    return small_sd.SmallSDSpec(
        resolution=cfg.resolution, vocab_size=cfg.vocab_size, max_length=cfg.max_length, text_width=cfg.text_width,
        text_layers=cfg.text_layers, text_heads=cfg.text_heads, vae_channels=cfg.vae_channels,
        unet_channels=cfg.unet_channels, unet_cross_attention=cfg.unet_cross_attention,
        unet_head_dim=cfg.unet_head_dim, prediction_type=cfg.prediction_type)


@torch.no_grad()
def encode_dataset(vae: Any, pixels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's latent mean and standard deviation (the autoencoder is frozen from here on)."""
    vae.eval()
    means, stds = [], []
    for i in range(0, len(pixels), 64):
        dist = vae.encode(to_float(pixels[i:i + 64], device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean = torch.cat(means)
    vae.register_to_config(scaling_factor=round(1.0 / float(mean.std()), 4))
    return mean, torch.cat(stds)


def to_float(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    return pixels.to(device).float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------- one step of each stage
def vae_step(m: Models, pixels: torch.Tensor, sampler: BatchSampler, cfg: TextToImageConfig,
             device: torch.device) -> torch.Tensor:
    indices, flips = sampler.next()
    images = to_float(pixels[indices], device)
    if cfg.random_flip:
        images = torch.where(flips.to(device)[:, None, None, None], images.flip(-1), images)
    loss, _ = small_sd.vae_loss(m.vae, images)
    m.vae_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(m.vae.parameters(), cfg.max_grad_norm)
    m.vae_optimizer.step()
    return loss.detach()


def diffusion_step(m: Models, latents: tuple[torch.Tensor, torch.Tensor], token_ids: torch.Tensor,
                   empty_ids: torch.Tensor, noise_scheduler: Any, sampler: BatchSampler, gen: torch.Generator,
                   cfg: TextToImageConfig, device: torch.device) -> torch.Tensor:
    indices, flips = sampler.next()
    mean, std = latents[0][indices], latents[1][indices]
    x0 = (mean + std * torch.randn(mean.shape, generator=gen, device=device)) * m.vae.config.scaling_factor
    if cfg.random_flip:
        x0 = torch.where(flips.to(device)[:, None, None, None], x0.flip(-1), x0)
    ids = token_ids[indices].clone()
    drop = torch.rand(len(ids), generator=gen, device=device) < cfg.caption_dropout  # classifier-free guidance
    ids[drop] = empty_ids
    noise = torch.randn(x0.shape, generator=gen, device=device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen, device=device)
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    target = noise_scheduler.get_velocity(x0, noise, timesteps) if cfg.prediction_type == "v_prediction" else noise
    pred = m.unet(noisy, timesteps, small_sd.encode_prompts(m.text_encoder, ids)).sample
    loss = F.mse_loss(pred.float(), target.float())
    m.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(m.diffusion_parameters(), cfg.max_grad_norm)
    m.optimizer.step()
    m.lr_scheduler.step()
    if m.ema is not None:
        m.ema.step(m.diffusion_parameters())
    return loss.detach()


# ----------------------------------------------------------------------------- checkpoints
def save(m: Models, run: RunDir, cfg: TextToImageConfig, step: int, sampler: BatchSampler, gen: torch.Generator,
         smoothed: list[float], report: Reporter) -> Path:
    from safetensors.torch import save_file

    for model in (m.vae, m.text_encoder, m.unet):
        if not weights_finite(model):
            raise NonFiniteLossError(f"The weights became non-finite before step {step}; nothing was saved.",
                                     "Lower the learning rate.")
    state = {"step": step, "vae_optimizer": m.vae_optimizer.state_dict(), "optimizer": m.optimizer.state_dict(),
             "lr_scheduler": m.lr_scheduler.state_dict(), "ema": m.ema.state_dict() if m.ema is not None else None,
             "sampler": sampler.state_dict(), "rng": rng_state(gen), "smoothed_loss": smoothed,
             "scaling_factor": float(m.vae.config.scaling_factor)}

    def write(folder: Path) -> None:
        for name in ("vae", "text_encoder", "unet"):
            weights = {k: v.detach().contiguous() for k, v in getattr(m, name).state_dict().items()}
            save_file(weights, str(folder / f"{name}.safetensors"))
        torch.save(state, folder / "training_state.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "total": cfg.total_steps}), "utf-8")

    path = save_checkpoint(run.checkpoints_dir, step, write, keep=cfg.checkpoints_total_limit)
    report("checkpoint", step, path=str(path), message=f"checkpoint at step {step}")
    return path


def load(m: Models, folder: Path, sampler: BatchSampler, gen: torch.Generator) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    try:
        for name in ("vae", "text_encoder", "unet"):
            getattr(m, name).load_state_dict(load_file(str(folder / f"{name}.safetensors")))
        state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - damaged, foreign or different-sized checkpoint
        raise CheckpointError(f"Checkpoint {folder} does not fit this run: {str(exc).splitlines()[0]}",
                              "Resume with the run's own config.json, or start a new run.") from None
    m.vae_optimizer.load_state_dict(state["vae_optimizer"])
    m.optimizer.load_state_dict(state["optimizer"])
    m.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if m.ema is not None:
        m.ema.load_state_dict(state["ema"])
    m.vae.register_to_config(scaling_factor=state["scaling_factor"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"], gen)
    return int(state["step"]), list(state["smoothed_loss"])


# ----------------------------------------------------------------------------- samples and export
def pipeline_of(m: Models, cfg: TextToImageConfig) -> Any:
    return small_sd.build_pipeline(m.vae, m.text_encoder, m.tokenizer, m.unet, cfg.prediction_type)


@torch.no_grad()
def validation_images(m: Models, cfg: TextToImageConfig) -> np.ndarray:
    """uint8 ``[P * k, R, R, 3]``: ``images_per_prompt`` fixed-seed images per validation prompt (EMA weights)."""
    if m.ema is not None:
        m.ema.store(m.diffusion_parameters())
        m.ema.copy_to(m.diffusion_parameters())
    try:
        m.unet.eval()
        m.text_encoder.eval()
        pipe = pipeline_of(m, cfg)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(list(cfg.validation_prompts), num_images_per_prompt=cfg.images_per_prompt,
                      height=cfg.resolution, width=cfg.resolution, num_inference_steps=cfg.sample_inference_steps,
                      guidance_scale=cfg.guidance_scale, generator=torch.Generator().manual_seed(cfg.seed),
                      output_type="np").images
    finally:
        if m.ema is not None:
            m.ema.restore(m.diffusion_parameters())
        m.unet.train()
        m.text_encoder.train()
    return (images * 255).round().astype(np.uint8)


@torch.no_grad()
def reconstructions(m: Models, pixels: torch.Tensor, device: torch.device) -> np.ndarray:
    """The first 8 images over their autoencoder reconstructions: uint8 ``[16, R, R, 3]``."""
    images = to_float(pixels[:8], device)
    was_training = m.vae.training
    m.vae.eval()
    recon = m.vae.decode(m.vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    m.vae.train(was_training)
    both = torch.cat([images, recon]).add(1).mul(127.5).round().byte()
    return both.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(run: RunDir, step: int, images: np.ndarray, columns: int, report: Reporter, what: str) -> None:
    from studio.atomic import save_image

    rows = [np.concatenate(list(images[i:i + columns]), axis=1) for i in range(0, len(images), columns)]
    grid = make_grid(np.stack(rows)) if len(rows) == 1 else make_grid(np.concatenate(rows, axis=0)[None])
    path = run.sample_path(step)
    save_image(grid, path)
    if report.writer is not None:
        report.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    report("samples", step, path=str(path), message=f"{what} at step {step}")


def export(m: Models, cfg: TextToImageConfig, run: RunDir, step: int) -> Path:
    """``model/``: the StableDiffusionPipeline with the EMA weights, tokenizer in both formats, a model card."""
    if m.ema is not None:
        m.ema.store(m.diffusion_parameters())
        m.ema.copy_to(m.diffusion_parameters())
    tmp = run.root / ".model-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        small_sd.save_pipeline(pipeline_of(m, cfg), tmp)
    finally:
        if m.ema is not None:
            m.ema.restore(m.diffusion_parameters())
    (tmp / "README.md").write_text(small_sd.model_card(run.name, cfg.to_dict(), step), encoding="utf-8")
    old = run.root / ".model-old"
    shutil.rmtree(old, ignore_errors=True)
    if run.model_dir.exists():
        os.replace(run.model_dir, old)
    os.replace(tmp, run.model_dir)
    shutil.rmtree(old, ignore_errors=True)
    return run.model_dir


# ----------------------------------------------------------------------------- the trainer
def train(cfg: TextToImageConfig, events: EventSink = ignore_events, stop: threading.Event | None = None,
          run: RunDir | None = None) -> RunDir:
    """Train a small Stable Diffusion as ``cfg`` says, reporting to ``events`` until done or ``stop``."""
    stop = stop or threading.Event()
    device = torch.device(resolve_device(cfg.device))
    if run is None:
        run = find_resume_run(cfg) if cfg.resume else RunDir.create(cfg.workspace, TASK, cfg.run_name)
    lock = run.lock(f"{TASK} '{run.name}'").acquire()
    report = Reporter(events, run, cfg.total_steps)
    try:
        warnings: list[str] = []
        resume_from = resolve_resume(cfg.resume, run.checkpoints_dir, warn=warnings.append) if cfg.resume else None
        for text in warnings:
            report("warning", message=text)
        return _train(cfg, report, stop, run, device, resume_from)
    except BaseException as exc:
        report("failed", message=describe_exception(exc))
        raise
    finally:
        report.close()
        lock.release()


def _train(cfg: TextToImageConfig, report: Reporter, stop: threading.Event, run: RunDir, device: torch.device,
           resume_from: Path | None) -> RunDir:
    run_cfg = dataclasses.replace(cfg, workspace=str(run.root.parent), run_name=run.name, resume="")
    run.write_config(TASK, run_cfg.to_dict())
    report.open_tensorboard()
    pixels, captions = load_dataset(cfg, report)
    report("status", message="learning the tokenizer from the captions, building the models")
    m = build_models(cfg, run, captions, device)
    token_ids = small_sd.tokenize(m.tokenizer, captions).to(device)
    empty_ids = small_sd.tokenize(m.tokenizer, [""])[0].to(device)
    noise_scheduler = small_sd.train_scheduler(cfg.prediction_type)
    sampler = BatchSampler(len(pixels), cfg.train_batch_size, 0, 1, cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + 1)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    prompt_quality = PromptQuality(pixels, captions, cfg.validation_prompts, cfg.images_per_prompt)
    step, smoothed, latents, checkpoint = 0, [0.0, 0.0], None, resume_from
    if resume_from is not None:
        step, smoothed = load(m, resume_from, sampler, gen)
        report("status", step, message=f"resumed at step {step} of {cfg.total_steps}")
    total, last_saved = cfg.total_steps, step
    report("status", step, message="training the autoencoder" if step < cfg.vae_steps else "training")
    window = time.perf_counter()
    while step < total and not stop.is_set():
        if step < cfg.vae_steps:
            loss, lr = vae_step(m, pixels, sampler, cfg, device), cfg.vae_learning_rate
        else:
            if latents is None:
                report("status", step, message="encoding the dataset into latents; training the diffusion model")
                latents = encode_dataset(m.vae, pixels, device)
                smoothed = [0.0, 0.0] if step == cfg.vae_steps else smoothed
            lr = m.lr_scheduler.get_last_lr()[0]
            loss = diffusion_step(m, latents, token_ids, empty_ids, noise_scheduler, sampler, gen, cfg, device)
        step += 1
        value = float(loss)
        if not math.isfinite(value):
            raise NonFiniteLossError(f"The loss became {value} at step {step}; nothing from this step on was saved.",
                                     "Lower the learning rate.")
        smoothed = [LOSS_SMOOTHING * smoothed[0] + (1 - LOSS_SMOOTHING) * value,
                    LOSS_SMOOTHING * smoothed[1] + (1 - LOSS_SMOOTHING)]
        now = time.perf_counter()
        per_step, window = now - window, now
        report("step", step, loss=value, smoothed_loss=smoothed[0] / smoothed[1], lr=lr,
               images_per_s=cfg.train_batch_size / per_step, eta_s=(total - step) * per_step)
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            checkpoint, last_saved = save(m, run, cfg, step, sampler, gen, smoothed, report), step
        stage_end = step == cfg.vae_steps
        if stage_end or (cfg.sample_every and step % cfg.sample_every == 0 and step < total):
            draw(m, cfg, run, step, pixels, device, prompt_quality, report)
            window = time.perf_counter()
    if last_saved != step:
        checkpoint = save(m, run, cfg, step, sampler, gen, smoothed, report)
    if step < total:
        report("stopped", step, path=str(checkpoint), message=f"stopped at step {step}; resume from {checkpoint}")
        return run
    draw(m, cfg, run, step, pixels, device, prompt_quality, report)
    report("status", step, message="exporting the model")
    model = export(m, cfg, run, step)
    write_progress_gif(run)
    report("finished", step, path=str(model), message=f"finished {step} steps; model in {model}")
    return run


def draw(m: Models, cfg: TextToImageConfig, run: RunDir, step: int, pixels: torch.Tensor, device: torch.device,
         prompt_quality: Any, report: Reporter) -> None:
    """The grid of this step: reconstructions in the autoencoder stage, then the validation prompts (scored)."""
    report("status", step, message=f"sampling at step {step}")
    if step <= cfg.vae_steps:
        save_grid(run, step, reconstructions(m, pixels, device), 8, report, "autoencoder reconstructions")
        return
    images = validation_images(m, cfg)
    save_grid(run, step, images, cfg.images_per_prompt, report, "validation images")
    prompt_quality(images, step, report)
