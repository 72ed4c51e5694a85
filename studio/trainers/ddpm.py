"""Unconditional DDPM training from scratch: one readable loop, top to bottom.

``train(cfg, events, stop, run)`` trains a diffusers ``UNet2DModel`` with a
``DDPMScheduler`` through accelerate (one process, or many under ``torchrun`` /
``accelerate launch``) and writes the run folder (see ``studio.runs``):
``config.json``, ``events.jsonl``, ``samples/step-N.png`` + ``progress.gif``,
``checkpoints/``, ``model/`` (a ``DDPMPipeline`` with the EMA weights) and
``logs/`` (TensorBoard). Every sample grid is also scored (``quality`` events, see
``studio.quality``; lower is better). It reports through ``events`` and listens to ``stop``;
it knows nothing of threads or the UI.

The loop per optimizer step:

    1. take a batch of cached uint8 images (each process its own shard), flip, scale to [-1, 1]
    2. draw noise (+ offset noise) and timesteps, ``add_noise``
    3. predict, MSE against epsilon / v / the clean image, min-SNR weighting
    4. backward (accumulating micro-batches), clip, AdamW, LR schedule, EMA
    5. every few steps read the losses back in one host sync, check they are finite, report

Resume is exact: a checkpoint holds the model, EMA, optimizer, LR schedule, grad
scaler, every RNG (python, numpy, torch, the noise generator of each process) and
the data sampler's position, so continuing gives the same weights bit for bit as
never stopping (on CPU, fixed seed). A non-finite loss stops the run before
anything is saved from the poisoned weights.

Everything around the loop is the trainer toolkit (DEVELOPERS.md, "Trainer toolkit"):
``setup`` (accelerator, run folder, resume point), ``batches``, ``losses``,
``optimization`` (AdamW, LR schedule, EMA), ``reporting`` (events, TensorBoard, grids,
loss curve), ``sampling``, ``resume`` (checkpoints) and ``export`` (``model/``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from pathlib import Path
from typing import Any

import torch

from studio.config.text_to_image import UNCONDITIONAL
from studio.config.train import BF16_CPU_WARNING, TrainConfig, check_precision_for_device
from studio.devices import MODEL_INIT_LOCK
from studio.errors import Stopped
from studio.events import EventSink, ignore_events
from studio.runs import RunDir
from studio.trainers.batches import BatchSampler, check_pixels, get_batch, load_images
from studio.trainers.export import export_ddpm_pipeline as export_pipeline
from studio.trainers.losses import diffusion_loss, draw_noise, snr
from studio.trainers.optimization import ema_weights, make_ema, make_lr_schedule, make_optimizer
from studio.trainers.reporting import (GRID_MIN_SIDE, DecodeProgress, LossMeter, NonFiniteLossError, Reporter,
                                       SampleQuality, make_grid, params_sha, write_progress_gif, write_ranks_report)
from studio.trainers.resume import load_ddpm_checkpoint, save_ddpm_checkpoint
from studio.trainers.sampling import sample_images
from studio.trainers.setup import (RunFolder, fresh_accelerator, import_diffusers, newest_run_of_mode, open_run,
                                   phase_stop, run_reported, seed_everything, stop_requested, training_device,
                                   write_run_config)
from studio.trainers.speed import prepare_unet_for_training
from studio.unet_presets import unet_kwargs

#: What other code imports from here (most of it defined in the toolkit modules beside this one).
__all__ = ["GRID_MIN_SIDE", "LOSS_SMOOTHING", "TASK", "BatchSampler", "NonFiniteLossError",
           "diffusion_loss", "export_pipeline", "get_batch", "load_images", "sample_images", "snr",
           "total_steps", "train", "write_progress_gif"]

TASK = "train"
#: Smoothing of the reported loss (debiased exponential moving average).
LOSS_SMOOTHING = 0.98


@dataclasses.dataclass
class Training:
    """What the loop and its helpers share once set up (one run, one process)."""

    cfg: TrainConfig
    stop: threading.Event
    run: RunDir
    run_cfg: TrainConfig
    report: Reporter
    accelerator: Any
    unet: Any  # the unwrapped UNet2DModel (``model`` is what accelerate wrapped)
    ema: Any
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    sampler: BatchSampler
    noise_gen: torch.Generator
    meter: LossMeter
    quality: SampleQuality | None
    total: int


def total_steps(cfg: TrainConfig, num_images: int, world: int = 1) -> int:
    """Optimizer steps of the run: ``max_train_steps``, or ``num_epochs`` passes over the data."""
    if cfg.max_train_steps > 0:
        return cfg.max_train_steps
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * world
    return cfg.num_epochs * max(1, math.ceil(num_images / per_step))


# ----------------------------------------------------------------------------- the trainer
def train(cfg: TrainConfig, events: EventSink = ignore_events, stop: threading.Event | None = None,
          run: RunDir | None = None) -> RunDir:
    """Train an unconditional DDPM as ``cfg`` says, reporting to ``events`` until done or ``stop``.

    Args:
        cfg: The run's settings.
        events: Receives every event (main process only).
        stop: Set it to end training after the current step (a checkpoint is saved).
        run: The run folder to use (the UI makes it first); None creates one, or finds
            the run being resumed.

    Returns:
        The run folder.

    Raises:
        StudioError: bad settings, unreadable data, an unusable checkpoint, a non-finite loss.
    """
    stop = stop or threading.Event()
    device_name = training_device(cfg.device)  # 'auto' under torchrun: accelerate gives each process its own
    check_precision_for_device(cfg.mixed_precision, device_name)
    from studio.budget import train_plan

    train_plan(cfg, "cpu" if device_name == "auto" else device_name).check()  # refuse before allocating
    accelerator = fresh_accelerator(cfg.mixed_precision, device_name)
    folder = open_run(cfg, TASK, accelerator, run or newest_run_of_mode(cfg, TASK, UNCONDITIONAL))  # never a t2i run
    report = Reporter(events, folder.run if accelerator.is_main_process else None, cfg.max_train_steps)
    return run_reported(folder, report, functools.partial(_train, cfg, report, stop, folder, accelerator))


def _train(cfg: TrainConfig, report: Reporter, stop: threading.Event, folder: RunFolder, accelerator: Any) -> RunDir:
    """The body of ``train`` once the accelerator and the run folder exist (every process runs it)."""
    DDPMScheduler, UNet2DModel, _, _ = import_diffusers()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    run, resume_from = folder.run, folder.resume_from
    report.warnings(folder.warnings)
    if cfg.mixed_precision == "bf16" and device.type == "cpu":
        report("warning", message=BF16_CPU_WARNING)
    run_cfg = write_run_config(run, TASK, cfg, accelerator)
    report.open_tensorboard()

    # -- data ------------------------------------------------------------------------------
    report("status", message=f"loading {cfg.data.label} at {cfg.resolution} px")
    with accelerator.main_process_first():  # one process decodes and caches, the others read the cache
        pixels = load_images(cfg, DecodeProgress(report), phase_stop(stop, accelerator))
    check_pixels(pixels, cfg.resolution)
    if pixels.numel() < 2 * 1024 ** 3:  # small enough: keep it on the device, index there
        pixels = pixels.to(device)
    total = report.total = total_steps(cfg, len(pixels), world)
    if resume_from is None:
        report.warnings(cfg.run_length_warnings(len(pixels)))

    # -- model, noise schedule, optimizer, LR schedule, EMA ------------------------------------
    report("status", message="building the model")
    seed_everything(cfg.seed)
    with MODEL_INIT_LOCK:  # a pipeline loading in another thread must not patch this construction
        unet = UNet2DModel(**unet_kwargs(cfg.resolution, cfg.block_out_channels, cfg.layers_per_block,
                                         cfg.down_block_types, cfg.up_block_types, cfg.attention_head_dim))
    if cfg.init_from and resume_from is None:  # TrainConfig took the model's noise schedule: say which
        from studio.pretrained import load_unet_weights, schedule_text

        report("status", message=f"starting from the weights of {cfg.init_from} and its noise schedule "
                                 f"({schedule_text(cfg.noise_schedule())})")
        load_unet_weights(unet, cfg.init_from, cfg.workspace)
    model = prepare_unet_for_training(unet, device)  # stock kernels; torch.compile only when asked (speed.py)
    noise_scheduler = DDPMScheduler(**cfg.noise_schedule())  # timesteps, betas, prediction type
    optimizer = make_optimizer(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                               weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, device=device)
    lr_scheduler = make_lr_schedule(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    unet = accelerator.unwrap_model(model)
    ema = make_ema(unet, UNet2DModel, decay=cfg.ema_max_decay, warmup=True, inv_gamma=cfg.ema_inv_gamma,
                   power=cfg.ema_power, update_after_step=cfg.ema_update_after_step) if cfg.use_ema else None
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    accum = cfg.gradient_accumulation_steps
    t = Training(cfg, stop, run, run_cfg, report, accelerator, unet, ema, noise_scheduler, optimizer, lr_scheduler,
                 sampler=BatchSampler(len(pixels), cfg.train_batch_size, rank, world, cfg.seed),
                 noise_gen=torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1),
                 meter=LossMeter(report, total, cfg.train_batch_size * accum * world, LOSS_SMOOTHING, accelerator),
                 quality=SampleQuality(pixels, cfg.num_samples) if accelerator.is_main_process else None,
                 total=total)

    # -- resume ------------------------------------------------------------------------------
    step = 0
    if resume_from is not None:
        report("status", message=f"resuming from {resume_from.name}")
        step, smoothed, debias = load_ddpm_checkpoint(resume_from, unet, ema, optimizer, lr_scheduler, accelerator,
                                                      t.sampler, t.noise_gen, rank, device)
        t.meter.load_state([smoothed, debias])
        t.meter.last_checkpoint = resume_from
        report("warning" if step >= total else "status",
               message=(f"Checkpoint {resume_from.name} is already at step {step} of {total}: nothing left to train."
                        if step >= total else f"resumed at step {step} of {total}"))

    # -- the loop ------------------------------------------------------------------------------
    if resume_from is None:
        draw_samples(t, 0)
    report("status", step, message="training")
    last_saved = step if resume_from is not None else -1
    first_batch: list[int] = []
    model.train()
    t.meter.restart_clock()
    while step < total and not stop_requested(stop, accelerator):
        lr = lr_scheduler.get_last_lr()[0]
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            # 1. a batch of images
            clean = get_batch(pixels, t.sampler, cfg.random_flip, device)
            first_batch = first_batch or t.sampler.last_indices.tolist()
            # 2. noise, timesteps, noisy images
            noise = draw_noise(clean.shape, t.noise_gen, device, cfg.noise_offset)
            timesteps = torch.randint(0, cfg.num_train_timesteps, (clean.shape[0],), generator=t.noise_gen,
                                      device=device)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            # 3. predict and compare; 4. backward (gradients are synchronised on the last micro-batch)
            with accelerator.no_sync(model) if micro < accum - 1 else contextlib.nullcontext():
                with accelerator.autocast():
                    pred = model(noisy, timesteps).sample
                loss = diffusion_loss(pred, clean, noise, timesteps, noise_scheduler, cfg.prediction_type,
                                      cfg.snr_gamma)
                accelerator.backward(loss / accum)
            step_loss += loss.detach() / accum
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        if not getattr(optimizer, "step_was_skipped", False):
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(unet.parameters())
        step += 1
        t.meter.add(step, lr, step_loss)

        # 5. report the losses (one host sync), checkpoints, sample grids
        save_due = cfg.save_every and step % cfg.save_every == 0 and step < total
        sample_due = cfg.sample_every and step % cfg.sample_every == 0 and step < total
        t.meter.flush_if_due(step, save_due or sample_due or stop.is_set())
        if save_due:
            save(t, step)
            last_saved = step
        if sample_due:
            draw_samples(t, step)
            t.meter.restart_clock()

    t.meter.flush()
    if last_saved != step:
        save(t, step)
    if step >= total:
        draw_samples(t, step)
    return finish(t, step, first_batch)


# ----------------------------------------------------------------------------- helpers of the loop
def save(t: Training, step: int) -> Path:
    """Checkpoint (all processes take part); a non-finite weight refuses it."""
    path = save_ddpm_checkpoint(t.run, step, unet=t.unet, optimizer=t.optimizer, lr_scheduler=t.lr_scheduler,
                                ema=t.ema, accelerator=t.accelerator, sampler=t.sampler, noise_gen=t.noise_gen,
                                smoothed_loss=t.meter.state(), config=t.run_cfg.to_dict(), total=t.total,
                                keep=t.cfg.checkpoints_total_limit)
    t.report("checkpoint", step, path=str(path), message=f"checkpoint at step {step}")
    t.meter.last_checkpoint = path
    return path


def draw_samples(t: Training, step: int) -> None:
    """The fixed-seed sample grid with the EMA weights, written, shown and scored (main process)."""
    if t.accelerator.is_main_process:
        t.report("status", step, message=f"sampling at step {step}")
        try:
            with ema_weights(t.ema, t.unet):
                images = sample_images(t.unet, t.noise_scheduler, t.cfg, t.accelerator.device, t.stop)
        except Stopped:  # the loop saves a checkpoint next; this grid is not drawn
            t.report("status", step, message=f"Stop pressed: the sample grid of step {step} is not drawn")
        else:
            t.report.samples(step, make_grid(images), message=f"samples at step {step}")
            t.quality(images, step, t.report)
    t.accelerator.wait_for_everyone()


def finish(t: Training, step: int, first_batch: list[int]) -> RunDir:
    """Export ``model/`` and the progress GIF, log each process's weights, report finished or stopped."""
    model_path = None
    if t.accelerator.is_main_process:
        t.report("status", step, message="exporting the model")
        model_path = export_pipeline(t.unet, t.ema, t.noise_scheduler, t.run, t.run_cfg, step, t.total,
                                     t.accelerator.num_processes)
        write_progress_gif(t.run)
    write_ranks_report(t.run, t.accelerator, params_sha(t.unet), first_batch)
    if step >= t.total:
        t.report("finished", step, path=str(model_path), message=f"finished {step} steps; model in {model_path}")
    else:
        checkpoint = t.meter.last_checkpoint
        t.report("stopped", step, path=str(checkpoint), message=f"stopped at step {step}; resume from {checkpoint}")
    t.accelerator.wait_for_everyone()
    return t.run
