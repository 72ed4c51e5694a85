"""Exported text encoders, tokenizers and LoRAs that transformers 4.x and 5 both load.

transformers 5 flattened ``CLIPTextModel`` (its weights are ``encoder.*``, ``embeddings.*``)
and saves tokenizers as ``tokenizer.json`` only; transformers 4.x (which diffusers users
still run, and which ``requirements.txt`` admits) expects ``text_model.encoder.*`` (it
loads a flattened file with a *randomly initialised* encoder and only a warning) and its
slow ``CLIPTokenizer`` reads ``vocab.json`` + ``merges.txt``. transformers 5 loads the 4.x
layout (as it does every Hub repo), so the studio writes that:

- ``portable_pipeline_folder``: after ``save_pretrained``, each CLIP text encoder's
  weights get their ``text_model.`` prefix back and each CLIP tokenizer folder gets
  ``vocab.json`` and ``merges.txt`` beside ``tokenizer.json``;
- ``hub_lora_text_encoder_keys``: a text-encoder LoRA's keys in the layout Hub LoRAs
  use (``text_encoder.text_model.encoder...``), which diffusers loads under both majors.

``tests/test_transformers4.py`` loads the results under transformers 4.57 in a second
virtualenv that ``.ci/run`` builds, and compares outputs with this stack's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Top-level weight names of a transformers-4 CLIP text model ("text_projection" only WithProjection's).
_V4_ROOTS = ("text_model.", "text_projection.", "logit_scale", "vision_model.", "visual_projection.")


def v4_text_encoder_keys(state: dict[str, Any]) -> dict[str, Any]:
    """CLIP text-encoder weights with the ``text_model.`` prefix transformers 4.x expects."""
    return {key if key.startswith(_V4_ROOTS) else f"text_model.{key}": value for key, value in state.items()}


def hub_lora_text_encoder_keys(layers: dict[str, Any]) -> dict[str, Any]:
    """A text-encoder LoRA (keys relative to the text encoder) in the layout Hub LoRAs use."""
    return v4_text_encoder_keys(layers)


def _is_clip_text(config: dict[str, Any]) -> bool:
    return any(a in ("CLIPTextModel", "CLIPTextModelWithProjection") for a in config.get("architectures") or [])


def rewrite_text_encoder(folder: str | Path) -> bool:
    """Give a saved CLIP text encoder's weights the 4.x layout in place; True when something changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    weights = folder / "model.safetensors"
    if not _is_clip_text(config) or not weights.is_file():  # a sharded or other encoder is left as saved
        return False
    with safe_open(str(weights), framework="pt") as fh:
        metadata = fh.metadata()
        state = {key: fh.get_tensor(key) for key in fh.keys()}
    renamed = v4_text_encoder_keys(state)
    if list(renamed) == list(state):
        return False
    save_file(renamed, str(weights), metadata=metadata)
    return True


def add_slow_tokenizer_files(tokenizer: Any, folder: str | Path) -> bool:
    """Write ``vocab.json`` and ``merges.txt`` (transformers 4.x's slow CLIPTokenizer) beside a saved tokenizer."""
    from studio.small_sd import tokenizer_merges

    folder = Path(folder)
    if type(tokenizer).__name__ not in ("CLIPTokenizer", "CLIPTokenizerFast") or not folder.is_dir():
        return False
    vocab = dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = ["#version: 0.2"] + [f"{a} {b}" for a, b in tokenizer_merges(tokenizer)]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    return True


def portable_pipeline_folder(folder: str | Path, pipe: Any) -> list[str]:
    """Make a ``save_pretrained`` folder of ``pipe`` loadable under transformers 4.x too; names what changed."""
    folder = Path(folder)
    changed = []
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None and rewrite_text_encoder(folder / name):
            changed.append(f"{name}/model.safetensors")
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None and not (folder / name / "vocab.json").is_file() \
                and add_slow_tokenizer_files(tokenizer, folder / name):
            changed.append(f"{name}/vocab.json+merges.txt")
    return changed
