"""Stable Diffusion pieces the fine-tune uses: the base pipeline, its modules, what trains.

Responsible for: loading and checking the base pipeline, moving and freezing its modules
(``load_frozen_base``: the base model as a fine-tune starts from it), the training noise
scheduler, adding what trains (LoRA adapters or the whole UNet) and its parameter groups,
SDXL's extra UNet inputs, the prompt of each training image, assembling a pipeline around the
training components for validation and export, and advice when memory runs out.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from studio.config.finetune import TEXT_ENCODER_LORA_TARGETS, FinetuneConfig
from studio.devices import MODEL_INIT_LOCK
from studio.errors import ConfigError, DataError, ModelError, StudioError
from studio.stopping import call_stoppable


# --------------------------------------------------------------------------- the base model
def load_base_pipeline(reference: str, workspace: str | Path | None = None, stop: Any = None) -> Any:
    """Load the base Stable Diffusion pipeline (fp32, CPU) through the studio's model loader.

    Accepts whatever the Generate tab accepts: a Hub id, a diffusers folder, a single
    ``.safetensors`` file, or a run of this workspace that exported a ``model/``.

    ``stop`` (the job's flag): set while a Hub model downloads, nothing is loaded (see ``load_pipeline``).

    Raises:
        ModelError: when the reference cannot be loaded, is a LoRA run, is not a Stable
            Diffusion (1.x, 2.x or XL) pipeline.
    """
    from studio.models import is_offline, load_pipeline, resolve_reference

    offline = is_offline()
    ref = resolve_reference(reference, workspace, offline)
    if ref.kind == "lora-run":
        raise ModelError(f"{reference} is a LoRA run, not a full model.",
                         f"Fine-tune its base model ({ref.base.label}) instead, or a full fine-tune run.")
    pipe = load_pipeline(ref, "cpu", dtype=torch.float32, offline=offline, workspace=workspace, stop=stop)
    return check_sd_pipeline(pipe, reference)


def check_sd_pipeline(pipe: Any, reference: str) -> Any:
    """Return ``pipe`` if it is an SD 1.x/2.x or SDXL pipeline, else raise ``ModelError`` saying why."""
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if type(pipe).__name__.startswith("StableDiffusionXL"):
        needed += ["text_encoder_2", "tokenizer_2"]
    missing = [name for name in needed if getattr(pipe, name, None) is None]
    if missing or type(getattr(pipe, "unet", None)).__name__ != "UNet2DConditionModel":
        raise ModelError(f"{reference} is not a Stable Diffusion text-to-image pipeline "
                         f"({type(pipe).__name__}{', missing ' + ', '.join(missing) if missing else ''}).",
                         "Fine-tuning needs a UNet2DConditionModel, a VAE, a text encoder and a tokenizer.")
    return pipe


@dataclasses.dataclass
class FrozenBase:
    """The base pipeline split up for a fine-tune: every module frozen, the VAE and text encoders on the
    device (SDXL has two text encoders and tokenizers), and the noise scheduler training uses."""

    pipe: Any
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    vae_dtype: torch.dtype
    noise_scheduler: Any

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) > 1


def frozen_weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen weights: fp16 or bf16 under that mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def load_frozen_base(cfg: FinetuneConfig, device: torch.device, weight_dtype: torch.dtype,
                     stop: threading.Event | None, report: Callable[..., None]) -> FrozenBase:
    """The base model of ``cfg``, once the memory plan says the run fits (refused before allocating).

    Loaded through ``call_stoppable`` (Stop returns at once), checked (no text-encoder training on
    SDXL), a memory warning reported when the GPU looks too small; then every module is frozen and
    the VAE (fp32 on SDXL, whose VAE overflows in fp16) and the text encoders moved to ``device``.
    """
    from studio.budget import finetune_plan, local_unet_config

    reference = cfg.pretrained_model_name_or_path
    finetune_plan(cfg, str(device) if device.type != "cpu" else "cpu",
                  unet_config=local_unet_config(reference)).check()
    report("status", message=f"loading base model {reference}")
    pipe = call_stoppable(functools.partial(load_base_pipeline, reference, cfg.workspace, stop), stop,
                          f"loading the base model {reference}")
    # SDXL has a second text encoder; its prompt embedding is both side by side, plus a pooled one
    is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_sdxl else [])
    if is_sdxl and cfg.train_text_encoder:
        raise ConfigError("Text-encoder training is offered for SD 1.x/2.x; for SDXL only the UNet trains.",
                          "Turn off 'Train text encoder'.")
    vae_dtype = torch.float32 if is_sdxl else weight_dtype  # SDXL's VAE overflows in fp16
    warning = memory_warning(cfg, pipe.unet, weight_dtype, device, is_sdxl)
    if warning:
        report("warning", message=warning)
    noise_scheduler = training_noise_scheduler(pipe, cfg.prediction_type)
    for module in (pipe.vae, *text_encoders, pipe.unet):
        module.requires_grad_(False)
    move_module(pipe.vae, device, vae_dtype)
    for module in text_encoders:
        move_module(module, device, weight_dtype)
    return FrozenBase(pipe, pipe.unet, pipe.vae, text_encoders, tokenizers, vae_dtype, noise_scheduler)


def move_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a module; cast only when its dtype differs (a no-op cast makes diffusers warn)."""
    if next(module.parameters()).dtype != dtype:
        module.to(device, dtype)
    else:
        module.to(device)


def add_trainables(cfg: FinetuneConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                   device: torch.device, weight_dtype: torch.dtype) -> None:
    """Add LoRA adapters (peft) or unfreeze the UNet; optionally LoRA on the text encoder.

    Args:
        cfg: The fine-tune settings (method, rank, alpha, targets, checkpointing).
        unet: The frozen base UNet; gains adapters or is unfrozen in place.
        text_encoder: The (first) text encoder; gains adapters when ``cfg.train_text_encoder``.
        device: Where training runs.
        weight_dtype: The dtype of the frozen weights (trainable ones stay fp32).
    """
    if cfg.is_lora:
        from peft import LoraConfig

        move_module(unet, device, weight_dtype)
        with MODEL_INIT_LOCK:  # adapter injection must not race a pipeline load in another thread
            unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                                        init_lora_weights="gaussian",
                                        target_modules=list(cfg.lora_target_modules)))
        if cfg.train_text_encoder:
            from peft import LoraConfig, inject_adapter_in_model

            te_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                                   init_lora_weights="gaussian", target_modules=list(TEXT_ENCODER_LORA_TARGETS))
            # transformers' own add_adapter demands a newer peft; peft's injector is what it calls
            with MODEL_INIT_LOCK:
                inject_adapter_in_model(te_config, text_encoder, adapter_name="default")
            text_encoder.peft_config = {"default": te_config}
            text_encoder.to(device)
        # trainable LoRA weights stay in fp32 even when the frozen base is fp16/bf16
        for module in (unet, text_encoder):
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    else:
        move_module(unet, device, torch.float32)
        unet.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    unet.train()
    if cfg.train_text_encoder:
        text_encoder.train()


