"""One memory estimator for every run: Train, Fine-tune and Generate.

``train_plan``, ``text_to_image_plan``, ``finetune_plan`` and ``generate_plan`` return a ``Plan``: the predicted
peak device memory of the request, which common GPUs it fits, whether it fits the
chosen device (this machine's RAM on CPU), and the cheapest change that makes it fit.
``Plan.check()`` raises ``BudgetError`` (a ``ConfigError``) before anything is
allocated; the UI shows ``Plan.markdown()`` as settings change, the trainers, the CLI
and Generate call ``check()`` first.

Activations come from ``studio.memory_sim``: the real model runs one step on torch's
``meta`` device under a simulated allocator, so what autograd saves for backward (LoRA
vs full, gradient checkpointing, attention kernels...) is counted as torch does it;
what it cannot see (allocator rounding, kernel workspaces) is covered by ``OVERHEAD``.
``benchmarks/memory.py`` compares the predictions with peaks measured on CPU.

Weights, gradients and optimizer state are counted from parameter counts:
fp32 weights 4 bytes, AdamW 8 (8-bit Adam 2), gradients 4 per trainable parameter,
EMA 4. Mixed precision (fp16/bf16, GPU only) halves activations and frozen weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from studio.errors import ConfigError
from studio.memory_sim import freeze, infer_sim, lora_params, param_count, train_activation

__all__ = ["GPUS", "GPU", "Plan", "BudgetError", "train_plan", "text_to_image_plan", "finetune_plan", "generate_plan", "device_limit",
           "human_bytes", "MEMORY_LIMIT_ENV", "family_of", "SD_FAMILIES", "pipeline_plan",
           "local_unet_config", "request_plan"]

GIB = 2 ** 30
MIB = 2 ** 20

#: Environment variable: cap (GiB) on what one request may use on this machine, below its RAM/GPU size.
MEMORY_LIMIT_ENV = "STUDIO_MEMORY_LIMIT_GB"

#: Share of the predicted peak added for what the simulation cannot see (allocator
#: rounding and caching, kernel workspaces, fragmentation).
OVERHEAD = 0.10

#: On a CPU, extra share of the activation-like parts (``_CHURN``): glibc's malloc raises
#: its mmap threshold after the first large frees (up to 32 MiB), so the many mid-sized
#: activation tensors of a step are then served from the heap, where freed blocks
#: fragment. Measured on the tiny preset (64 px, batch 16): peak RSS 723 MiB for a step
#: whose live tensors peak at 562 MiB (555 MiB with ``MALLOC_MMAP_THRESHOLD_`` fixed,
#: which costs speed instead). See ``benchmarks/memory.py``.
CPU_HEAP = 0.30
_CHURN = ("activations", "gradients + backward", "working set")


@dataclass(frozen=True)
class GPU:
    """A common GPU and the memory a training process can use on it (CUDA context taken off)."""

    name: str
    total_gib: float

    @property
    def usable(self) -> int:
        return int((self.total_gib - 0.6) * GIB)  # ~0.5 GiB CUDA context + cuDNN/cuBLAS workspaces


#: The GPUs the plan names, smallest first (memory as the driver reports it).
GPUS: tuple[GPU, ...] = (
    GPU("T4 16 GB", 15.0),
    GPU("L4 / A10 24 GB", 22.5),
    GPU("A100 40 GB", 40.0),
    GPU("A100 / H100 80 GB", 79.6),
    GPU("H200 141 GB", 140.4),
)


class BudgetError(ConfigError):
    """The request will not fit the memory of the chosen device (refused before allocating)."""


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


# --------------------------------------------------------------------------- device limits
def device_limit(device: str) -> tuple[int, str]:
    """Bytes one request may use on ``device`` and how the limit is named in messages.

    CPU (and MPS, which shares it): the RAM available now (psutil). CUDA: the GPU's total
    memory less ~0.6 GiB for the CUDA context. ``STUDIO_MEMORY_LIMIT_GB`` lowers either.
    """
    kind = str(device or "cpu").split(":")[0]
    if kind == "cuda":
        import torch

        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        limit, name = int(props.total_memory - 0.6 * GIB), f"the {props.name} GPU's {human_bytes(props.total_memory)}"
    else:
        import psutil

        mem = psutil.virtual_memory()
        limit, name = int(mem.available), f"this machine's free RAM ({human_bytes(mem.available)} of {human_bytes(mem.total)})"
    cap = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if cap:
        try:
            capped = int(float(cap) * GIB)
        except ValueError:
            raise ConfigError(f"{MEMORY_LIMIT_ENV}={cap!r} is not a number of GiB.") from None
        if capped < limit:
            limit, name = capped, f"the studio's memory limit ({MEMORY_LIMIT_ENV}={cap} GiB)"
    return limit, name


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """The memory plan of one request.

    Attributes:
        task: "train", "finetune" or "generate".
        parts: Named parts of the peak in bytes (weights, gradients, optimizer, activations...).
        peak: Predicted peak device memory in bytes (parts + ``OVERHEAD``).
        device: "cpu", "cuda", "cuda:1", "mps".
        limit: Bytes available on that device (see ``device_limit``).
        limit_name: How the limit is named in messages.
        suggestion: The cheapest change that makes the request fit the device (or the
            smallest GPU when it already fits), "" when none is needed or none is found.
        summary: The request in a few words ("batch 16, 32 px, fp32").
    """

    task: str
    parts: dict[str, int]
    peak: int
    device: str
    limit: int
    limit_name: str
    suggestion: str = ""
    summary: str = ""
    gpus: tuple[tuple[str, bool], ...] = field(default=())

    @property
    def fits(self) -> bool:
        return self.peak <= self.limit

    def gpu_line(self) -> str:
        fit = [name for name, ok in self.gpus if ok]
        return ("fits " + ", ".join(fit)) if fit else "fits none of T4 16 GB … H200 141 GB"

    def markdown(self) -> str:
        """One short line for the tabs."""
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in self.parts.items() if v)
        where = "RAM" if not self.device.startswith("cuda") else "GPU memory"
        verdict = ("✅ fits" if self.fits else "⛔ does not fit") + f" {self.limit_name.split(' (')[0]}"
        line = (f"**Memory plan**: peak ≈ **{human_bytes(self.peak)}** {where} ({parts}) · {verdict} · "
                f"{self.gpu_line()}")
        if self.suggestion:
            line += f" · to fit: {self.suggestion}"
        return line

    def message(self) -> str:
        """The refusal text: what was asked, the prediction, the limit."""
        return (f"This {TASK_NAMES[self.task]} ({self.summary}) needs about {human_bytes(self.peak)} of memory; "
                f"the limit is {human_bytes(self.limit)}: {self.limit_name}.")

    def check(self) -> "Plan":
        """Raise ``BudgetError`` when the plan does not fit the device; return self otherwise."""
        if not self.fits:
            raise BudgetError(self.message(), f"Try: {self.suggestion}." if self.suggestion
                              else "Use a machine with more memory.")
        return self


TASK_NAMES = {"train": "training run", "finetune": "fine-tune", "generate": "request"}


def _gpus(peak: int) -> tuple[tuple[str, bool], ...]:
    return tuple((g.name, peak <= g.usable) for g in GPUS)


def _with_heap(parts: dict[str, int], device: str) -> dict[str, int]:
    """``parts`` plus, off CUDA, the glibc heap's share of the activation-like parts (``CPU_HEAP``)."""
    if device.startswith("cuda"):
        return parts
    return {**parts, "CPU heap fragmentation": int(CPU_HEAP * sum(parts.get(k, 0) for k in _CHURN))}


