"""Benchmark and check: the studio's GPU paths end to end, against the diffusers reference loops.

One script, four parts, one JSON line each (``{"part": ..., "ok": ..., ...}``):

a. **train** — the 128 px presets of the Train tab ("lucidrains Unet(dim=64,
   dim_mults=(1,2,4,8))" and "diffusers example (128 px)"), batch 16, fp16 AMP, on the
   bundled emoji: the studio trainer (``studio.trainers.ddpm.train``) against the inner
   loop of diffusers' ``train_unconditional.py`` (the reference of
   ``benchmarks/train_ddpm.py``, here with accelerate's AMP as the example runs it):
   images/s over the steps after the warm-up, and peak CUDA memory.
b. **finetune** — an SD-1.5-sized pipeline built from the real UNet/VAE/CLIP configs
   with random weights (``benchmarks/finetune.py --size sd15``; throughput and memory do
   not depend on the weights, and nothing comes from the Hub), LoRA and full fine-tunes
   at 512 px in fp16 and bf16: the studio trainer against the
   ``train_text_to_image(_lora).py`` inner loop of ``benchmarks/finetune.py``:
   s/step, images/s and peak CUDA memory.
c. **generate** — the studio's generate path (``PipelineManager`` + ``generate``) on that
   pipeline in fp16 at 512 px with every scheduler of ``studio.schedulers.SCHEDULERS``
   (those the pipeline is not compatible with are listed as skipped, with the reason).
d. **numerics** — no NaN and no black image: every VAE decode of part c is checked
   (finite latents in, finite pixels out), and an SDXL-style pipeline whose VAE says
   ``force_upcast`` (its decoder made to overflow fp16 on purpose) is run through the
   studio's loader in fp16 twice: with the fp32 VAE upcast (must give finite, non-black
   images) and with the upcast turned off (must be caught as NaN/black: the check works).

On a GPU the whole run takes a few minutes (the target is under 8). ``--cpu-smoke`` runs a
tiny version of every part on CPU (tiny models, 2 steps, 16-32 px, fp32 except part d's
fp16 VAE) in well under a minute; ``tests/test_benchmarks_gpu_smoke.py`` runs it so the
script cannot rot.

    python benchmarks/gpu.py                     # on a CUDA machine
    python benchmarks/gpu.py --parts train,generate
    python benchmarks/gpu.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

PARTS = ("train", "finetune", "generate", "numerics")


@dataclass
class Profile:
    """Sizes of one run: the GPU run, or the CPU smoke run."""

    device: str
    train_presets: tuple[str, ...]
    train_resolution: int
    train_batch: int
    train_precision: str
    train_warmup: int
    train_steps: int
    train_rows: int
    ft_size: str
    ft_resolution: int
    ft_batch: int
    ft_precisions: tuple[str, ...]
    ft_warmup: int
    ft_steps: int
    ft_rows: int
    gen_size: int
    gen_steps: int
    sdxl_size: int
    sdxl_vae: str


GPU = Profile(device="cuda", train_presets=("lucidrains Unet(dim=64, dim_mults=(1,2,4,8))", "diffusers example (128 px)"),
              train_resolution=128, train_batch=16, train_precision="fp16", train_warmup=10, train_steps=40,
              train_rows=0, ft_size="sd15", ft_resolution=512, ft_batch=4, ft_precisions=("fp16", "bf16"),
              ft_warmup=3, ft_steps=10, ft_rows=32, gen_size=512, gen_steps=8, sdxl_size=512, sdxl_vae="sd")
CPU_SMOKE = Profile(device="cpu", train_presets=("tiny (CPU demo)",), train_resolution=16, train_batch=2,
                    train_precision="no", train_warmup=1, train_steps=2, train_rows=8, ft_size="tiny",
                    ft_resolution=32, ft_batch=2, ft_precisions=("no",), ft_warmup=1, ft_steps=2, ft_rows=8,
                    gen_size=16, gen_steps=2, sdxl_size=32, sdxl_vae="tiny")


def _load_benchmark(name: str) -> Any:
    """Import ``benchmarks/<name>.py`` (the reference loops) as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    """Peak CUDA memory allocated since the last reset, in MiB (None on CPU: not measured here)."""
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None


