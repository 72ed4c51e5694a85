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

The shared trainer toolkit does the rest: ``studio.trainers.reporting`` (events,
TensorBoard, sample grids), ``sampling`` (the fixed-seed samples), ``export`` (``model/``),
``batches`` (the image cache, the batch sampler), ``resume`` (restoring a checkpoint) and
``setup`` (diffusers import, the accelerator).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from studio.checkpoints import resolve_resume, save_checkpoint
from studio.config.train import BF16_CPU_WARNING, TrainConfig, check_precision_for_device
from studio.devices import MODEL_INIT_LOCK
from studio.errors import CheckpointError, ConfigError, JobError, Stopped, describe_exception
from studio.events import EventSink, ignore_events
from studio.runs import RunDir, resumable_runs
from studio.trainers.batches import BatchSampler, load_images
from studio.trainers.export import DDPM_MODEL_CARD as MODEL_CARD
from studio.trainers.export import export_ddpm_pipeline as export_pipeline
from studio.trainers.reporting import GRID_MIN_SIDE, Reporter, SampleQuality, save_samples, write_progress_gif, \
    write_ranks_report
from studio.trainers.resume import load_checkpoint, rng_state, weights_finite
from studio.trainers.sampling import sample_images
from studio.trainers.setup import fresh_accelerator, import_diffusers
from studio.trainers.speed import ema_update_, make_optimizer, prepare_unet_for_training
from studio.unet_presets import unet_kwargs

#: What other code imports from here (some of it defined in the toolkit modules beside this one).
__all__ = ["GRID_MIN_SIDE", "LOSS_SMOOTHING", "MODEL_CARD", "TASK", "BatchSampler", "NonFiniteLossError",
           "diffusion_loss", "ema_step", "export_pipeline", "find_resume_run", "get_batch", "load_images",
           "sample_images", "snr", "total_steps", "train", "write_progress_gif"]

TASK = "train"
#: Smoothing of the reported loss (debiased exponential moving average).
LOSS_SMOOTHING = 0.98


class NonFiniteLossError(JobError):
    """The loss became NaN or infinite; the run was stopped before saving the bad weights."""


# ----------------------------------------------------------------------------- data
def get_batch(pixels: torch.Tensor, sampler: BatchSampler, random_flip: bool, device: torch.device) -> torch.Tensor:
    """Step 1: a float batch in [-1, 1] on ``device``, randomly flipped on tensors (no PIL)."""
    indices, flips = sampler.next()
    batch = pixels[indices.to(pixels.device)].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if random_flip:
        flips = flips.to(device)[:, None, None, None]
        batch = torch.where(flips, batch.flip(-1), batch)
    return batch.contiguous()


