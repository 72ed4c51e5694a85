"""Benchmark: the studio's fine-tune step against diffusers' train_text_to_image(_lora).py inner loop.

The reference is a faithful re-implementation of the scripts' training step: every step
reads its batch the way their DataLoader does (``num_workers=0``: decode each image,
resize, center crop, to tensor, normalise), encodes it through the frozen VAE
(``latent_dist.sample()``) and the captions
through the frozen text encoder, then noise, timesteps, UNet forward, MSE, the
per-step ``accelerator.gather(loss).mean().item()`` log, backward, grad clipping,
``AdamW`` (the scripts' default, not fused), LR schedule step, ``zero_grad`` — inside
``accelerator.accumulate``. The studio runs its real trainer (``train()``) on the same
pipeline, data, batch size and optimizer settings: latents and text embeddings come
from the one-time cache, AdamW is fused, the loss is read once per step.

Both are timed on steps after a warm-up, in alternating runs in one process (machine
noise hits both alike), for LoRA and full fine-tunes. On CPU with one torch thread the
clock is the training thread's CPU time (``time.thread_time``): every op runs in that
thread, and other processes on a shared machine then barely move the numbers. An instrumented run of each
prints the per-step split (data, VAE encode, text encode, UNet forward/backward, optimizer).
Peak memory of LoRA vs full is measured in a fresh subprocess each: on CUDA
``max_memory_allocated``; on CPU the peak growth of the heap in use while ``train()`` runs.

    python benchmarks/finetune.py [--rounds 4] [--steps 12] [--resolution 32] [--batch 4] [--device cpu]
    python benchmarks/finetune.py --size sd15 --resolution 512 --batch 1 --device cuda   # on a GPU

``--size sd15`` builds an SD-1.5-sized UNet/VAE/CLIP from configs with random weights
(throughput does not depend on the weights). The benchmark patches the studio trainer's
validation images, checkpoints and export to no-ops: they are not part of a step.

The last line printed is one JSON object:
    {"lora_ratio": ..., "full_ratio": ..., "lora_peak_mb": ..., "full_peak_mb": ...}
where a ratio is the median over rounds of reference s/step divided by studio s/step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


# --------------------------------------------------------------------------- set-up
def build_pipeline(size: str, path: Path) -> Path:
    """Save the tiny test pipeline, or an SD-1.5-sized one with random weights, to ``path``."""
    if (path / "model_index.json").is_file():
        return path
    if size == "tiny":
        from tiny_pipelines import make_tiny_sd

        return make_tiny_sd(path)
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_pipelines import make_tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=make_tiny_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def load_data(rows: int):
    """The bundled emoji as the scripts see them: a dataset that decodes each image when read, and captions."""
    from studio import data
    from studio.config.data import DataConfig

    dataset = data.load_image_dataset(DataConfig(max_rows=rows))
    return dataset, list(dataset.captions)


def script_transform(image, resolution: int) -> torch.Tensor:
    """The scripts' train_transforms without torchvision: Resize(resolution, bilinear), CenterCrop,
    ToTensor, Normalize([0.5], [0.5])."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.Resampling.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (array - 0.5) / 0.5


#: The clock every timing uses; ``main`` picks it (see ``--clock``).
_CLOCK = {"fn": time.perf_counter}


def clock() -> float:
    """Seconds on the chosen clock: wall time, or this thread's CPU time."""
    return _CLOCK["fn"]()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the reference loop
def reference_run(base: Path, method: str, dataset, captions: list[str], args, steps: int,
                  split: dict[str, float] | None = None) -> float:
    """diffusers' train_text_to_image(_lora).py inner loop; returns seconds per step after warm-up.

    With ``split`` (a dict), times each phase (synchronising the device) and adds the totals.
    """
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=1)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    torch.manual_seed(args.seed)
    if method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        if args.mixed_precision == "fp16":
            from diffusers.training_utils import cast_training_params

            cast_training_params(unet, dtype=torch.float32)
        params = list(filter(lambda p: p.requires_grad, unet.parameters()))
        lr = 1e-4
    else:
        unet.train()
        unet.to(device)
        params = unet.parameters()
        lr = 1e-5
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=args.warmup + steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    # captions are tokenised once (the scripts' preprocess_train); images are decoded and transformed
    # when the DataLoader (num_workers=0, the scripts' default) reads a batch
    input_ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                          return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(args.seed)
    unet.train()
    train_loss = 0.0
    timer = _PhaseTimer(device, split)
    start = None
    for step in range(args.warmup + steps):
        if step == args.warmup:
            _sync(device)
            start = clock()
            timer.active = split is not None
        rows = torch.randint(0, len(dataset), (args.batch,), generator=gen)
        with timer("data (decode, transform)"):
            batch_pixels = torch.stack([script_transform(dataset.image(int(i)), args.resolution)
                                        for i in rows]).to(device)
            batch_ids = input_ids[rows].to(device)
        with accelerator.accumulate(unet):
            with timer("vae_encode"):
                latents = vae.encode(batch_pixels.to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
            timesteps = timesteps.long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            with timer("text_encode"):
                encoder_hidden_states = text_encoder(batch_ids, return_dict=False)[0]
            target = noise
            with timer("unet_fwd_bwd"):
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(args.batch)).mean()
                train_loss += avg_loss.item() / accelerator.gradient_accumulation_steps
                accelerator.backward(loss)
            with timer("optimizer"):
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters() if method == "full" else params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        if accelerator.sync_gradients:
            train_loss = 0.0
    _sync(device)
    elapsed = clock() - start
    if split is not None:
        split["steps"] = split.get("steps", 0) + steps
    del pipe, unet, optimizer, vae, text_encoder
    return elapsed / steps