def _emit(record: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps(record), flush=True)
    return record


# --------------------------------------------------------------------------- a. train
def studio_train_rate(profile: Profile, preset: str, workspace: Path) -> tuple[float, float | None]:
    """The studio DDPM trainer on ``preset``: (images/s after the warm-up, peak MiB)."""
    from studio.config.data import DataConfig
    from studio.config.train import TrainConfig
    from studio.trainers.ddpm import train

    cfg = TrainConfig(data=DataConfig(max_rows=profile.train_rows), workspace=str(workspace),
                      run_name=f"gpu-{len(list(workspace.glob('*')))}", preset=preset,
                      resolution=profile.train_resolution, train_batch_size=profile.train_batch,
                      max_train_steps=profile.train_warmup + profile.train_steps,
                      mixed_precision=profile.train_precision, lr_warmup_steps=0, save_every=0, sample_every=0,
                      num_samples=1, sample_inference_steps=1, checkpoints_total_limit=1, seed=0,
                      device=profile.device)
    stamps: list[tuple[int, float]] = []

    def sink(event: Any) -> None:
        if event.kind == "step":
            _sync(profile.device)
            stamps.append((event.step, time.perf_counter()))
        elif event.kind == "failed":
            raise RuntimeError(event.message)

    _reset_peak(profile.device)
    train(cfg, sink, threading.Event())
    peak = _peak_mb(profile.device)
    # steps are reported in bursts (one host sync every few steps on a GPU): time from the
    # end of the first burst at or after the warm-up to the last step
    first = next(i for i, (s, _) in enumerate(stamps) if s >= profile.train_warmup)
    while first + 1 < len(stamps) and stamps[first + 1][1] == stamps[first][1]:
        first += 1
    (s0, t0), (s1, t1) = stamps[first], stamps[-1]
    if s1 <= s0:
        raise RuntimeError("too few steps after the warm-up to time the studio trainer")
    return (s1 - s0) * profile.train_batch / (t1 - t0), peak


