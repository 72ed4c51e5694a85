"""Benchmark: the studio's generate path against a plain diffusers pipeline call.

Same tiny Stable Diffusion pipeline (built locally, no Hub), same scheduler, steps,
size and seed; the two are run alternately in one process so machine noise hits both
alike. Also measured: scheduler switch time, model switch time (the first load in
this process, vs later switches, which also free the previous pipeline with gc) and RSS
growth over many generations. The tiny pipelines are written just before, so their files
sit in the OS page cache either way; real models are dominated by reading the weights.

    python benchmarks/generate.py [--runs 12] [--steps 10] [--size 64] [--device cpu]

The last line printed is one JSON object:
    {"overhead_ratio": ..., "scheduler_switch_ms": ..., "model_switch_s": ..., "rss_growth_mb": ..., ...}
``overhead_ratio`` is the median over alternating pairs of studio time / plain time; the
studio path includes the live
preview, the progress callback and writing the PNG with its parameters.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=16, help="alternating runs of each path")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="image width and height (multiple of 8)")
    parser.add_argument("--scheduler", default="DPM++ 2M Karras")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps timings steadier on shared 2-core machines; 0 = torch's default)")
    parser.add_argument("--generations", type=int, default=30, help="generations for the RSS measurement")
    args = parser.parse_args(argv)

    import psutil
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from studio.config.generate import GenerateConfig
    from studio.generate import generate
    from studio.models import PipelineManager
    from studio.schedulers import make_scheduler
    from tiny_pipelines import make_tiny_ddpm, make_tiny_sd

    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    sd_path = make_tiny_sd(tmp / "sd")
    ddpm_path = make_tiny_ddpm(tmp / "ddpm")
    manager = PipelineManager(args.device, tmp / "workspace", offline=True)

    # Model switch: the first load in this process, then alternating switches (unload + gc + load).
    started = time.perf_counter()
    manager.load(str(sd_path))
    first_s = time.perf_counter() - started
    switches = []
    for i in range(6):
        started = time.perf_counter()
        manager.load(str(ddpm_path if i % 2 == 0 else sd_path))
        switches.append(time.perf_counter() - started)
    pipe = manager.loaded.pipe
    assert manager.loaded.reference == str(sd_path)

    cfg = GenerateConfig(model=str(sd_path), prompt="a small red house by a lake", negative_prompt="blurry",
                         width=args.size, height=args.size, num_inference_steps=args.steps, guidance_scale=7.0,
                         seed=1234, scheduler=args.scheduler)
    plain_scheduler = make_scheduler(pipe, args.scheduler)

    def plain() -> float:
        pipe.scheduler = plain_scheduler  # the same scheduler object setup a script would make once
        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        started = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, width=cfg.width, height=cfg.height,
                 num_inference_steps=cfg.num_inference_steps,
                 guidance_scale=cfg.guidance_scale, generator=[generator], num_images_per_prompt=1)
        return time.perf_counter() - started

    def studio() -> float:
        started = time.perf_counter()
        generate(manager, cfg, on_progress=lambda progress: None)
        return time.perf_counter() - started

    plain(), studio()  # warm-up of both paths
    plain_times, studio_times = [], []
    for i in range(args.runs):
        order = (plain, studio) if i % 2 == 0 else (studio, plain)
        for fn in order:
            (plain_times if fn is plain else studio_times).append(fn())
    # Median of the per-pair ratios: robust to load from other processes drifting over the run.
    overhead_ratio = statistics.median(s / p for s, p in zip(studio_times, plain_times))

    # Same picture both ways (same scheduler, steps, seed).
    import numpy as np

    studio_image = np.asarray(generate(manager, cfg, save=False).images[0].image)
    pipe.scheduler = make_scheduler(pipe, args.scheduler)
    with torch.inference_mode():
        plain_image = np.asarray(pipe(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, width=cfg.width,
                                      height=cfg.height, num_inference_steps=cfg.num_inference_steps,
                                      guidance_scale=cfg.guidance_scale,
                                      generator=[torch.Generator("cpu").manual_seed(cfg.seed)]).images[0])
    same_image = bool((studio_image == plain_image).all())

    # Scheduler switch: swapping never reloads the model.
    names = ["Euler a", "DPM++ 2M Karras", "UniPC", "DDIM", "DPM++ SDE Karras", "Heun"]
    switch_ms = []
    for _ in range(5):
        for name in names:
            started = time.perf_counter()
            manager.set_scheduler(name)
            switch_ms.append((time.perf_counter() - started) * 1000)

    # RSS after many generations.
    process = psutil.Process()
    small = cfg.replace(num_inference_steps=2, width=16, height=16)
    for _ in range(3):
        generate(manager, small, save=False)
    gc.collect()
    rss_before = process.memory_info().rss
    for i in range(args.generations):
        generate(manager, small.replace(seed=i), save=False)
    gc.collect()
    rss_growth_mb = (process.memory_info().rss - rss_before) / 2**20

    result = {
        "overhead_ratio": round(overhead_ratio, 4),
        "scheduler_switch_ms": round(statistics.median(switch_ms), 3),
        "model_switch_s": round(statistics.median(switches), 4),
        "rss_growth_mb": round(rss_growth_mb, 2),
        "model_load_first_s": round(first_s, 4),
        "plain_median_s": round(statistics.median(plain_times), 4),
        "studio_median_s": round(statistics.median(studio_times), 4),
        "same_image": same_image,
        "runs": args.runs, "steps": args.steps, "size": args.size, "scheduler": args.scheduler,
        "device": manager.device, "threads": torch.get_num_threads(), "generations": args.generations,
    }
    print(f"plain diffusers call : median {result['plain_median_s']:.4f} s over {args.runs} runs")
    print(f"studio generate path : median {result['studio_median_s']:.4f} s (ratio {overhead_ratio:.4f})")
    print(f"same image both ways : {same_image}")
    print(f"scheduler switch     : median {result['scheduler_switch_ms']:.3f} ms")
    print(f"model switch         : first load {first_s:.3f} s, then median {result['model_switch_s']:.3f} s "
          "per switch (unload + gc + load)")
    print(f"RSS growth           : {rss_growth_mb:.1f} MB over {args.generations} generations")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
