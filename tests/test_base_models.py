"""The Fine-tune base-model list (studio.base_models): what it offers, in which order, its default, native sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from studio import bundled
from studio.base_models import (default_base_model, default_generate_model, finetune_base_choices,
                                local_pipeline_folder, native_resolution)
from tiny_pipelines import bundled_sd, tiny_ddpm, tiny_sd, tiny_sd_stand_in  # noqa: F401  (fixtures)


def make_run(workspace: Path, name: str, task: str, model: Path | None = None, lora: bool = False) -> Path:
    run = workspace / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": task, "pretrained_model_name_or_path": "x"}))
    if model is not None:
        shutil.copytree(model, run / "model")
    if lora:
        (run / "lora").mkdir()
        (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    return run


def put_in_hub_cache(folder: Path, repo_id: str) -> Path:
    """Lay ``folder`` out as a cached Hub snapshot of ``repo_id`` (what a download leaves)."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    return repo


def test_the_list_offers_sd_pipelines_only_bundled_first(bundled_sd, workspace, tiny_sd, tiny_ddpm):
    make_run(workspace, "train-ddpm", "train", model=tiny_ddpm)  # unconditional: cannot be fine-tuned
    make_run(workspace, "full-sd", "finetune", model=tiny_sd)
    make_run(workspace, "a-lora", "finetune", lora=True)  # a LoRA is not a base model
    cached = [put_in_hub_cache(tiny_sd, "studio-test/tiny-sd"), put_in_hub_cache(tiny_ddpm, "studio-test/tiny-ddpm")]
    try:
        choices = finetune_base_choices(workspace)
    finally:
        for repo in cached:
            shutil.rmtree(repo)
    values = [value for _, value in choices]
    assert values[0] == bundled_sd and "emoji" in choices[0][0]
    assert "bundled:emoji-ddpm" not in values and str(workspace / "train-ddpm") not in values
    assert str(workspace / "a-lora") not in values and "studio-test/tiny-ddpm" not in values
    assert ("run: full-sd", str(workspace / "full-sd")) in choices
    assert ("studio-test/tiny-sd (cached)", "studio-test/tiny-sd") in choices
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in values
    assert not any(v.startswith("google/ddpm") for v in values)  # unconditional Hub models are not offered
    order = [values.index(v) for v in (bundled_sd, str(workspace / "full-sd"), "studio-test/tiny-sd",
                                       "stable-diffusion-v1-5/stable-diffusion-v1-5")]
    assert order == sorted(order)  # bundled, runs, cached, curated


def test_defaults_are_the_bundled_text_to_image_model(bundled_sd, monkeypatch):
    assert default_base_model() == bundled_sd
    assert default_generate_model() == bundled_sd  # Generate opens on the text-to-image model
    # a checkout with only the DDPM (a new table: delitem's undo would re-insert emoji-sd last,
    # and later tests would see the table's order changed)
    monkeypatch.setattr(bundled, "BUNDLED_MODELS", {k: m for k, m in bundled.BUNDLED_MODELS.items() if k != "emoji-sd"})
    assert default_base_model() == ""  # nothing to fine-tune offline: the box stays empty
    assert default_generate_model() == "bundled:emoji-ddpm"


def test_native_resolution_is_read_from_the_configs(bundled_sd, workspace, tiny_sd):
    from studio.budget import local_unet_config
    from studio.models import load_pipeline, native_size

    size = native_resolution(bundled_sd)
    assert (size, size) == native_size(load_pipeline(bundled_sd, "cpu", offline=True))
    run = make_run(workspace, "full-sd", "finetune", model=tiny_sd)
    assert local_pipeline_folder("full-sd", workspace) == run / "model"
    assert native_resolution("full-sd", workspace) == 16 and native_resolution(str(tiny_sd)) == 16
    assert native_resolution("stabilityai/stable-diffusion-2-1") == 768  # curated, not cached
    assert native_resolution("someone/unknown") is None and native_resolution("") is None
    # the memory plan reads the bundled model's own UNet, not a guessed SD 1.5
    assert local_unet_config(bundled_sd)["cross_attention_dim"] == \
        json.loads((local_pipeline_folder(bundled_sd) / "unet" / "config.json").read_text())["cross_attention_dim"]