def reference_train_rate(profile: Profile, preset: str) -> tuple[float, float | None]:
    """diffusers' train_unconditional.py inner loop (accelerate AMP): (images/s after warm-up, peak MiB)."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from datasets import Dataset
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from studio.unet_presets import PRESETS, unet_kwargs

    ref = _load_benchmark("train_ddpm")
    p, res = PRESETS[preset], profile.train_resolution
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=profile.device == "cpu", mixed_precision=profile.train_precision)
    torch.manual_seed(0)
    model = UNet2DModel(**unet_kwargs(res, p.block_out_channels, p.layers_per_block, p.down_block_types,
                                      p.up_block_types))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), **ref.ADAM)
    dataset = Dataset.from_parquet(str(ref.EMOJI))
    if profile.train_rows:
        dataset = dataset.select(range(profile.train_rows))

    def augment(image: Any) -> torch.Tensor:  # the example's Resize, RandomCrop, RandomHorizontalFlip, ToTensor, Normalize
        image = ref.random_crop(ref.resize_shorter(image.convert("RGB"), res), res)
        return ref.to_tensor_normalized(ref.hflip_or_not(image))

    dataset.set_transform(lambda examples: {"input": [augment(im) for im in examples["image"]]})
    loader = torch.utils.data.DataLoader(dataset, batch_size=profile.train_batch, shuffle=True, num_workers=0,
                                         drop_last=True, generator=torch.Generator().manual_seed(0))
    total = profile.train_warmup + profile.train_steps
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), **ref.EMA, model_cls=UNet2DModel,
                   model_config=accelerator.unwrap_model(model).config)
    ema.to(accelerator.device)
    _reset_peak(profile.device)
    model.train()
    batches, step, start = iter(loader), 0, 0.0
    while step < total:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        if step == profile.train_warmup:
            _sync(profile.device)
            start = time.perf_counter()
        clean = batch["input"].to(accelerator.device)
        noise = torch.randn(clean.shape, device=clean.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                  device=clean.device).long()
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with accelerator.accumulate(model):
            output = model(noisy, timesteps).sample
            loss = F.mse_loss(output.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.step(model.parameters())
            step += 1
        loss.detach().item()  # the example logs loss.detach().item() every step
    _sync(profile.device)
    rate = profile.train_steps * profile.train_batch / (time.perf_counter() - start)
    peak = _peak_mb(profile.device)
    del model, optimizer, ema
    return rate, peak


def part_train(profile: Profile, tmp: Path) -> dict[str, Any]:
    rows = []
    for preset in profile.train_presets:
        studio_rate, studio_peak = studio_train_rate(profile, preset, tmp / "train-runs")
        reference_rate, reference_peak = reference_train_rate(profile, preset)
        rows.append({"preset": preset, "resolution": profile.train_resolution, "batch": profile.train_batch,
                     "precision": profile.train_precision, "studio_img_s": round(studio_rate, 2),
                     "reference_img_s": round(reference_rate, 2), "ratio": round(studio_rate / reference_rate, 3),
                     "studio_peak_mb": studio_peak, "reference_peak_mb": reference_peak})
    ok = all(r["studio_img_s"] > 0 and r["reference_img_s"] > 0 for r in rows)
    return {"part": "train", "ok": ok, "runs": rows}


# --------------------------------------------------------------------------- b. finetune
def part_finetune(profile: Profile, tmp: Path, base: Path) -> dict[str, Any]:
    ft = _load_benchmark("finetune")
    ft._patch_trainer_outputs()  # validation images, checkpoints and the export are not steps
    dataset, captions = ft.load_data(profile.ft_rows)
    rows = []
    for method in ("lora", "full"):
        for precision in profile.ft_precisions:
            args = SimpleNamespace(device=profile.device, mixed_precision=precision, seed=0, batch=profile.ft_batch,
                                   resolution=profile.ft_resolution, warmup=profile.ft_warmup, rows=profile.ft_rows)
            _reset_peak(profile.device)
            studio_s = ft.studio_run(base, method, tmp / f"ft-{method}-{precision}", args, profile.ft_steps)
            studio_peak = _peak_mb(profile.device)
            _reset_peak(profile.device)
            reference_s = ft.reference_run(base, method, dataset, captions, args, profile.ft_steps)
            reference_peak = _peak_mb(profile.device)
            rows.append({"method": method, "precision": precision, "resolution": profile.ft_resolution,
                         "batch": profile.ft_batch, "studio_s_step": round(studio_s, 4),
                         "reference_s_step": round(reference_s, 4),
                         "studio_img_s": round(profile.ft_batch / studio_s, 2),
                         "reference_img_s": round(profile.ft_batch / reference_s, 2),
                         "ratio": round(reference_s / studio_s, 3), "studio_peak_mb": studio_peak,
                         "reference_peak_mb": reference_peak})
    ok = all(r["studio_s_step"] > 0 and r["reference_s_step"] > 0 for r in rows)
    return {"part": "finetune", "ok": ok, "model": profile.ft_size, "runs": rows}


# --------------------------------------------------------------------------- c. generate (+ d's decode checks)
def watch_decodes(pipe: Any, log: list[dict[str, Any]]) -> None:
    """Wrap ``pipe.vae.decode`` to record, for every decode, its dtype and whether input and output are finite."""
    vae = pipe.vae
    original = vae.decode

    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = original(latents, *args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        log.append({"dtype": str(next(vae.parameters()).dtype).replace("torch.", ""),
                    "latents_finite": bool(torch.isfinite(latents).all()),
                    "pixels_finite": bool(torch.isfinite(sample).all())})
        return out

    vae.decode = decode


def image_is_black(image: Any) -> bool:
    """An image with no signal: all pixels 0 (what a NaN decode turns into) or one flat value."""
    import numpy as np

    array = np.asarray(image)
    return bool(array.max() == 0 or array.std() == 0)


def part_generate(profile: Profile, tmp: Path, base: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from studio.config.generate import GenerateConfig
    from studio.generate import generate
    from studio.models import PipelineManager
    from studio.schedulers import DEFAULT_SCHEDULER, SCHEDULERS, entry_available, is_compatible

    manager = PipelineManager(profile.device, tmp / "gen-workspace", offline=True)
    loaded = manager.load(str(base))
    decodes: list[dict[str, Any]] = []
    watch_decodes(loaded.pipe, decodes)
    dtype = str(loaded.pipe.unet.dtype).replace("torch.", "")
    rows, checks = [], []
    for name in (DEFAULT_SCHEDULER, *SCHEDULERS):
        if name != DEFAULT_SCHEDULER and not is_compatible(loaded.pipe, name):
            why = "needs " + SCHEDULERS[name].requires if not entry_available(name) else "not compatible with SD"
            rows.append({"scheduler": name, "skipped": why})
            continue
        cfg = GenerateConfig(model=str(base), prompt="a red fox in the snow", negative_prompt="blurry",
                             width=profile.gen_size, height=profile.gen_size,
                             num_inference_steps=profile.gen_steps, guidance_scale=7.0, seed=1, scheduler=name)
        decodes.clear()
        _sync(profile.device)
        started = time.perf_counter()
        result = generate(manager, cfg, save=False)
        _sync(profile.device)
        seconds = time.perf_counter() - started
        black = [image_is_black(img.image) for img in result.images]
        check = {"scheduler": name, "images": len(result.images), "black": sum(black),
                 "nan_decodes": sum(not (d["latents_finite"] and d["pixels_finite"]) for d in decodes)}
        checks.append(check)
        rows.append({"scheduler": name, "seconds": round(seconds, 3), "black": check["black"],
                     "nan_decodes": check["nan_decodes"]})
    ran = [r for r in rows if "seconds" in r]
    ok = bool(ran) and all(r["black"] == 0 and r["nan_decodes"] == 0 for r in ran)
    return ({"part": "generate", "ok": ok, "dtype": dtype, "size": profile.gen_size, "steps": profile.gen_steps,
             "generated": len(ran), "skipped": len(rows) - len(ran), "schedulers": rows}, checks)


# --------------------------------------------------------------------------- d. numerics
def build_sdxl_style(path: Path, vae_size: str, seed: int = 0) -> Path:
    """A small SDXL-architecture pipeline (two text encoders, text_time embedding) whose VAE says force_upcast.

    The VAE decoder is made to overflow fp16 on purpose (``post_quant_conv`` scaled by 1e5: its
    activations reach ~1e5-1e6, beyond fp16's 65504, while fp32 and the GroupNorms after it are
    fine), as the real SDXL VAE does on some images: only the fp32 upcast gives a clean image.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.devices import MODEL_INIT_LOCK
    from tiny_pipelines import TINY_VOCAB_SIZE, make_tiny_tokenizer

    with MODEL_INIT_LOCK:
        torch.manual_seed(seed)
        text_config = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=0,
                           eos_token_id=1, pad_token_id=1)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80, transformer_layers_per_block=(1, 1), norm_num_groups=32)
        if vae_size == "sd":  # the SD/SDXL VAE's real architecture (84 M parameters)
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
                                scaling_factor=0.13025, force_upcast=True)
        else:
            vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                sample_size=32, norm_num_groups=32, scaling_factor=0.13025, force_upcast=True)
        with torch.no_grad():
            vae.post_quant_conv.weight.mul_(1e5)
            vae.post_quant_conv.bias.mul_(1e5)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config)),
            tokenizer=make_tiny_tokenizer(), tokenizer_2=make_tiny_tokenizer(), unet=unet,
            scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             steps_offset=1, timestep_spacing="leading"),
            force_zeros_for_empty_prompt=True)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def sdxl_decode_check(profile: Profile, path: Path, upcast: bool) -> dict[str, Any]:
    """Load ``path`` with the studio's loader in fp16 and generate one image as the studio calls the pipeline."""
    from studio.config.generate import GenerateConfig
    from studio.generate import build_call_kwargs
    from studio.models import load_pipeline, pipeline_kind

    pipe = load_pipeline(str(path), device=profile.device, dtype=torch.float16, offline=True)
    pipe.vae.register_to_config(force_upcast=upcast)
    decodes: list[dict[str, Any]] = []
    watch_decodes(pipe, decodes)
    cfg = GenerateConfig(model=str(path), prompt="a lighthouse at dusk", width=profile.sdxl_size,
                         height=profile.sdxl_size, num_inference_steps=2, guidance_scale=5.0, seed=3)
    import warnings

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "invalid value encountered in cast": the NaN case
        images = pipe(**build_call_kwargs(pipe, cfg, [3], (profile.sdxl_size, profile.sdxl_size))).images
    return {"kind": pipeline_kind(pipe), "force_upcast": upcast,
            "vae_dtype_at_decode": decodes[-1]["dtype"] if decodes else None,
            "pixels_finite": all(d["pixels_finite"] for d in decodes), "black": sum(map(image_is_black, images))}


