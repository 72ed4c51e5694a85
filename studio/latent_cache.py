"""Encode the training images through the VAE and the captions through the text encoder once.

Stable Diffusion's VAE and text encoder are frozen during a fine-tune, so diffusers'
scripts recompute the same latents and text embeddings every step. Here they are
computed once, kept on disk under ``<workspace>/cache/finetune/`` and reused by every
later run with the same base model, resolution, dataset and crop/flip mode; the VAE
and text encoder then leave the device while the UNet trains.

What is cached:

- images: the VAE's latent distribution (mean and std), not one sample, so each step
  still draws ``mean + std * noise`` exactly like ``latent_dist.sample()``. With
  ``random_flip`` both orientations are encoded (two entries per image); a random
  crop cannot be cached, and the trainer encodes per step instead (and says so).
- prompts: the text encoder's last hidden state for each distinct prompt, plus the
  empty prompt used by caption dropout. Training the text encoder disables this.

A cache file is keyed by a fingerprint of the model weights (a hash of a few of their
tensors and the configs), so a different base model never reads stale latents.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from studio.stopping import raise_if_stopped

#: Bump when the cache layout changes: old files are then simply not found.
CACHE_VERSION = 1


@dataclass
class LatentCache:
    """VAE latent distributions of the training images.

    Attributes:
        mean: [N, V, C, h, w] latent means, V = 1 (no flip) or 2 (original, flipped).
        std: Same shape: latent standard deviations.
        scaling_factor: The VAE's ``scaling_factor`` (latents are multiplied by it).
        key: The cache key (file name stem).
        hit: True when it was read from disk rather than encoded now.
    """

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    key: str
    hit: bool = False

    @property
    def views(self) -> int:
        """1, or 2 when flipped copies are cached."""
        return int(self.mean.shape[1])

    def sample(self, index: torch.Tensor, view: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Draw scaled latents for images ``index`` in orientation ``view`` (like ``latent_dist.sample()``)."""
        mean = self.mean[index, view]
        std = self.std[index, view]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return (mean + std * noise) * self.scaling_factor


@dataclass
class TextCache:
    """Text-encoder hidden states of every distinct prompt.

    Attributes:
        prompts: The distinct prompts; ``prompts[0]`` is always "" (caption dropout).
        embeds: [P, T, D] hidden states, one per prompt (SDXL: both encoders' penultimate
            layers side by side, as its pipeline builds them).
        key: The cache key.
        hit: True when it was read from disk.
        pooled: [P, D2] pooled text embeddings of SDXL's second encoder (None for SD 1.x/2.x).
    """

    prompts: list[str]
    embeds: torch.Tensor
    key: str
    hit: bool = False
    pooled: torch.Tensor | None = None

    def index_of(self, prompts: Sequence[str]) -> torch.Tensor:
        """Indices into ``embeds`` for each prompt in ``prompts``."""
        where = {p: i for i, p in enumerate(self.prompts)}
        return torch.tensor([where[p] for p in prompts], dtype=torch.long)


def _hash_tensor(h: "hashlib._Hash", tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())


def module_fingerprint(module: torch.nn.Module, sample: int = 4) -> str:
    """A short hash of a frozen module: its config and a few of its weight tensors.

    Args:
        module: The VAE or the text encoder.
        sample: How many tensors to hash from each end of the state dict.
    """
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    params = list(module.state_dict().items())
    for name, tensor in params[:sample] + params[-sample:]:
        h.update(name.encode())
        _hash_tensor(h, tensor)
    return h.hexdigest()[:16]


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], default=str).encode()).hexdigest()[:24]


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from studio.atomic import write_atomic

    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata=metadata))


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        return load_file(str(path)), metadata
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None


