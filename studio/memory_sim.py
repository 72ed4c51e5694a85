"""The simulated allocator: peak bytes of one step of a diffusers model, on torch's ``meta`` device.

The real model is built on the ``meta`` device (shapes only, no memory) from its config
and one training step (forward, MSE loss, backward), one no-grad forward or one VAE
encode/decode runs under a dispatch mode that plays allocator: every tensor an op
creates adds its bytes, every tensor freed (weak reference on its storage) takes them
away, and the highest level is the peak. What autograd saves for backward (which
depends on LoRA vs full, gradient checkpointing, attention kernels...) is therefore
counted exactly as torch does it, for any architecture.

Results are cached per architecture and size. Every simulation runs at ``SIM_BATCH``
and other batches scale from it (``per_batch``); sizes above two small reference sides
are extrapolated linearly in pixels (``_fit``). ``studio.budget`` turns these figures
into the memory plans of Train, Fine-tune and Generate.

Models are given as a kind ("unet2d", "unet_cond", "vae", "vae_encode", "clip_text") and a config
made hashable by ``freeze``. torch, diffusers and peft are imported inside the
functions, so importing this module stays light.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["SIM_BATCH", "Allocator", "Sim", "simulate", "freeze", "build_meta", "param_count", "lora_params",
           "train_activation", "infer_sim", "per_batch"]


# --------------------------------------------------------------------------- the simulated allocator
class Allocator:
    """A ``TorchDispatchMode`` that counts the bytes of live tensors created under it (see module doc)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        owner = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not any(r.alias_info is not None for r in func._schema.returns):
                    owner._created(out)
                return out

        self.mode = Mode()
        self.live = 0
        self.peak = 0
        self._lock = threading.Lock()

    def _free(self, n: int) -> None:
        with self._lock:
            self.live -= n

    def _created(self, out: Any) -> None:
        import torch

        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                n = storage.nbytes()
                with self._lock:
                    self.live += n
                    self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, n)


def _FlashAttention():
    """A ``TorchFunctionMode`` sending SDPA on meta tensors to the flash kernel, as on a real CPU/GPU.

    On the meta device torch picks SDPA's math path, which keeps the L x L attention
    matrix; the fused kernels real devices use (CPU flash, CUDA flash/memory-efficient)
    keep O(L) per head. Masked attention keeps the math path.
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention and len(args) >= 3 and args[0].device.type == "meta" \
                    and kwargs.get("attn_mask") is None and (len(args) < 4 or args[3] is None):
                q, k, v = args[:3]
                out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, float(kwargs.get("dropout_p", 0.0)), bool(kwargs.get("is_causal", False)),
                    scale=kwargs.get("scale"))
                return out[0]
            return func(*args, **kwargs)

    return Mode()


@dataclass(frozen=True)
class Sim:
    """What one simulated run kept alive, in bytes."""

    after_forward: int  # bytes live when the forward returned (saved activations + output)
    peak: int           # highest level over the whole run


def simulate(run: Callable[[], Any], flash: bool = True) -> Sim:
    """Run ``run`` (meta tensors) under the simulated allocator.

    A model the meta device cannot run (an op without a meta kernel, a shape only a real
    run would reject) gives ``Sim(0, 0)`` and a log line: the plan then counts weights and
    optimizer state only, so a failed simulation never refuses a run that would fit.
    """
    import gc
    import logging

    alloc = Allocator()
    marks: dict[str, int] = {}
    try:
        with (_FlashAttention() if flash else _nothing()), alloc.mode:
            run(lambda: marks.setdefault("forward", alloc.live))
    except Exception as exc:  # noqa: BLE001 - an estimate must never break the run it estimates
        logging.getLogger(__name__).warning("memory simulation failed (%s): counting weights only", exc)
        return Sim(0, 0)
    gc.collect()
    return Sim(marks.get("forward", alloc.peak), alloc.peak)


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def _meta_inputs(*shapes: tuple[int, ...]):
    import torch

    return [torch.empty(s, device="meta") for s in shapes]


# --------------------------------------------------------------------------- models on the meta device
def freeze(value: Any) -> Any:
    """A hashable copy of a JSON-like config (lists -> tuples, dicts -> sorted item tuples)."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items() if not str(k).startswith("_")))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def build_meta(kind: str, config: tuple):
    """A diffusers model on the meta device from a frozen config."""
    import torch

    from studio.devices import MODEL_INIT_LOCK

    kwargs = dict(config)
    with MODEL_INIT_LOCK, torch.device("meta"):
        if kind == "unet2d":
            from diffusers import UNet2DModel

            return UNet2DModel(**_known(UNet2DModel, kwargs))
        if kind == "unet_cond":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**_known(UNet2DConditionModel, kwargs))
        if kind == "clip_text":
            from transformers import CLIPTextConfig, CLIPTextModel

            return CLIPTextModel(CLIPTextConfig(**kwargs))
        from diffusers import AutoencoderKL

        return AutoencoderKL(**_known(AutoencoderKL, kwargs))