def part_numerics(profile: Profile, tmp: Path, generate_checks: list[dict[str, Any]]) -> dict[str, Any]:
    path = build_sdxl_style(tmp / "sdxl-style", profile.sdxl_vae)
    on = sdxl_decode_check(profile, path, upcast=True)
    off = sdxl_decode_check(profile, path, upcast=False)
    generated = sum(c["images"] for c in generate_checks)
    bad = [c["scheduler"] for c in generate_checks if c["black"] or c["nan_decodes"]]
    upcast_ok = on["vae_dtype_at_decode"] == "float32" and on["pixels_finite"] and on["black"] == 0
    detected = not off["pixels_finite"] and off["black"] > 0  # the check sees the failure it guards against
    return {"part": "numerics", "ok": upcast_ok and detected and not bad, "generate_images_checked": generated,
            "generate_bad_schedulers": bad, "sdxl_upcast_on": on, "sdxl_upcast_off": off,
            "nan_detected_without_upcast": detected}


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny version of every part on CPU (< 1 minute)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--workdir", default="", help="folder for the built models and runs (default: a temp folder)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    profile = CPU_SMOKE if args.cpu_smoke else GPU
    if profile.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --cpu-smoke for the CPU version")
    if profile.device == "cpu":
        torch.set_num_threads(1)
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-gpu-"))
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name(0) if profile.device == "cuda" else "cpu"
    print(f"device: {device_name}, torch {torch.__version__}, parts: {', '.join(parts)}", flush=True)

    base = None
    if {"finetune", "generate"} & set(parts):
        ft = _load_benchmark("finetune")
        t = time.perf_counter()
        base = ft.build_pipeline(profile.ft_size, tmp / f"pipeline-{profile.ft_size}")
        print(f"built the {profile.ft_size} pipeline in {time.perf_counter() - t:.1f} s", flush=True)
    checks: list[dict[str, Any]] = []
    failed = False
    for part in PARTS:
        if part not in parts:
            continue
        t = time.perf_counter()
        if part == "train":
            record = part_train(profile, tmp)
        elif part == "finetune":
            record = part_finetune(profile, tmp, base)
        elif part == "generate":
            record, checks = part_generate(profile, tmp, base)
        else:
            record = part_numerics(profile, tmp, checks)
        record.update(device=device_name, seconds=round(time.perf_counter() - t, 1))
        _emit(record)
        failed |= not record["ok"]
        gc.collect()
        if profile.device == "cuda":
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
