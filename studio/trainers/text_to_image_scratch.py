"""Text-to-image from scratch: a small Stable Diffusion trained on captioned images, top to bottom.

``train(cfg, events, stop, run)`` (Train tab mode "text-to-image"; ``python -m studio train`` with
``"mode": "text-to-image"``) trains the parts of ``studio.small_sd`` in two stages on one step counter:
steps 1..vae_steps the AutoencoderKL on the images; then the UNet2DConditionModel and CLIP text
encoder jointly on latents (caption dropout for classifier-free guidance; EMA of both). One AdamW
holds both stages as two parameter groups (a group without gradients is left alone), each with its
own learning-rate factor by step. Between the stages the dataset is encoded once (latent mean and
std per image, sampled every step) and the latent scaling factor set to 1 / std of the latents, as
SD chose 0.18215. The rest is the trainer toolkit (``studio.trainers``): run folder, reporter, loss
meter, tensor checkpoints (bit-exact resume), EMA weights for sampling. Grids: the autoencoder's
reconstructions, then a row of fixed-seed images per validation prompt, scored per prompt
(``studio.prompt_steering``). ``model/`` is a ``StableDiffusionPipeline``. One process.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from studio import small_sd
from studio.config.text_to_image import MODE, TextToImageConfig
from studio.devices import MODEL_INIT_LOCK, resolve_device
from studio.errors import Stopped
from studio.events import EventSink, ignore_events
from studio.prompt_steering import PromptQuality
from studio.runs import RunDir
from studio.stopping import raise_if_stopped
from studio.trainers import optimization, resume, setup
from studio.trainers.batches import BatchSampler, load_captioned_images, to_float
from studio.trainers.latent_batches import encode_dataset
from studio.trainers.reporting import (LossMeter, Reporter, rows_grid, weights_sha256, write_progress_gif,
                                       write_ranks_report)
from studio.trainers.sampling import prompt_images

TASK = "train"
LOSS_SMOOTHING = 0.98


@dataclasses.dataclass
class Parts:
    """What trains: the tokenizer, the three models, one optimizer and schedule for both stages, the EMA."""

    tokenizer: Any
    vae: Any
    text_encoder: Any
    unet: Any
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    denoiser: torch.nn.ModuleList  # [unet, text_encoder]: what the diffusion stage trains and the EMA averages


# ----------------------------------------------------------------------------- set-up
def build_parts(cfg: TextToImageConfig, run: RunDir, captions: list[str], device: torch.device) -> Parts:
    """The tokenizer (learnt from the captions, or the run's own on resume), the models, optimizer, schedule, EMA."""
    from diffusers.training_utils import EMAModel

    folder = run.root / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        tokenizer = small_sd.load_tokenizer(folder)
    else:
        tokenizer = small_sd.train_tokenizer(captions, folder, cfg.vocab_size, cfg.max_length)
    spec = small_sd.SmallSDSpec.of(cfg)
    with MODEL_INIT_LOCK:
        vae = small_sd.build_vae(spec).to(device)
        text_encoder = small_sd.build_text_encoder(spec, tokenizer).to(device)
        unet = small_sd.build_unet(spec).to(device)
    denoiser = torch.nn.ModuleList([unet, text_encoder])
    groups = [{"params": list(vae.parameters()), "lr": cfg.vae_learning_rate, "weight_decay": 0.0},
              {"params": list(denoiser.parameters()), "lr": cfg.learning_rate, "weight_decay": cfg.adam_weight_decay}]
    optimizer = optimization.make_optimizer(groups, lr=cfg.learning_rate, device=device)
    # the autoencoder's group at its constant rate in its stage, then the diffusion stage's schedule
    factors = optimization.two_stage_lr_factors(cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps,
                                                cfg.vae_steps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    # optimization.make_ema's EMAModel (its own step, foreach=False) over the two models at once
    ema = EMAModel(denoiser.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, power=cfg.ema_power,
                   foreach=False) if cfg.use_ema else None
    return Parts(tokenizer, vae, text_encoder, unet, optimizer, lr_scheduler, ema, denoiser)


# ----------------------------------------------------------------------------- one step of each stage
def vae_loss(p: Parts, pixels: torch.Tensor, sampler: BatchSampler, cfg: TextToImageConfig,
             device: torch.device) -> torch.Tensor:
    indices, flips = sampler.next()
    images = to_float(pixels[indices], device)
    if cfg.random_flip:
        images = torch.where(flips.to(device)[:, None, None, None], images.flip(-1), images)
    return small_sd.vae_loss(p.vae, images)[0]


def diffusion_loss(p: Parts, latents: tuple[torch.Tensor, torch.Tensor], token_ids: torch.Tensor,
                   empty_ids: torch.Tensor, noise_scheduler: Any, sampler: BatchSampler, gen: torch.Generator,
                   cfg: TextToImageConfig, device: torch.device) -> torch.Tensor:
    from studio.trainers.losses import diffusion_target

    indices, flips = sampler.next()
    mean, std = latents[0][indices], latents[1][indices]
    x0 = (mean + std * torch.randn(mean.shape, generator=gen, device=device)) * p.vae.config.scaling_factor
    if cfg.random_flip:
        x0 = torch.where(flips.to(device)[:, None, None, None], x0.flip(-1), x0)
    ids = token_ids[indices].clone()
    ids[torch.rand(len(ids), generator=gen, device=device) < cfg.caption_dropout] = empty_ids  # for guidance
    noise = torch.randn(x0.shape, generator=gen, device=device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen, device=device)
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    pred = p.unet(noisy, timesteps, small_sd.encode_prompts(p.text_encoder, ids)).sample
    target = diffusion_target(noise_scheduler, cfg.prediction_type, x0, noise, timesteps)
    return F.mse_loss(pred.float(), target.float())


# ----------------------------------------------------------------------------- checkpoints
def trainable_weights(p: Parts) -> dict[str, torch.Tensor]:
    """Every trained weight by name ('vae.' / 'text_encoder.' / 'unet.' prefixes)."""
    return {f"{name}.{k}": v for name in ("vae", "text_encoder", "unet")
            for k, v in getattr(p, name).named_parameters()}


def save(p: Parts, run: RunDir, run_cfg: TextToImageConfig, step: int, sampler: BatchSampler,
         gen: torch.Generator, meter: LossMeter, report: Reporter) -> Path:
    """A tensor checkpoint (toolkit layout) plus the data position, the loss curve and the latent scale."""
    for model in (p.vae, p.text_encoder, p.unet):
        resume.check_weights_finite(model, step)
    rngs = [resume.generator_states({"noise": gen, "data": sampler.generator})]
    path = resume.save_tensor_checkpoint(run, step, trainable=trainable_weights(p), optimizer=p.optimizer,
                                         lr_scheduler=p.lr_scheduler, ema=p.ema, rngs=rngs, config=run_cfg.to_dict(),
                                         keep=run_cfg.checkpoints_total_limit,
                                         extra={"sampler": sampler.position(), "loss": meter.state(),
                                                "scaling_factor": float(p.vae.config.scaling_factor)})
    meter.last_checkpoint = path
    report("checkpoint", step, path=str(path), message=f"checkpoint at step {step}")
    return path


def load(p: Parts, folder: Path, sampler: BatchSampler, gen: torch.Generator, meter: LossMeter) -> int:
    modules = {"vae": p.vae, "text_encoder": p.text_encoder, "unet": p.unet}
    state = resume.load_tensor_checkpoint(folder, modules=modules, optimizer=p.optimizer,
                                          lr_scheduler=p.lr_scheduler, ema=p.ema,
                                          generators={"noise": gen, "data": sampler.generator}, rank=0, world=1)
    sampler.load_position(state["sampler"], folder.name)
    meter.load_state(state["loss"])
    p.vae.register_to_config(scaling_factor=state["scaling_factor"])
    return int(state["step"])


# ----------------------------------------------------------------------------- samples and export
def pipeline_of(p: Parts, cfg: TextToImageConfig) -> Any:
    return small_sd.build_pipeline(p.vae, p.text_encoder, p.tokenizer, p.unet, cfg.prediction_type)


def validation_images(p: Parts, cfg: TextToImageConfig, stop: threading.Event | None) -> np.ndarray:
    """uint8 ``[P * k, R, R, 3]``: ``images_per_prompt`` fixed-seed images per validation prompt (EMA weights)."""
    with optimization.ema_weights(p.ema, p.denoiser):
        p.denoiser.eval()
        images = prompt_images(pipeline_of(p, cfg), cfg.validation_prompts, cfg.images_per_prompt, cfg.resolution,
                               cfg.sample_inference_steps, cfg.guidance_scale, cfg.seed, stop)
        p.denoiser.train()
    return images


def draw(p: Parts, cfg: TextToImageConfig, step: int, pixels: torch.Tensor, device: torch.device,
         prompt_quality: PromptQuality, report: Reporter, stop: threading.Event) -> None:
    """The grid of this step: reconstructions in the autoencoder stage, then the validation prompts (scored)."""
    report("status", step, message=f"sampling at step {step}")
    if step <= cfg.vae_steps:
        report.samples(step, rows_grid(small_sd.reconstructions(p.vae, to_float(pixels[:8], device)), 8),
                       f"autoencoder reconstructions at step {step} (top: images, bottom: reconstructed)")
        return
    images = validation_images(p, cfg, stop)
    report.samples(step, rows_grid(images, cfg.images_per_prompt),
                   f"validation images at step {step}: one row per prompt ({'; '.join(cfg.validation_prompts)})")
    prompt_quality(images, step, report)


def export(p: Parts, cfg: TextToImageConfig, run: RunDir, step: int) -> Path:
    """``model/``: the StableDiffusionPipeline with the EMA weights, tokenizer in both formats, a model card."""
    with optimization.ema_weights(p.ema, p.denoiser):
        return small_sd.replace_pipeline_folder(pipeline_of(p, cfg), run.model_dir,
                                                small_sd.model_card(run.name, cfg.to_dict(), step))


# ----------------------------------------------------------------------------- the trainer
def train(cfg: TextToImageConfig, events: EventSink = ignore_events, stop: threading.Event | None = None,
          run: RunDir | None = None) -> RunDir:
    """Train a small Stable Diffusion as ``cfg`` says, reporting to ``events`` until done or ``stop``."""
    stop = stop or threading.Event()
    device_name = resolve_device(cfg.device)
    from studio.budget import text_to_image_plan

    text_to_image_plan(cfg, device_name).check()  # refuse what cannot fit before making a run folder or allocating
    accelerator = setup.fresh_accelerator(cfg.mixed_precision, device_name)
    folder = setup.open_run(cfg, TASK, accelerator, run or setup.newest_run_of_mode(cfg, TASK, MODE))
    report = Reporter(events, folder.run, cfg.total_steps)
    return setup.run_reported(folder, report, functools.partial(_train, cfg, report, stop, folder,
                                                                torch.device(device_name), accelerator))


def _train(cfg: TextToImageConfig, report: Reporter, stop: threading.Event, folder: setup.RunFolder,
           device: torch.device, accelerator: Any) -> RunDir:
    run = folder.run
    report.warnings(folder.warnings)
    run_cfg = setup.write_run_config(run, TASK, cfg, accelerator)
    report.open_tensorboard()
    setup.seed_everything(cfg.seed)
    pixels, captions = load_captioned_images(cfg, report)
    raise_if_stopped(stop, "loading the dataset")
    report("status", message="learning the tokenizer from the captions, building the models")
    p = build_parts(cfg, run, captions, device)
    token_ids = small_sd.tokenize(p.tokenizer, captions).to(device)
    empty_ids = small_sd.tokenize(p.tokenizer, [""])[0].to(device)
    noise_scheduler = small_sd.train_scheduler(cfg.prediction_type)
    sampler = BatchSampler(len(pixels), cfg.train_batch_size, 0, 1, cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + 1)
    prompt_quality = PromptQuality(pixels, captions, cfg.validation_prompts, cfg.images_per_prompt)
    meter = LossMeter(report, cfg.total_steps, cfg.train_batch_size, LOSS_SMOOTHING)
    step, total, latents = 0, cfg.total_steps, None
    if folder.resume_from is not None:
        step = load(p, folder.resume_from, sampler, gen, meter)
        meter.last_checkpoint = folder.resume_from
        report("status", step, message=f"resumed at step {step} of {total}")
    last_saved, first_batch = step, []
    report("status", step, message="training the autoencoder" if step < cfg.vae_steps else "training")
    meter.restart_clock()
    while step < total and not setup.stop_requested(stop, accelerator):
        lr = p.lr_scheduler.get_last_lr()[0 if step < cfg.vae_steps else 1]
        if step < cfg.vae_steps:
            loss = vae_loss(p, pixels, sampler, cfg, device)
        else:
            if latents is None:
                report("status", step, message="encoding the dataset into latents; training the diffusion model")
                latents = encode_dataset(p.vae, pixels, device)
                if step == cfg.vae_steps:
                    meter.load_state(None)  # a new curve for the new loss
            loss = diffusion_loss(p, latents, token_ids, empty_ids, noise_scheduler, sampler, gen, cfg, device)
        first_batch = first_batch or sampler.last_indices.tolist()
        p.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            params = p.vae.parameters() if step < cfg.vae_steps else p.denoiser.parameters()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        p.optimizer.step()
        p.lr_scheduler.step()
        if p.ema is not None and step >= cfg.vae_steps:
            p.ema.step(p.denoiser.parameters())
        step += 1
        meter.add(step, lr, loss)
        meter.flush()  # one process on a CPU: every step is free
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save(p, run, run_cfg, step, sampler, gen, meter, report)
            last_saved = step
        if step == cfg.vae_steps or (cfg.sample_every and step % cfg.sample_every == 0 and step < total):
            try:
                draw(p, cfg, step, pixels, device, prompt_quality, report, stop)
            except Stopped:  # Stop pressed while drawing: the loop ends and saves this step
                pass
            meter.restart_clock()
    if last_saved != step:
        checkpoint = save(p, run, run_cfg, step, sampler, gen, meter, report)
    else:
        checkpoint = meter.last_checkpoint
    # logs/processes.json, as the other trainers write it: this process's final weights and first batch
    write_ranks_report(run, accelerator, weights_sha256(v for _, v in sorted(trainable_weights(p).items())),
                       first_batch)
    if step < total:
        report("stopped", step, path=str(checkpoint), message=f"stopped at step {step}; resume from {checkpoint}")
        return run
    draw(p, cfg, step, pixels, device, prompt_quality, report, None)
    report("status", step, message="exporting the model")
    model = export(p, cfg, run, step)
    write_progress_gif(run)
    report("finished", step, path=str(model), message=f"finished {step} steps; model in {model}")
    return run