class _PhaseTimer:
    """Context manager factory adding the wall time of named phases (device-synchronised)."""

    def __init__(self, device: torch.device, totals: dict[str, float] | None) -> None:
        self.device, self.totals, self.active = device, totals, False

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                if timer.active:
                    _sync(timer.device)
                    self.t = clock()

            def __exit__(self, *exc):
                if timer.active:
                    _sync(timer.device)
                    timer.totals[name] = timer.totals.get(name, 0.0) + clock() - self.t

        return _Phase()


# --------------------------------------------------------------------------- the studio trainer
def _patch_trainer_outputs() -> None:
    """Validation images, checkpoints and the export are not part of a step: make them no-ops."""
    from studio.trainers import text_to_image

    text_to_image._Trainer.validate = lambda self, step: None
    text_to_image._Trainer.save = lambda self, step: None
    text_to_image._Trainer.export = lambda self, step: self.run.root


def studio_config(base: Path, method: str, workspace: Path, args, steps: int):
    from studio.config.data import DataConfig
    from studio.config.finetune import FinetuneConfig

    return FinetuneConfig(
        pretrained_model_name_or_path=str(base), data=DataConfig(max_rows=args.rows), method=method,
        resolution=args.resolution, train_batch_size=args.batch, max_train_steps=args.warmup + steps,
        learning_rate=1e-4 if method == "lora" else 1e-5, rank=4, validation_every=0, checkpoint_every=0,
        workspace=str(workspace), device=args.device, mixed_precision=args.mixed_precision, seed=args.seed)


def studio_run(base: Path, method: str, workspace: Path, args, steps: int) -> float:
    """The studio's ``train()``; returns seconds per step after warm-up (from its step events)."""
    from studio.trainers.text_to_image import train

    times: dict[int, float] = {}

    def sink(event) -> None:
        if event.kind == "step":
            _sync(torch.device(args.device if args.device != "cpu" else "cpu"))
            times[event.step] = clock()
        elif event.kind == "failed":
            raise RuntimeError(event.message)

    train(studio_config(base, method, workspace, args, steps), sink, threading.Event())
    return (times[args.warmup + steps] - times[args.warmup]) / steps


def studio_split(base: Path, method: str, workspace: Path, args, steps: int) -> dict[str, float]:
    """One instrumented studio run: time spent getting latents, text embeddings, UNet fwd/bwd, optimizer."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from studio.trainers import latent_batches, text_to_image

    totals: dict[str, float] = {}
    state = {"step": 0}
    device = torch.device("cuda" if args.device.startswith("cuda") else "cpu")
    originals = {}

    def wrap(owner, name: str, phase: str) -> None:
        original = getattr(owner, name)
        originals[(owner, name)] = original

        def timed(*a, **k):
            if state["step"] < args.warmup:
                return original(*a, **k)
            _sync(device)
            t = clock()
            try:
                return original(*a, **k)
            finally:
                _sync(device)
                totals[phase] = totals.get(phase, 0.0) + clock() - t

        setattr(owner, name, timed)

    wrap(latent_batches.LatentBatches, "image_latents", "vae_encode (cache sample)")
    wrap(latent_batches.LatentBatches, "text_embeddings", "text_encode (cache lookup)")
    wrap(text_to_image._Trainer, "loss_on", "unet_fwd_bwd")
    wrap(Accelerator, "backward", "unet_fwd_bwd")
    wrap(Accelerator, "clip_grad_norm_", "optimizer")
    wrap(AcceleratedOptimizer, "step", "optimizer")
    wrap(AcceleratedOptimizer, "zero_grad", "optimizer")

    def sink(event) -> None:
        if event.kind == "step":
            state["step"] = event.step

    try:
        train_cfg = studio_config(base, method, workspace, args, steps)
        text_to_image.train(train_cfg, sink, threading.Event())
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
    totals["steps"] = steps
    return totals


# --------------------------------------------------------------------------- peak memory
def _heap_in_use() -> int | None:
    """Bytes malloc has handed out and not taken back (glibc ``mallinfo2``), or None elsewhere."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def peak_memory_child(args) -> None:
    """Run in a subprocess: train a few steps and print the peak memory growth in MB.

    On CUDA: ``max_memory_allocated``. On CPU: the peak of the heap in use (glibc's
    ``mallinfo2``; RSS where that is missing) above what it was just before ``train()``,
    sampled every millisecond: model copy, caches, gradients, optimizer state, activations.
    """
    import psutil

    _patch_trainer_outputs()
    base = Path(args.base)
    workspace = Path(tempfile.mkdtemp(prefix="ft-mem-"))
    from studio.trainers.text_to_image import train

    process = psutil.Process()
    measure = _heap_in_use if _heap_in_use() is not None else (lambda: process.memory_info().rss)
    done = threading.Event()
    # load once first so imports and lazily built tables are not counted as training memory
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    gc.collect()
    before = measure()
    peak = {"bytes": before}

    def sample() -> None:
        while not done.is_set():
            peak["bytes"] = max(peak["bytes"], measure())
            time.sleep(0.001)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train(studio_config(base, args.peak_memory, workspace, args, 4), lambda e: None, threading.Event())
    done.set()
    watcher.join()
    if args.device.startswith("cuda"):
        print(json.dumps({"peak_mb": torch.cuda.max_memory_allocated() / 2**20}))
    else:
        print(json.dumps({"peak_mb": (peak["bytes"] - before) / 2**20}))


