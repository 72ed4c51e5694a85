"""Fine-tune Stable Diffusion on image+caption pairs: LoRA, full UNet, DreamBooth.

The loop is diffusers' ``train_text_to_image(_lora).py`` / ``train_dreambooth(_lora).py`` made
into one readable class: VAE and text encoder frozen, latents = ``vae.encode(pixels) *
scaling_factor``, noise, timesteps, text embeddings as ``encoder_hidden_states``, (min-SNR) MSE on
the UNet's prediction, plus DreamBooth's prior-preservation loss on class images made by the base
model. Unlike the scripts, images and captions are encoded once before training
(``latent_batches``) and the VAE and text encoder leave the device.

The run folder gets ``config.json``, ``events.jsonl``, validation images in ``samples/`` (step 0 is
the untouched base model), atomic checkpoints, and ``lora/`` (diffusers + kohya/A1111 files) or
``model/`` (a diffusers pipeline), each with a model card. Everything around the loop is the
trainer toolkit (DEVELOPERS.md, "Trainer toolkit").
"""

from __future__ import annotations

import contextlib
import functools
import threading
from pathlib import Path
from typing import Any

import torch

from studio.config.finetune import FinetuneConfig
from studio.devices import resolve_device
from studio.errors import Stopped
from studio.events import EventSink
from studio.runs import RunDir
from studio.stopping import raise_if_stopped
from studio.trainers.batches import SeededEpochs
from studio.trainers.export import export_finetune, push_to_hub, write_model_card
from studio.trainers.latent_batches import LatentBatches
from studio.trainers.losses import diffusion_target, draw_noise, per_sample_loss
from studio.trainers.optimization import ema_weights, make_ema, make_lr_schedule, make_optimizer
from studio.trainers.reporting import LossMeter, Reporter, image_row, weights_sha256, write_ranks_report
from studio.trainers.resume import (gather_from_processes, generator_states, load_tensor_checkpoint,
                                    save_tensor_checkpoint, trainable_tensors)
from studio.trainers.sampling import make_class_images, validation_images
from studio.trainers.setup import RunFolder, fresh_accelerator, open_run, phase_stop, run_reported, \
    seed_everything, stop_requested, write_run_config
from studio.trainers.stable_diffusion import (add_trainables, assemble_pipeline, check_sd_pipeline, image_prompts,
                                              frozen_weight_dtype, is_oom, load_base_pipeline, load_frozen_base,
                                              oom_advice, out_of_memory_error, sdxl_conditioning, trainable_groups)

#: What other code imports from here (most of it defined in the toolkit modules beside this one).
__all__ = ["check_sd_pipeline", "image_prompts", "load_base_pipeline", "out_of_memory_error", "push_to_hub",
           "train", "write_model_card"]

TASK = "finetune"
#: Gradient clipping norm (diffusers' scripts default ``max_grad_norm=1.0``).
MAX_GRAD_NORM = 1.0
#: Smoothing of the reported loss curve.
LOSS_SMOOTHING = 0.9
_is_oom = is_oom  # the name tests know


def train(cfg: FinetuneConfig, events: EventSink, stop: threading.Event, run: RunDir | None = None) -> RunDir:
    """Fine-tune ``cfg.pretrained_model_name_or_path`` and export LoRA weights or a pipeline.

    Args:
        cfg: The validated fine-tune settings.
        events: Receives status, step, samples, checkpoint and final events.
        stop: Checked after every step; when set, a checkpoint is saved and the run stops.
        run: The run folder (a new one is made when None; the resumed one for ``resume``).

    Returns:
        The run folder.

    Raises:
        StudioError: a problem a person can fix (data, model, memory, non-finite loss).
    """
    device = resolve_device(cfg.device)
    accelerator = fresh_accelerator("no" if device == "cpu" else cfg.mixed_precision, device)
    folder = open_run(cfg, TASK, accelerator, run)
    report = Reporter(events, folder.run if accelerator.is_main_process else None, cfg.max_train_steps)
    trainer = _Trainer(cfg, report, stop, folder, accelerator)  # only keeps its arguments: nothing to fail
    return run_reported(folder, report, trainer.fit, functools.partial(oom_advice, cfg))


