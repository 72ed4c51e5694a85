"""Benchmark: does the prompt steer a text-to-image model? (default: the bundled emoji SD)

Draws ``--images`` (16) fixed-seed images per prompt with plain
``diffusers.StableDiffusionPipeline`` (PNDM, ``--steps`` 25, guidance ``--guidance`` 4, at the
model's resolution) for "red heart", "yellow smiling face", "flag" and "blue circle", plus
the empty prompt as the reference of the same run (what the model draws unsteered), and
prints per prompt:

- colour figures (``studio.prompt_steering.colour_stats``): mean hue of the coloured
  pixels (degrees: 0 red, 60 yellow, 120 green, 240 blue), share of coloured pixels, and
  of those the red and yellow shares; the same figures of the dataset images matching
  the prompt (``matching_images``) are printed beside them;
- a steering matrix of the quality figure (``studio.quality``, sliced Wasserstein
  distance of patches x 1000, lower is closer): each prompt's images (rows) against the
  dataset images matching each prompt (columns). A steered model has the lowest value
  of each column on the diagonal (``columns_steered``); ``diagonal_ratio`` is, per
  column, the prompt's own value over the other prompts' mean, averaged (below 1 =
  steered; the empty prompt's row is printed as the unsteered reference).

It also times loading the pipeline (``load_s``: ``from_pretrained``, CPU, fp32).

    python benchmarks/prompt_steering.py                         # the bundled emoji SD
    python benchmarks/prompt_steering.py --model runs/my-run     # a run folder or pipeline folder
    python benchmarks/prompt_steering.py --grid samples.png      # also save 8 images per prompt, a row each

The last line printed is one JSON object: ``{"model", "load_s", "red_share", "yellow_share",
"hue", "diagonal_ratio", "columns_steered"}`` (per-prompt dicts where it says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPTS = ("red heart", "yellow smiling face", "flag", "blue circle")


def model_folder(path: str | Path) -> Path:
    path = Path(path).expanduser()
    for candidate in (path, path / "model"):
        if (candidate / "model_index.json").is_file():
            return candidate
    raise SystemExit(f"{path} is not a diffusers pipeline folder (no model_index.json), nor a run folder with model/.")


def generate(pipe, prompt: str, images: int, steps: int, guidance: float, seed: int):
    """``images`` uint8 images of ``prompt`` at the model's resolution, fixed seed."""
    import numpy as np
    import torch

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = pipe([prompt] * images, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="np").images
    return (out * 255).round().astype(np.uint8)


def measure(model: Path, prompts=PROMPTS, images: int = 16, steps: int = 25, guidance: float = 4.0,
            seed: int = 0, max_rows: int = 0) -> dict:
    """The figures of the module docstring for ``model``, as a dict (also what the test reads)."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from studio.config.data import DataConfig
    from studio.data import load_tensor_cache
    from studio.prompt_steering import colour_stats, matching_images
    from studio.quality import QualityReference

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    load_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    cache_root = Path(os.environ.get("STUDIO_BENCH_CACHE", Path.home() / ".cache" / "diffusion-studio-bench"))
    cache = load_tensor_cache(DataConfig(source="emoji", max_rows=max_rows), size, cache_root)
    pixels, captions = cache.pixels, cache.captions
    drawn = {p: generate(pipe, p, images, steps, guidance, seed) for p in ("", *prompts)}
    refs = {p: QualityReference.build(pixels[matching_images(captions, p)], sample_count=images) for p in prompts}
    start = time.perf_counter()
    StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    again_s = time.perf_counter() - start
    result = {"model": str(model), "load_s": round(load_s, 3), "load_again_s": round(again_s, 3), "colour": {},
              "data_colour": {}, "matrix": {}, "images": {p: drawn[p][:8] for p in prompts}}
    for p in ("", *prompts):
        result["colour"][p] = colour_stats(drawn[p])
        result["matrix"][p] = {q: refs[q].score(drawn[p]) for q in prompts}
    for p in prompts:
        matched = pixels[matching_images(captions, p)].permute(0, 2, 3, 1).numpy()
        result["data_colour"][p] = colour_stats(matched)
    m = result["matrix"]  # per reference (column): are the prompt's own images the closest to it?
    result["diagonal_ratio"] = float(np.mean([m[q][q] / np.mean([m[p][q] for p in prompts if p != q])
                                              for q in prompts]))
    result["columns_steered"] = sum(min(prompts, key=lambda p: m[p][q]) == q for q in prompts)
    return result


def save_grid(images: dict, path: str, scale: int = 3) -> None:
    """One row of images per prompt (white gaps), enlarged ``scale`` times (nearest neighbour)."""
    import numpy as np
    from PIL import Image

    rows = [np.concatenate([np.pad(im, ((2, 2), (2, 2), (0, 0)), constant_values=255) for im in row], axis=1)
            for row in images.values()]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)
    print(f"grid: {path} (rows: {', '.join(images)})")


def print_report(r: dict, prompts=PROMPTS) -> None:
    print(f"model {r['model']}  (loaded in {r['load_s']:.2f} s, again in {r['load_again_s']:.2f} s)")
    print(f"{'prompt':22s} {'hue':>5s} {'coloured':>8s} {'red':>5s} {'yellow':>6s} |"
          f" data: {'hue':>5s} {'red':>5s} {'yellow':>6s}")
    for p in ("", *prompts):
        c = r["colour"][p]
        d = r["data_colour"].get(p)
        data = f" {d['hue']:11.0f} {d['red']:5.2f} {d['yellow']:6.2f}" if d else "       (unsteered reference)"
        print(f"{(p or '(empty prompt)'):22s} {c['hue']:5.0f} {c['coloured']:8.2f} {c['red']:5.2f} "
              f"{c['yellow']:6.2f} |{data}")
    print("\nquality figure (lower = closer) of each prompt's images vs the dataset images matching each prompt:")
    print(f"{'':22s} " + " ".join(f"{q[:12]:>12s}" for q in prompts))
    for p in ("", *prompts):
        row = r["matrix"][p]
        print(f"{(p or '(empty prompt)'):22s} " + " ".join(f"{row[q]:12.0f}" for q in prompts))
    print(f"\nper column, own prompt / other prompts: {r['diagonal_ratio']:.2f} (below 1 = steered); "
          f"columns whose own prompt's images are the closest: {r['columns_steered']} of {len(prompts)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "models" / "emoji-sd"),
                        help="StableDiffusionPipeline folder or run folder (default: the bundled emoji SD)")
    parser.add_argument("--images", type=int, default=16, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25, help="PNDM steps per image")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--grid", default="", help="also write the first 8 images of each prompt, a row each, here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    r = measure(model_folder(args.model), images=args.images, steps=args.steps, guidance=args.guidance)
    print_report(r)
    if args.grid:
        save_grid(r["images"], args.grid)
    summary = {"model": r["model"], "load_s": r["load_s"], "load_again_s": r["load_again_s"],
               "red_share": {p: round(r["colour"][p]["red"], 3) for p in ("", *PROMPTS)},
               "yellow_share": {p: round(r["colour"][p]["yellow"], 3) for p in ("", *PROMPTS)},
               "hue": {p: round(r["colour"][p]["hue"], 1) for p in ("", *PROMPTS)},
               "diagonal_ratio": round(r["diagonal_ratio"], 3), "columns_steered": r["columns_steered"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