@torch.no_grad()
def encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor, device: str | torch.device,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the VAE encoder on uint8 or [-1, 1] images; returns (mean, std) in float32 on CPU.

    Args:
        vae: The pipeline's AutoencoderKL.
        pixels: [B, 3, R, R] uint8 (0-255) or float in [-1, 1].
        device: Where the VAE runs.
        dtype: The VAE's dtype.
    """
    if pixels.dtype == torch.uint8:
        pixels = pixels.float() / 127.5 - 1.0
    dist = vae.encode(pixels.to(device, dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def build_latent_cache(vae: torch.nn.Module, pixels: torch.Tensor, *, data_key: str, resolution: int,
                       random_flip: bool, cache_root: str | Path, device: str | torch.device,
                       dtype: torch.dtype = torch.float32, batch_size: int = 8,
                       progress: Callable[[int, int], None] | None = None,
                       stop: threading.Event | None = None) -> LatentCache:
    """Latents of every image (and its mirror when ``random_flip``), from disk when cached.

    Args:
        vae: The frozen VAE (already on ``device``).
        pixels: [N, 3, R, R] uint8 center-cropped images.
        data_key: The dataset's cache key (source, files, resolution, crop).
        resolution: Training resolution (part of the key).
        random_flip: Encode the mirrored images too.
        cache_root: Folder of cache files.
        device / dtype: Where and how the VAE runs.
        batch_size: Images per VAE call.
        progress: Called with (done, total) after each batch.
        stop: A job's stop flag, looked at before every batch: ``Stopped`` ends the encode
            within one batch and no cache file is written.
    """
    fingerprint = module_fingerprint(vae)
    key = "latents-" + _key(fingerprint, data_key, resolution, "flip" if random_flip else "noflip",
                            int(pixels.shape[0]))
    path = Path(cache_root) / f"{key}.safetensors"
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    loaded = _load(path)
    if loaded is not None:
        tensors, _ = loaded
        return LatentCache(tensors["mean"], tensors["std"], scaling, key, hit=True)
    views = [False, True] if random_flip else [False]
    n = int(pixels.shape[0])
    means, stds = [], []
    total = n * len(views)
    done = 0
    for flip in views:
        view_means, view_stds = [], []
        for start in range(0, n, batch_size):
            raise_if_stopped(stop, f"caching latents ({done} of {total} images encoded)")
            chunk = pixels[start:start + batch_size]
            if flip:
                chunk = torch.flip(chunk, dims=[-1])
            mean, std = encode_pixels(vae, chunk, device, dtype)
            view_means.append(mean)
            view_stds.append(std)
            done += int(chunk.shape[0])
            if progress is not None:
                progress(done, total)
        means.append(torch.cat(view_means))
        stds.append(torch.cat(view_stds))
    mean = torch.stack(means, dim=1)
    std = torch.stack(stds, dim=1)
    _save_atomic(path, {"mean": mean, "std": std},
                 {"resolution": str(resolution), "random_flip": str(random_flip), "data_key": data_key})
    # train on the tensors as read back, so a first run and a cached run compute identically
    loaded = _load(path)
    if loaded is not None:
        mean, std = loaded[0]["mean"], loaded[0]["std"]
    return LatentCache(mean, std, scaling, key, hit=False)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length, as the SD pipelines do."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_tokens(text_encoders: Sequence[torch.nn.Module], token_ids: Sequence[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states for token ids, the way the SD pipelines build ``prompt_embeds``.

    One encoder (SD 1.x/2.x): its last hidden state, no pooled output. Two (SDXL): each
    encoder's penultimate hidden state, concatenated, plus the second one's pooled
    (projected) embedding.
    """
    if len(text_encoders) == 1:
        return text_encoders[0](token_ids[0], return_dict=False)[0], None
    states, pooled = [], None
    for encoder, ids in zip(text_encoders, token_ids):
        out = encoder(ids, output_hidden_states=True, return_dict=False)
        pooled = out[0]
        states.append(out[-1][-2])
    return torch.cat(states, dim=-1), pooled


@torch.no_grad()
def encode_prompts(tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module], prompts: Sequence[str],
                   device: str | torch.device, batch_size: int = 32,
                   stop: threading.Event | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [P, T, D], pooled [P, D2] or None), float32 on CPU, of ``prompts``.

    ``stop`` is looked at before every batch (``Stopped``).
    """
    hidden, pooled = [], []
    for start in range(0, len(prompts), batch_size):
        raise_if_stopped(stop, f"encoding captions ({start} of {len(prompts)} done)")
        chunk = prompts[start:start + batch_size]
        ids = [tokenize(tok, chunk).to(device) for tok in tokenizers]
        states, pool = encode_tokens(text_encoders, ids)
        hidden.append(states.float().cpu())
        if pool is not None:
            pooled.append(pool.float().cpu())
    return torch.cat(hidden), (torch.cat(pooled) if pooled else None)


def build_text_cache(tokenizers: Any, text_encoders: Any, prompts: Sequence[str], *,
                     cache_root: str | Path, device: str | torch.device,
                     stop: threading.Event | None = None) -> TextCache:
    """Embeddings of "" and every distinct prompt in ``prompts``, from disk when cached.

    Args:
        tokenizers: The tokenizer, or a list of them (SDXL has two).
        text_encoders: The text encoder, or a list of them in the same order.
        prompts: Prompts to encode (duplicates are encoded once).
        cache_root: Folder of cache files.
        device: Where the text encoders run.
        stop: A job's stop flag (``Stopped`` within one batch; nothing is written).
    """
    tokenizers = list(tokenizers) if isinstance(tokenizers, (list, tuple)) else [tokenizers]
    text_encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    distinct = [""] + sorted({p for p in prompts if p})
    fingerprint = [module_fingerprint(encoder) for encoder in text_encoders]
    key = "text-" + _key(fingerprint, [(getattr(t, "model_max_length", 0), len(t)) for t in tokenizers], distinct)
    path = Path(cache_root) / f"{key}.safetensors"
    loaded = _load(path)
    if loaded is None or json.loads(loaded[1].get("prompts", "[]")) != distinct:
        embeds, pooled = encode_prompts(tokenizers, text_encoders, distinct, device, stop=stop)
        tensors = {"embeds": embeds, **({"pooled": pooled} if pooled is not None else {})}
        _save_atomic(path, tensors, {"prompts": json.dumps(distinct)})
        # train on the tensors as read back, so a first run and a cached run compute identically
        reread = _load(path)
        tensors = reread[0] if reread is not None else tensors
        return TextCache(distinct, tensors["embeds"], key, hit=False, pooled=tensors.get("pooled"))
    tensors = loaded[0]
    return TextCache(distinct, tensors["embeds"], key, hit=True, pooled=tensors.get("pooled"))


def free_module(module: torch.nn.Module | None) -> None:
    """Move a frozen module off the accelerator (to CPU) and release cached GPU memory."""
    if module is None:
        return
    module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