def peak_memory(base: Path, method: str, args) -> float:
    cmd = [sys.executable, __file__, "--peak-memory", method, "--base", str(base), "--device", args.device,
           "--resolution", str(args.resolution), "--batch", str(args.batch), "--rows", str(args.rows),
           "--mixed-precision", args.mixed_precision, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


# --------------------------------------------------------------------------- main
def print_split(name: str, totals: dict[str, float]) -> None:
    steps = totals.pop("steps")
    whole = sum(totals.values())
    parts = ", ".join(f"{k} {1000 * v / steps:.1f} ms ({100 * v / whole:.0f}%)" for k, v in totals.items())
    print(f"  {name:<22} {1000 * whole / steps:7.1f} ms/step timed: {parts}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of studio vs reference")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=32, help="emoji images in the dataset")
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default=None, help="no, fp16, bf16 (default: no on CPU, fp16 on CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="lora,full", help="which of lora,full to measure")
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                        help="cpu: this thread's CPU time, robust to other processes on a shared machine (valid "
                             "with one torch thread on CPU); auto: cpu there, wall time otherwise")
    parser.add_argument("--peak-memory", default="", help=argparse.SUPPRESS)
    parser.add_argument("--base", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mixed_precision is None:
        args.mixed_precision = "no" if args.device == "cpu" else "fp16"
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    use_cpu_clock = args.clock == "cpu" or (args.clock == "auto" and args.device == "cpu" and args.threads == 1)
    _CLOCK["fn"] = time.thread_time if use_cpu_clock else time.perf_counter
    if args.peak_memory:
        peak_memory_child(args)
        return {}

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    _patch_trainer_outputs()
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    base = build_pipeline(args.size, tmp / f"{args.size}-sd")
    workspace = tmp / "ws"
    dataset, captions = load_data(args.rows)
    print(f"Fine-tune step throughput: {args.size} SD pipeline, {args.rows} emoji at {args.resolution} px, "
          f"batch {args.batch}, {args.device} ({args.mixed_precision}), {args.warmup} warm-up + {args.steps} "
          f"timed steps, {args.rounds} alternating rounds, "
          f"{'thread CPU time' if _CLOCK['fn'] is time.thread_time else 'wall time'}")
    results: dict[str, float | None] = {"lora_ratio": None, "full_ratio": None, "lora_peak_mb": None,
                                        "full_peak_mb": None}
    methods = [m for m in ("lora", "full") if m in args.methods.split(",")]
    for method in methods:
        studio_run(base, method, workspace, args, 1)  # builds the latent/text cache (one-time cost)
        ratios, studio_times, reference_times = [], [], []
        for round_ in range(args.rounds):
            if round_ % 2 == 0:
                s = studio_run(base, method, workspace, args, args.steps)
                r = reference_run(base, method, dataset, captions, args, args.steps)
            else:
                r = reference_run(base, method, dataset, captions, args, args.steps)
                s = studio_run(base, method, workspace, args, args.steps)
            gc.collect()  # the other loop's models must be gone before the next run
            studio_times.append(s)
            reference_times.append(r)
            ratios.append(r / s)
        ratio = statistics.median(ratios)
        results[f"{method}_ratio"] = round(ratio, 3)
        print(f"{method}: studio {1000 * statistics.median(studio_times):.1f} ms/step, reference "
              f"{1000 * statistics.median(reference_times):.1f} ms/step -> {ratio:.2f}x "
              f"(per round: {', '.join(f'{x:.2f}' for x in ratios)})")
        ref_split: dict[str, float] = {}
        reference_run(base, method, dataset, captions, args, args.steps, split=ref_split)
        print_split("reference (diffusers)", ref_split)
        print_split("studio", studio_split(base, method, workspace, args, args.steps))
    for method in methods:
        results[f"{method}_peak_mb"] = round(peak_memory(base, method, args), 1)
    print(f"peak memory while training ({'CUDA allocated' if args.device.startswith('cuda') else 'heap growth'}): "
          + ", ".join(f"{m} {results[m + '_peak_mb']:.1f} MB" for m in methods))
    summary = {k: results[k] for k in ("lora_ratio", "full_ratio", "lora_peak_mb", "full_peak_mb")}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
