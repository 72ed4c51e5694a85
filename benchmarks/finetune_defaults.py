"""Benchmark: which learning rate moves the bundled emoji SD in a LoRA fine-tune (issue 10, per-base defaults).

A person fine-tunes ``bundled:emoji-sd`` on ten images of their own (red hearts on white,
captioned "a red heart", the same images as ``tests/test_bundled_sd.py``) with LoRA at the
tab's settings (rank 4, batch 1, constant schedule), for each learning rate. After
``--steps`` (e.g. 50, 100, 200) the LoRA's images of "a red heart" for six seeds are compared
with the mean of the ten training images: the mean absolute pixel distance (0-255), against
the bundled model's own images at step 0. A ratio below 1 means the outputs moved toward
the person's hearts; the table of ``studio.base_models.FINETUNE_DEFAULTS`` is picked from it.

    python benchmarks/finetune_defaults.py [--rates 1e-4 1e-3 3e-3] [--steps 50 100 200] [--method lora]

The run resumes (exactly) from one step count to the next, so each rate trains ``max(steps)``
steps in all. The last line printed is one JSON object {method: {rate: {steps: ratio}}}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SEEDS = range(6)
PROMPT = "a red heart"


def images(manager, lora: str) -> "np.ndarray":
    import numpy as np

    from studio.config.generate import GenerateConfig
    from studio.generate import generate

    out = []
    for seed in SEEDS:
        cfg = GenerateConfig(model="bundled:emoji-sd", prompt=PROMPT, num_inference_steps=20, seed=seed, lora=lora,
                             scheduler="DPM++ 2M", guidance_scale=4.0)
        out.append(np.asarray(generate(manager, cfg, save=False).images[0].image).astype(float))
    return np.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[1e-4, 1e-3, 3e-3])
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    p.add_argument("--method", default="lora")
    args = p.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    from studio.config.data import DataConfig
    from studio.config.finetune import FinetuneConfig
    from studio.models import PipelineManager
    from studio.trainers.text_to_image import train
    from test_bundled_sd import red_hearts

    work = Path(tempfile.mkdtemp(prefix="finetune-defaults-"))
    hearts = red_hearts(work / "hearts")
    target = np.stack([np.asarray(Image.open(p).convert("RGB")).astype(float) for p in sorted(hearts.glob("*.png"))])
    target = target.mean(0)
    manager = PipelineManager(device="cpu", workspace=work, offline=True)
    base = np.abs(images(manager, "") - target).mean()
    print(f"base model: distance of '{PROMPT}' (6 seeds) to the mean heart {base:.1f}")
    results: dict[str, dict[str, float]] = {}
    for rate in args.rates:
        name = f"{args.method}-{rate:g}"
        results[f"{rate:g}"] = {}
        for steps in sorted(args.steps):
            cfg = FinetuneConfig(pretrained_model_name_or_path="bundled:emoji-sd", method=args.method,
                                 data=DataConfig(source="folder", path=str(hearts)), resolution=32,
                                 learning_rate=rate, max_train_steps=steps, validation_every=0,
                                 num_inference_steps=2, checkpoint_every=0, run_name=name, workspace=str(work),
                                 device="cpu", validation_prompts=(PROMPT,),
                                 resume="latest" if (work / name).exists() else "")
            started = time.perf_counter()
            train(cfg, lambda event: None, threading.Event())
            seconds = time.perf_counter() - started
            if args.method in ("lora", "dreambooth-lora"):
                # a copy per step count: Generate keeps a loaded LoRA by its path, so the run folder would be stale
                lora = work / "loras" / f"{name}-{steps}.safetensors"
                lora.parent.mkdir(exist_ok=True)
                shutil.copyfile(work / name / "lora" / "pytorch_lora_weights.safetensors", lora)
                distance = np.abs(images(manager, str(lora)) - target).mean()
            else:  # a full fine-tune: its own pipeline folder, copied per step count (Generate keeps it by path)
                from studio.config.generate import GenerateConfig
                from studio.generate import generate

                copy = work / "models" / f"{name}-{steps}"
                shutil.copytree(work / name / "model", copy)
                distance = np.abs(np.stack([np.asarray(generate(manager, GenerateConfig(
                    model=str(copy), prompt=PROMPT, num_inference_steps=20, seed=seed, scheduler="DPM++ 2M",
                    guidance_scale=4.0), save=False).images[0].image).astype(float) for seed in SEEDS])
                    - target).mean()
            results[f"{rate:g}"][str(steps)] = round(float(distance / base), 3)
            print(f"{args.method} lr {rate:g}: step {steps}: distance {distance:.1f} = {distance / base:.3f} of the "
                  f"base model's ({seconds:.0f} s of training)", flush=True)
    print(json.dumps({args.method: results}))


if __name__ == "__main__":
    main()
