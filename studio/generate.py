"""One Generate request -> images with their parameters, progress, live preview and stop.

``generate(manager, cfg)`` loads the model if needed, sets the scheduler and the LoRA,
picks the seeds (``cfg.seed`` or a random one; image *i* gets seed + i, so any image
can be made again alone), runs the pipeline batch by batch and saves every image as
``<workspace>/outputs/<YYYY-MM-DD>/<NNNNN>-<seed>.png`` with its "parameters" text.

Text-to-image pipelines are called as diffusers defines them (``pipe(prompt, ...)``
with ``callback_on_step_end`` for progress, preview and interrupt). Unconditional
pipelines (DDPM/DDIM-style, no prompt) run the same few lines their ``__call__`` runs,
but through ``scheduler.scale_model_input`` so that every compatible scheduler works.
"""

from __future__ import annotations

import inspect
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable

from studio.config.generate import MAX_SEED, GenerateConfig
from studio.errors import ConfigError
from studio.pnginfo import format_parameters

#: Approximate latent -> RGB maps (4 latent channels): cheap previews without the VAE.
_LATENT_RGB = {
    "sd": ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0]),
    "sdxl": ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
              [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
}


@dataclass
class GeneratedImage:
    """One finished image."""

    image: Any
    seed: int
    parameters: str
    path: Path | None = None


@dataclass
class Progress:
    """What the UI shows while generating.

    Attributes:
        step: Denoising steps done over the whole request.
        total_steps: Steps of the whole request (steps x batch count).
        message: One line ("Batch 1/2, step 3/25").
        preview: A small PIL preview of the current batch's first image, or None.
        images: Images finished so far.
    """

    step: int
    total_steps: int
    message: str
    preview: Any = None
    images: list[GeneratedImage] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


@dataclass
class GenerateResult:
    """The outcome of one request."""

    images: list[GeneratedImage]
    seed: int
    stopped: bool
    seconds: float
    scheduler: str
    model: str

    @property
    def seeds(self) -> list[int]:
        return [img.seed for img in self.images]

    @property
    def summary(self) -> str:
        """One line for the UI."""
        what = f"{len(self.images)} image{'s' if len(self.images) != 1 else ''}"
        seeds = ", ".join(str(s) for s in self.seeds[:8]) + ("…" if len(self.seeds) > 8 else "")
        state = "Stopped: kept " if self.stopped else ""
        return f"{state}{what} in {self.seconds:.1f} s · seed {seeds or self.seed} · {self.scheduler} · {self.model}"


ProgressFn = Callable[[Progress], None]


def pick_seed(seed: int) -> int:
    """``seed`` itself, or a fresh random 32-bit seed for -1."""
    return seed if seed >= 0 else secrets.randbelow(MAX_SEED + 1)


