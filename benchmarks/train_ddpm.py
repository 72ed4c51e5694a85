"""Benchmark: the studio DDPM trainer against the diffusers example's training loop.

Workload W1: the bundled 32x32 RGB emoji, batch 16, ``UNet2DModel(block_out_channels=
(32, 64, 64), layers_per_block=1, down=(DownBlock2D, AttnDownBlock2D, DownBlock2D),
up=(UpBlock2D, AttnUpBlock2D, UpBlock2D))``, 1000 train timesteps, AdamW 1e-4, EMA on,
fp32, gradient clipping at 1.0 (both sides, as the example does).

* **reference** — a faithful re-implementation of the inner loop of diffusers'
  ``examples/unconditional_image_generation/train_unconditional.py``: a ``datasets``
  Dataset with ``set_transform`` doing, per sample with PIL + numpy + torch, what the
  example's torchvision transforms do (Resize bilinear, RandomCrop, RandomHorizontalFlip,
  ToTensor, Normalize([0.5], [0.5])) through a ``torch`` DataLoader (shuffle, 0 workers,
  the example's default); ``torch.randn`` noise, ``torch.randint`` timesteps,
  ``DDPMScheduler.add_noise``, epsilon MSE, backward, ``clip_grad_norm_``, AdamW,
  cosine LR schedule, diffusers ``EMAModel.step``, ``loss.item()`` logging. It runs
  without accelerate (in one CPU process accelerate adds only wrappers; leaving it out
  makes the reference a little faster, not slower).
* **studio** — the real trainer, ``studio.trainers.ddpm.train`` (which calls
  ``studio.trainers.speed.prepare_unet_for_training``), on the same workload.

The two alternate in blocks inside one process: the trainer's event callback runs a
block of reference steps after every block of trainer steps, and each side's clock
only runs during its own steps. The first block of each side is warm-up and is not
counted. Figures are medians over blocks (other jobs share the 2 cores: noisy).

Before timing, both sides compute the loss of the same batch, noise and timesteps from
the same initial weights (the reference through its plain UNet and ``F.mse_loss``, the
studio through its prepared UNet and the trainer's ``diffusion_loss``) and print both.

``--levers`` instead measures each speed lever of the pure training step on its own
against the plain eager step (alternating blocks) and prints a table.

The last line printed is one JSON object:
``{"workload": "W1", "studio_img_s": ..., "reference_img_s": ..., "ratio": ...}``.

    python benchmarks/train_ddpm.py --quick            # < 1 minute
    python benchmarks/train_ddpm.py --threads 1 --blocks 12 --steps 6
    python benchmarks/train_ddpm.py --levers --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EMOJI = ROOT / "assets" / "emoji" / "emoji.parquet"
RESOLUTION = 32
BATCH = 16
W1_UNET = dict(sample_size=RESOLUTION, block_out_channels=(32, 64, 64), layers_per_block=1,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
# the example's defaults: --adam_beta1 0.95 --adam_beta2 0.999 --adam_weight_decay 1e-6 --adam_epsilon 1e-8,
# --lr_scheduler cosine --lr_warmup_steps 500, --ema_max_decay 0.9999 --ema_inv_gamma 1.0 --ema_power 0.75
ADAM = dict(lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
EMA = dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
WARMUP_STEPS = 500


def w1_unet(seed: int = 0, head_dim: int = 8):
    """The W1 UNet; ``head_dim`` sets ``attention_head_dim`` (the parameter count does not change)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**W1_UNET, attention_head_dim=head_dim)


# ----------------------------------------------------------------------------- reference (the example)
def hflip_or_not(image):
    """torchvision ``RandomHorizontalFlip(p=0.5)`` on a PIL image: one ``torch.rand(1)`` draw."""
    from PIL import Image

    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else image


def random_crop(image, size: int):
    """torchvision ``RandomCrop(size)`` on a PIL image (no draw when it already fits)."""
    w, h = image.size
    if w == size and h == size:
        return image
    top = int(torch.randint(0, h - size + 1, size=(1,)).item())
    left = int(torch.randint(0, w - size + 1, size=(1,)).item())
    return image.crop((left, top, left + size, top + size))