def _make(task: str, parts: dict[str, int], device: str, summary: str,
          alternatives: Callable[[], list[tuple[str, int]]], resident: int = 0) -> Plan:
    """Build the plan; ``alternatives`` lists (change, peak) in order of cost, cheapest first
    (each peak a sum of parts through ``_with_heap``, without ``OVERHEAD``).

    ``resident``: bytes of this request already in RAM (a loaded pipeline), which the
    free-RAM figure of a CPU no longer counts; they are added back to its limit.
    """
    gpu_peak = int(sum(parts.values()) * (1 + OVERHEAD))
    parts = _with_heap(parts, device)
    peak = int(sum(parts.values()) * (1 + OVERHEAD))
    limit, limit_name = device_limit(device)
    if resident and not device.startswith("cuda"):
        limit += int(resident)
    suggestion = ""
    if peak > limit:
        for change, other in alternatives():
            if int(other * (1 + OVERHEAD)) <= limit:
                suggestion = change
                break
    return Plan(task, parts, peak, device, limit, limit_name, suggestion, summary, _gpus(gpu_peak))


# --------------------------------------------------------------------------- model families
#: UNet2DConditionModel configs of the Stable Diffusion families (from their unet/config.json).
SD_FAMILIES: dict[str, dict[str, Any]] = {
    "sd1": {"label": "SD 1.x", "resolution": 512, "text_encoder_params": 123_060_480, "unet": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))},
    "sd2": {"label": "SD 2.x", "resolution": 768, "text_encoder_params": 340_387_840, "unet": dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))},
    "sdxl": {"label": "SDXL", "resolution": 1024, "text_encoder_params": 123_060_480 + 694_659_840, "unet": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), use_linear_projection=True, block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))},
}
#: The Stable Diffusion VAE (the same layout in 1.x, 2.x and XL).
SD_VAE: dict[str, Any] = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                              block_out_channels=(128, 256, 512, 512),
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def family_of(reference: str) -> str:
    """Guess the SD family of a model reference without loading it: a local folder's
    ``unet/config.json`` when there is one, else the name ("xl" -> sdxl, "2-"/"2." -> sd2)."""
    import json
    from pathlib import Path

    text = str(reference or "").lower()
    try:
        config = Path(str(reference)).expanduser() / "unet" / "config.json"
        if config.is_file():
            data = json.loads(config.read_text(encoding="utf-8"))
            if data.get("addition_embed_type") == "text_time":
                return "sdxl"
            return "sd2" if int(data.get("cross_attention_dim") or 768) >= 1024 else "sd1"
    except (OSError, ValueError, TypeError):
        pass
    if "xl" in text:
        return "sdxl"
    if "stable-diffusion-2" in text or "sd2" in text or "sd-2" in text or "v2-" in text:
        return "sd2"
    return "sd1"