def latent_preview(latents: Any, kind: str) -> Any:
    """A cheap approximate RGB picture of the first latent of a batch (no VAE), or None."""
    import numpy as np
    import torch
    from PIL import Image

    if latents is None or latents.ndim != 4:
        return None
    first = latents[0].detach().float().cpu()
    if first.shape[0] == 4:
        weights, bias = _LATENT_RGB.get(kind, _LATENT_RGB["sd"])
        rgb = (np.tensordot(first.numpy(), np.asarray(weights, dtype=np.float32), axes=([0], [0]))
               + np.asarray(bias, dtype=np.float32))
        rgb = torch.from_numpy((rgb + 1) / 2)
    elif first.shape[0] >= 3:
        rgb = first[:3].permute(1, 2, 0)
        rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min() + 1e-6)
    else:
        return None
    array = (rgb.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


#: A VAE this small (parameters) decodes the preview exactly: it is cheap, and the SD/SDXL
#: latent -> RGB maps are wrong for any VAE trained apart from those (e.g. the bundled emoji SD's).
EXACT_PREVIEW_VAE_PARAMS = 20_000_000


def vae_preview(pipe: Any) -> Callable[[Any], Any] | None:
    """A preview function decoding the first latent with ``pipe``'s own VAE when it is small, else None."""
    import torch

    vae = getattr(pipe, "vae", None)
    if vae is None or sum(p.numel() for p in vae.parameters()) > EXACT_PREVIEW_VAE_PARAMS:
        return None

    def decode(latents: Any) -> Any:
        if latents is None or latents.ndim != 4:
            return None
        first = latents[:1].to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        with torch.inference_mode():
            return sample_preview(vae.decode(first).sample)

    return decode


def sample_preview(sample: Any) -> Any:
    """The first image of an unconditional sample batch (values in -1..1) as PIL."""
    import numpy as np
    from PIL import Image

    array = ((sample[0].detach().float().cpu().permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
    array = (array * 255).round().astype(np.uint8)
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def is_unconditional_unet(pipe: Any) -> bool:
    """True for pipelines without a prompt that denoise with a plain ``unet`` (DDPM/DDIM-style)."""
    from studio.models import pipeline_capabilities

    return (not pipeline_capabilities(pipe)["prompt"] and getattr(pipe, "unet", None) is not None
            and getattr(pipe, "scheduler", None) is not None and getattr(pipe, "vae", None) is None
            and getattr(pipe, "vqvae", None) is None)


def _generators(seeds: list[int]) -> list[Any]:
    """CPU generators (the same images on every device), one per image."""
    import torch

    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def _seed_sde(pipe: Any, seed: int) -> None:
    """DPM++ SDE draws its Brownian noise from its own seed: tie it to the image seed."""
    if hasattr(pipe.scheduler, "noise_sampler_seed"):
        pipe.scheduler.noise_sampler_seed = seed


def run_unconditional(pipe: Any, steps: int, seeds: list[int],
                      on_step: Callable[[int, Any], bool] | None = None) -> tuple[list[Any], bool]:
    """Denoise ``len(seeds)`` samples with ``pipe.unet`` and ``pipe.scheduler``.

    Args:
        pipe: An unconditional UNet pipeline (see ``is_unconditional_unet``).
        steps: num_inference_steps.
        seeds: One seed per image.
        on_step: Called with (step index, current sample); returning True stops.

    Returns:
        (PIL images, stopped).
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor
    from PIL import Image

    unet, scheduler = pipe.unet, pipe.scheduler
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    shape = (len(seeds), unet.config.in_channels, height, width)
    device, dtype = unet.device, unet.dtype
    _seed_sde(pipe, seeds[0])
    generators = _generators(seeds)
    scheduler.set_timesteps(steps, device=device)
    sample = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * scheduler.init_noise_sigma
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    stopped = False
    with torch.inference_mode():
        for index, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(sample, t)
            noise = unet(model_input, t).sample
            sample = scheduler.step(noise, t, sample, **step_kwargs).prev_sample
            if on_step is not None and on_step(index, sample):
                stopped = True
                break
    arrays = ((sample / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in arrays], stopped


def build_call_kwargs(pipe: Any, cfg: GenerateConfig, seeds: list[int], size: tuple[int, int],
                      caps: dict[str, bool] | None = None) -> dict[str, Any]:
    """The keyword arguments of a text-to-image ``pipe(...)`` call for one batch."""
    from studio.models import pipeline_capabilities

    caps = caps or pipeline_capabilities(pipe)
    kwargs: dict[str, Any] = {"num_inference_steps": cfg.num_inference_steps, "generator": _generators(seeds),
                              "output_type": "pil"}
    if caps["prompt"]:
        kwargs["prompt"] = cfg.prompt
        kwargs["num_images_per_prompt"] = len(seeds)
    elif caps["batch_size"]:
        kwargs["batch_size"] = len(seeds)
    if caps["negative_prompt"] and cfg.negative_prompt:
        kwargs["negative_prompt"] = cfg.negative_prompt
    if caps["guidance_scale"]:
        kwargs["guidance_scale"] = cfg.guidance_scale
    if caps["size"]:
        kwargs["width"], kwargs["height"] = size
    return kwargs


def output_dir(workspace: str | Path, day: date | None = None) -> Path:
    """``<workspace>/outputs/<YYYY-MM-DD>`` (created)."""
    folder = Path(workspace) / "outputs" / (day or date.today()).isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_image(image: Any, folder: Path, seed: int, parameters: str) -> Path:
    """Save ``image`` as ``<NNNNN>-<seed>.png`` with the "parameters" text chunk; never overwrites."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    number = len(list(folder.glob("*.png")))
    while True:
        path = folder / f"{number:05d}-{seed}.png"
        try:
            with open(path, "xb") as fh:
                image.save(fh, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            number += 1


def generate(manager: Any, cfg: GenerateConfig, on_progress: ProgressFn | None = None,
             stop: threading.Event | None = None, save: bool = True, preview_every: int = 0) -> GenerateResult:
    """Run one request on the manager's pipeline.

    Args:
        manager: ``studio.models.PipelineManager`` (its model is loaded from ``cfg.model``
            when that differs from the loaded one).
        cfg: What to generate.
        on_progress: Called after every step (and with each finished batch).
        stop: When set, the current batch is abandoned and the finished images are kept.
        save: Write PNGs under ``<workspace>/outputs/``.
        preview_every: Decode a preview every N steps (0 = about four per batch).

    Raises:
        ModelError: no model, or one that cannot be loaded.
        ConfigError: settings the model cannot take (e.g. a LoRA on an unconditional model).
    """
    from studio.models import free_memory
    from studio.schedulers import DEFAULT_SCHEDULER, a1111_sampler, current_scheduler_name, describe_scheduler

    stop = stop or threading.Event()
    report = on_progress or (lambda progress: None)
    with manager.lock:
        loaded = manager.load(cfg.model) if cfg.model else manager.require_loaded()
        pipe = loaded.pipe
        if current_scheduler_name(pipe) != cfg.scheduler:
            manager.set_scheduler(cfg.scheduler)
        adapters = manager.sync_lora(cfg.lora, cfg.lora_scale)
        caps = loaded.capabilities
        # DDPM/DDIM-style models run the studio's own loop (every compatible scheduler works);
        # everything else, text-to-image or not, is called as diffusers defines it.
        unconditional = is_unconditional_unet(pipe)
        size = (cfg.width or loaded.size[0], cfg.height or loaded.size[1]) if caps["size"] else loaded.size
        every = preview_every or max(1, cfg.num_inference_steps // 4)
        base_seed = pick_seed(cfg.seed)
        sampler = describe_scheduler(pipe, cfg.scheduler)
        names = _metadata_names(manager, loaded, cfg, adapters, a1111_sampler(pipe, cfg.scheduler))
        if caps["size"] or unconditional:  # refuse what cannot fit before allocating the batch
            from studio.budget import pipeline_plan

            plan = pipeline_plan(pipe, size[0], size[1], cfg.batch_size, caps["prompt"] and cfg.guidance_scale > 1,
                                 manager.device)
            if plan is not None:
                plan.check()
        folder = output_dir(manager.workspace) if save else None
        # UNet passes per batch: PLMS adds one, Heun/DPM2 nearly double them; read from the
        # scheduler once the pipeline has set its timesteps (at the first step).
        passes = {"n": cfg.num_inference_steps}
        started = time.perf_counter()
        images: list[GeneratedImage] = []
        stopped = False
        for batch in range(cfg.batch_count):
            if stop.is_set():
                stopped = True
                break
            seeds = [(base_seed + batch * cfg.batch_size + j) % (MAX_SEED + 1) for j in range(cfg.batch_size)]
            label = f"Batch {batch + 1}/{cfg.batch_count}, step"

            def on_step(index: int, tensor: Any, preview_fn: Callable[[Any], Any]) -> bool:
                timesteps = getattr(pipe.scheduler, "timesteps", None)
                if index == 0 and batch == 0 and timesteps is not None:
                    passes["n"] = max(1, len(timesteps))
                iterations = passes["n"]
                step = min(index + 1, iterations)
                preview = preview_fn(tensor) if (step % every == 0 or step == iterations) else None
                report(Progress(batch * iterations + step, iterations * cfg.batch_count,
                                f"{label} {step}/{iterations}", preview, list(images)))
                return stop.is_set()

            try:
                if unconditional:
                    pil_images, batch_stopped = run_unconditional(
                        pipe, cfg.num_inference_steps, seeds, lambda i, s: on_step(i, s, sample_preview))
                else:
                    pil_images, batch_stopped = _run_text_to_image(pipe, cfg, seeds, size, loaded.kind, caps,
                                                                   on_step)
            except (ValueError, TypeError, NotImplementedError) as exc:
                if cfg.scheduler == DEFAULT_SCHEDULER:
                    raise
                # A scheduler diffusers calls compatible can still refuse what this pipeline
                # passes it (e.g. custom sigmas): say which choice failed and what works.
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"The {cfg.scheduler} scheduler failed with {loaded.label}: {first}",
                                  "Pick another scheduler; the model's own default always works.") from None
            if batch_stopped:
                stopped = True
                break
            for image, seed in zip(pil_images, seeds):
                parameters = image_parameters(cfg, seed, image.size, names, prompt=caps["prompt"])
                path = save_image(image, folder, seed, parameters) if folder is not None else None
                images.append(GeneratedImage(image=image, seed=seed, parameters=parameters, path=path))
            report(Progress((batch + 1) * passes["n"], passes["n"] * cfg.batch_count,
                            f"Batch {batch + 1}/{cfg.batch_count} done", None, list(images)))
        seconds = time.perf_counter() - started
        if stopped:
            free_memory()
    return GenerateResult(images=images, seed=base_seed, stopped=stopped, seconds=seconds, scheduler=sampler,
                          model=loaded.label)


def _run_text_to_image(pipe: Any, cfg: GenerateConfig, seeds: list[int], size: tuple[int, int], kind: str,
                       caps: dict[str, bool],
                       on_step: Callable[[int, Any, Callable[[Any], Any]], bool]) -> tuple[list[Any], bool]:
    """One ``pipe(...)`` call for a batch, with per-step progress, preview and interrupt."""
    import torch

    kwargs = build_call_kwargs(pipe, cfg, seeds, size, caps)
    _seed_sde(pipe, seeds[0])
    state = {"stopped": False}
    preview = vae_preview(pipe) or (lambda latents: latent_preview(latents, kind))
    if caps["callback"]:
        def callback(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step(index, tensors.get("latents"), preview):
                state["stopped"] = True
                pipeline._interrupt = True
            return tensors

        kwargs["callback_on_step_end"] = callback
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
    with torch.inference_mode():
        output = pipe(**kwargs)
    return list(output.images), state["stopped"]


@dataclass(frozen=True)
class MetadataNames:
    """How one request's model, LoRAs and sampler are named in its images' parameters."""

    model: Any  # studio.model_names.PngModel
    loras: tuple[tuple[str, str, float], ...] = ()  # (name, short hash, scale)
    a1111: tuple[str, str] | None = None  # ("Sampler", "Schedule type")
    studio_sampler: str | None = None


def _metadata_names(manager: Any, loaded: Any, cfg: GenerateConfig, adapters: dict[str, float],
                    a1111: tuple[str, str] | None) -> MetadataNames:
    from studio.model_names import lora_short_hash, png_lora
    from studio.models import resolve_lora
    from studio.schedulers import DEFAULT_SCHEDULER

    loras = []
    if loaded.ref.kind == "lora-run" and adapters.get("run"):
        name, file = png_lora(loaded.ref.lora)
        loras.append((name, lora_short_hash(file), 1.0))
    if cfg.lora and any(name != "run" for name in adapters):
        name, file = png_lora(resolve_lora(cfg.lora, manager.workspace))
        loras.append((name, lora_short_hash(file), cfg.lora_scale))
    studio = cfg.scheduler if (cfg.scheduler == DEFAULT_SCHEDULER or a1111 is None) else None
    return MetadataNames(loaded.png(), tuple(loras), a1111, studio)


def image_parameters(cfg: GenerateConfig, seed: int, size: tuple[int, int], names: MetadataNames,
                     prompt: bool = True) -> str:
    """The "parameters" text of one image, in A1111's conventions (see ``studio.pnginfo``)."""
    sampler, schedule = names.a1111 if names.a1111 else (None, None)
    params: dict[str, Any] = {
        "Steps": cfg.num_inference_steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": cfg.guidance_scale if prompt else None,
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model hash": names.model.short_hash,
        "Model": names.model.name,
        "Lora hashes": ", ".join(f"{n.replace(':', '').replace(',', '')}: {h}" for n, h, _ in names.loras) or None,
        "Studio sampler": names.studio_sampler,
    }
    text = cfg.prompt if prompt else ""
    if prompt and names.loras:
        text = " ".join([text, *(f"<lora:{n}:{scale:g}>" for n, _, scale in names.loras)]).strip()
    return format_parameters(text, cfg.negative_prompt if prompt else "", params)


def run_cli(cfg: GenerateConfig, events: Callable[[Any], None], stop: threading.Event) -> Path:
    """``python -m studio generate --config gen.json``: one request, headless.

    Args:
        cfg: The request; ``cfg.model`` is required, ``cfg.workspace``/``cfg.device`` say where.
        events: ``studio.events`` sink (status, one "samples" per image, then finished/stopped).
        stop: Set by Ctrl-C; the current batch is abandoned and finished images are kept.

    Returns:
        The folder the images were saved in.

    Raises:
        ConfigError: no model in the config.
        ModelError: the model cannot be loaded.
    """
    from studio.events import Event
    from studio.models import PipelineManager

    if not cfg.model:
        raise ConfigError("The config names no model: set \"model\" to a Hub id, a folder, a .safetensors file "
                          "or a run folder.")
    manager = PipelineManager(cfg.device, Path(cfg.workspace or "runs").expanduser().resolve())
    events(Event("status", message=f"loading {cfg.model} on {manager.device}"))
    manager.load(cfg.model)
    batches = {"done": 0}

    def on_progress(progress: Progress) -> None:
        if len(progress.images) > batches["done"]:
            for image in progress.images[batches["done"]:]:
                events(Event("samples", path=str(image.path), message=f"seed {image.seed}"))
            batches["done"] = len(progress.images)

    result = generate(manager, cfg, on_progress=on_progress, stop=stop)
    folder = output_dir(manager.workspace)
    events(Event("stopped" if result.stopped else "finished", path=str(folder), message=result.summary))
    return folder