def resize_shorter(image, size: int):
    """torchvision ``Resize(size, BILINEAR)`` on a PIL image: the shorter side becomes ``size``."""
    from PIL import Image

    w, h = image.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return image if (w, h) == new else image.resize(new, Image.Resampling.BILINEAR)


def to_tensor_normalized(image) -> torch.Tensor:
    """torchvision ``ToTensor()`` then ``Normalize([0.5], [0.5])``."""
    array = np.array(image, dtype=np.uint8, copy=True)
    tensor = torch.from_numpy(array).view(image.size[1], image.size[0], 3).permute(2, 0, 1).contiguous()
    tensor = tensor.to(torch.float32).div(255)
    mean = torch.as_tensor([0.5], dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor([0.5], dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def example_augment(image) -> torch.Tensor:
    """The example's ``augmentations`` (no --center_crop, with --random_flip)."""
    image = resize_shorter(image, RESOLUTION)
    image = random_crop(image, RESOLUTION)
    image = hflip_or_not(image)
    return to_tensor_normalized(image)


def example_dataloader(seed: int = 0) -> torch.utils.data.DataLoader:
    """``load_dataset`` + ``set_transform`` + DataLoader exactly as the example wires them."""
    from datasets import Dataset

    dataset = Dataset.from_parquet(str(EMOJI))

    def transform_images(examples: dict[str, Any]) -> dict[str, Any]:
        return {"input": [example_augment(image.convert("RGB")) for image in examples["image"]]}

    dataset.set_transform(transform_images)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0,
                                       generator=torch.Generator().manual_seed(seed))


class ExampleLoop:
    """The example's training state and its inner loop, one optimizer step per ``step()``."""

    def __init__(self, seed: int = 0, total_steps: int = 10_000) -> None:
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.model = w1_unet(seed)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), **ADAM)
        self.lr_scheduler = get_scheduler("cosine", optimizer=self.optimizer, num_warmup_steps=WARMUP_STEPS,
                                          num_training_steps=total_steps)
        self.ema_model = EMAModel(self.model.parameters(), **EMA, model_cls=UNet2DModel,
                                  model_config=self.model.config)
        self.loader = example_dataloader(seed)
        self.batches = iter(self.loader)
        self.global_step = 0
        self.logs: dict[str, Any] = {}
        self.model.train()

    def next_batch(self) -> dict[str, torch.Tensor]:
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> None:
        batch = self.next_batch()
        clean_images = batch["input"].to(torch.float32)
        noise = torch.randn(clean_images.shape, dtype=torch.float32, device=clean_images.device)
        bsz = clean_images.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,),
                                  device=clean_images.device).long()
        noisy_images = self.noise_scheduler.add_noise(clean_images, noise, timesteps)
        model_output = self.model(noisy_images, timesteps).sample
        loss = F.mse_loss(model_output.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.ema_model.step(self.model.parameters())
        self.global_step += 1
        self.logs = {"loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0],
                     "step": self.global_step, "ema_decay": self.ema_model.cur_decay_value}


# ----------------------------------------------------------------------------- studio (the trainer)
def studio_config(workspace: str, steps: int):
    """The trainer's settings for W1 (the same optimiser, schedule, EMA and clipping as the example)."""
    from studio.config.data import DataConfig
    from studio.config.train import TrainConfig

    return TrainConfig(data=DataConfig(source="emoji"), workspace=workspace, run_name="bench-w1",
                       resolution=RESOLUTION, center_crop=True, random_flip=True, train_batch_size=BATCH,
                       learning_rate=ADAM["lr"], lr_scheduler="cosine", lr_warmup_steps=WARMUP_STEPS,
                       adam_beta1=ADAM["betas"][0], adam_beta2=ADAM["betas"][1],
                       adam_weight_decay=ADAM["weight_decay"], adam_epsilon=ADAM["eps"], max_grad_norm=1.0,
                       max_train_steps=steps, use_ema=True, ema_max_decay=EMA["decay"], ema_power=EMA["power"],
                       ema_inv_gamma=EMA["inv_gamma"], num_train_timesteps=1000, beta_schedule="linear",
                       prediction_type="epsilon", seed=0, save_every=0, sample_every=0, num_samples=1,
                       sample_inference_steps=1, checkpoints_total_limit=1,
                       block_out_channels=W1_UNET["block_out_channels"],
                       layers_per_block=W1_UNET["layers_per_block"], down_block_types=W1_UNET["down_block_types"],
                       up_block_types=W1_UNET["up_block_types"], device="cpu")


def check_same_loss(reference: ExampleLoop) -> tuple[float, float, float]:
    """Loss of one example batch, same weights, noise and timesteps: plain reference vs the studio path.

    Returns:
        (reference loss, studio loss, relative difference of the whole gradient vector).
    """
    from studio.trainers.ddpm import diffusion_loss
    from studio.trainers.speed import prepare_unet_for_training

    plain = w1_unet(seed=123)
    studio = prepare_unet_for_training(w1_unet(seed=123), "cpu")
    clean = reference.next_batch()["input"].to(torch.float32)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(clean.shape, generator=g)
    timesteps = torch.randint(0, 1000, (clean.shape[0],), generator=g)
    noisy = reference.noise_scheduler.add_noise(clean, noise, timesteps)
    ref_loss = F.mse_loss(plain(noisy, timesteps).sample.float(), noise.float())
    ref_loss.backward()
    studio_loss = diffusion_loss(studio(noisy, timesteps).sample, clean, noise, timesteps, reference.noise_scheduler,
                                 "epsilon", 0.0)
    studio_loss.backward()
    ref_grad = torch.cat([p.grad.flatten() for p in plain.parameters()])
    studio_grad = torch.cat([p.grad.flatten() for p in studio.parameters()])
    return ref_loss.item(), studio_loss.item(), ((ref_grad - studio_grad).norm() / ref_grad.norm()).item()


def alternate(blocks: int, steps: int, workspace: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Trainer blocks and reference blocks in turn.

    Returns:
        img/s per counted block of the studio and of the reference by wall time, then the
        same by this process's CPU time (a steadier figure when other jobs share the cores,
        meaningful at one thread).
    """
    from studio.trainers.ddpm import train

    reference = ExampleLoop(total_steps=(blocks + 1) * steps + 10)
    ref_loss, studio_loss, grad_diff = check_same_loss(reference)
    print(f"same batch, seed and weights: reference loss {ref_loss:.7f}, studio loss {studio_loss:.7f}, "
          f"|diff| {abs(ref_loss - studio_loss):.2e}; gradients differ by {grad_diff:.1e} (relative norm)",
          flush=True)
    studio_rates: list[float] = []
    reference_rates: list[float] = []
    studio_cpu: list[float] = []
    reference_cpu: list[float] = []
    clock = {"start": None, "cpu": None, "steps": 0, "block": 0}

    def on_event(event) -> None:
        if event.kind == "failed":
            print(f"trainer failed: {event.message}", flush=True)
        if event.kind != "step":
            return
        now, cpu_now = time.perf_counter(), time.process_time()
        if clock["start"] is None:  # the first step includes start-up: begin the clock after it
            clock["start"], clock["cpu"] = now, cpu_now
            return
        clock["steps"] += 1
        if event.step % steps != 0:
            return
        studio_s, studio_cpu_s, n = now - clock["start"], cpu_now - clock["cpu"], clock["steps"]
        block = clock["block"]
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            reference.step()
        ref_s, ref_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        if block > 0:  # block 0 is warm-up on both sides
            studio_rates.append(n * BATCH / studio_s)
            reference_rates.append(steps * BATCH / ref_s)
            studio_cpu.append(n * BATCH / studio_cpu_s)
            reference_cpu.append(steps * BATCH / ref_cpu_s)
            print(f"block {block:2d}: studio {studio_rates[-1]:6.1f} img/s  reference {reference_rates[-1]:6.1f} "
                  f"img/s  (loss {event.loss:.4f} / {reference.logs['loss']:.4f})", flush=True)
        clock["block"] += 1
        clock["steps"] = 0
        clock["start"], clock["cpu"] = time.perf_counter(), time.process_time()

    train(studio_config(workspace, (blocks + 1) * steps + 1), on_event)
    return studio_rates, reference_rates, studio_cpu, reference_cpu


# ----------------------------------------------------------------------------- levers (pure step)
class StepVariant:
    """One way to run the W1 training step (synthetic batch, no data loading)."""

    def __init__(self, name: str, *, fused_adamw: bool = False, foreach_ema: bool = False,
                 channels_last: bool = False, compile_mode: str | None = None, qkv_cat: bool = False,
                 mkldnn: bool = True, math_sdpa: bool = False, head_dim: int = 8) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        from studio.trainers import speed

        self.name, self.mkldnn, self.math_sdpa = name, mkldnn, math_sdpa
        self.model = w1_unet(head_dim=head_dim)
        if qkv_cat:
            set_cat_qkv_processor(self.model)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model, dynamic=False, mode=compile_mode) if compile_mode else self.model
        self.optimizer = (speed.make_optimizer(self.model.parameters(), device="cpu", **ADAM) if fused_adamw
                          else torch.optim.AdamW(self.model.parameters(), **ADAM))
        self.params = list(self.model.parameters())
        self.ema = EMAModel(self.params, **EMA)
        self.foreach_ema = foreach_ema
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(64, 3, RESOLUTION, RESOLUTION, generator=g) * 2 - 1
        self.i = 0

    def step(self) -> None:
        from studio.trainers.speed import ema_update_

        torch.backends.mkldnn.enabled = self.mkldnn
        clean = self.images[(self.i % 4) * BATCH:(self.i % 4 + 1) * BATCH].contiguous(memory_format=self.memory_format)
        self.i += 1
        noise = torch.randn(clean.shape).contiguous(memory_format=self.memory_format)
        timesteps = torch.randint(0, 1000, (BATCH,))
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        if self.math_sdpa:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                loss = F.mse_loss(self.forward(noisy, timesteps).sample, noise)
                loss.backward()
        else:
            loss = F.mse_loss(self.forward(noisy, timesteps).sample, noise)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.foreach_ema:
            self.ema.optimization_step += 1
            ema_update_(self.ema.shadow_params, self.params, self.ema.get_decay(self.ema.optimization_step))
        else:
            self.ema.step(self.params)
        torch.backends.mkldnn.enabled = True


def set_cat_qkv_processor(unet) -> None:
    """Attention with q, k, v as one matmul of the concatenated weights (same parameters)."""
    from diffusers.models.attention_processor import Attention

    class CatQKVProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs):
            residual = hidden_states
            b, c, h, w = hidden_states.shape
            x = attn.group_norm(hidden_states.view(b, c, h * w)).transpose(1, 2)
            weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
            bias = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
            qkv = F.linear(x, weight, bias).view(b, h * w, 3, attn.heads, c // attn.heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, h * w, c)
            out = attn.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
            return (out + residual) / attn.rescale_output_factor

    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(CatQKVProcessor())


LEVERS: dict[str, dict[str, Any]] = {
    "eager (baseline)": {},
    "fused AdamW": {"fused_adamw": True},
    "foreach EMA": {"foreach_ema": True},
    "channels_last": {"channels_last": True},
    "q/k/v as one matmul": {"qkv_cat": True},
    "oneDNN (mkldnn) off": {"mkldnn": False},
    "SDPA math backend": {"math_sdpa": True},
    "torch.compile default": {"compile_mode": "default"},
    "torch.compile max-autotune-no-cudagraphs": {"compile_mode": "max-autotune-no-cudagraphs"},
    "all kept levers": {"fused_adamw": True, "foreach_ema": True},
    "wide heads (head_dim 32, SDPA)": {"head_dim": 32},
    "one head (head_dim 64 = channels, SDPA)": {"head_dim": 64},
}


def measure_levers(names: list[str], rounds: int, steps: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    """img/s per round of each variant, the variants taking turns every ``steps`` steps."""
    variants = []
    for name in names:
        t0 = time.perf_counter()
        variant = StepVariant(name, **LEVERS[name])
        variant.step()
        variant.step()  # warm-up (and compilation)
        variants.append(variant)
        print(f"  ready: {name} ({time.perf_counter() - t0:.1f} s to build and warm up)", flush=True)
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for variant in variants if r % 2 == 0 else reversed(variants):
            t0 = clock()
            for _ in range(steps):
                variant.step()
            rates[variant.name].append(steps * BATCH / (clock() - t0))
    return rates


# ----------------------------------------------------------------------------- main
def spread(values: list[float]) -> str:
    """Median, quartile range and best block (other jobs only ever slow a block down)."""
    if len(values) < 4:
        return f"{statistics.median(values):.1f} (best {max(values):.1f})"
    q = statistics.quantiles(values, n=4)
    return f"{statistics.median(values):.1f} (IQR {q[0]:.1f}-{q[2]:.1f}, best {max(values):.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few short blocks: under a minute")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--blocks", type=int, default=10, help="counted A/B blocks (plus one warm-up block)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per block")
    parser.add_argument("--levers", action="store_true", help="measure each lever of the pure step instead")
    parser.add_argument("--lever", action="append", choices=list(LEVERS), help="with --levers: only these")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.blocks < 1 or args.steps < 1:
        parser.error("--threads, --blocks and --steps must be at least 1")
    if args.quick:
        args.blocks, args.steps = 3, 2
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores; W1 batch {BATCH}, "
          f"{RESOLUTION}px", flush=True)

    if args.levers:
        names = args.lever or list(LEVERS)
        if "eager (baseline)" not in names:
            names.insert(0, "eager (baseline)")
        # one thread: this thread's CPU time, which other jobs on the machine barely disturb; more: wall time
        clock = time.thread_time if args.threads == 1 else time.perf_counter
        print(f"clock: {'thread CPU time' if args.threads == 1 else 'wall time'}", flush=True)
        rates = measure_levers(names, rounds=4 if args.quick else args.blocks, steps=args.steps, clock=clock)
        base = statistics.median(rates["eager (baseline)"])
        print(f"\n| lever ({args.threads} thread(s)) | img/s median (IQR, best) | vs eager |\n|---|---|---|")
        for name, values in rates.items():
            print(f"| {name} | {spread(values)} | {statistics.median(values) / base:.3f}x |")
        best = max(rates, key=lambda k: statistics.median(rates[k]))
        print(json.dumps({"workload": "W1-step", "threads": args.threads, "baseline_img_s": round(base, 2),
                          "best": best, "best_img_s": round(statistics.median(rates[best]), 2)}))
        return 0

    if not EMOJI.exists():
        print(f"missing {EMOJI}: the bundled emoji set is needed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-ddpm-") as workspace:
        studio_rates, reference_rates, studio_cpu, reference_cpu = alternate(args.blocks, args.steps, workspace)
    studio = statistics.median(studio_rates)
    reference = statistics.median(reference_rates)
    ratios = [s / r for s, r in zip(studio_rates, reference_rates)]
    print(f"studio    {spread(studio_rates)} img/s\nreference {spread(reference_rates)} img/s\n"
          f"ratio of medians {studio / reference:.2f}x; per-block ratios median {statistics.median(ratios):.2f}x, "
          f"min {min(ratios):.2f}x, max {max(ratios):.2f}x", flush=True)
    if args.threads == 1:
        cpu_ratio = statistics.median(studio_cpu) / statistics.median(reference_cpu)
        print(f"by CPU time (steadier on a shared machine): studio {spread(studio_cpu)} img/s, reference "
              f"{spread(reference_cpu)} img/s, ratio {cpu_ratio:.2f}x", flush=True)
    result = {"workload": "W1", "studio_img_s": round(studio, 2), "reference_img_s": round(reference, 2),
              "ratio": round(studio / reference, 3) if reference > 0 and math.isfinite(studio) else None}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