def local_unet_config(reference: str, workspace: str | None = None) -> dict | None:
    """The UNet config of a model on this machine (``<folder>/unet/config.json``), else None.

    The folder is what ``studio.base_models.local_pipeline_folder`` finds: a bundled model,
    a diffusers folder, a run (of ``workspace``) or a cached Hub id.
    """
    import json

    from studio.base_models import local_pipeline_folder

    try:
        folder = local_pipeline_folder(str(reference), workspace)
        path = folder / "unet" / "config.json" if folder is not None else None
        if path is not None and path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------- Train (DDPM)
def train_plan(cfg: Any, device: str | None = None) -> Plan:
    """The memory plan of a DDPM ``TrainConfig`` on ``device`` (default: ``cfg.device`` resolved)."""
    from studio.unet_presets import unet_kwargs

    device = device or _resolve(cfg.device)
    kwargs = unet_kwargs(cfg.resolution, cfg.block_out_channels, cfg.layers_per_block, cfg.down_block_types,
                         cfg.up_block_types, *([cfg.attention_head_dim] if getattr(cfg, "attention_head_dim", 0) else []))
    config = freeze(kwargs)
    params = param_count("unet2d", config)
    half = cfg.mixed_precision in ("fp16", "bf16") and not device.startswith("cpu")

    def parts_for(batch: int, resolution: int) -> dict[str, int]:
        conf = config  # sample_size does not change the layers; the simulation takes the size itself
        act, rest = train_activation("unet2d", conf, resolution, batch)
        # the sample grid (num_samples images, no grad) runs between steps: the larger of the two counts
        sampling = infer_sim("unet2d", conf, resolution, resolution, cfg.num_samples)
        return {"weights": params * 4, "AdamW": params * 8, "EMA": params * 4 if cfg.use_ema else 0,
                "gradients + backward": rest, "activations": int(max(act, sampling) * (0.5 if half else 1))}

    parts = parts_for(cfg.train_batch_size, cfg.resolution)

    def alternatives() -> list[tuple[str, int]]:
        out = []

        def total(batch: int, resolution: int = cfg.resolution) -> int:
            return sum(_with_heap(parts_for(batch, resolution), device).values())

        per_sample = max(1, (total(4) - total(2)) // 2)
        limit = device_limit(device)[0] / (1 + OVERHEAD)
        fitting = int((limit - (total(2) - 2 * per_sample)) // per_sample)
        if fitting < 2:
            fitting = 1 if total(1) <= limit else 0
        if 1 <= fitting < cfg.train_batch_size:
            accum = cfg.gradient_accumulation_steps * _ceil(cfg.train_batch_size, fitting)
            keep = f" with gradient accumulation {accum} for the same effective batch" if accum <= 64 else ""
            out.append((f"batch size {fitting} or less{keep}", total(fitting)))
        return out + _smaller_resolutions(cfg.resolution, 2 ** (len(cfg.block_out_channels) - 1), total)

    summary = f"batch {cfg.train_batch_size}, {cfg.resolution} px, {human_count(params)} parameters"
    return _make("train", parts, device, summary, alternatives)


# --------------------------------------------------------------------------- Train (text-to-image from scratch)
def text_to_image_plan(cfg: Any, device: str | None = None) -> Plan:
    """The memory plan of a ``TextToImageConfig`` (a small Stable Diffusion trained from scratch).

    One optimizer holds the autoencoder, the text encoder and the UNet all run long, so weights and
    AdamW state count all three (EMA: text encoder + UNet). The step's part is the larger of the two
    stages (autoencoder: encode + decode + backward at the image size; diffusion: text encoder + UNet
    at the latent size) and of the no-grad work between steps (validation images with guidance,
    encoding the dataset in batches of 64).
    """
    from studio.small_sd import SmallSDSpec, text_encoder_kwargs, unet_kwargs, vae_kwargs

    device = device or _resolve(cfg.device)
    spec = SmallSDSpec.of(cfg)
    # sample_size does not change the layers (the simulation takes the size itself): one cache entry per model
    vae, unet = (freeze({k: v for k, v in kwargs.items() if k != "sample_size"})
                 for kwargs in (vae_kwargs(spec), unet_kwargs(spec)))
    text = freeze(text_encoder_kwargs(spec, spec.vocab_size))
    counts = {"autoencoder": param_count("vae", vae), "text encoder": param_count("clip_text", text),
              "UNet": param_count("unet_cond", unet)}
    params, denoiser = sum(counts.values()), counts["text encoder"] + counts["UNet"]
    half = cfg.mixed_precision in ("fp16", "bf16") and not device.startswith("cpu")
    scale = 2 ** (len(spec.unet_channels) - 1)

    def parts_for(batch: int, resolution: int) -> dict[str, int]:
        latent = resolution // 2
        vae_act, vae_rest = train_activation("vae", vae, resolution, batch)
        te_act, te_rest = train_activation("clip_text", text, 1, batch)
        unet_act, unet_rest = train_activation("unet_cond", unet, max(scale, latent), batch)
        sampling = infer_sim("unet_cond", unet, latent, latent, 2 * len(cfg.validation_prompts) * cfg.images_per_prompt)
        encoding = infer_sim("vae_encode", vae, resolution, resolution, 64)
        act = max(vae_act, te_act + unet_act, sampling, encoding)
        return {"weights": params * 4, "AdamW": params * 8, "EMA": denoiser * 4 if cfg.use_ema else 0,
                "gradients + backward": max(vae_rest, te_rest + unet_rest),
                "activations": int(act * (0.5 if half else 1))}

    parts = parts_for(cfg.train_batch_size, cfg.resolution)

    def alternatives() -> list[tuple[str, int]]:
        def total(batch: int, resolution: int = cfg.resolution) -> int:
            return sum(_with_heap(parts_for(batch, resolution), device).values())

        out = []
        limit = device_limit(device)[0] / (1 + OVERHEAD)
        # the largest batch that fits (the sampling between steps may dominate small batches: not linear)
        fitting, high = 0, cfg.train_batch_size
        while fitting < high:
            middle = (fitting + high + 1) // 2
            fitting, high = (middle, high) if total(middle) <= limit else (fitting, middle - 1)
        if 1 <= fitting < cfg.train_batch_size:
            out.append((f"batch size {fitting} or less", total(fitting)))
        return out + _smaller_resolutions(cfg.resolution, 2 * scale, total)

    summary = (f"text-to-image, batch {cfg.train_batch_size}, {cfg.resolution} px, "
               f"{human_count(params)} parameters")
    return _make("train", parts, device, summary, alternatives)


def _smaller_resolutions(resolution: int, step: int, total: Callable[[int, int], int]) -> list[tuple[str, int]]:
    """A training plan's "resolution R px at batch 1" alternatives: each halving of ``resolution`` down
    to 8 px (and not below ``step``) that ``step`` divides, with ``total(batch, resolution)``'s bytes."""
    out = []
    r = resolution // 2
    while r >= max(8, step):
        if r % step == 0:
            out.append((f"resolution {r} px at batch 1", total(1, r)))
        r //= 2
    return out


def _ceil(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def human_count(n: int) -> str:
    from studio.unet_presets import human_count as count  # noqa: PLC0415

    return count(n)


def _resolve(device: str) -> str:
    from studio.devices import resolve_device

    return resolve_device(device or "auto")


# --------------------------------------------------------------------------- Fine-tune
def finetune_plan(cfg: Any, device: str | None = None, unet_config: dict | None = None,
                  text_encoder_params: int | None = None) -> Plan:
    """The memory plan of a ``FinetuneConfig``.

    Args:
        cfg: The fine-tune settings.
        device: Where it trains (default ``cfg.device`` resolved).
        unet_config: The base model's UNet config (``unet.config``) when known; else the
            family's (``family_of(cfg.pretrained_model_name_or_path)``).
        text_encoder_params: Parameters of the text encoder(s); default the family's.
    """
    device = device or _resolve(cfg.device)
    family = SD_FAMILIES[family_of(cfg.pretrained_model_name_or_path)]
    ucfg = dict(unet_config or family["unet"])
    config = freeze(ucfg)
    te_params = family["text_encoder_params"] if text_encoder_params is None else int(text_encoder_params)
    unet_params = param_count("unet_cond", config)
    vae_config = freeze(SD_VAE)
    vae_params = param_count("vae", vae_config)
    gpu_half = cfg.mixed_precision in ("fp16", "bf16") and device.startswith("cuda")
    factor = 0.5 if gpu_half else 1.0
    scale = 2 ** (len(ucfg.get("block_out_channels", (1, 1, 1, 1))) - 1)

    def parts_for(batch: int, resolution: int, lora: bool, checkpointing: bool, adam8: bool,
                  cache: bool) -> dict[str, int]:
        side = max(scale, resolution // 8)
        act, rest = train_activation("unet_cond", config, side, batch, "lora" if lora else "all", checkpointing,
                                      int(getattr(cfg, "rank", 4) or 4), tuple(cfg.lora_target_modules))
        opt_bytes = 2 if adam8 else 8
        if lora:
            trainable = lora_params(ucfg, int(cfg.rank), tuple(cfg.lora_target_modules))
            if cfg.train_text_encoder:
                trainable += int(te_params * 0.0016 * cfg.rank / 4)  # q/k/v/out LoRA on the CLIP layers
            weights = int(unet_params * 4 * factor) + trainable * 4
        else:
            trainable = unet_params
            weights = unet_params * 4
        frozen = 0 if cache and not cfg.train_text_encoder else int((vae_params + te_params) * 4 * factor)
        if cache and cfg.train_text_encoder:
            frozen = int(te_params * 4 * factor)
        vae_step = 0 if cache else int(infer_sim("vae_encode", vae_config, resolution, resolution, batch) * factor)
        parts = {"weights": weights, "VAE + text encoder": frozen,
                 "optimizer": trainable * opt_bytes, "EMA": unet_params * 4 if cfg.use_ema and not lora else 0,
                 "gradients + backward": int(rest * (factor if lora else 1.0)),
                 "activations": int(max(act * factor, vae_step))}
        if cfg.is_dreambooth and cfg.with_prior_preservation:  # instance + class image in every step
            parts["activations"] *= 2
        return parts

    base = dict(batch=cfg.train_batch_size, resolution=cfg.resolution, lora=cfg.is_lora,
                checkpointing=cfg.gradient_checkpointing, adam8=cfg.use_8bit_adam, cache=cfg.cache_latents)
    parts = parts_for(**base)

    def alternatives() -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []

        def add(change: str, **kw: Any) -> None:
            out.append((change, sum(_with_heap(parts_for(**{**base, **kw}), device).values())))

        if not base["checkpointing"]:
            add("turn on gradient checkpointing", checkpointing=True)
        if cfg.train_batch_size > 1:
            add(f"batch size 1 with gradient accumulation {cfg.gradient_accumulation_steps * cfg.train_batch_size}",
                batch=1)
        if not base["cache"]:
            add("cache latents", cache=True)
        if not base["lora"]:
            add("LoRA instead of a full fine-tune", lora=True)
            add("LoRA with gradient checkpointing", lora=True, checkpointing=True)
        if not base["adam8"] and device.startswith("cuda") and not base["lora"]:
            add("8-bit Adam with gradient checkpointing", adam8=True, checkpointing=True)
        r = cfg.resolution
        while r > 256:
            r = max(256, (r // 2) // 8 * 8)
            add(f"resolution {r} px, batch 1, LoRA, gradient checkpointing", resolution=r, batch=1, lora=True,
                checkpointing=True)
        return out

    summary = (f"{cfg.method}, {family['label']}-sized UNet ({human_count(unet_params)} parameters), "
               f"batch {cfg.train_batch_size}, {cfg.resolution} px")
    return _make("finetune", parts, device, summary, alternatives)


# --------------------------------------------------------------------------- Generate
def generate_plan(width: int, height: int, batch: int = 1, *, device: str = "cpu", unet_config: dict | None = None,
                  unconditional: bool = False, vae_config: dict | None = None, weight_bytes: int | None = None,
                  family: str = "sd1", guidance: bool = True, half: bool | None = None, vae_tiling: bool = False,
                  attention_slicing: bool = False, loaded: bool = False) -> Plan:
    """The memory plan of one Generate batch.

    Args:
        width / height: Image size in pixels.
        batch: Images per pass.
        device: Where it runs.
        unet_config: The pipeline's UNet config; default the family's.
        unconditional: A pixel-space ``UNet2DModel`` (DDPM): no VAE, no guidance.
        vae_config: The pipeline's VAE config; default the SD VAE.
        weight_bytes: Bytes of the loaded pipeline's weights; default from the configs.
        family: "sd1", "sd2" or "sdxl" when the configs are not given.
        guidance: Classifier-free guidance (the UNet runs on 2 x batch).
        half: fp16/bf16 weights and activations (default: on CUDA).
        vae_tiling: Decode in 512 px tiles (diffusers' ``enable_vae_tiling``).
        attention_slicing: Recorded in the summary; with SDPA it changes the peak little.
        loaded: The weights are already in memory (on a CPU they are added back to the free RAM).
    """
    half = device.startswith("cuda") if half is None else bool(half)
    dbytes = 2 if half else 4
    scale = 0.5 if half else 1.0
    if unconditional:
        ucfg = dict(unet_config or {})
        kind, config = "unet2d", freeze(ucfg)
        weights = param_count(kind, config) * dbytes if weight_bytes is None else int(weight_bytes)
        vcfg = None
    else:
        fam = SD_FAMILIES.get(family, SD_FAMILIES["sd1"])
        ucfg = dict(unet_config or fam["unet"])
        kind, config = "unet_cond", freeze(ucfg)
        vcfg = freeze(dict(vae_config or SD_VAE))
        if weight_bytes is None:
            weight_bytes = (param_count(kind, config) + param_count("vae", vcfg) + fam["text_encoder_params"]) * dbytes
        weights = int(weight_bytes)

    def parts_for(w: int, h: int, b: int, tiling: bool) -> dict[str, int]:
        if unconditional:
            unet = infer_sim(kind, config, h, w, b)
            return {"weights": weights, "denoising": int(unet * scale)}
        down = 2 ** (len(dict(vcfg).get("block_out_channels", (1, 1, 1, 1))) - 1)
        lw, lh = max(1, w // down), max(1, h // down)
        unet = infer_sim(kind, config, lh, lw, b * (2 if guidance else 1))
        latents = 4 * lw * lh * b * 4 * 3  # latents, noise prediction, scheduler state
        if tiling and (w > 512 or h > 512):
            tw, th = min(w, 512), min(h, 512)
            decode = infer_sim("vae", vcfg, th // down, tw // down) + 3 * w * h * b * 4 * 2  # tile + output image
        else:
            decode = infer_sim("vae", vcfg, lh, lw, b)
        return {"weights": weights, "denoising": int(unet * scale) + latents, "VAE decode": int(decode * scale)}

    def peak_of(parts: dict[str, int]) -> int:
        working = max(v for k, v in parts.items() if k != "weights")
        return sum(_with_heap({"weights": parts["weights"], "working set": working}, device).values())

    parts = parts_for(width, height, batch, vae_tiling)
    shown = {"weights": parts["weights"], "working set": max(v for k, v in parts.items() if k != "weights")}

    def alternatives() -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        if not unconditional and not vae_tiling and (width > 512 or height > 512):
            out.append(("VAE tiling", peak_of(parts_for(width, height, batch, True))))
        if batch > 1:
            out.append(("batch size 1 (raise batch count instead)", peak_of(parts_for(width, height, 1, vae_tiling))))
        w, h = width, height
        while max(w, h) > 64:
            w, h = max(8, (w // 2) // 8 * 8), max(8, (h // 2) // 8 * 8)
            out.append((f"{w}x{h} px at batch 1", peak_of(parts_for(w, h, 1, vae_tiling))))
        return out

    extras = [x for x, on in (("VAE tiling", vae_tiling), ("attention slicing", attention_slicing)) if on]
    summary = f"{width}x{height} px, batch {batch}" + (", " + ", ".join(extras) if extras else "")
    return _make("generate", shown, device, summary, alternatives, resident=weights if loaded else 0)


def pipeline_plan(pipe: Any, width: int, height: int, batch: int, guidance: bool, device: str) -> Plan | None:
    """``generate_plan`` for a loaded diffusers pipeline (its own UNet/VAE configs and weight bytes);
    None for a pipeline without a UNet (not estimated)."""
    import torch

    if getattr(pipe, "unet", None) is None:
        return None
    weights = 0
    for module in getattr(pipe, "components", {}).values():
        if isinstance(module, torch.nn.Module):
            weights += sum(p.numel() * p.element_size() for p in module.parameters())
            weights += sum(b.numel() * b.element_size() for b in module.buffers())
    unet = getattr(pipe, "unet", None)
    vae = getattr(pipe, "vae", None)
    dtype = getattr(unet, "dtype", torch.float32)
    unconditional = vae is None or type(unet).__name__ == "UNet2DModel"
    return generate_plan(width, height, batch, device=device, unet_config=dict(unet.config),
                         unconditional=unconditional, vae_config=None if vae is None else dict(vae.config),
                         weight_bytes=weights, guidance=guidance, half=dtype != torch.float32,
                         vae_tiling=bool(getattr(vae, "use_tiling", False)), loaded=True)


def request_plan(manager: Any, width: int, height: int, batch: int, guidance: bool = True) -> Plan | None:
    """The Generate plan for the manager's loaded pipeline (0 = its native size), or the SD 1.x
    family's when nothing is loaded; None for a pipeline without a UNet."""
    loaded = manager.loaded
    if loaded is None:
        return generate_plan(width or 512, height or 512, batch, device=manager.device, guidance=guidance)
    w, h = (width or loaded.size[0], height or loaded.size[1]) if loaded.capabilities.get("size") else loaded.size
    return pipeline_plan(loaded.pipe, w, h, batch, guidance and loaded.capabilities.get("prompt", False),
                         manager.device)
