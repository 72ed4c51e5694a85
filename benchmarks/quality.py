"""Benchmark: how good are the default tiny run's samples after N minutes of CPU training?

Trains the default Train-tab run (``TrainConfig()`` as it stands: the default tiny
preset on the bundled emoji set) with the studio's own trainer for a fixed wall-clock
budget (counted from the first optimisation step; loading and the step-0 grid are not
counted), then scores the exported model's fixed-seed samples with the studio's quality
figure (``studio.quality``: sliced Wasserstein distance of 7x7 patches of a Laplacian
pyramid, Karras et al. 2018, x 1000). **Lower is better.** The figure is printed with
its two reference levels, measured the same way at the same sample count:

- ``noise_level``: Gaussian noise images against the dataset (an untrained model);
- ``data_level``: held-out dataset images against the rest (a perfect model).

``--model PATH`` scores an existing ``DDPMPipeline`` folder (or a run folder holding
``model/``) instead of training; ``minutes`` and ``steps`` are then null.

Samples are drawn exactly as the Train tab's sample grid: ``num_samples`` images (16),
DDIM with ``sample_inference_steps`` (50) from the model's noise schedule, initial noise
from seed 0. The reference is the images the run trained on (the default run: the emoji
set's smileys & emotion) at the model's resolution (seed 0); with ``--model``, the whole
emoji set unless ``--category`` / ``--max-rows`` say otherwise.

    python benchmarks/quality.py                  # 5 minutes of training, then score
    python benchmarks/quality.py --quick          # 1 minute
    python benchmarks/quality.py --model assets/models/emoji-ddpm --max-rows 160   # the faces it was trained on
    python benchmarks/quality.py --set learning_rate=2e-3 --set 'block_out_channels=[64, 64]'   # a recipe probe
    python benchmarks/quality.py --set 'data={"source": "emoji"}'   # the default run on all 1,911 emoji

The last line printed is one JSON object:
``{"minutes": ..., "steps": ..., "quality": ..., "noise_level": ..., "data_level": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def model_folder(path: str | Path) -> Path:
    """The DDPMPipeline folder ``path`` names: itself, or ``path/model`` for a run folder."""
    path = Path(path).expanduser()
    for candidate in (path, path / "model"):
        if (candidate / "model_index.json").is_file():
            return candidate
    raise SystemExit(f"{path} is not a diffusers pipeline folder (no model_index.json), nor a run folder with "
                     "model/.")


def score_pipeline(path: str | Path, *, samples: int = 16, inference_steps: int = 50, seed: int = 0,
                   cache_root: str | Path, data: Any = None, grid_path: Path | None = None) -> dict[str, Any]:
    """Quality of a DDPMPipeline folder's fixed-seed samples against ``data`` (a ``DataConfig``; None: the
    whole bundled emoji set).

    Returns:
        ``{"quality", "noise_level", "data_level", "levels", "resolution", "grid"}``.
    """
    import torch
    from diffusers import DDPMPipeline

    from studio.config.data import DataConfig
    from studio.data import load_tensor_cache
    from studio.quality import QualityReference
    from studio.trainers.reporting import make_grid
    from studio.trainers.sampling import sample_images

    pipe = DDPMPipeline.from_pretrained(str(model_folder(path)), use_safetensors=True)
    size = pipe.unet.config.sample_size
    resolution = int(size if isinstance(size, int) else size[0])
    pixels = load_tensor_cache(data or DataConfig(), resolution, Path(cache_root)).pixels
    reference = QualityReference.build(pixels, sample_count=samples)
    grid_cfg = SimpleNamespace(num_samples=samples, resolution=resolution, seed=seed,
                               sample_inference_steps=inference_steps)
    images = sample_images(pipe.unet, pipe.scheduler, grid_cfg, torch.device("cpu"))
    if grid_path is not None:
        make_grid(images).save(grid_path)
    return {"quality": reference.score(images), "levels": reference.score_levels(images),
            "noise_level": reference.noise_level, "data_level": reference.data_level, "resolution": resolution,
            "grid": str(grid_path) if grid_path else None}


def train_for(minutes: float, workspace: Path, **overrides: Any) -> tuple[Path, int, float, list[tuple[int, float]],
                                                                      Any]:
    """Train ``TrainConfig()``'s defaults for ``minutes`` of wall-clock training (or until it finishes).

    The clock starts at the first optimisation step: loading the data, building the model
    and the step-0 grid are not counted (on a busy machine they alone can take a minute).

    ``overrides`` change settings (the smoke test trains a tiny model); the benchmark passes none.

    Returns:
        (run folder, steps trained, seconds spent, [(step, quality) from the run's events], the run's DataConfig).
    """
    from studio.config.train import TrainConfig
    from studio.trainers.ddpm import train

    cfg = TrainConfig(**{"workspace": str(workspace), "run_name": "quality-benchmark", **overrides})
    print(f"training the default run ({cfg.preset}, {cfg.resolution} px, batch {cfg.train_batch_size}, "
          f"lr {cfg.learning_rate}, {cfg.max_train_steps} steps planned) for at most {minutes:g} minutes",
          flush=True)
    stop = threading.Event()
    steps = [0]

    timer = threading.Timer(minutes * 60.0, stop.set)
    start: list[float] = []

    def on_event(event) -> None:
        if event.kind == "step":
            if not start:
                start.append(time.perf_counter())
                timer.start()
            steps[0] = event.step
        elif event.kind == "quality" and getattr(event, "quality", None) is not None:
            print(f"  step {event.step}: quality {event.quality:.1f}", flush=True)

    try:
        run = train(cfg, on_event, stop)
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - start[0] if start else 0.0
    curve = [(e.step, e.quality) for e in run.read_events()
             if e.kind == "quality" and getattr(e, "quality", None) is not None]
    return run.root, steps[0], elapsed, curve, cfg.data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["learning_rate=2e-3", "block_out_channels=[64, 64]"]`` -> TrainConfig keyword arguments.

    Values are JSON (lists become tuples, as TrainConfig's architecture fields are); a value
    that is not JSON is taken as a string (``prediction_type=epsilon``).
    """
    from studio.config.train import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    overrides: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with a TrainConfig field "
                             f"(e.g. learning_rate=2e-3).")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if name == "data" and isinstance(value, dict):
            from studio.config.data import DataConfig

            value = DataConfig(**value)
        overrides[name] = tuple(value) if isinstance(value, list) else value
    return overrides


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget (default 5)")
    parser.add_argument("--quick", action="store_true", help="a 1-minute budget")
    parser.add_argument("--model", default="", help="score this DDPMPipeline folder (or run folder) instead")
    parser.add_argument("--samples", type=int, default=16, help="images scored (the sample grid's num_samples)")
    parser.add_argument("--inference-steps", type=int, default=50, help="DDIM steps per sample (the grid's)")
    parser.add_argument("--category", default=None, help="score against this category of the emoji set "
                        "(default: the trained run's own dataset; with --model the whole set; '' = the whole set)")
    parser.add_argument("--max-rows", type=int, default=None, help="score against at most this many of those images")
    parser.add_argument("--workspace", default="", help="where the run and the image cache go (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="change one TrainConfig setting for a recipe probe (repeatable), e.g. "
                             "learning_rate=2e-3 or 'block_out_channels=[64, 64]'")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="bench-quality-")).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    minutes = steps = None
    from studio.config.data import DataConfig

    reference = DataConfig()
    if args.model:
        target = Path(args.model)
    else:
        minutes = 1.0 if args.quick else args.minutes
        target, steps, elapsed, curve, reference = train_for(minutes, workspace, **overrides)
        print(f"trained {steps} steps in {elapsed / 60:.2f} minutes; run folder {target}")
        if curve:
            print("quality during training (lower is better): "
                  + ", ".join(f"step {s}: {q:.1f}" for s, q in curve))
    if args.category is not None or args.max_rows is not None:
        reference = DataConfig(category=reference.category if args.category is None else args.category,
                               max_rows=reference.max_rows if args.max_rows is None else args.max_rows)
    result = score_pipeline(target, samples=args.samples, inference_steps=args.inference_steps,
                            cache_root=workspace / ".cache", data=reference, grid_path=workspace / "quality-samples.png")
    print(f"model {model_folder(target)} at {result['resolution']} px, {args.samples} samples "
          f"({args.inference_steps} DDIM steps, seed 0) against {reference.label}"
          f"{f' (first {reference.max_rows})' if reference.max_rows else ''}; grid: {result['grid']}")
    data = "n/a" if result["data_level"] is None else f"{result['data_level']:.1f}"
    print(f"quality (SWD x 1000, lower is better): {result['quality']:.1f}   per level "
          + " / ".join(f"{v:.1f}" for v in result["levels"])
          + f"\nreference levels: noise {result['noise_level']:.1f} (untrained) · data {data} (held-out images)")
    summary = {"minutes": minutes, "steps": steps, **({"set": args.set} if args.set else {}), "quality": round(result["quality"], 2),
               "noise_level": round(result["noise_level"], 2),
               "data_level": None if result["data_level"] is None else round(result["data_level"], 2)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
