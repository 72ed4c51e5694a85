"""Fine-tune Stable Diffusion on image+caption pairs: LoRA, full UNet, DreamBooth.

The loop is diffusers' ``train_text_to_image(_lora).py`` / ``train_dreambooth(_lora).py``
made into one readable function: VAE and text encoder frozen, latents =
``vae.encode(pixels) * scaling_factor``, noise, timesteps, text embeddings as
``encoder_hidden_states``, MSE on the UNet's prediction (optionally min-SNR weighted),
plus DreamBooth's prior-preservation loss on class images made by the base model.

What differs from the scripts is the work it avoids: images and captions are encoded
once before training (``studio.latent_cache``) and the VAE and text encoder leave the
device; the step does no host sync beyond reading the loss once. Random crops and
text-encoder training make a cache impossible; then the trainer says so and encodes
per step like the scripts.

Everything lands in the run folder: ``config.json``, ``events.jsonl``, validation
images in ``samples/`` (step 0 is the untouched base model), atomic checkpoints,
``lora/`` (diffusers ``pytorch_lora_weights.safetensors`` + a kohya/A1111 file) or
``model/`` (a diffusers pipeline), each with a model card ``README.md``.

This file is the loop and its set-up; the pieces around it live in the trainer toolkit:
``studio.trainers.stable_diffusion`` (base model, trainables), ``sampling`` (class and
validation images), ``reporting`` (grids) and ``export`` (LoRA/pipeline export, model card, Hub push).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from studio.checkpoints import resolve_resume, save_checkpoint
from studio.config.finetune import FinetuneConfig
from studio.errors import CheckpointError, ConfigError, DataError, ModelError, Stopped, StudioError, describe_exception
from studio.stopping import call_stoppable, raise_if_stopped
from studio.events import Event, EventSink
from studio.runs import RunDir, list_runs
from studio.trainers.export import export_lora, push_to_hub, write_model_card
from studio.trainers.export import export_sd_pipeline as export_pipeline
from studio.trainers.reporting import save_grid
from studio.trainers.sampling import make_class_images, validation_images
from studio.trainers.stable_diffusion import (
    add_trainables,
    assemble_pipeline,
    check_sd_pipeline,
    load_base_pipeline,
    move_module,
)

#: What other code imports from here (some of it defined in the toolkit modules beside this one).
__all__ = ["check_sd_pipeline", "image_prompts", "load_base_pipeline", "open_run", "out_of_memory_error",
           "push_to_hub", "train", "write_model_card"]

TASK = "finetune"
#: Gradient clipping norm (diffusers' scripts default ``max_grad_norm=1.0``).
MAX_GRAD_NORM = 1.0
#: Smoothing of the reported loss curve.
LOSS_SMOOTHING = 0.9


# --------------------------------------------------------------------------- helpers
def open_run(cfg: FinetuneConfig, run: RunDir | None = None) -> RunDir:
    """The run folder to train in: the one given, the one being resumed, or a new one.

    Raises:
        ConfigError: a new run whose name is taken.
    """
    if run is not None:
        run.root.mkdir(parents=True, exist_ok=True)
        for sub in (run.samples_dir, run.checkpoints_dir, run.logs_dir):
            sub.mkdir(exist_ok=True)
        return run
    resume = (cfg.resume or "").strip()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.run_name:
        raise ConfigError("Training on several processes needs a run name so they share one run folder.",
                          "Set run_name in the config.")
    if not resume and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # several processes (torchrun / accelerate launch) share the named run folder
        run = RunDir(Path(cfg.workspace) / cfg.run_name)
        for sub in (run.samples_dir, run.checkpoints_dir, run.logs_dir):
            sub.mkdir(parents=True, exist_ok=True)
        return run
    if not resume:
        return RunDir.create(cfg.workspace, TASK, cfg.run_name)
    if resume != "latest":  # a checkpoint folder: its run is two levels up
        path = Path(resume).expanduser()
        if not path.exists():
            raise CheckpointError(f"Checkpoint not found: {path}.", "Check the path, or use 'latest'.")
        return RunDir(path.resolve().parent.parent)
    if cfg.run_name:
        root = Path(cfg.workspace) / cfg.run_name
        if not root.is_dir():
            raise CheckpointError(f"No run named {cfg.run_name!r} in {cfg.workspace} to resume.",
                                  "Check the run name, or leave it empty to resume the newest fine-tune.")
        return RunDir(root)
    runs = [r for r in list_runs(cfg.workspace) if r.task == TASK]
    if not runs:
        raise CheckpointError(f"No fine-tune run in {cfg.workspace} to resume.", "Start a new run first.")
    return RunDir(runs[0].path)


def image_prompts(cfg: FinetuneConfig, captions: list[str] | None, count: int) -> list[str]:
    """The prompt of each training image: the instance prompt (DreamBooth) or its caption.

    Raises:
        DataError: when an image has neither a caption nor an instance prompt to fall back on.
    """
    instance = cfg.instance_prompt.strip()
    if cfg.is_dreambooth:
        return [instance] * count
    caps = [(c or "").strip() for c in (captions or [""] * count)]
    missing = sum(1 for c in caps if not c)
    if missing and not instance:
        raise DataError(f"{missing} of {count} images have no caption and no instance prompt is set.",
                        "Add captions (metadata.jsonl or a .txt beside each image), or set an instance prompt.")
    return [c or instance for c in caps]


def _batch_indices(micro: int, batch: int, count: int, seed: int, rank: int, world: int,
                   perms: dict[int, torch.Tensor]) -> torch.Tensor:
    """Images of micro-batch ``micro``: walk a seeded permutation per epoch (no state to save)."""
    out = []
    for j in range(batch):
        position = (micro * world + rank) * batch + j
        epoch, offset = divmod(position, count)
        if epoch not in perms:
            perms.clear()  # only the current epoch is ever needed again
            perms[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perms[epoch][offset]))
    return torch.tensor(out, dtype=torch.long)


def _random_crop(image, resolution: int, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Shorter side to ``resolution``, a random square crop, an optional mirror -> [3, R, R] in [-1, 1]."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left = int(torch.randint(0, nw - resolution + 1, (1,), generator=gen))
    top = int(torch.randint(0, nh - resolution + 1, (1,), generator=gen))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float() / 127.5 - 1.0


def out_of_memory_error(cfg: FinetuneConfig, exc: BaseException) -> StudioError:
    """Turn an out-of-memory error into advice that fits this config."""
    tips = []
    if not cfg.is_lora:
        tips.append("use LoRA instead of a full fine-tune")
    if not cfg.gradient_checkpointing:
        tips.append("turn on gradient checkpointing")
    if cfg.train_batch_size > 1:
        tips.append("use a smaller batch (raise gradient accumulation to keep the effective batch)")
    if cfg.resolution > 256:
        tips.append(f"lower the resolution (now {cfg.resolution})")
    if cfg.train_text_encoder:
        tips.append("stop training the text encoder")
    advice = "; ".join(tips) or "use a smaller base model or a machine with more memory"
    return StudioError("Out of memory while fine-tuning.", f"Try: {advice}.")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _load_plain(path: Path) -> Any:
    """A torch file of tensors, numbers, strings, lists and dicts only (``weights_only=True``).

    Raises:
        CheckpointError: when the file holds anything else: such a pickle could run code
            when loaded, so it is refused without being run.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"Refused to load {path.parent.name}/{path.name}: it holds Python objects other than "
                              "tensors and numbers, which could run code when loaded.",
                              "Resume only from checkpoints this studio wrote, or start a new run.") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"Cannot read {path.parent.name}/{path.name}: {str(exc).splitlines()[0][:200]}",
                              "Resume from another checkpoint, or start a new run.") from None