# ----------------------------------------------------------------------------- loss
def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at ``timesteps`` (as diffusers' compute_snr)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return (a.sqrt() / (1.0 - a).sqrt()) ** 2


def diffusion_loss(pred: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   noise_scheduler: Any, prediction_type: str, snr_gamma: float) -> torch.Tensor:
    """Step 3: MSE against the target of ``prediction_type``, optionally min-SNR weighted.

    Min-SNR-gamma (Hang et al. 2023) weights each sample by min(SNR, gamma) divided by
    SNR (epsilon), SNR + 1 (v-prediction) or 1 (clean-image prediction).
    """
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    else:
        target = clean
    if not snr_gamma:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    s = snr(noise_scheduler.alphas_cumprod, timesteps)
    weights = torch.clamp(s, max=snr_gamma)
    if prediction_type == "epsilon":
        weights = weights / s
    elif prediction_type == "v_prediction":
        weights = weights / (s + 1)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


# ----------------------------------------------------------------------------- EMA
def ema_step(ema: Any, parameters: Any) -> None:
    """``EMAModel.step`` with the same decay schedule and state, updated by foreach kernels.

    The decay comes from diffusers' ``get_decay`` and the counters advance as in
    ``EMAModel.step``; ``speed.ema_update_`` applies ``ema -= (1 - decay) * (ema - p)``
    bit-exactly, in a few kernel launches instead of three per tensor.
    """
    ema.optimization_step += 1
    decay = ema.get_decay(ema.optimization_step)
    ema.cur_decay_value = decay
    ema_update_(ema.shadow_params, list(parameters), decay)


# ----------------------------------------------------------------------------- run set-up
def total_steps(cfg: TrainConfig, num_images: int, world: int = 1) -> int:
    """Optimizer steps of the run: ``max_train_steps``, or ``num_epochs`` passes over the data."""
    if cfg.max_train_steps > 0:
        return cfg.max_train_steps
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * world
    return cfg.num_epochs * max(1, math.ceil(num_images / per_step))


def find_resume_run(cfg: TrainConfig) -> RunDir:
    """The run folder a ``resume`` request refers to.

    A checkpoint path names its run (``<run>/checkpoints/step-N``); "latest" uses the
    run named ``run_name``, or the newest train run of the workspace that has a checkpoint.

    Raises:
        CheckpointError: when there is no such run.
    """
    if cfg.resume != "latest":
        path = Path(cfg.resume).expanduser()
        if not path.exists():
            raise CheckpointError(f"Checkpoint not found: {path}.", "Check the path, or use 'latest'.")
        return RunDir(path.resolve().parent.parent)
    if cfg.run_name:
        if not cfg.run_root.is_dir():
            raise CheckpointError(f"No run named {cfg.run_name!r} in {cfg.workspace} to resume.",
                                  "Check run_name, or leave it empty to resume the newest run.")
        return RunDir(cfg.run_root)
    runs = resumable_runs(cfg.workspace, TASK)  # never a run whose start failed (no checkpoint)
    if not runs:
        raise CheckpointError(f"No training run with a checkpoint in {cfg.workspace} to resume.",
                              "Start a new run first.")
    return RunDir(runs[0].path)


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
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        device_name = "cpu" if cfg.device == "cpu" else "auto"
    else:
        from studio.devices import resolve_device

        device_name = resolve_device(cfg.device)
    check_precision_for_device(cfg.mixed_precision, device_name)
    from studio.budget import train_plan

    train_plan(cfg, "cpu" if device_name == "auto" else device_name).check()  # refuse before allocating
    accelerator = fresh_accelerator(cfg, device_name)
    is_main = accelerator.is_main_process

    # -- run folder (created by the main process; the others learn its path) -----------
    warnings: list[str] = []
    resume_from: Path | None = None
    run_lock = None
    if is_main:
        if run is None:
            run = find_resume_run(cfg) if cfg.resume else RunDir.create(cfg.workspace, TASK, cfg.run_name)
        run_lock = run.lock(f"{TASK} '{run.name}'").acquire()  # one trainer per run folder, across processes
        try:
            if cfg.resume:
                resume_from = resolve_resume(cfg.resume, run.checkpoints_dir, warn=warnings.append)
        except BaseException:
            run_lock.release()
            raise
    if distributed:
        from accelerate.utils import broadcast_object_list

        shared = [str(run.root) if run else None, str(resume_from) if resume_from else None]
        broadcast_object_list(shared)
        run = RunDir(shared[0])
        resume_from = Path(shared[1]) if shared[1] else None
    report = Reporter(events, run if is_main else None, cfg.max_train_steps)
    try:
        return _train(cfg, report, stop, run, accelerator, resume_from, warnings)
    except Stopped as exc:  # Stop during a phase before the loop: nothing trained, no checkpoint changed
        report("stopped", message=exc.message + (f" {resume_from.name} is unchanged: resume to go on."
                                                 if resume_from else " Nothing was trained."))
        return run
    except BaseException as exc:
        report("failed", message=describe_exception(exc))
        raise
    finally:
        report.close()
        if run_lock is not None:
            run_lock.release()


def _train(cfg: TrainConfig, report: Reporter, stop: threading.Event, run: RunDir, accelerator: Any,
           resume_from: Path | None, warnings: list[str]) -> RunDir:
    """The body of ``train`` once the accelerator and the run folder exist (every process runs it)."""
    DDPMScheduler, UNet2DModel, get_scheduler, EMAModel = import_diffusers()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    for text in warnings:
        report("warning", message=text)
    if cfg.mixed_precision == "bf16" and device.type == "cpu":
        report("warning", message=BF16_CPU_WARNING)
    run_cfg = dataclasses.replace(cfg, workspace=str(run.root.parent), run_name=run.name, resume="")
    if is_main:
        run.write_config(TASK, run_cfg.to_dict())
        report.open_tensorboard()

    # -- data ----------------------------------------------------------------------------
    report("status", message=f"loading {cfg.data.label} at {cfg.resolution} px")
    shown = [-1.0]

    def progress(fraction: float, message: str) -> None:
        if fraction >= 1.0 or fraction - shown[0] >= 0.1:
            shown[0] = fraction
            report("status", message=message)

    with accelerator.main_process_first():  # one process decodes and caches, the others read the cache
        pixels = load_images(cfg, progress, stop)
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, cfg.resolution, cfg.resolution):
        raise ConfigError(f"The image cache has shape {tuple(pixels.shape)} {pixels.dtype}; "
                          f"expected uint8 [N, 3, {cfg.resolution}, {cfg.resolution}].")
    if len(pixels) == 0:
        raise ConfigError("The dataset has no images.", "Pick another dataset in the Dataset tab.")
    if pixels.numel() < 2 * 1024 ** 3:  # small enough: keep it on the device, index there
        pixels = pixels.to(device)
    total = total_steps(cfg, len(pixels), world)
    report.total = total
    if resume_from is None:
        for text in cfg.run_length_warnings(len(pixels)):
            report("warning", message=text)

    # -- model, noise schedule, optimizer, LR schedule, EMA ------------------------------------
    report("status", message="building the model")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    with MODEL_INIT_LOCK:  # a pipeline loading in another thread must not patch this construction
        model = UNet2DModel(**unet_kwargs(cfg.resolution, cfg.block_out_channels, cfg.layers_per_block,
                                          cfg.down_block_types, cfg.up_block_types, cfg.attention_head_dim))
    if cfg.init_from and resume_from is None:
        from studio.pretrained import load_unet_weights

        report("status", message=f"starting from the weights of {cfg.init_from}")
        load_unet_weights(model, cfg.init_from, cfg.workspace)
    model = prepare_unet_for_training(model, device)  # stock kernels; torch.compile only when asked (speed.py)
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                    prediction_type=cfg.prediction_type)
    optimizer = make_optimizer(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                               weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, device=device)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=total)
    model, optimizer = accelerator.prepare(model, optimizer)
    unet = accelerator.unwrap_model(model)
    ema = None
    if cfg.use_ema:
        ema = EMAModel(unet.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, inv_gamma=cfg.ema_inv_gamma,
                       power=cfg.ema_power, update_after_step=cfg.ema_update_after_step, foreach=True,
                       model_cls=UNet2DModel, model_config=unet.config)
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    sampler = BatchSampler(len(pixels), cfg.train_batch_size, rank, world, cfg.seed)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)
    first_indices: list[int] = []
    quality = SampleQuality(pixels, cfg.num_samples) if is_main else None

    # -- resume ------------------------------------------------------------------------------
    step, smoothed, debias = 0, 0.0, 0.0
    if resume_from is not None:
        report("status", message=f"resuming from {resume_from.name}")
        step, smoothed, debias = load_checkpoint(resume_from, unet, ema, optimizer, lr_scheduler, accelerator,
                                                 sampler, noise_gen, rank, device)
        report("warning" if step >= total else "status",
               message=(f"Checkpoint {resume_from.name} is already at step {step} of {total}: nothing left to train."
                        if step >= total else f"resumed at step {step} of {total}"))

    def save(step: int) -> Path:
        """Checkpoint (all processes take part: the RNG states of every process are gathered)."""
        if not weights_finite(unet):
            raise NonFiniteLossError(f"The weights became non-finite before step {step}; nothing was saved.",
                                     "Lower the learning rate or enable gradient clipping.")
        rng = [rng_state(noise_gen)]
        if world > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)
        path = None
        if is_main:
            state = {"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                     "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                     "ema": ema.state_dict() if ema is not None else None, "rng": rng,
                     "sampler": sampler.state_dict(), "smoothed_loss": [smoothed, debias]}

            def write(folder: Path) -> None:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()},
                          str(folder / "unet.safetensors"))
                torch.save(state, folder / "training_state.pt")
                (folder / "trainer_state.json").write_text(json.dumps(
                    {"step": step, "total": total, "world_size": world, "epoch": sampler.epoch,
                     "config": run_cfg.to_dict()}, indent=1), encoding="utf-8")

            path = save_checkpoint(run.checkpoints_dir, step, write, keep=cfg.checkpoints_total_limit)
            report("checkpoint", step, path=str(path), message=f"checkpoint at step {step}")
        accelerator.wait_for_everyone()
        return path or run.checkpoints_dir

    def draw_samples(step: int) -> None:
        if is_main:
            report("status", step, message=f"sampling at step {step}")
            if ema is not None:
                ema.store(unet.parameters())
                ema.copy_to(unet.parameters())
            try:
                images = sample_images(unet, noise_scheduler, cfg, device, stop)
            except Stopped:  # the loop saves a checkpoint next; this grid is not drawn
                images = None
                report("status", step, message=f"Stop pressed: the sample grid of step {step} is not drawn")
            finally:
                if ema is not None:
                    ema.restore(unet.parameters())
            if images is not None:
                path = save_samples(run, step, images, report.writer)
                report("samples", step, path=str(path), message=f"samples at step {step}")
                quality(images, step, report)
        accelerator.wait_for_everyone()

    def finish(kind: str, step: int, checkpoint: Path | None) -> RunDir:
        model_path = None
        if is_main:
            report("status", step, message="exporting the model")
            model_path = export_pipeline(unet, ema, noise_scheduler, run, run_cfg, step, total, world)
            write_progress_gif(run)
        write_ranks_report(run, rank, world, unet, first_indices, accelerator, is_main)
        if kind == "finished":
            report("finished", step, path=str(model_path), message=f"finished {step} steps; model in {model_path}")
        else:
            report("stopped", step, path=str(checkpoint),
                   message=f"stopped at step {step}; resume from {checkpoint}")
        accelerator.wait_for_everyone()
        return run

    # -- the loop ------------------------------------------------------------------------------
    log_every = 1 if device.type == "cpu" else 10  # host syncs: every step is free on CPU, not on a GPU
    accum = cfg.gradient_accumulation_steps
    if resume_from is None:
        draw_samples(0)
    report("status", step, message="training")
    pending: list[tuple[int, float, torch.Tensor]] = []
    window_start, window_steps = time.perf_counter(), 0
    sec_per_step: float | None = None
    last_saved = step if resume_from is not None else -1
    checkpoint_path: Path | None = resume_from
    model.train()

    def flush() -> None:
        """Step 5: one host sync for all pending losses; non-finite loss ends the run here."""
        nonlocal pending, smoothed, debias, window_start, window_steps, sec_per_step
        if not pending:
            return
        losses = torch.stack([loss for _, _, loss in pending])
        if world > 1:
            losses = accelerator.reduce(losses, "mean")
        values = losses.tolist()
        now = time.perf_counter()
        elapsed = now - window_start
        rate = window_steps * cfg.train_batch_size * accum * world / elapsed if elapsed > 0 else None
        if window_steps and elapsed > 0:
            sec = elapsed / window_steps
            sec_per_step = sec if sec_per_step is None else 0.8 * sec_per_step + 0.2 * sec
        for (s, lr, _), value in zip(pending, values):
            if not math.isfinite(value):
                pending = []
                raise NonFiniteLossError(
                    f"The loss became {value} at step {s}; training stopped and nothing from this step on "
                    "was saved" + (f" (last good checkpoint: {checkpoint_path.name})." if checkpoint_path else "."),
                    "Lower the learning rate, keep gradient clipping on, or use fp32 (mixed_precision 'no').")
            smoothed = LOSS_SMOOTHING * smoothed + (1 - LOSS_SMOOTHING) * value
            debias = LOSS_SMOOTHING * debias + (1 - LOSS_SMOOTHING)
            eta = (total - s) * sec_per_step if sec_per_step is not None else None
            report("step", s, loss=value, smoothed_loss=smoothed / debias, lr=lr, images_per_s=rate, eta_s=eta)
        pending = []
        window_start, window_steps = now, 0

    while step < total:
        should_stop = stop.is_set()
        if world > 1:  # every process must agree to stop at the same step
            flag = accelerator.reduce(torch.tensor([float(should_stop)], device=device), "sum")
            should_stop = bool(flag.item() > 0)
        if should_stop:
            break
        lr = lr_scheduler.get_last_lr()[0]
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            # 1. a batch of images
            clean = get_batch(pixels, sampler, cfg.random_flip, device)
            if not first_indices:
                first_indices = sampler.last_indices.tolist()
            # 2. noise, timesteps, noisy images
            noise = torch.randn(clean.shape, generator=noise_gen, device=device)
            if cfg.noise_offset:
                noise = noise + cfg.noise_offset * torch.randn((clean.shape[0], clean.shape[1], 1, 1),
                                                               generator=noise_gen, device=device)
            timesteps = torch.randint(0, cfg.num_train_timesteps, (clean.shape[0],), generator=noise_gen,
                                      device=device)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            # 3. predict and compare; 4. backward (gradients are synchronised on the last micro-batch)
            sync = accelerator.no_sync(model) if micro < accum - 1 else contextlib.nullcontext()
            with sync:
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
            ema_step(ema, unet.parameters())
        step += 1
        window_steps += 1
        pending.append((step, lr, step_loss))

        save_due = cfg.save_every and step % cfg.save_every == 0 and step < total
        sample_due = cfg.sample_every and step % cfg.sample_every == 0 and step < total
        if step % log_every == 0 or step == total or save_due or sample_due or stop.is_set():
            flush()
        if save_due:
            checkpoint_path, last_saved = save(step), step
        if sample_due:
            draw_samples(step)
            window_start, window_steps = time.perf_counter(), 0

    flush()
    if step >= total:
        if last_saved != step:
            checkpoint_path = save(step)
        draw_samples(step)
        return finish("finished", step, checkpoint_path)
    if last_saved != step:
        checkpoint_path = save(step)
    return finish("stopped", step, checkpoint_path)
