"""Images made during training: fixed-seed samples and validation images, DreamBooth's class images.

Responsible for: the DDPM's fixed-seed DDIM samples (``sample_images``), a text-to-image
pipeline's validation images for fixed prompts (``validation_images``; several per prompt in one
call: ``prompt_images``) and DreamBooth's class images made by the untouched base model
(``make_class_images``). Stop is looked at every denoising step (``stop_callback``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.config.finetune import FinetuneConfig
from studio.config.train import TrainConfig
from studio.stopping import raise_if_stopped


def stop_callback(stop: threading.Event | None, what: str) -> Callable[..., dict]:
    """A diffusers ``callback_on_step_end`` that raises ``Stopped`` at the denoising step after Stop."""
    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        raise_if_stopped(stop, what)
        return tensors

    return on_step_end


@torch.no_grad()
def sample_images(unet: torch.nn.Module, noise_scheduler: Any, cfg: TrainConfig, device: torch.device,
                  stop: threading.Event | None = None) -> np.ndarray:
    """The fixed-seed sample grid's images (uint8 [N, R, R, 3]) with DDIM in ``sample_inference_steps``.

    The initial noise comes from a generator seeded with ``cfg.seed`` every time, so
    grids at different steps show the same "scene" getting better. ``stop`` is looked at
    before every denoising step (``Stopped``; the grid is abandoned).
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    scheduler.set_timesteps(cfg.sample_inference_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn((cfg.num_samples, 3, cfg.resolution, cfg.resolution), generator=gen).to(device)
    was_training = unet.training
    unet.eval()
    try:
        for t in scheduler.timesteps:
            raise_if_stopped(stop, "drawing the sample grid")
            out = unet(x, t.to(device)).sample
            x = scheduler.step(out.float(), t, x).prev_sample
    finally:
        unet.train(was_training)
    x = (x / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)



@torch.no_grad()
def make_class_images(pipe: Any, cfg: FinetuneConfig, folder: Path, device: torch.device,
                      autocast: Callable[[], AbstractContextManager], stop: threading.Event | None,
                      report: Callable[..., None]) -> torch.Tensor:
    """Generate (or reuse) ``num_class_images`` images of ``class_prompt`` in ``folder``.

    Returns:
        The class images as a uint8 ``[N, 3, R, R]`` tensor.

    Raises:
        Stopped: ``stop`` was set (looked at every denoising step); the images made so
            far are kept, and the next start makes only the rest.
    """
    import numpy as np
    from PIL import Image

    folder.mkdir(exist_ok=True)
    paths = [folder / f"{i:04d}.png" for i in range(cfg.num_class_images)]
    todo = [i for i, p in enumerate(paths) if not p.is_file() or p.stat().st_size == 0]
    if todo:
        report("status", message=f"generating {len(todo)} class images of '{cfg.class_prompt}'")
        pipe.unet.to(device)
        pipe.set_progress_bar_config(disable=True)
        for made, i in enumerate(todo):
            what = (f"generating class images ({made} of {len(todo)} made; they are kept and the next start "
                    "makes only the rest)")
            raise_if_stopped(stop, what)
            gen = torch.Generator(device=device).manual_seed(cfg.seed + 10_000 + i)
            with autocast():  # fp16 text encoder/VAE with an fp32 UNet on a GPU
                image = pipe(cfg.class_prompt, height=cfg.resolution, width=cfg.resolution,
                             num_inference_steps=cfg.num_inference_steps, generator=gen,
                             callback_on_step_end=stop_callback(stop, what)).images[0]
            from studio.atomic import save_image

            save_image(image, paths[i])  # atomic: a kill mid-write leaves no truncated class image
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths if p.is_file()]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- validation images
@torch.no_grad()
def validation_images(pipe: Any, prompts: list[str], cfg: FinetuneConfig, device: torch.device,
                      autocast: Callable[[], AbstractContextManager],
                      stop: threading.Event | None = None) -> list[Any]:
    """One image per prompt, each with the fixed seed ``cfg.seed`` (PIL images).

    Raises:
        Stopped: ``stop`` was set (looked at every denoising step).
    """
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in prompts:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        with autocast():
            images.append(pipe(prompt, height=cfg.resolution, width=cfg.resolution,
                               num_inference_steps=cfg.num_inference_steps, generator=gen,
                               callback_on_step_end=stop_callback(stop, "drawing the validation images")
                               ).images[0])
    return images


@torch.no_grad()
def prompt_images(pipe: Any, prompts: list[str], images_per_prompt: int, resolution: int, steps: int,
                  guidance_scale: float, seed: int, stop: threading.Event | None = None) -> np.ndarray:
    """uint8 ``[P * k, R, R, 3]``: ``images_per_prompt`` images of each prompt in one call, from one generator
    seeded with ``seed`` (the same images at every step for the same weights).

    Raises:
        Stopped: ``stop`` was set (looked at every denoising step).
    """
    pipe.set_progress_bar_config(disable=True)
    images = pipe(list(prompts), num_images_per_prompt=images_per_prompt, height=resolution, width=resolution,
                  num_inference_steps=steps, guidance_scale=guidance_scale,
                  generator=torch.Generator().manual_seed(seed), output_type="np",
                  callback_on_step_end=stop_callback(stop, "drawing the validation images")).images
    return (images * 255).round().astype(np.uint8)
