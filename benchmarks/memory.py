"""Benchmark: the memory plan (studio.budget) against peaks measured on this CPU.

Each case runs in a fresh Python process: it imports torch and diffusers, computes the
plan's prediction (the simulated allocator on the meta device: no real memory), then
resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), reads the
resident set as the baseline, builds the real model with random weights from its
config (nothing from the Hub: throughput and memory do not depend on the weights) and
runs the work. Measured = ``VmHWM`` (the kernel's peak resident set since the reset)
minus the baseline: every byte the model, optimizer and step touched, allocator and
library overhead included. Linux only.

Cases (``--case``, default all of ``--quick`` or the full list):

* ``ddpm-tiny-32-b16`` / ``ddpm-tiny-64-b16``: the Train tab's tiny preset, two
  optimizer steps (AdamW, EMA, fp32) -- what ``train_plan`` predicts.
* ``ddpm-lucidrains-64-b4``: the lucidrains preset (35 M parameters) at 64 px.
* ``t2i-32-b16`` / ``t2i-64-b16``: the Train tab's text-to-image mode at its defaults (32 px, batch 16): the
  autoencoder, text encoder and UNet with one AdamW over all three and the EMA, two autoencoder
  steps, the dataset encoded (64 images), two diffusion steps and the validation grid (4 prompts x 4
  images, guidance) -- what ``text_to_image_plan`` predicts.
* ``sd15-lora-256-b1`` / ``sd15-lora-512-b1``: an SD-1.5-sized ``UNet2DConditionModel``
  (860 M parameters, its real config), frozen, LoRA rank 4 on the attention projections,
  one AdamW step on cached latents -- ``finetune_plan`` (LoRA, cached latents).
* ``sd15-generate-512``: the same UNet and the SD VAE, one guided denoising pass
  (batch 2) and one VAE decode at 512 px -- ``generate_plan`` with those weights.

Prints one row per case (predicted, measured, relative error) and, last, one JSON line
``{"cases": ..., "worst_error": ...}``. Run it with ``nice -n 10`` on a shared machine.

    python benchmarks/memory.py --quick        # the DDPM and text-to-image cases, about a minute idle
    python benchmarks/memory.py                # everything (SD-1.5 cases: minutes, ~10 GB RAM)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUICK = ("ddpm-tiny-32-b16", "ddpm-tiny-64-b16", "t2i-32-b16")
CASES = QUICK + ("t2i-64-b16", "ddpm-lucidrains-64-b4", "sd15-lora-256-b1", "sd15-lora-512-b1", "sd15-generate-512")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> int:
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _ddpm(preset_name: str, resolution: int, batch: int) -> tuple[int, int]:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    from studio.budget import train_plan
    from studio.config.train import TrainConfig
    from studio.trainers.speed import make_optimizer
    from studio.unet_presets import PRESETS, unet_kwargs

    preset = PRESETS[preset_name]
    cfg = TrainConfig(device="cpu", preset=preset_name, resolution=resolution, train_batch_size=batch,
                      num_samples=min(16, batch))
    predicted = train_plan(cfg).peak
    base = _reset_peak()
    torch.manual_seed(0)
    model = UNet2DModel(**unet_kwargs(resolution, preset.block_out_channels, preset.layers_per_block,
                                      preset.down_block_types, preset.up_block_types, cfg.attention_head_dim))
    optimizer = make_optimizer(model.parameters(), lr=1e-4, device="cpu")
    ema = EMAModel(model.parameters(), foreach=True)
    for _ in range(2):
        x = torch.randn(batch, 3, resolution, resolution)
        t = torch.randint(0, 1000, (batch,))
        F.mse_loss(model(x, t).sample, x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
    return predicted, _status("VmHWM") - base


def _t2i(resolution: int, batch: int) -> tuple[int, int]:
    import tempfile

    import torch
    import torch.nn.functional as F

    from studio import small_sd
    from studio.budget import text_to_image_plan
    from studio.config.text_to_image import TextToImageConfig
    from studio.runs import RunDir
    from studio.trainers.latent_batches import encode_dataset
    from studio.trainers.text_to_image_scratch import build_parts, validation_images

    cfg = TextToImageConfig(device="cpu", resolution=resolution, train_batch_size=batch, sample_inference_steps=3)
    predicted = text_to_image_plan(cfg).peak
    words = ["red", "blue", "yellow", "green", "heart", "circle", "face", "flag", "smiling", "square"]
    captions = [f"{words[i % 10]} {words[(3 * i + 4) % 10]}" for i in range(64)]
    base = _reset_peak()
    torch.manual_seed(0)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        p = build_parts(cfg, RunDir(Path(folder)), captions, device)
        pixels = torch.randint(0, 256, (64, 3, resolution, resolution), dtype=torch.uint8)
        images = pixels[:batch].float() / 127.5 - 1
        for _ in range(2):  # the autoencoder stage
            small_sd.vae_loss(p.vae, images)[0].backward()
            p.optimizer.step()
            p.optimizer.zero_grad(set_to_none=True)
        mean, std = encode_dataset(p.vae, pixels, device)
        ids = small_sd.tokenize(p.tokenizer, captions[:batch])
        scheduler = small_sd.train_scheduler(cfg.prediction_type)
        for _ in range(2):  # the diffusion stage
            x0 = (mean[:batch] + std[:batch] * torch.randn_like(std[:batch])) * p.vae.config.scaling_factor
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (batch,))
            pred = p.unet(scheduler.add_noise(x0, noise, t), t, small_sd.encode_prompts(p.text_encoder, ids)).sample
            F.mse_loss(pred, scheduler.get_velocity(x0, noise, t)).backward()
            p.optimizer.step()
            p.optimizer.zero_grad(set_to_none=True)
            p.ema.step(p.denoiser.parameters())
        validation_images(p, cfg, None)
    return predicted, _status("VmHWM") - base


def _sd15_unet():
    import torch
    from diffusers import UNet2DConditionModel

    from studio.budget import SD_FAMILIES

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD_FAMILIES["sd1"]["unet"])


def _sd15_lora(resolution: int, batch: int) -> tuple[int, int]:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from studio.budget import finetune_plan
    from studio.config.finetune import DEFAULT_LORA_TARGETS, FinetuneConfig

    cfg = FinetuneConfig(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5", method="lora",
                         resolution=resolution, train_batch_size=batch, device="cpu", cache_latents=True)
    predicted = finetune_plan(cfg, device="cpu").peak
    base = _reset_peak()
    unet = _sd15_unet()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=list(DEFAULT_LORA_TARGETS)))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    side = resolution // 8
    latents = torch.randn(batch, 4, side, side)
    context = torch.randn(batch, 77, 768)
    t = torch.randint(0, 1000, (batch,))
    F.mse_loss(unet(latents, t, context).sample, latents).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return predicted, _status("VmHWM") - base


def _sd15_generate(resolution: int) -> tuple[int, int]:
    import torch
    from diffusers import AutoencoderKL

    from studio.budget import SD_VAE, generate_plan

    base = _reset_peak()
    unet = _sd15_unet().eval()
    vae = AutoencoderKL(**SD_VAE).eval()
    weights = sum(p.numel() * p.element_size() for m in (unet, vae) for p in m.parameters())
    with torch.no_grad():
        side = resolution // 8
        latents = torch.randn(1, 4, side, side)
        noise = unet(torch.cat([latents] * 2), torch.tensor([500, 500]), torch.randn(2, 77, 768)).sample
        latents = latents - 0.1 * noise.chunk(2)[0]
        vae.decode(latents / 0.18215).sample
    measured = _status("VmHWM") - base
    predicted = generate_plan(resolution, resolution, 1, device="cpu", family="sd1", weight_bytes=weights,
                              guidance=True, half=False).peak
    return predicted, measured


def run_case(name: str) -> tuple[int, int]:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if name.startswith("ddpm-tiny"):
        _, _, res, b = name.split("-")
        return _ddpm("tiny (CPU demo)", int(res), int(b[1:]))
    if name.startswith("t2i-"):
        _, res, b = name.split("-")
        return _t2i(int(res), int(b[1:]))
    if name == "ddpm-lucidrains-64-b4":
        from studio.unet_presets import PRESETS

        return _ddpm(next(n for n in PRESETS if n.startswith("lucidrains")), 64, 4)
    if name.startswith("sd15-lora"):
        _, _, res, b = name.split("-")
        return _sd15_lora(int(res), int(b[1:]))
    if name == "sd15-generate-512":
        return _sd15_generate(512)
    raise SystemExit(f"unknown case {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the DDPM and text-to-image cases")
    parser.add_argument("--case", action="append", choices=CASES, help="run these cases (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        predicted, measured = run_case(args.child)
        print(json.dumps({"predicted": predicted, "measured": measured}))
        return 0
    from studio.budget import human_bytes

    names = args.case or (QUICK if args.quick else CASES)
    rows = []
    print("| case | predicted peak | measured peak (VmHWM - baseline) | error |\n|---|---|---|---|", flush=True)
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode} |||")
            continue
        data = json.loads(out.stdout.strip().splitlines()[-1])
        error = (data["predicted"] - data["measured"]) / data["measured"]
        rows.append({"case": name, **data, "error": round(error, 4)})
        print(f"| {name} | {human_bytes(data['predicted'])} | {human_bytes(data['measured'])} | {error:+.1%} |",
              flush=True)
    worst = max((abs(r["error"]) for r in rows), default=None)
    print(json.dumps({"cases": rows, "worst_error": worst}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
