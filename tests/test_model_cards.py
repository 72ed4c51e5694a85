"""Model cards of exported models follow the Hub's conventions, and their snippets run as pasted.

Each export (a LoRA fine-tuned on a Hub base by id through the loopback Hub, a full
DreamBooth fine-tune of a local base, a DDPM trained from scratch) is checked as the
Hub reads it (``huggingface_hub.ModelCard``): licence, library, pipeline tag, base model
as a Hub id or absent, tags, instance prompt; no local path in any file written (card,
configs, safetensors headers); and the card's Python block, run from the model's folder,
makes an image.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from test_ddpm_trainer import Recorder, tiny_config
from test_finetune import make_cfg, run_train
from tiny_pipelines import make_tiny_sd, tiny_sd  # noqa: F401  (fixture)

_LOCAL_PATH = re.compile(r"(?<![\w.])/(tmp|root|home|Users|private|var)/")


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def _texts(folder: Path) -> dict[str, str]:
    """Every text a model folder exports: cards, JSON configs, safetensors headers."""
    out = {}
    for path in folder.rglob("*"):
        if path.suffix in (".md", ".json", ".txt"):
            out[str(path)] = path.read_text(encoding="utf-8")
        elif path.suffix == ".safetensors":
            with open(path, "rb") as fh:
                out[str(path)] = fh.read(struct.unpack("<Q", fh.read(8))[0]).decode("utf-8")
    return out


def _no_local_paths(folder: Path) -> None:
    leaks = {name: _LOCAL_PATH.search(text)[0] for name, text in _texts(folder).items() if _LOCAL_PATH.search(text)}
    assert not leaks, leaks


def _run_snippet(folder: Path, monkeypatch) -> None:
    """Paste the card's Python block into a session started in the model's folder."""
    from studio.devices import MODEL_INIT_LOCK

    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)[1]
    monkeypatch.chdir(folder)
    with MODEL_INIT_LOCK:
        exec(compile(code, str(folder / "README.md"), "exec"), {"__name__": "__card__"})
    assert (folder / "example.png").stat().st_size > 0


def test_a_lora_on_a_hub_base_by_id_gets_a_hub_card_whose_snippet_runs(local_hub, tmp_path, workspace, monkeypatch):
    from hub_server import files_of
    from safetensors import safe_open

    readme = b"---\nlicense: creativeml-openrail-m\nlibrary_name: diffusers\n---\n# tiny sd\n"
    files = files_of(make_tiny_sd(tmp_path / "base"))
    fp16 = {k.replace("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"): v
            for k, v in files.items()}
    local_hub.add_repo("acme/tiny-sd", {**files, "README.md": readme})
    local_hub.add_repo("acme/tiny-sd", {**fp16, "README.md": readme}, revision="v2")

    run, events = run_train(make_cfg("acme/tiny-sd@v2:fp16", workspace, max_train_steps=2, validation_every=0))
    assert events[-1].kind == "finished", events[-1].message
    card = _card(run.lora_dir)
    assert card.data.base_model == "acme/tiny-sd" and card.data.license == "creativeml-openrail-m"
    assert (card.data.library_name, card.data.pipeline_tag) == ("diffusers", "text-to-image")
    assert {"lora", "stable-diffusion", "text-to-image"} <= set(card.data.tags)
    assert 'from_pretrained("acme/tiny-sd", revision="v2", variant="fp16")' in card.text
    with safe_open(str(run.lora_dir / f"{run.name}-kohya.safetensors"), framework="pt") as fh:
        assert fh.metadata()["base_model"] == "acme/tiny-sd@v2:fp16"
    _no_local_paths(run.lora_dir)
    _run_snippet(run.lora_dir, monkeypatch)


def test_a_full_dreambooth_of_a_local_base_names_no_path_and_loads_from_its_folder(tiny_sd, workspace,  # noqa: F811
                                                                                   monkeypatch):
    cfg = make_cfg(tiny_sd, workspace, method="dreambooth-full", instance_prompt="a sks emoji", max_train_steps=1,
                   validation_every=0)
    run, events = run_train(cfg)
    assert events[-1].kind == "finished", events[-1].message
    card = _card(run.model_dir)
    assert card.data.base_model is None and card.data.license == "other"  # a local base with no card
    assert card.data.instance_prompt == "a sks emoji" and "dreambooth" in card.data.tags
    assert "set `license:`" in card.text and 'from_pretrained(".")' in card.text
    model_index = json.loads((run.model_dir / "model_index.json").read_text())
    assert "_name_or_path" not in model_index
    _no_local_paths(run.model_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _run_snippet(run.model_dir, monkeypatch)


def test_a_ddpm_from_scratch_carries_its_data_licence_and_a_relative_snippet(workspace, monkeypatch):
    from studio.trainers.ddpm import train

    recorder = Recorder()
    run = train(tiny_config(workspace, max_train_steps=2), recorder, recorder.stop)
    card = _card(run.model_dir)
    assert card.data.license == "cc-by-4.0"  # the bundled emoji set's (Twemoji) licence
    assert card.data.pipeline_tag == "unconditional-image-generation" and card.data.base_model is None
    _no_local_paths(run.model_dir)
    _run_snippet(run.model_dir, monkeypatch)


@pytest.mark.parametrize("reference,expected", [
    ("acme/x", "acme/x"), ("acme/x@v2:fp16", "acme/x@v2:fp16"), ("bundled:emoji-sd", "emoji-sd"),
    ("/data/models/my-model.safetensors", "my-model"), ("/data/models/sd15", "sd15"),
])
def test_public_names_never_carry_a_path(reference, expected):
    from studio.model_cards import public_name

    assert public_name(reference) == expected
