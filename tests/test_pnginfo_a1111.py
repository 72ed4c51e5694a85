"""PNG parameters in AUTOMATIC1111's conventions, written and read back.

The studio writes ``Model hash`` (SHA-256 of the checkpoint, 10 digits; for a diffusers
folder, of its UNet weights), ``Model`` as a name, ``<lora:name:scale>`` in the prompt with
``Lora hashes`` (kohya's addnet hash, 12 digits), and ``Sampler`` + ``Schedule type`` as
A1111 >= 1.9 does; hashes are checked against hashlib here, not against the studio's own
code. Reading back takes both sampler forms, finds models and LoRAs by name or hash, and
maps A1111 checkpoint names to Hub ids.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from studio.config.generate import GenerateConfig
from studio.generate import generate
from studio.model_names import NameLookup, PngModel, png_model, split_lora_tags
from studio.models import PipelineManager, resolve_reference
from studio.pnginfo import config_updates, parse_parameters, read_png_parameters
from tiny_pipelines import make_tiny_lora, tiny_sd  # noqa: F401  (fixture)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _addnet(path: Path) -> str:
    """kohya's hash: SHA-256 of what follows the safetensors header."""
    data = path.read_bytes()
    return _sha256(data[8 + int.from_bytes(data[:8], "little"):])


def _lora_run(workspace: Path, base: Path, tmp_path: Path, name: str = "fox-style") -> Path:
    """A Fine-tune LoRA run as the trainer leaves it: diffusers weights plus the kohya file A1111 loads."""
    run = workspace / name
    (run / "lora").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": "finetune", "pretrained_model_name_or_path": str(base)}))
    weights = make_tiny_lora(base, tmp_path / "lora-src")
    shutil.copy(weights, run / "lora" / "pytorch_lora_weights.safetensors")
    shutil.copy(weights, run / "lora" / f"{name}-kohya.safetensors")
    return run


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image.image) for image in result.images])


