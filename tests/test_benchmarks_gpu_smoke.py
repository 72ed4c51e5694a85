"""``benchmarks/gpu.py --cpu-smoke``: every part of the GPU benchmark runs, tiny, on CPU, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_benchmark_cpu_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--cpu-smoke", "--workdir",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    records = {r["part"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert list(records) == ["train", "finetune", "generate", "numerics"]
    assert all(r["ok"] and r["device"] == "cpu" for r in records.values())

    (train,) = records["train"]["runs"]
    assert train["studio_img_s"] > 0 and train["reference_img_s"] > 0 and train["ratio"] > 0
    methods = {(r["method"], r["precision"]) for r in records["finetune"]["runs"]}
    assert methods == {("lora", "no"), ("full", "no")}
    assert all(r["studio_s_step"] > 0 and r["reference_s_step"] > 0 for r in records["finetune"]["runs"])

    generate = records["generate"]
    names = [r["scheduler"] for r in generate["schedulers"]]
    from studio.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

    assert names == [DEFAULT_SCHEDULER, *SCHEDULERS]  # every row of the table is tried or said why not
    assert {"DPM++ 2M Karras", "Euler a", "DDIM", "UniPC"} <= {r["scheduler"] for r in generate["schedulers"]
                                                              if "seconds" in r}
    assert all(r["black"] == 0 and r["nan_decodes"] == 0 for r in generate["schedulers"] if "seconds" in r)

    numerics = records["numerics"]
    assert numerics["generate_images_checked"] == generate["generated"]
    assert numerics["sdxl_upcast_on"]["vae_dtype_at_decode"] == "float32"
    assert numerics["sdxl_upcast_on"]["pixels_finite"] and numerics["sdxl_upcast_on"]["black"] == 0
    # with the upcast off, the deliberately overflowing fp16 VAE gives NaN -> black, and the check sees it
    assert numerics["sdxl_upcast_off"]["vae_dtype_at_decode"] == "float16"
    assert not numerics["sdxl_upcast_off"]["pixels_finite"] and numerics["nan_detected_without_upcast"]
