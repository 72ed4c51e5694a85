"""What the studio exports loads the same under transformers 4.x + its diffusers as under our stack.

``.ci/run`` builds a second virtualenv once (transformers 4.57.1, diffusers 0.35.2,
huggingface_hub 0.36, peft 0.17 over this stack's torch; see ``.ci/run``) and points
``STUDIO_TF4_PYTHON`` at it. A full fine-tune's ``model/``, a LoRA with text-encoder
layers and every bundled model are loaded there with plain diffusers
(``tests/tf4_check.py``): token ids, text embeddings and images must equal this stack's.
Without that interpreter the test is skipped (it needs the second environment).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_finetune import make_cfg, run_train
from tiny_pipelines import tiny_sd  # noqa: F401  (fixture)

TF4_PYTHON = os.environ.get("STUDIO_TF4_PYTHON", "")
ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (TF4_PYTHON and Path(TF4_PYTHON).exists()),
                                                    reason="needs STUDIO_TF4_PYTHON (the venv .ci/run builds)")]


def test_exports_and_bundled_models_match_under_transformers_4(tiny_sd, workspace, tmp_path):  # noqa: F811
    import shutil

    from studio.bundled import bundled_models
    from studio.models import load_pipeline
    from studio.transformers_compat import portable_pipeline_folder
    from tf4_check import outputs

    # a base like a Hub SD repo (4.x-layout text encoder, vocab.json + merges.txt), as every real base is
    base = Path(shutil.copytree(tiny_sd, tmp_path / "base"))
    assert portable_pipeline_folder(base, load_pipeline(str(base), "cpu", offline=True))
    tiny_sd = base
    full, events = run_train(make_cfg(tiny_sd, workspace, method="full", max_train_steps=1, validation_every=0,
                                      run_name="full"))
    assert events[-1].kind == "finished"
    lora, events = run_train(make_cfg(tiny_sd, workspace, train_text_encoder=True, max_train_steps=1,
                                      validation_every=0, learning_rate=1e-2, run_name="lora-te"))
    assert events[-1].kind == "finished"
    assert (full.model_dir / "tokenizer" / "vocab.json").is_file() and (full.model_dir / "tokenizer" / "merges.txt").is_file()
    cases = [{"name": "full fine-tune", "kind": "sd", "model": str(full.model_dir), "prompt": "a smiling face"},
             {"name": "LoRA (UNet + text encoder)", "kind": "sd", "model": str(tiny_sd), "lora": str(lora.lora_dir),
              "prompt": "a smiling face"}]
    for model in bundled_models():
        kind = "ddpm" if model.kind == "ddpm" else "sd"
        cases.append({"name": f"bundled {model.name}", "kind": kind, "model": str(model.path), "prompt": "a red heart",
                      "size": 32})
    for i, case in enumerate(cases):
        case["out"] = str(tmp_path / f"tf4-{i}.npz")
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    done = subprocess.run([TF4_PYTHON, str(ROOT / "tests" / "tf4_check.py"), str(spec)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    versions = json.loads(done.stdout.strip().splitlines()[-1])
    assert versions["transformers"].startswith("4."), versions

    base_embeds = outputs({"kind": "sd", "model": str(tiny_sd), "prompt": "a smiling face"})["embeds"]
    for case in cases:
        ours, theirs = outputs(case), dict(np.load(case["out"]))
        assert set(ours) == set(theirs), case["name"]
        for key in ours:
            assert ours[key].shape == theirs[key].shape, (case["name"], key)
            np.testing.assert_allclose(theirs[key], ours[key], atol=1e-4, err_msg=f"{case['name']}: {key}")
    # the LoRA's text-encoder layers are applied under both stacks (not silently dropped)
    lora_embeds = dict(np.load(cases[1]["out"]))["embeds"]
    assert np.abs(lora_embeds - base_embeds).max() > 1e-3
