"""LoRA weights out of a training run, in the two layouts other tools load.

``save_lora`` writes a run's ``lora/`` folder:

- ``pytorch_lora_weights.safetensors``: diffusers' format (``save_lora_weights``),
  with the peft config (rank, alpha, targets) in the header, so
  ``pipe.load_lora_weights(folder)`` restores exactly what was trained;
- ``<name>-kohya.safetensors``: the kohya-ss / AUTOMATIC1111 / ComfyUI layout, one
  file with ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``
  per adapted module (and ``lora_te_text_model_<module>...`` for the text encoder).

diffusers' own ``convert_state_dict_to_kohya`` writes ``alpha = rank`` whatever the
training alpha was, and, because transformers 5's ``CLIPTextModel`` has no
``text_model`` wrapper any more, names text-encoder keys ``lora_te1_encoder_layers_...``
where kohya's loader and A1111 expect ``lora_te_text_model_encoder_layers_...``. So the
conversion is done here, both ways, from module names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

#: The file name diffusers' ``load_lora_weights(folder)`` looks for.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"


def _unet_path(sdxl_unet_config: dict | None):
    """UNet module path -> the name kohya uses: diffusers' own for SD 1.x/2.x, the original layout for SDXL."""
    if sdxl_unet_config is None:
        return lambda module: module
    from studio.single_file import ldm_unet_module

    return lambda module: ldm_unet_module(module, sdxl_unet_config)


def _te_path(module: str) -> str:
    """A text-encoder module path in the classic ``text_model.`` layout kohya uses."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def _split_peft_key(key: str) -> tuple[str, str]:
    """'a.b.to_q.lora_A.weight' -> ('a.b.to_q', 'down'); lora_B -> 'up'."""
    for marker, kind in ((".lora_A.", "down"), (".lora_B.", "up")):
        if marker in key and key.endswith(".weight"):  # '.lora_A.weight' or '.lora_A.<adapter>.weight'
            return key.split(marker)[0], kind
    raise ValueError(f"not a LoRA A/B weight: {key}")


def peft_to_kohya(unet_state: dict[str, torch.Tensor], text_encoder_state: dict[str, torch.Tensor] | None,
                  alpha: float, sdxl_unet_config: dict | None = None) -> dict[str, torch.Tensor]:
    """Convert peft LoRA state dicts (``get_peft_model_state_dict``) to the kohya/A1111 layout.

    Args:
        unet_state: UNet LoRA weights, keys like ``down_blocks.0...attn1.to_q.lora_A.weight``.
        text_encoder_state: Text-encoder LoRA weights (keys with or without ``text_model.``), or None.
        alpha: The LoRA alpha used in training (kohya stores it per module; scale = alpha / rank).
        sdxl_unet_config: For SDXL, the UNet config: kohya names SDXL UNet modules in the original
            layout (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``).

    Returns:
        ``{"lora_unet_down_blocks_0_..._to_q.lora_down.weight": A, "...lora_up.weight": B, "....alpha": alpha}``.
    """
    out: dict[str, torch.Tensor] = {}
    unet_path = _unet_path(sdxl_unet_config)
    parts = [(UNET_PREFIX, unet_state, unet_path)]
    if text_encoder_state:
        parts.append((TEXT_ENCODER_PREFIX, text_encoder_state, _te_path))
    for prefix, state, to_path in parts:
        for key, tensor in state.items():
            module, kind = _split_peft_key(key)
            flat = prefix + to_path(module).replace(".", "_")
            out[f"{flat}.lora_{kind}.weight"] = tensor.detach().contiguous().cpu()
            out[f"{flat}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_to_peft(state: dict[str, torch.Tensor], unet_modules: Iterable[str],
                  text_encoder_modules: Iterable[str] = (), sdxl_unet_config: dict | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Convert a kohya/A1111 LoRA back to peft state dicts for a given model.

    Kohya flattens module paths with underscores, which module names themselves contain
    (``down_blocks``, ``to_q``), so the names of the target model's modules resolve the
    ambiguity.

    Args:
        state: The kohya-layout tensors.
        unet_modules: ``name for name, _ in unet.named_modules()``.
        text_encoder_modules: The same for the text encoder (either naming).
        sdxl_unet_config: For SDXL, the UNet config (its kohya names use the original layout).

    Returns:
        (unet peft state, text-encoder peft state, alpha per peft module path).

    Raises:
        ValueError: for a key that names no module of the model.
    """
    unet_path = _unet_path(sdxl_unet_config)
    unet_map = {}
    for m in unet_modules:
        if not m:
            continue
        try:
            unet_map[UNET_PREFIX + unet_path(m).replace(".", "_")] = ("unet", m)
        except Exception:  # containers (e.g. 'down_blocks') have no place of their own in the original layout
            continue
    te_map = {TEXT_ENCODER_PREFIX + _te_path(m).replace(".", "_"): ("te", m) for m in text_encoder_modules if m}
    lookup = {**unet_map, **te_map}
    unet_state: dict[str, torch.Tensor] = {}
    te_state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, tensor in state.items():
        flat, _, suffix = key.partition(".")
        if flat not in lookup:
            raise ValueError(f"{flat} names no module of this model")
        target, module = lookup[flat]
        if suffix == "alpha":
            alphas[f"{target}:{module}"] = float(tensor)
            continue
        kind = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B"}.get(suffix)
        if kind is None:
            raise ValueError(f"unsupported kohya tensor {key}")
        (unet_state if target == "unet" else te_state)[f"{module}.{kind}.weight"] = tensor
    return unet_state, te_state, alphas