def trainable_groups(cfg: FinetuneConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                     text_encoder_trains: bool) -> tuple[list[dict[str, Any]], list[torch.nn.Parameter]]:
    """AdamW's parameter groups (the UNet's at ``learning_rate``, the text encoder's at ``text_encoder_lr``
    when it trains) and every trainable parameter (for gradient clipping)."""
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": cfg.learning_rate}]
    te_params = [p for p in text_encoder.parameters() if p.requires_grad] if text_encoder_trains else []
    if te_params:
        groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
    return groups, unet_params + te_params


def assemble_pipeline(base: Any, vae: torch.nn.Module, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                       sdxl: bool) -> Any:
    """An SD (or SDXL) pipeline around the training components, for validation and export.

    ``base`` is the loaded base pipeline: its tokenizers, second text encoder and scheduler are reused.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if sdxl:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=base.text_encoder_2,
                                         tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
                                         scheduler=base.scheduler)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=base.tokenizer, unet=unet,
                                   scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def training_noise_scheduler(pipe: Any, prediction_type: str = "") -> Any:
    """A ``DDPMScheduler`` with the base pipeline's schedule (``prediction_type`` overrides its target).

    Raises:
        ModelError: a target other than epsilon or v_prediction.
    """
    from diffusers import DDPMScheduler

    config = dict(pipe.scheduler.config)
    if prediction_type:
        config["prediction_type"] = prediction_type
    scheduler = DDPMScheduler.from_config(config)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ModelError(f"The base scheduler predicts {scheduler.config.prediction_type!r}; fine-tuning supports "
                         "epsilon and v_prediction.", "Set prediction_type explicitly.")
    return scheduler


def sdxl_conditioning(pooled: torch.Tensor | None, batch: int, resolution: int,
                      device: torch.device) -> dict[str, torch.Tensor] | None:
    """SDXL's extra UNet inputs: the pooled text embedding and the size/crop ids (None for SD 1.x/2.x).

    Images come center-cropped at the training resolution, so the ids say original
    size = target size = (R, R) and crop = (0, 0), which is also what generation asks for.
    """
    if pooled is None:
        return None
    r = resolution
    time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=pooled.dtype).repeat(batch, 1)
    return {"text_embeds": pooled, "time_ids": time_ids}


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


# --------------------------------------------------------------------------- memory
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


def oom_advice(cfg: FinetuneConfig, exc: BaseException) -> BaseException:
    """What a failed fine-tune shows: advice that fits ``cfg`` when ``exc`` is out of memory, else ``exc``."""
    return out_of_memory_error(cfg, exc) if is_oom(exc) else exc


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means the device (or the host) ran out of memory."""
    return isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def memory_warning(cfg: FinetuneConfig, unet: torch.nn.Module, weight_dtype: torch.dtype, device: torch.device,
                   sdxl: bool) -> str | None:
    """A warning when the UNet's training state alone will not fit the GPU (e.g. full SDXL), or SDXL on CPU."""
    params = sum(p.numel() for p in unet.parameters())
    if cfg.is_lora:  # frozen weights in the training dtype; the adapters are tiny
        need = params * (2 if weight_dtype != torch.float32 else 4)
    else:  # fp32 weights, gradients and two Adam moments (+ an EMA copy)
        need = params * 4 * (4 + (1 if cfg.use_ema else 0)) // (2 if cfg.use_8bit_adam else 1)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if need > 0.8 * total:
            return (f"This {cfg.method} fine-tune keeps about {need / 2**30:.0f} GiB of UNet weights and optimizer "
                    f"state, and this GPU has {total / 2**30:.0f} GiB: it will likely run out of memory. "
                    + out_of_memory_error(cfg, MemoryError()).hint)
    elif sdxl:
        return "SDXL on CPU trains very slowly; a GPU with 16+ GiB (LoRA) is advised."
    return None