def test_written_in_a1111_conventions_and_read_back_to_the_same_image(tiny_sd, workspace, tmp_path):  # noqa: F811
    run = _lora_run(workspace, tiny_sd, tmp_path)
    manager = PipelineManager("cpu", workspace)
    cfg = GenerateConfig(model=str(tiny_sd), prompt="a red fox", negative_prompt="blurry", num_inference_steps=2,
                         guidance_scale=4.0, seed=7, scheduler="Euler a", lora=str(run), lora_scale=0.8)
    result = generate(manager, cfg)
    text = read_png_parameters(result.images[0].path)
    unet = (tiny_sd / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    kohya = run / "lora" / "fox-style-kohya.safetensors"
    assert text == ("a red fox <lora:fox-style-kohya:0.8>\nNegative prompt: blurry\n"
                    "Steps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 4.0, Seed: 7, Size: 16x16, "
                    f"Model hash: {_sha256(unet)[:10]}, Model: pipeline, "
                    f'Lora hashes: "fox-style-kohya: {_addnet(kohya)[:12]}"')
    assert str(tmp_path) not in text and str(workspace) not in text

    loaded = manager.loaded
    updates, notes = config_updates(parse_parameters(text), NameLookup(workspace, (loaded.reference, loaded.png())))
    assert notes == []
    rebuilt = GenerateConfig().replace(**updates)
    assert rebuilt.replace(width=0, height=0, lora=str(run)) == cfg and Path(rebuilt.lora) == run
    np.testing.assert_array_equal(_pixels(generate(manager, rebuilt, save=False)), _pixels(result))

    # without the loaded model, a different workspace: the name is not a Hub id and is said to be so
    updates, notes = config_updates(parse_parameters(text), NameLookup(tmp_path / "elsewhere"))
    assert "model" not in updates and updates["lora"] == ""
    assert any("'pipeline' is a checkpoint name, not a Hub id" in n for n in notes)
    assert any("'fox-style-kohya' is not a Fine-tune run" in n for n in notes)


def test_the_model_own_sampler_and_samplers_a1111_lacks(tiny_sd, workspace):  # noqa: F811
    manager = PipelineManager("cpu", workspace)
    base = GenerateConfig(model=str(tiny_sd), prompt="a cat", num_inference_steps=2, seed=1)
    own = read_png_parameters(generate(manager, base).images[0].path)
    assert "Sampler: PLMS, Schedule type: Automatic" in own and "Studio sampler: Default (model's own)" in own
    assert "PNDM" not in own  # not an A1111 name
    deis = read_png_parameters(generate(manager, base.replace(scheduler="DEIS")).images[0].path)
    assert "Sampler:" not in deis and "Studio sampler: DEIS" in deis
    for text, expected in ((own, "Default (model's own)"), (deis, "DEIS")):
        assert config_updates(parse_parameters(text))[0]["scheduler"] == expected


def test_a_single_file_is_hashed_as_a1111_does_and_named_by_its_stem(tmp_path):
    payload = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 64
    path = tmp_path / "my-model_v2.safetensors"
    path.write_bytes(payload)
    ref = resolve_reference(str(path), offline=True)
    assert png_model(ref) == PngModel("my-model_v2", _sha256(payload)[:10])


@pytest.mark.parametrize("sampler,expected", [
    ("Sampler: DPM++ 2M Karras", "DPM++ 2M Karras"),  # before A1111 1.9
    ("Sampler: DPM++ 2M, Schedule type: Karras", "DPM++ 2M Karras"),
    ("Sampler: DPM++ 2M, Schedule type: Automatic", "DPM++ 2M Karras"),  # 1.9's automatic for DPM++ 2M
    ("Sampler: DPM++ 2M, Schedule type: Uniform", "DPM++ 2M"),
    ("Sampler: Euler a, Schedule type: Automatic", "Euler a"),
    ("Sampler: DDIM", "DDIM"),
    ("Sampler: Euler, Schedule type: Exponential", "Euler"),  # with a note
    ("Sampler: DPM++ 2M, Schedule type: Karras, Studio sampler: UniPC", "UniPC"),
])
def test_both_a1111_sampler_forms_read_back(sampler, expected):
    updates, notes = config_updates(parse_parameters(f"x\nSteps: 20, {sampler}, Seed: 1"))
    assert updates["scheduler"] == expected
    assert bool(notes) == ("Exponential" in sampler)


def test_an_a1111_png_maps_known_names_and_says_what_it_cannot_use(workspace):
    text = ("masterpiece, fox <lora:detail:0.6> <lora:other:1>, <hypernet:x:1>\nNegative prompt: lowres\n"
            "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3216, Size: 512x768, "
            'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "detail: 1a2b3c4d5e6f", '
            "Version: v1.10.1")
    updates, notes = config_updates(parse_parameters(text), NameLookup(workspace))
    assert updates["prompt"] == "masterpiece, fox" and updates["negative_prompt"] == "lowres"
    assert updates["model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert updates["lora"] == ""
    joined = " ".join(notes)
    assert "A1111 checkpoint name" in joined and "'detail' is not a Fine-tune run" in joined
    assert "'other' was left out" in joined and "<hypernet:x:1>" in joined
    updates, notes = config_updates(parse_parameters(text.replace("v1-5-pruned-emaonly", "anything-v5")))
    assert "model" not in updates and "not a Hub id" in " ".join(notes)
    assert config_updates(parse_parameters("x\nSteps: 2, Model: acme/tiny@v2:fp16"))[0]["model"] == "acme/tiny@v2:fp16"
    assert config_updates(parse_parameters("x\nSteps: 2, Model: emoji-ddpm"))[0]["model"] == "bundled:emoji-ddpm"


def test_a_lora_renamed_elsewhere_is_found_by_its_hash(tiny_sd, workspace, tmp_path):  # noqa: F811
    run = _lora_run(workspace, tiny_sd, tmp_path)
    digest = _addnet(run / "lora" / "fox-style-kohya.safetensors")[:12]
    text = f'a <lora:my-renamed-copy:0.5>\nSteps: 2, Lora hashes: "my-renamed-copy: {digest}"'
    updates, notes = config_updates(parse_parameters(text), NameLookup(workspace))
    assert (updates["lora"], updates["lora_scale"], notes) == (str(run), 0.5, [])


def test_lora_tags_are_taken_out_of_the_prompt():
    assert split_lora_tags("a cat <lora:x:0.5>, sitting <lyco:y>") == ("a cat, sitting", [("x", 0.5), ("y", 1.0)], [])