def save_kohya(path: str | Path, unet_state: dict[str, torch.Tensor],
               text_encoder_state: dict[str, torch.Tensor] | None, alpha: float, rank: int,
               metadata: dict[str, str] | None = None, sdxl_unet_config: dict | None = None) -> Path:
    """Write one kohya/A1111 ``.safetensors`` with the usual ``ss_*`` header fields."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl_unet_config else "sd_v1",
        "ss_output_name": path.stem,
        "modelspec.architecture": ("stable-diffusion-xl-v1-base/lora" if sdxl_unet_config
                                   else "stable-diffusion-v1/lora"),
        **{k: str(v) for k, v in (metadata or {}).items()},
    }
    save_file(peft_to_kohya(unet_state, text_encoder_state, alpha, sdxl_unet_config), str(path), metadata=header)
    return path


def save_lora(folder: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
              kohya_name: str = "lora-kohya.safetensors", metadata: dict[str, str] | None = None,
              sdxl: bool = False) -> Path:
    """Write a run's LoRA: diffusers' file and a kohya/A1111 file, from models with peft adapters.

    Args:
        folder: Output folder (``run/lora``).
        unet: The UNet with a "default" LoRA adapter.
        text_encoder: The text encoder with a LoRA adapter, or None.
        kohya_name: File name of the kohya-layout copy.
        metadata: Extra header fields for the kohya file (base model, trigger words).
        sdxl: The UNet is SDXL's (diffusers' SDXL loader; kohya's original-layout names).

    Returns:
        The folder.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from studio.transformers_compat import hub_lora_text_encoder_keys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet_state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    unet_config = unet.peft_config["default"]
    te_state = None
    te_meta = None
    if text_encoder is not None:
        te_state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(text_encoder).items()}
        te_meta = _peft_metadata(text_encoder.peft_config["default"])
    (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(dict(unet_state)),
        # the text encoder's keys as Hub LoRAs have them (text_model.*): transformers 4.x and 5 both load that
        text_encoder_lora_layers=hub_lora_text_encoder_keys(convert_state_dict_to_diffusers(dict(te_state)))
        if te_state else None,
        weight_name=DIFFUSERS_WEIGHT_NAME,
        safe_serialization=True,
        unet_lora_adapter_metadata=_peft_metadata(unet_config),
        text_encoder_lora_adapter_metadata=te_meta,
    )
    save_kohya(folder / kohya_name, unet_state, te_state, alpha=float(unet_config.lora_alpha),
               rank=int(unet_config.r), metadata=metadata, sdxl_unet_config=dict(unet.config) if sdxl else None)
    return folder


def _peft_metadata(config) -> dict:
    """A LoraConfig as JSON-able metadata: rank, alpha, targets and what differs from peft's defaults.

    diffusers rebuilds the config as ``LoraConfig(**metadata)``; fields a newer peft added (at their
    defaults here) would make an older peft refuse the file, so only settings that matter are kept.
    """
    from peft import LoraConfig

    data = config.to_dict()
    defaults = LoraConfig().to_dict()
    skip = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}
    kept = {k: v for k, v in data.items()
            if k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
            or (k not in skip and v != defaults.get(k))}
    return json.loads(json.dumps(kept, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def load_kohya(path: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
               sdxl: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Read a kohya/A1111 LoRA file back into peft state dicts for ``unet`` (and ``text_encoder``)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    te_modules = [n for n, _ in text_encoder.named_modules()] if text_encoder is not None else []
    return kohya_to_peft(state, [n for n, _ in unet.named_modules()], te_modules,
                         dict(unet.config) if sdxl else None)
