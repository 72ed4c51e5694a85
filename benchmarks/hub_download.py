"""Hub downloads over loopback: the studio's download with byte progress vs a plain snapshot download.

Serves repos from ``tests/hub_server.py`` (the loopback Hub the tests use) and measures,
in one run:

- speed of ``huggingface_hub.snapshot_download`` and of diffusers' ``DiffusionPipeline.download``
  (references: no progress) and of ``studio.hub.download_pipeline`` (diffusers' download plus
  the repo-size lookup and the watcher that reports bytes, speed and time left), each on its
  own copy of a pipeline repo with one ``--mb`` MB weight file; the ratio to diffusers'
  download is the cost of showing progress;
- time to first image after "Download for offline use": the bundled emoji DDPM served as a
  Hub repo, downloaded, then loaded offline from the cache and one image generated (25 steps).

    python benchmarks/hub_download.py [--mb 128]

The last line is JSON. Figures and the machine are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hub-bench-")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=128, help="size of the big weight file (MB)")
    args = parser.parse_args()

    from _pytest.monkeypatch import MonkeyPatch
    from hub_server import LocalHub, files_of, point_clients_at

    import torch

    torch.set_num_threads(1)
    from huggingface_hub import constants, snapshot_download

    from studio.bundled import find_bundled
    from studio.hub import download_pipeline

    ddpm = files_of(find_bundled("emoji-ddpm").path)
    big = dict(ddpm)
    big["unet/diffusion_pytorch_model.safetensors"] = os.urandom(args.mb * 1_000_000)
    size = sum(len(v) for k, v in big.items() if not k.endswith((".png", ".md")))
    patch = MonkeyPatch()
    with LocalHub() as hub:
        point_clients_at(hub, patch)
        hub.add_repo("bench/reference", big)
        hub.add_repo("bench/studio", big)
        hub.add_repo("bench/plain", big)
        hub.add_repo("bench/emoji-ddpm", ddpm)

        import diffusers

        diffusers.DiffusionPipeline.download  # noqa: B018 - import diffusers' pipelines before any timing
        began = time.perf_counter()
        snapshot_download("bench/reference", allow_patterns=["*.json", "*/*.safetensors"])
        reference_s = time.perf_counter() - began
        began = time.perf_counter()
        diffusers.DiffusionPipeline.download("bench/plain", use_safetensors=None)
        plain_s = time.perf_counter() - began

        reports = []
        began = time.perf_counter()
        download_pipeline("bench/studio", on_progress=reports.append)
        studio_s = time.perf_counter() - began
        shown = [r.message("bench/studio") for r in reports]

        began = time.perf_counter()
        download_pipeline("bench/emoji-ddpm")
        ddpm_download_s = time.perf_counter() - began
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        from studio.config.generate import GenerateConfig
        from studio.generate import generate
        from studio.models import PipelineManager

        began = time.perf_counter()
        manager = PipelineManager("cpu", tempfile.mkdtemp(), offline=True)
        generate(manager, GenerateConfig(model="bench/emoji-ddpm", num_inference_steps=25, seed=0), save=False)
        first_image_s = time.perf_counter() - began
    patch.undo()
    shutil.rmtree(os.environ["HF_HOME"], ignore_errors=True)
    result = {
        "bytes": size, "reference_s": round(reference_s, 2), "reference_MBps": round(size / reference_s / 1e6, 1),
        "studio_s": round(studio_s, 2), "studio_MBps": round(size / studio_s / 1e6, 1),
        "diffusers_download_s": round(plain_s, 2), "studio_vs_snapshot": round(studio_s / reference_s, 2),
        "studio_vs_diffusers_download": round(studio_s / plain_s, 2), "progress_reports": len(reports),
        "last_progress_lines": shown[-2:], "emoji_ddpm_download_s": round(ddpm_download_s, 2),
        "first_image_after_download_s": round(first_image_s, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
