"""The inputs of a latent text-to-image model for any rows of a captioned dataset.

``LatentBatches`` reads the dataset (uint8 tensors with center crop, PIL images with random
crop), encodes it once where it can (``studio.latent_cache``: VAE latents, text embeddings;
then the VAE and text encoders leave the device), and hands the loop, for any rows:
``image_latents(rows)`` (sampled from the cache, or VAE-encoded now) and
``text_embeddings(rows)`` (looked up, or encoded now; with caption dropout), for the
training images or DreamBooth's class images (``is_class``). Random crops and a training
text encoder make a cache impossible; it says so and encodes per step like the scripts.
``for_validation`` brings the freed modules back to the device while validation images are drawn.
``encode_dataset`` is the text-to-image-from-scratch trainer's: its own autoencoder, frozen, encodes
every image once and sets the latent scaling factor.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from studio.config.finetune import FinetuneConfig
from studio.errors import DataError
from studio.trainers.batches import random_crop, to_float
from studio.trainers.stable_diffusion import image_prompts


class LatentBatches:
    """Latents and text embeddings of the dataset's rows (see the module docstring).

    Args:
        cfg: The fine-tune settings (data, resolution, crop, flip, caption dropout, caching).
        vae / tokenizers / text_encoders: The frozen modules that encode (``text_encoders[0]`` may train).
        device: Where training runs. weight_dtype / vae_dtype: dtypes of the frozen modules.
        data_gen / noise_gen: The run's generators for data choices and latent noise (saved in checkpoints).
    """

    def __init__(self, cfg: FinetuneConfig, vae: Any, tokenizers: list[Any], text_encoders: list[Any],
                 device: torch.device, weight_dtype: torch.dtype, vae_dtype: torch.dtype,
                 data_gen: torch.Generator, noise_gen: torch.Generator) -> None:
        self.cfg, self.vae, self.tokenizers, self.text_encoders = cfg, vae, tokenizers, text_encoders
        self.device, self.weight_dtype, self.vae_dtype = device, weight_dtype, vae_dtype
        self.data_gen, self.noise_gen = data_gen, noise_gen
        self.latents = self.class_latents = self.text = None
        self.class_pixels: torch.Tensor | None = None
        self.cache_images = self.cache_text = self.text_encoder_trains = False

    # ---------------------------------------------------------------- the dataset
    def load(self, report: Any, stop: threading.Event | None = None) -> None:
        """Read the dataset as uint8 tensors (center crop) or as PIL images (random crop), and its prompts."""
        from studio import data as studio_data

        cfg = self.cfg
        report("status", message=f"loading dataset {cfg.data.label}")
        cache_root = Path(cfg.workspace) / ".cache"
        self.images = None
        if cfg.center_crop:
            cache = studio_data.load_tensor_cache(cfg.data, cfg.resolution, cache_root, center_crop=True, stop=stop)
            self.pixels, captions, self.data_key = cache.pixels, cache.captions, cache.key
        else:
            dataset = studio_data.load_image_dataset(cfg.data, scratch=cache_root, stop=stop)
            self.images = [dataset.image(i) for i in range(len(dataset))]
            self.pixels, captions, self.data_key = None, dataset.captions, dataset.fingerprint
        count = len(self.images) if self.images is not None else int(self.pixels.shape[0])
        if count == 0:
            raise DataError("The dataset has no usable images.", "Pick another dataset in the Dataset tab.")
        self.prompts = image_prompts(cfg, captions, count)
        self.count = count

    # ---------------------------------------------------------------- encode once
    def encode_once(self, report: Any, stop: threading.Event, class_pixels: torch.Tensor | None,
                    class_cache: Path, text_encoder_trains: bool) -> None:
        """Cache latents and text embeddings (or explain the fallback), then free the VAE/text encoders."""
        from studio.latent_cache import build_latent_cache, build_text_cache, free_module, tokenize

        cfg = self.cfg
        cache_root = Path(cfg.workspace) / ".cache" / "finetune"
        self.class_pixels, self.text_encoder_trains = class_pixels, text_encoder_trains
        extra = [cfg.class_prompt.strip()] if class_pixels is not None else []
        self.cache_images = cfg.cache_latents and self.images is None
        self.cache_text = cfg.cache_latents and not text_encoder_trains
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
                progress=CacheProgress(report), stop=stop)
            if self.latents.hit:
                report("status", message="latents loaded from cache (no VAE encode)")
        if class_pixels is not None:
            # class images are exactly R x R: cropping is the identity, so they are always cacheable
            self.class_latents = build_latent_cache(
                self.vae, class_pixels, data_key=f"class-{class_cache.parent.name}-{len(class_pixels)}",
                resolution=cfg.resolution, random_flip=cfg.random_flip, cache_root=class_cache,
                device=self.device, dtype=self.vae_dtype, stop=stop)
        if self.cache_text:
            self.text = build_text_cache(self.tokenizers, self.text_encoders, self.prompts + extra,
                                         cache_root=cache_root, device=self.device, stop=stop)
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

    @contextlib.contextmanager
    def for_validation(self, unet: Any, text_encoder: Any) -> Iterator[None]:
        """Inside: the VAE and the text encoders (``text_encoder``, the unwrapped first one, and SDXL's second)
        on the device, ``unet`` and ``text_encoder`` in eval mode. After: training mode again (the text
        encoder only when it trains), and the modules whose outputs are cached back off the device."""
        encoders = (text_encoder, *self.text_encoders[1:])
        self.vae.to(self.device)
        for module in encoders:
            module.to(self.device)
        unet.eval()
        text_encoder.eval()
        try:
            yield
        finally:
            unet.train()
            if self.text_encoder_trains:
                text_encoder.train()
            if self.cache_images:  # the VAE is only needed here: back off the device
                self.vae.to("cpu")
            if self.cache_text:
                for module in encoders:
                    module.to("cpu")

    # ---------------------------------------------------------------- per step
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
            pixels = torch.stack([random_crop(self.images[int(i)], cfg.resolution, self.data_gen, bool(v))
                                  for i, v in zip(rows, views)])
        else:
            pixels = self.pixels[rows].float() / 127.5 - 1.0
            pixels = torch.where(views.view(-1, 1, 1, 1).bool(), torch.flip(pixels, dims=[-1]), pixels)
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
            return (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=self.noise_gen,
                                                       device=self.device, dtype=dist.mean.dtype)) \
                * self.vae.config.scaling_factor


class CacheProgress:
    """``progress(done, total)`` for the latent cache: a status event per batch."""

    def __init__(self, report: Any) -> None:
        self.report = report

    def __call__(self, done: int, total: int) -> None:
        self.report("status", message=f"caching latents {done}/{total}")


@torch.no_grad()
def encode_dataset(vae: Any, pixels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's latent mean and standard deviation (the autoencoder is frozen from here on); the
    autoencoder's scaling factor becomes 1 / std of the latents (as SD chose 0.18215)."""
    vae.eval().requires_grad_(False)
    means, stds = [], []
    for i in range(0, len(pixels), 64):
        dist = vae.encode(to_float(pixels[i:i + 64], device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean = torch.cat(means)
    vae.register_to_config(scaling_factor=round(1.0 / float(mean.std()), 4))
    return mean, torch.cat(stds)
