"""Benchmark: seconds to load a bundled model in Generate, against plain diffusers on the same folder.

In one process, after the imports the studio's engine does at launch (torch, diffusers,
transformers), each round loads every bundled model twice, alternating:

* **studio** — ``PipelineManager.load("bundled:<name>")`` while another model is loaded:
  what Generate's Load does on a switch (free the previous pipeline, resolve the
  reference, ``from_pretrained`` with safetensors only, tokenizer check, move to the
  device, remember the default scheduler); with one bundled model, after ``unload()``;
* **diffusers** — ``DiffusionPipeline.from_pretrained(<folder>, use_safetensors=True)``
  on the same folder, the reference.

Then one image of the first prompt is made with the model's own scheduler at 25 steps
(Generate's default) to time the first picture. The medians over the rounds are printed,
and the last line is one JSON object per model:
``{"model": ..., "studio_s": ..., "diffusers_s": ..., "ratio": ..., "image_25_steps_s": ...}``.

    python benchmarks/bundled_load.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    torch.set_num_threads(args.threads)
    import diffusers
    import transformers  # noqa: F401  (the engine imports it at launch too)

    from studio.bundled import bundled_models
    from studio.config.generate import GenerateConfig
    from studio.generate import generate
    from studio.models import PipelineManager

    diffusers.utils.logging.disable_progress_bar()
    manager = PipelineManager("cpu", Path("runs"), offline=True)
    results = []
    models = bundled_models()
    for index, model in enumerate(models):
        other = models[index - 1] if len(models) > 1 else None
        manager.load(model.reference)  # warm: the first load pays for lazy imports inside diffusers
        studio_s, reference_s = [], []
        for _ in range(args.rounds):
            if other is not None:
                manager.load(other.reference)
            else:
                manager.unload()
            start = time.perf_counter()
            manager.load(model.reference)
            studio_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            diffusers.DiffusionPipeline.from_pretrained(model.path, use_safetensors=True)
            reference_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        generate(manager, GenerateConfig(model=model.reference, prompt="red heart", seed=0), save=False)
        image_s = time.perf_counter() - start
        row = {"model": model.reference, "studio_s": round(statistics.median(studio_s), 3),
               "diffusers_s": round(statistics.median(reference_s), 3),
               "ratio": round(statistics.median(studio_s) / statistics.median(reference_s), 2),
               "image_25_steps_s": round(image_s, 3), "rounds": args.rounds}
        print(f"{model.reference}: studio {min(studio_s):.3f}-{max(studio_s):.3f} s, "
              f"diffusers {min(reference_s):.3f}-{max(reference_s):.3f} s")
        results.append(row)
    for row in results:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