class _Reporter:
    """Sends events to the sink and, on the main process, to ``events.jsonl``."""

    def __init__(self, events: EventSink, run: RunDir, total: int, main: bool) -> None:
        self.events, self.run, self.total, self.main = events, run, total, main

    def __call__(self, kind: str, **fields: Any) -> None:
        event = Event(kind, total=self.total, **fields)
        if self.main:
            self.run.append_event(event)
            self.events(event)


# --------------------------------------------------------------------------- entry point
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
    run = open_run(cfg, run)
    main = int(os.environ.get("RANK", "0")) == 0
    run_lock = run.lock(f"{TASK} '{run.name}'").acquire() if main else None  # one trainer per run folder
    try:
        return _train_in(cfg, events, stop, run, main)
    finally:
        if run_lock is not None:
            run_lock.release()


def _train_in(cfg: FinetuneConfig, events: EventSink, stop: threading.Event, run: RunDir, main: bool) -> RunDir:
    """``train`` once its run folder is open and locked."""
    report = _Reporter(events, run, cfg.max_train_steps, main=main)
    trainer = _Trainer(cfg, report, stop, run)
    try:
        trainer.fit()
    except Stopped as exc:  # Stop during a phase before the loop: nothing trained, no checkpoint changed
        resumed = getattr(trainer, "checkpoint", None)
        report("stopped", message=exc.message + (f" {resumed.name} is unchanged: resume to go on." if resumed
                                                 else " Nothing was trained."))
    except BaseException as exc:
        error = out_of_memory_error(cfg, exc) if _is_oom(exc) else exc
        report("failed", message=describe_exception(error))
        try:
            import traceback

            run.logs_dir.mkdir(parents=True, exist_ok=True)
            (run.logs_dir / "error.txt").write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
        except OSError:
            pass
        if error is exc:
            raise
        raise error from exc
    return run