class _Trainer:
    """One fine-tune: ``fit`` sets up (numbered steps), then runs ``loop``. Read top to bottom."""

    def __init__(self, cfg: FinetuneConfig, report: Reporter, stop: threading.Event, folder: RunFolder,
                 accelerator: Any) -> None:
        self.cfg, self.report, self.stop, self.run = cfg, report, stop, folder.run
        self.checkpoint, self.accelerator, self.device = folder.resume_from, accelerator, accelerator.device
        self.weight_dtype = frozen_weight_dtype(accelerator.mixed_precision)
        self.warnings = folder.warnings

    def fit(self) -> None:
        cfg, report, acc = self.cfg, self.report, self.accelerator
        report.warnings(self.warnings)
        if self.device.type == "cpu" and cfg.mixed_precision != "no":
            report("warning", message=f"Mixed precision {cfg.mixed_precision} is off on CPU (fp32 is faster here).")
        # 1. name the run (so `--config <its config.json> --resume latest` finds it), seed
        write_run_config(self.run, TASK, cfg, acc)
        report.open_tensorboard()
        seed_everything(cfg.seed)
        rank = acc.process_index
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1_000 * rank)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1_000 * rank + 1)
        self.generators = {"data": self.data_gen, "noise": self.noise_gen}  # their states go into checkpoints

        # 2. the base model, once the memory plan says the run fits: every module frozen, VAE and text encoders placed
        self.phase_stop = phase_stop(self.stop, acc)  # phases before the loop: this process alone may stop them
        base = load_frozen_base(cfg, self.device, self.weight_dtype, self.phase_stop, report)
        self.pipe, self.unet, self.vae, self.text_encoders = base.pipe, base.unet, base.vae, base.text_encoders
        self.text_encoder, self.is_sdxl = base.text_encoders[0], base.is_sdxl
        self.noise_scheduler, self.prediction_type = base.noise_scheduler, base.noise_scheduler.config.prediction_type

        # 3. the data: one prompt per image
        self.batches = LatentBatches(cfg, self.vae, base.tokenizers, self.text_encoders, self.device,
                                     self.weight_dtype, base.vae_dtype, self.data_gen, self.noise_gen)
        self.batches.load(report, self.phase_stop)
        self.validation_prompts = list(cfg.validation_prompts) or [cfg.trigger_words or self.batches.prompts[0]]

        # 4. DreamBooth class images, made by the untouched base model
        class_pixels = None
        if cfg.with_prior_preservation:
            class_pixels = make_class_images(self.pipe, cfg, self.run.root / "class_images", self.device, acc.autocast,
                                             self.phase_stop, report)
        raise_if_stopped(self.phase_stop, "preparing the run")

        # 5. what trains: LoRA adapters or the whole UNet
        self.text_encoder_trains = cfg.train_text_encoder
        add_trainables(cfg, self.unet, self.text_encoder, self.device, self.weight_dtype)

        # 6. encode once (or say why not) and free the frozen modules
        self.batches.encode_once(report, self.phase_stop, class_pixels, self.run.root / "class_images",
                                 self.text_encoder_trains)
        self.order = SeededEpochs(self.batches.count, cfg.train_batch_size, cfg.seed, rank, acc.num_processes)
        self.class_order = SeededEpochs(len(class_pixels), cfg.train_batch_size, cfg.seed + 7, rank,
                                        acc.num_processes) if class_pixels is not None else None

        # 7. optimizer, schedule, EMA, accelerate; the checkpoint to resume from
        self.prepare_optimization()
        self.start_step = 0
        if self.checkpoint is not None:
            self.load_checkpoint(self.checkpoint)
            report("status", step=self.start_step,
                   message=f"resumed from {self.checkpoint.name} (step {self.start_step})")
        self.loop()

    def prepare_optimization(self) -> None:
        """AdamW (fused, or bitsandbytes 8-bit) over the trainable weights, LR schedule, EMA, accelerate."""
        cfg, acc = self.cfg, self.accelerator
        groups, self.trainable = trainable_groups(cfg, self.unet, self.text_encoder, self.text_encoder_trains)
        self.optimizer = make_optimizer(groups, lr=cfg.learning_rate, weight_decay=1e-2, device=self.device,
                                        eight_bit=cfg.use_8bit_adam)
        self.lr_scheduler = make_lr_schedule(cfg.lr_scheduler, self.optimizer, cfg.lr_warmup_steps,
                                             cfg.max_train_steps)
        self.ema = make_ema(self.unet, type(self.unet)) if cfg.use_ema else None  # a UNet2DConditionModel
        if self.text_encoder_trains:
            self.unet, self.text_encoder, self.optimizer, self.lr_scheduler = acc.prepare(
                self.unet, self.text_encoder, self.optimizer, self.lr_scheduler)
            self.batches.text_encoders[0] = self.text_encoder  # the wrapped one, so gradients synchronise
        else:
            self.unet, self.optimizer, self.lr_scheduler = acc.prepare(self.unet, self.optimizer, self.lr_scheduler)

    # ---------------------------------------------------------------- the loop
    def loop(self) -> None:
        cfg, report, acc = self.cfg, self.report, self.accelerator
        if self.start_step == 0:
            self.validate(0)
            raise_if_stopped(self.phase_stop, "drawing the validation images of the base model")
        step, accum = self.start_step, cfg.gradient_accumulation_steps
        meter = LossMeter(report, cfg.max_train_steps, cfg.train_batch_size * accum * acc.num_processes,
                          LOSS_SMOOTHING, acc)
        meter.last_checkpoint = self.checkpoint
        report("status", step=step, message=f"training ({self.prediction_type} target)")
        while step < cfg.max_train_steps:
            # 1. forward/backward over the accumulated micro-batches
            total = None
            for m in range(accum):
                sync = m == accum - 1
                with (acc.no_sync(self.unet) if not sync and acc.num_processes > 1 else contextlib.nullcontext()):
                    loss = self.micro_batch_loss(step * accum + m) / accum
                    acc.backward(loss)
                total = loss.detach() if total is None else total + loss.detach()
            # 2. clip, step, schedule, EMA
            acc.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.unet.parameters())
            step += 1
            meter.add(step, self.lr_scheduler.get_last_lr()[0], total)
            # 3. report (one host sync) and refuse to go on with a broken loss; validation, stop, checkpoints
            validate_due = cfg.validation_every and step % cfg.validation_every == 0 and step < cfg.max_train_steps
            save_due = cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_train_steps
            meter.flush_if_due(step, validate_due or save_due or self.stop.is_set())
            if validate_due:
                self.validate(step)
                meter.restart_clock()
            if stop_requested(self.stop, acc):
                path = self.save(step)
                report("stopped", step=step, path=str(path), message=f"stopped at step {step}; resume to go on")
                return
            if save_due:
                meter.last_checkpoint = self.save(step)
        meter.flush()
        self.validate(step)
        self.save(step)
        write_ranks_report(self.run, acc, weights_sha256(v for _, v in sorted(self.trainable_state().items())),
                           getattr(self, "first_batch", []))
        out = self.export(step)
        report("finished", step=step, path=str(out), message=f"finished {step} steps; saved to {out.name}/")

    def micro_batch_loss(self, micro: int) -> torch.Tensor:
        """The loss of one micro-batch (instance images, plus class images with prior preservation)."""
        rows = self.order.rows(micro)
        if micro == 0:
            self.first_batch = rows.tolist()
        loss = self.loss_on(self.batches.image_latents(rows), *self.batches.text_embeddings(rows)).mean()
        if self.class_order is not None:
            class_rows = self.class_order.rows(micro)
            prior = self.loss_on(self.batches.image_latents(class_rows, True),
                                 *self.batches.text_embeddings(class_rows, True)).mean()
            loss = loss + self.cfg.prior_loss_weight * prior
        return loss

    def loss_on(self, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample diffusion loss: noise, add at random timesteps, predict, (min-SNR) MSE."""
        cfg = self.cfg
        latents = latents.float()
        b = latents.shape[0]
        noise = draw_noise(latents.shape, self.noise_gen, self.device, cfg.noise_offset)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,),
                                  generator=self.data_gen).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(self.noise_scheduler, self.prediction_type, latents, noise, timesteps)
        with self.accelerator.autocast():
            pred = self.unet(noisy.to(self.weight_dtype) if cfg.is_lora else noisy, timesteps, encoder_hidden_states,
                             added_cond_kwargs=sdxl_conditioning(pooled, b, cfg.resolution, self.device),
                             return_dict=False)[0]
        return per_sample_loss(pred, target, timesteps, self.noise_scheduler, self.prediction_type, cfg.snr_gamma)

    # ---------------------------------------------------------------- validation images
    @torch.no_grad()
    def validate(self, step: int) -> Path | None:
        """Images of the validation prompts with a fixed seed, side by side in ``samples/step-N.png``."""
        cfg, acc = self.cfg, self.accelerator
        if not acc.is_main_process:
            return None
        self.report("status", step=step, message=f"validation images at step {step}")
        unet, text_encoder = acc.unwrap_model(self.unet), acc.unwrap_model(self.text_encoder)
        try:
            with self.batches.for_validation(unet, text_encoder), ema_weights(self.ema, unet):
                pipe = assemble_pipeline(self.pipe, self.vae, unet, text_encoder, self.is_sdxl)
                images = validation_images(pipe, self.validation_prompts, cfg, self.device, acc.autocast, self.stop)
        except Stopped:  # the loop saves a checkpoint next (or, before step 1, ends "stopped"); no grid
            self.report("status", step=step, message=f"Stop pressed: no validation images at step {step}")
            return None
        return self.report.samples(step, image_row(images, cfg.resolution), message=" | ".join(
            self.validation_prompts) + (" (base model)" if step == 0 else ""))

    # ---------------------------------------------------------------- checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name ('unet.' / 'text_encoder.' prefixes)."""
        modules = {"unet": self.unet, "text_encoder": self.text_encoder} if self.text_encoder_trains else \
            {"unet": self.unet}
        return trainable_tensors({k: self.accelerator.unwrap_model(m) for k, m in modules.items()})

    def save(self, step: int) -> Path | None:
        """Atomic tensor checkpoint (``studio.trainers.resume``); every process gives its RNG states."""
        acc = self.accelerator
        acc.wait_for_everyone()
        rngs = gather_from_processes(generator_states(self.generators), acc)
        if not acc.is_main_process:
            return None
        path = save_tensor_checkpoint(self.run, step, trainable=self.trainable_state(), optimizer=self.optimizer,
                                      lr_scheduler=self.lr_scheduler, ema=self.ema, rngs=rngs,
                                      config=self.cfg.to_dict(), keep=self.cfg.checkpoints_total_limit)
        self.report("checkpoint", step=step, path=str(path), message=f"checkpoint {path.name}")
        return path

    def load_checkpoint(self, folder: Path) -> None:
        """Restore everything ``save`` wrote, so the next step is the one that would have come."""
        acc = self.accelerator
        modules = {"unet": acc.unwrap_model(self.unet), "text_encoder": acc.unwrap_model(self.text_encoder)}
        state = load_tensor_checkpoint(folder, modules=modules, optimizer=self.optimizer,
                                       lr_scheduler=self.lr_scheduler, ema=self.ema, generators=self.generators,
                                       rank=acc.process_index, world=acc.num_processes)
        self.start_step = int(state["step"])

    # ---------------------------------------------------------------- export
    def export(self, step: int) -> Path:
        """Write ``lora/`` or ``model/`` with a model card; push to the Hub when asked."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return self.run.root
        self.report("status", step=step, message="exporting")
        unet, text_encoder = acc.unwrap_model(self.unet), acc.unwrap_model(self.text_encoder)
        pipe = assemble_pipeline(self.pipe, self.vae, unet, text_encoder, self.is_sdxl)
        return export_finetune(self.run, self.cfg, pipe, self.text_encoder_trains, step, self.report, self.ema)