def _known(cls: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments ``cls`` takes (a saved config also holds bookkeeping keys)."""
    import inspect

    known = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in kwargs.items() if k in known}


@functools.lru_cache(maxsize=32)
def param_count(kind: str, config: tuple) -> int:
    """Parameters of the model ``kind`` with the frozen ``config`` (counted on the meta device)."""
    return sum(p.numel() for p in build_meta(kind, config).parameters())


def _unet_call(kind: str, model: Any, config: dict, batch: int, side_h: int, side_w: int):
    """(inputs, call) for one UNet forward at ``batch`` x ``side_h`` x ``side_w`` (latent/pixel side)."""
    import torch

    channels = int(config.get("in_channels", 4))
    x, = _meta_inputs((batch, channels, side_h, side_w))
    t = torch.full((batch,), 10, device="meta", dtype=torch.long)
    if kind == "unet2d":
        return lambda: model(x, t).sample
    ctx, = _meta_inputs((batch, 77, int(config.get("cross_attention_dim", 768))))
    extra = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = int(config.get("projection_class_embeddings_input_dim", 2816)) - 6 * int(
            config.get("addition_time_embed_dim", 256))
        text_embeds, time_ids = _meta_inputs((batch, pooled), (batch, 6))
        extra = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
    return lambda: model(x, t, ctx, **extra).sample


def _reference_sides(kind: str, config: tuple) -> tuple[int, int]:
    """Two small sides the simulation runs at; larger sizes are extrapolated linearly in pixels
    (with fused attention every activation is proportional to the pixel count)."""
    conf = dict(config)
    factor = 1 if kind == "vae" else 2 ** (len(conf.get("block_out_channels", (1,))) - 1)
    first = max(8, 2 * factor)
    return first, 2 * first


def _fit(kind: str, config: tuple, h: int, w: int, at: Callable[[int, int], tuple[int, ...]]) -> tuple[int, ...]:
    """``at(h, w)`` exactly for small sizes, else a + b * pixels fitted on the two reference sides."""
    r1, r2 = _reference_sides(kind, config)
    if h * w <= r2 * r2:
        return at(h, w)
    small, large = at(r1, r1), at(r2, r2)
    pixels = h * w
    return tuple(int(a + (b - a) * (pixels - r1 * r1) / (r2 * r2 - r1 * r1)) for a, b in zip(small, large))


#: Batch size of every simulation; other batches scale from it (``per_batch``).
SIM_BATCH = 2


def _train_sim(kind: str, config: tuple, side: int, trainable: str, checkpointing: bool, lora_rank: int,
               lora_targets: tuple[str, ...]) -> Sim:
    """Simulated training step at ``SIM_BATCH`` and ``side`` (see ``_fit``)."""
    def at(h: int, w: int) -> tuple[int, int]:
        sim = _train_sim_at(kind, config, h, trainable, checkpointing, lora_rank, lora_targets)
        return sim.after_forward, sim.peak

    after, peak = _fit(kind, config, side, side, at)
    return Sim(after, peak)


def infer_sim(kind: str, config: tuple, side_h: int, side_w: int, batch: int = 1) -> int:
    """Peak bytes of one no-grad forward at ``batch`` (see ``_fit`` and ``per_batch``)."""
    simulated = _fit("vae" if kind == "vae" else kind, config, side_h, side_w,
                     lambda h, w: (_infer_sim_at(kind, config, h, w),))[0]
    return per_batch(simulated, batch)


def per_batch(simulated: int, batch: int) -> int:
    """Bytes at ``batch`` from ``simulated`` bytes at ``SIM_BATCH``, in proportion.

    Batch 1 is not representative: some reshapes and transposes are views at batch 1 but
    copies at any larger batch (the tiny preset at 64 px saves 29.5 MiB for one sample,
    33.5 MiB per sample at batch 2 and at batch 16 alike). One simulation size for every
    batch also keeps the number of (slow, for an SD-sized UNet) simulations down; batch 1
    is then over-counted a little, on the safe side."""
    return int(simulated * batch / SIM_BATCH)


@functools.lru_cache(maxsize=64)
def _train_sim_at(kind: str, config: tuple, side: int, trainable: str, checkpointing: bool, lora_rank: int,
                  lora_targets: tuple[str, ...]) -> Sim:
    """Simulated training step at ``SIM_BATCH``: forward, MSE loss, backward.

    ``trainable``: "all" (every weight) or "lora" (frozen base, LoRA adapters on ``lora_targets``).
    Kinds: the UNets (``side`` = the latent or pixel side), "vae" (encode + decode at ``side`` px) and
    "clip_text" (a batch of padded prompts).
    """
    import torch

    model = build_meta(kind, config)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    if trainable == "lora":
        model.requires_grad_(False)
        from peft import LoraConfig

        from studio.devices import MODEL_INIT_LOCK

        with MODEL_INIT_LOCK, torch.device("meta"):
            model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                         target_modules=list(lora_targets)))
    if kind == "vae":  # the autoencoder's own training step: encode, decode (``side`` in pixels)
        x, = _meta_inputs((SIM_BATCH, int(dict(config).get("in_channels", 3)), side, side))
        call = lambda: model(x).sample  # noqa: E731
    elif kind == "clip_text":  # a text encoder trained with the UNet (``side`` unused: prompts are padded)
        ids = torch.zeros((SIM_BATCH, int(dict(config).get("max_position_embeddings", 77))), dtype=torch.long,
                          device="meta")
        call = lambda: model(ids)[0]  # noqa: E731
    else:
        call = _unet_call(kind, model, dict(config), SIM_BATCH, side, side)

    def run(mark):
        out = call()
        mark()
        loss = out.float().pow(2).mean()
        loss.backward()

    # checkpointing recomputes the forward inside backward, where the routing mode is not
    # active: keep SDPA's math path in both (conservative: counts the attention matrix)
    return simulate(run, flash=not checkpointing)


@functools.lru_cache(maxsize=64)
def _infer_sim_at(kind: str, config: tuple, side_h: int, side_w: int) -> int:
    """Peak bytes of one no-grad forward at ``SIM_BATCH`` (the model's own weights not included)."""
    import torch

    model = build_meta(kind, config).eval()
    if kind == "vae":
        z, = _meta_inputs((SIM_BATCH, int(dict(config).get("latent_channels", 4)), side_h, side_w))

        def run(mark):
            with torch.no_grad():
                model.decode(z)
    elif kind == "vae_encode":
        x, = _meta_inputs((SIM_BATCH, 3, side_h, side_w))

        def run(mark):
            with torch.no_grad():
                model.encode(x)
    else:
        call = _unet_call(kind, model, dict(config), SIM_BATCH, side_h, side_w)

        def run(mark):
            with torch.no_grad():
                call()
    return simulate(run).peak


def train_activation(kind: str, config: tuple, side: int, batch: int, trainable: str = "all",
                     checkpointing: bool = False, lora_rank: int = 4,
                     lora_targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")) -> tuple[int, int]:
    """(activations, gradients) of a training step at ``batch``: what lives at the step's peak
    beyond weights and optimizer state, split into the per-sample part and the rest."""
    sim = _train_sim(kind, config, side, trainable, checkpointing, lora_rank, tuple(lora_targets))
    act = per_batch(sim.after_forward, batch)
    # gradients and backward temporaries on top of the saved tensors: mostly the weight gradients,
    # which do not grow with the batch (as the activations are freed while they are made)
    rest = max(0, sim.peak - sim.after_forward)
    return act, rest


def lora_params(ucfg: dict, rank: int, targets: tuple[str, ...]) -> int:
    """LoRA parameters: rank x (in + out) for every targeted linear layer of the meta UNet."""
    import torch

    model = build_meta("unet_cond", freeze(ucfg))
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total