class _Trainer:
    """One fine-tune: set up once, then ``fit`` runs the loop. Read top to bottom."""

    def __init__(self, cfg: FinetuneConfig, report: _Reporter, stop: threading.Event, run: RunDir) -> None:
        self.cfg, self.report, self.stop, self.run = cfg, report, stop, run

    # ---------------------------------------------------------------- setup
    def fit(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        from studio.devices import resolve_device

        cfg, report = self.cfg, self.report
        device = resolve_device(cfg.device)
        on_cpu = device == "cpu"
        mixed = "no" if on_cpu else cfg.mixed_precision
        if on_cpu and cfg.mixed_precision != "no":
            report("warning", message=f"Mixed precision {cfg.mixed_precision} is off on CPU (fp32 is faster here).")
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # runs with other settings may precede this one
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        self.accelerator = acc = Accelerator(cpu=on_cpu, mixed_precision=mixed)
        self.device = acc.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
        report.main = acc.is_main_process

        # 1. resume point (before anything slow, so a bad path fails fast)
        self.checkpoint = resolve_resume(cfg.resume, self.run.checkpoints_dir,
                                         warn=lambda m: report("warning", message=m))
        if acc.is_main_process:  # names this run, so `python -m studio finetune --config <it> --resume latest` finds it
            self.run.write_config(TASK, cfg.replace(workspace=str(self.run.root.parent), run_name=self.run.name,
                                                    resume="").to_dict())
        self.seed_all(cfg.seed)

        # 2. the base model, once the memory plan says the run fits (refused before allocating)
        from studio.budget import finetune_plan, local_unet_config

        finetune_plan(cfg, str(self.device) if self.device.type != "cpu" else "cpu",
                      unet_config=local_unet_config(cfg.pretrained_model_name_or_path)).check()
        report("status", message=f"loading base model {cfg.pretrained_model_name_or_path}")
        pipe = call_stoppable(lambda: load_base_pipeline(cfg.pretrained_model_name_or_path, cfg.workspace),
                              self.stop, f"loading the base model {cfg.pretrained_model_name_or_path}")
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        # SDXL has a second text encoder; its prompt embedding is both side by side, plus a pooled one
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.is_sdxl else [])
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.is_sdxl else [])
        if self.is_sdxl and cfg.train_text_encoder:
            raise ConfigError("Text-encoder training is offered for SD 1.x/2.x; for SDXL only the UNet trains.",
                              "Turn off 'Train text encoder'.")
        # SDXL's VAE overflows in fp16, so it stays fp32 (it runs once per image, to fill the cache)
        self.vae_dtype = torch.float32 if self.is_sdxl else self.weight_dtype
        self.warn_about_memory()
        sched_config = dict(pipe.scheduler.config)
        if cfg.prediction_type:
            sched_config["prediction_type"] = cfg.prediction_type
        self.noise_scheduler = DDPMScheduler.from_config(sched_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"The base scheduler predicts {self.prediction_type!r}; fine-tuning supports "
                             "epsilon and v_prediction.", "Set prediction_type explicitly.")
        for module in (self.vae, *self.text_encoders, self.unet):
            module.requires_grad_(False)
        move_module(self.vae, self.device, self.vae_dtype)
        for module in self.text_encoders:
            move_module(module, self.device, self.weight_dtype)

        # 3. the data: one prompt per image
        self.load_data()
        self.prompts_for_validation = list(cfg.validation_prompts) or [cfg.trigger_words or self.prompts[0]]

        # 4. DreamBooth class images, made by the untouched base model
        self.class_pixels = None
        if cfg.with_prior_preservation:
            self.class_pixels = make_class_images(self.pipe, cfg, self.run.root / "class_images", self.device,
                                                  self.accelerator.autocast, self.stop, report)
        raise_if_stopped(self.stop, "preparing the run")

        # 5. what trains: LoRA adapters or the whole UNet
        self.text_encoder_trains = cfg.train_text_encoder
        add_trainables(cfg, self.unet, self.text_encoder, self.device, self.weight_dtype)

        # 6. encode once (or say why not) and free the frozen modules
        self.encode_once()

        # 7. optimizer, schedule, EMA, accelerate
        self.make_optimizer()
        self.start_step = 0
        if self.checkpoint is not None:
            self.load_checkpoint(self.checkpoint)
            report("status", step=self.start_step,
                   message=f"resumed from {self.checkpoint.name} (step {self.start_step})")
        self.loop()

    def warn_about_memory(self) -> None:
        """Say so up front when the UNet's training state alone will not fit the GPU (e.g. full SDXL)."""
        cfg = self.cfg
        params = sum(p.numel() for p in self.unet.parameters())
        if cfg.is_lora:  # frozen weights in the training dtype; the adapters are tiny
            need = params * (2 if self.weight_dtype != torch.float32 else 4)
        else:  # fp32 weights, gradients and two Adam moments (+ an EMA copy)
            need = params * 4 * (4 + (1 if cfg.use_ema else 0)) // (2 if cfg.use_8bit_adam else 1)
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            if need > 0.8 * total:
                self.report("warning", message=(
                    f"This {cfg.method} fine-tune keeps about {need / 2**30:.0f} GiB of UNet weights and optimizer "
                    f"state, and this GPU has {total / 2**30:.0f} GiB: it will likely run out of memory. "
                    + out_of_memory_error(cfg, MemoryError()).hint))
        elif self.is_sdxl:
            self.report("warning", message="SDXL on CPU trains very slowly; a GPU with 16+ GiB (LoRA) is advised.")

    def seed_all(self, seed: int) -> None:
        """Seed python, torch and the two step generators (data order and noise)."""
        rank = self.accelerator.process_index
        random.seed(seed)
        torch.manual_seed(seed)
        self.data_gen = torch.Generator().manual_seed(seed + 1_000 * rank)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(seed + 1_000 * rank + 1)

    def load_data(self) -> None:
        """Read the dataset as uint8 tensors (center crop) or as PIL images (random crop)."""
        from studio import data as studio_data

        cfg = self.cfg
        self.report("status", message=f"loading dataset {cfg.data.label}")
        cache_root = Path(cfg.workspace) / ".cache"
        self.images = None
        if cfg.center_crop:
            cache = studio_data.load_tensor_cache(cfg.data, cfg.resolution, cache_root, center_crop=True,
                                                  stop=self.stop)
            self.pixels, captions, self.data_key = cache.pixels, cache.captions, cache.key
        else:
            dataset = studio_data.load_image_dataset(cfg.data, scratch=cache_root, stop=self.stop)
            self.images = [dataset.image(i) for i in range(len(dataset))]
            self.pixels, captions, self.data_key = None, dataset.captions, dataset.fingerprint
        count = len(self.images) if self.images is not None else int(self.pixels.shape[0])
        if count == 0:
            raise DataError("The dataset has no usable images.", "Pick another dataset in the Dataset tab.")
        self.prompts = image_prompts(cfg, captions, count)
        self.count = count

    def encode_once(self) -> None:
        """Cache latents and text embeddings (or explain the fallback), then free the VAE/text encoder."""
        from studio.latent_cache import build_latent_cache, build_text_cache, free_module, tokenize

        cfg, report = self.cfg, self.report
        cache_root = Path(cfg.workspace) / ".cache" / "finetune"
        extra = [cfg.class_prompt.strip()] if self.class_pixels is not None else []
        self.latents = self.class_latents = self.text = None
        self.cache_images = cfg.cache_latents and self.images is None
        self.cache_text = cfg.cache_latents and not self.text_encoder_trains
        if cfg.cache_latents and not self.cache_images:
            report("warning", message="Random crop changes every step, so image latents cannot be cached: "
                                      "the VAE encodes every step (turn on center crop to cache them).")
        if cfg.cache_latents and not self.cache_text:
            report("warning", message="The text encoder is training, so text embeddings cannot be cached: "
                                      "captions are encoded every step.")
        if self.cache_images:
            report("status", message=f"caching latents of {self.count} images")
            self.latents = build_latent_cache(
                self.vae, self.pixels, data_key=self.data_key, resolution=cfg.resolution,
                random_flip=cfg.random_flip, cache_root=cache_root, device=self.device, dtype=self.vae_dtype,
                progress=lambda done, total: report("status", message=f"caching latents {done}/{total}"),
                stop=self.stop)
            if self.latents.hit:
                report("status", message="latents loaded from cache (no VAE encode)")
        if self.class_pixels is not None:
            # class images are exactly R x R: cropping is the identity, so they are always cacheable
            self.class_latents = build_latent_cache(
                self.vae, self.class_pixels, data_key=f"class-{self.run.name}-{len(self.class_pixels)}",
                resolution=cfg.resolution, random_flip=cfg.random_flip, cache_root=self.run.root / "class_images",
                device=self.device, dtype=self.vae_dtype, stop=self.stop)
        if self.cache_text:
            self.text = build_text_cache(self.tokenizers, self.text_encoders, self.prompts + extra,
                                         cache_root=cache_root, device=self.device, stop=self.stop)
            self.prompt_ids = self.text.index_of(self.prompts)
            self.class_prompt_id = self.text.index_of(extra)[0] if extra else None
        else:
            self.token_ids = [tokenize(tok, [""] + self.prompts + extra) for tok in self.tokenizers]
        if self.latents is not None and self.device.type != "cpu":
            self.latents.mean = self.latents.mean.to(self.device)
            self.latents.std = self.latents.std.to(self.device)
        # the frozen parts leave the device while the UNet trains (back only for validation)
        if self.cache_images:
            free_module(self.vae)
        if self.cache_text:
            for module in self.text_encoders:
                free_module(module)

    def make_optimizer(self) -> None:
        """AdamW (fused where the device has it, or bitsandbytes 8-bit), LR schedule, EMA, accelerate."""
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        unet_params = [p for p in self.unet.parameters() if p.requires_grad]
        groups = [{"params": unet_params, "lr": cfg.learning_rate}]
        te_params = [p for p in self.text_encoder.parameters() if p.requires_grad] if self.text_encoder_trains else []
        if te_params:
            groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
        self.trainable = unet_params + te_params
        if cfg.use_8bit_adam:
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, weight_decay=1e-2)
        else:
            fused = self.device.type in ("cuda", "cpu")
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=1e-2, fused=fused)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps)
        self.ema = None
        if cfg.use_ema:
            from diffusers import UNet2DConditionModel
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.unet.parameters(), model_cls=UNet2DConditionModel, model_config=self.unet.config)
            self.ema.to(self.device)
        acc = self.accelerator
        if self.text_encoder_trains:
            self.unet, self.text_encoder, self.optimizer, self.lr_scheduler = acc.prepare(
                self.unet, self.text_encoder, self.optimizer, self.lr_scheduler)
            self.text_encoders[0] = self.text_encoder  # the wrapped one, so gradients synchronise
        else:
            self.unet, self.optimizer, self.lr_scheduler = acc.prepare(self.unet, self.optimizer, self.lr_scheduler)

    # ---------------------------------------------------------------- one step
    def text_embeddings(self, rows: torch.Tensor, is_class: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder hidden states (and SDXL's pooled embedding) for images ``rows``, with caption dropout."""
        cfg = self.cfg
        n = len(rows)
        drop = (torch.rand(n, generator=self.data_gen) < cfg.caption_dropout) if cfg.caption_dropout and not is_class \
            else torch.zeros(n, dtype=torch.bool)
        if self.cache_text:
            ids = torch.full((n,), int(self.class_prompt_id), dtype=torch.long) if is_class else self.prompt_ids[rows]
            ids = torch.where(drop, torch.zeros_like(ids), ids)
            pooled = self.text.pooled[ids].to(self.device, self.weight_dtype) if self.text.pooled is not None else None
            return self.text.embeds[ids].to(self.device, self.weight_dtype), pooled
        # token rows: 0 is "", 1..N the images, N+1 the class prompt
        ids = torch.full((n,), len(self.prompts) + 1, dtype=torch.long) if is_class else rows + 1
        ids = torch.where(drop, torch.zeros_like(ids), ids)
        from studio.latent_cache import encode_tokens

        with torch.no_grad() if not self.text_encoder_trains else contextlib.nullcontext():
            return encode_tokens(self.text_encoders, [t[ids].to(self.device) for t in self.token_ids])

    def image_latents(self, rows: torch.Tensor, is_class: bool = False) -> torch.Tensor:
        """Scaled latents for images ``rows``: sampled from the cache, or encoded now."""
        cfg = self.cfg
        cache = self.class_latents if is_class else self.latents
        views = torch.randint(0, 2, (len(rows),), generator=self.data_gen) if cfg.random_flip \
            else torch.zeros(len(rows), dtype=torch.long)
        if cache is not None:
            noise_device = cache.mean.device
            gen = self.noise_gen if noise_device.type == self.device.type else None
            return cache.sample(rows.to(noise_device), views.to(noise_device), gen).to(self.device)
        if self.images is not None:
            pixels = torch.stack([_random_crop(self.images[int(i)], cfg.resolution, self.data_gen, bool(v))
                                  for i, v in zip(rows, views)])
        else:
            pixels = self.pixels[rows].float() / 127.5 - 1.0
            pixels = torch.where(views.view(-1, 1, 1, 1).bool(), torch.flip(pixels, dims=[-1]), pixels)
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
            return (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=self.noise_gen,
                                                       device=self.device, dtype=dist.mean.dtype)) \
                * self.vae.config.scaling_factor

    def loss_on(self, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample diffusion loss: noise, add at random timesteps, predict, (min-SNR) MSE."""
        from diffusers.training_utils import compute_snr

        cfg = self.cfg
        latents = latents.float()
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.noise_gen, device=self.device)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=self.noise_gen,
                                                           device=self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,),
                                  generator=self.data_gen).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else \
            self.noise_scheduler.get_velocity(latents, noise, timesteps)
        with self.accelerator.autocast():
            pred = self.unet(noisy.to(self.weight_dtype) if self.cfg.is_lora else noisy, timesteps,
                             encoder_hidden_states, added_cond_kwargs=self.sdxl_conditioning(pooled, b),
                             return_dict=False)[0]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma:
            snr = compute_snr(self.noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=cfg.snr_gamma)
            weights = weights / snr if self.prediction_type == "epsilon" else weights / (snr + 1)
            per_sample = per_sample * weights
        return per_sample

    def sdxl_conditioning(self, pooled: torch.Tensor | None, batch: int) -> dict[str, torch.Tensor] | None:
        """SDXL's extra UNet inputs: the pooled text embedding and the size/crop ids.

        Images come center-cropped at the training resolution, so the ids say original
        size = target size = (R, R) and crop = (0, 0), which is also what generation asks for.
        """
        if pooled is None:
            return None
        r = self.cfg.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=self.device, dtype=pooled.dtype).repeat(batch, 1)
        return {"text_embeds": pooled, "time_ids": time_ids}

    def micro_batch_loss(self, micro: int) -> torch.Tensor:
        """The loss of one micro-batch (instance images, plus class images with prior preservation)."""
        cfg = self.cfg
        acc = self.accelerator
        rows = _batch_indices(micro, cfg.train_batch_size, self.count, cfg.seed, acc.process_index,
                              acc.num_processes, self._perms)
        if micro == 0:
            self.first_batch = rows.tolist()
        loss = self.loss_on(self.image_latents(rows), *self.text_embeddings(rows)).mean()
        if self.class_pixels is not None:
            class_rows = _batch_indices(micro, cfg.train_batch_size, len(self.class_pixels), cfg.seed + 7,
                                        acc.process_index, acc.num_processes, self._class_perms)
            prior = self.loss_on(self.image_latents(class_rows, True), *self.text_embeddings(class_rows, True)).mean()
            loss = loss + cfg.prior_loss_weight * prior
        return loss

    # ---------------------------------------------------------------- the loop
    def loop(self) -> None:
        cfg, report, acc = self.cfg, self.report, self.accelerator
        self._perms: dict[int, torch.Tensor] = {}
        self._class_perms: dict[int, torch.Tensor] = {}
        writer = self.tensorboard()
        if self.start_step == 0:
            self.validate(0)
            raise_if_stopped(self.stop, "drawing the validation images of the base model")
        step, smoothed = self.start_step, None
        accum = cfg.gradient_accumulation_steps
        images_per_step = cfg.train_batch_size * accum * acc.num_processes
        report("status", step=step, message=f"training ({self.prediction_type} target)")
        tick, tick_step = time.perf_counter(), step
        while step < cfg.max_train_steps:
            # 1. forward/backward over the accumulated micro-batches
            total = None
            for m in range(accum):
                sync = m == accum - 1
                with (acc.no_sync(self.unet) if not sync and acc.num_processes > 1 else contextlib.nullcontext()):
                    loss = self.micro_batch_loss(step * accum + m) / accum
                    acc.backward(loss)
                total = loss.detach() if total is None else total + loss.detach()
            # 2. clip, step, schedule
            acc.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.unet.parameters())
            step += 1
            # 3. report (the one host sync of the step) and refuse to go on with a broken loss
            if acc.num_processes > 1:
                total = acc.reduce(total, reduction="mean")
            value = float(total)
            if not math.isfinite(value):
                raise StudioError(f"The loss became {value} at step {step}; training stopped and nothing from "
                                  "this step was saved.", "Lower the learning rate, or turn off fp16.")
            smoothed = value if smoothed is None else LOSS_SMOOTHING * smoothed + (1 - LOSS_SMOOTHING) * value
            now = time.perf_counter()
            rate = images_per_step * (step - tick_step) / max(now - tick, 1e-9)
            lr = self.lr_scheduler.get_last_lr()[0]
            report("step", step=step, loss=value, smoothed_loss=smoothed, lr=lr, images_per_s=rate,
                   eta_s=(cfg.max_train_steps - step) * images_per_step / max(rate, 1e-9))
            if writer is not None:
                writer.add_scalar("loss", value, step)
                writer.add_scalar("lr", lr, step)
            if step % 20 == 0:
                tick, tick_step = now, step
            # 4. validation images, checkpoints, stop
            if cfg.validation_every and step % cfg.validation_every == 0 and step < cfg.max_train_steps:
                self.validate(step)
            if self.stop.is_set():
                path = self.save(step)
                report("stopped", step=step, path=str(path), message=f"stopped at step {step}; resume to go on")
                return
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_train_steps:
                self.save(step)
        self.validate(step)
        self.save(step)
        if acc.num_processes > 1:
            self.record_process()
        out = self.export(step)
        if writer is not None:
            writer.close()
        report("finished", step=step, path=str(out), message=f"finished {step} steps; saved to {out.name}/")

    def record_process(self) -> None:
        """Each process writes ``logs/rank-N.json``: its first batch and a hash of its trained weights
        (equal hashes show the gradients were synchronised; disjoint batches, that the data was sharded)."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.trainable_state().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        acc = self.accelerator
        record = {"rank": acc.process_index, "world_size": acc.num_processes,
                  "first_batch": getattr(self, "first_batch", []), "weights_sha256": digest.hexdigest()}
        (self.run.logs_dir / f"rank-{acc.process_index}.json").write_text(json.dumps(record), encoding="utf-8")

    def tensorboard(self):
        if not self.accelerator.is_main_process:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.run.logs_dir))

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, step: int) -> Path | None:
        """Images of the validation prompts with a fixed seed, side by side in ``samples/step-N.png``."""
        cfg, acc = self.cfg, self.accelerator
        if not acc.is_main_process:
            return None
        self.report("status", step=step, message=f"validation images at step {step}")
        unet = acc.unwrap_model(self.unet)
        text_encoder = acc.unwrap_model(self.text_encoder)
        if self.ema is not None:
            self.ema.store(unet.parameters())
            self.ema.copy_to(unet.parameters())
        self.vae.to(self.device)
        for module in (text_encoder, *self.text_encoders[1:]):
            module.to(self.device)
        unet.eval()
        text_encoder.eval()
        try:
            pipe = self.inference_pipeline(unet, text_encoder)
            images = validation_images(pipe, self.prompts_for_validation, cfg, self.device, acc.autocast, self.stop)
        except Stopped:  # the loop saves a checkpoint next (or, before step 1, ends "stopped"); no grid
            self.report("status", step=step, message=f"Stop pressed: no validation images at step {step}")
            return None
        finally:
            unet.train()
            if self.text_encoder_trains:
                text_encoder.train()
            if self.ema is not None:
                self.ema.restore(unet.parameters())
            if getattr(self, "cache_images", False):  # the VAE is only needed here: back off the device
                self.vae.to("cpu")
            if getattr(self, "cache_text", False):
                for module in (text_encoder, *self.text_encoders[1:]):
                    module.to("cpu")
        path = save_grid(images, cfg.resolution, self.run.sample_path(step))
        self.report("samples", step=step, path=str(path),
                    message=" | ".join(self.prompts_for_validation) + (" (base model)" if step == 0 else ""))
        return path

    def inference_pipeline(self, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> Any:
        """An SD (or SDXL) pipeline around the training components, for validation and export."""
        return assemble_pipeline(self.pipe, self.vae, unet, text_encoder, self.is_sdxl)

    # ---------------------------------------------------------------- checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name ('unet.' / 'text_encoder.' prefixes)."""
        acc = self.accelerator
        state = {f"unet.{n}": p.detach() for n, p in acc.unwrap_model(self.unet).named_parameters() if p.requires_grad}
        if self.text_encoder_trains:
            state.update({f"text_encoder.{n}": p.detach()
                          for n, p in acc.unwrap_model(self.text_encoder).named_parameters() if p.requires_grad})
        return state

    def save(self, step: int) -> Path | None:
        """Atomic checkpoint: trainable weights, optimizer, schedule, EMA, every process's RNGs, the step.

        Tensors go to safetensors (weights, EMA, RNG states), counters to JSON; only the
        optimizer and LR-schedule state dicts are torch files, read back with
        ``weights_only=True``. Every process takes part: each one's RNG state is gathered.
        """
        from safetensors.torch import save_file

        acc = self.accelerator
        acc.wait_for_everyone()
        rngs = [self.rng_state()]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        if not acc.is_main_process:
            return None

        def write(folder: Path) -> None:
            save_file({k: v.contiguous().cpu() for k, v in self.trainable_state().items()},
                      str(folder / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), folder / "scheduler.pt")
            if self.ema is not None:
                ema = self.ema.state_dict()
                shadow = ema.pop("shadow_params")
                save_file({f"shadow.{i}": t.detach().contiguous().cpu() for i, t in enumerate(shadow)},
                          str(folder / "ema.safetensors"), metadata={"state": json.dumps(ema)})
            save_file({f"rank{r}.{name}": t for r, state in enumerate(rngs) for name, t in state.items()},
                      str(folder / "rng.safetensors"))
            (folder / "state.json").write_text(json.dumps({"step": step, "world_size": len(rngs),
                                                           "config": self.cfg.to_dict()}, indent=1))

        path = save_checkpoint(self.run.checkpoints_dir, step, write, keep=self.cfg.checkpoints_total_limit)
        self.report("checkpoint", step=step, path=str(path), message=f"checkpoint {path.name}")
        return path

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This process's RNG states as uint8 tensors (torch, data order, noise, each CUDA device)."""
        state = {"torch": torch.get_rng_state(), "data": self.data_gen.get_state(),
                 "noise": self.noise_gen.get_state()}
        if torch.cuda.is_available():
            state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        return {k: v.cpu().contiguous() for k, v in state.items()}

    def load_checkpoint(self, folder: Path) -> None:
        """Restore everything ``save`` wrote, so the next step is the one that would have come.

        Raises:
            CheckpointError: a checkpoint for another model, saved by fewer processes, or
                holding a torch file with anything but plain tensors and numbers (such a
                pickle could run code when loaded, so it is refused unread).
        """
        from safetensors.torch import load_file

        acc = self.accelerator
        state = load_file(str(folder / "trainable.safetensors"))
        modules = {"unet": acc.unwrap_model(self.unet), "text_encoder": acc.unwrap_model(self.text_encoder)}
        for key, tensor in state.items():
            prefix, name = key.split(".", 1)
            param = dict(modules[prefix].named_parameters()).get(name)
            if param is None or param.shape != tensor.shape:
                raise CheckpointError(f"Checkpoint {folder.name} does not match this model ({key}).",
                                      "Resume with the same base model and method, or start a new run.")
            with torch.no_grad():
                param.copy_(tensor.to(param.device, param.dtype))
        self.optimizer.load_state_dict(_load_plain(folder / "optimizer.pt"))
        self.lr_scheduler.load_state_dict(_load_plain(folder / "scheduler.pt"))
        if self.ema is not None:
            self.load_ema(folder)
        self.set_rng_state(folder)
        self.start_step = int(json.loads((folder / "state.json").read_text())["step"])

    def load_ema(self, folder: Path) -> None:
        """The EMA weights and counters from ``ema.safetensors`` (or an older ``ema.pt``, tensors only)."""
        from safetensors import safe_open

        if (folder / "ema.safetensors").is_file():
            with safe_open(str(folder / "ema.safetensors"), framework="pt") as fh:
                state = json.loads((fh.metadata() or {}).get("state", "{}"))
                shadow = [fh.get_tensor(f"shadow.{i}") for i in range(len(list(fh.keys())))]
        elif (folder / "ema.pt").is_file():
            state = _load_plain(folder / "ema.pt")
            shadow = state.pop("shadow_params", None) or []
        else:
            return
        if len(shadow) != len(self.ema.shadow_params) or any(
                a.shape != b.shape for a, b in zip(shadow, self.ema.shadow_params)):
            raise CheckpointError(f"The EMA weights of checkpoint {folder.name} do not match this model.",
                                  "Resume with the same base model and method, or start a new run.")
        state["shadow_params"] = [t.to(p.device, p.dtype) for t, p in zip(shadow, self.ema.shadow_params)]
        self.ema.load_state_dict(state)

    def set_rng_state(self, folder: Path) -> None:
        """Give this process back its own RNG states (each rank draws its own noise and timesteps)."""
        from safetensors.torch import load_file

        rank = self.accelerator.process_index
        if (folder / "rng.safetensors").is_file():
            saved = load_file(str(folder / "rng.safetensors"))
            ranks = {key.split(".", 1)[0] for key in saved}
            if f"rank{rank}" not in ranks:
                raise CheckpointError(f"Checkpoint {folder.name} was saved by {len(ranks)} process(es); "
                                      f"this run has {self.accelerator.num_processes}.",
                                      "Resume with the same number of processes.")
            state = {key.split(".", 1)[1]: t for key, t in saved.items() if key.startswith(f"rank{rank}.")}
        else:  # checkpoints written before per-process states: one state for all
            state = _load_plain(folder / "rng.pt")
            state.update({f"cuda.{i}": s for i, s in enumerate(state.pop("cuda", []))})
        torch.set_rng_state(state["torch"])
        self.data_gen.set_state(state["data"])
        self.noise_gen.set_state(state["noise"])
        cuda = [state[f"cuda.{i}"] for i in range(len(state)) if f"cuda.{i}" in state]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)

    # ---------------------------------------------------------------- export
    def export(self, step: int) -> Path:
        """Write ``lora/`` or ``model/`` with a model card; push to the Hub when asked."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return self.run.root
        cfg = self.cfg
        self.report("status", step=step, message="exporting")
        unet = acc.unwrap_model(self.unet)
        if cfg.is_lora:
            out = export_lora(self.run, cfg, unet,
                              acc.unwrap_model(self.text_encoder) if self.text_encoder_trains else None,
                              sdxl=self.is_sdxl)
        else:
            if self.ema is not None:
                self.ema.copy_to(unet.parameters())
            out = export_pipeline(self.run, cfg, self.inference_pipeline(unet, self.text_encoder), step, self.report)
        write_model_card(out, cfg, self.run, step, sdxl=self.is_sdxl)
        if cfg.push_to_hub:
            message = push_to_hub(out, cfg.hub_model_id)
            self.report("warning" if message.startswith("Not pushed") else "status", step=step, message=message)
        return out
