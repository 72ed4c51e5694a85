"""A diffusers Stable Diffusion 1.x pipeline as one original-layout ``.safetensors`` checkpoint.

AUTOMATIC1111, ComfyUI and kohya's scripts load SD models as one file in the original
(CompVis / LDM) key layout: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(VAE) and ``cond_stage_model.transformer.text_model.*`` (CLIP). diffusers reads such
files (``from_single_file``) but ships no writer, so this module inverts its reader,
deriving the block numbering from the UNet config (``layers_per_block``, the number of
blocks, which blocks have attention) instead of hard-coding SD 1.5's sizes.

SD 2.x uses an OpenCLIP text encoder with a different layout; it is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from studio.errors import ModelError

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _resnet(rest: str) -> str:
    for new, old in _UNET_RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights -> ``model.diffusion_model.*`` keys."""
    per = int(config["layers_per_block"]) + 1
    up_attention = {i: "CrossAttn" in t for i, t in enumerate(config["up_block_types"])}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        head = ".".join(parts[:2])
        if head in _UNET_FIXED:
            new = f"{_UNET_FIXED[head]}.{'.'.join(parts[2:])}"
        elif parts[0] in _UNET_FIXED:
            new = f"{_UNET_FIXED[parts[0]]}.{'.'.join(parts[1:])}"
        elif parts[0] == "down_blocks":
            block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + block * per + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + block * per + j}.1.{rest}"
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{(block + 1) * per}.0.op.{'.'.join(parts[5:])}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{block * per + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{block * per + j}.1.{rest}"
            else:  # upsamplers.0.conv.*
                slot = 2 if up_attention[block] else 1
                new = f"output_blocks.{block * per + per - 1}.{slot}.{'.'.join(parts[4:])}"
        else:
            raise ModelError(f"The UNet weight {key} has no place in the original SD layout.",
                             "Single-file export covers standard SD 1.x UNets.")
        out["model.diffusion_model." + new] = tensor
    return out


def ldm_unet_module(path: str, config: dict[str, Any]) -> str:
    """A diffusers UNet module path in the original layout ('down_blocks.1.attentions.0...' ->
    'input_blocks.4.1...'), as kohya names SDXL LoRA modules."""
    key = next(iter(unet_to_ldm({path + ".weight": None}, config)))
    return key[len("model.diffusion_model."):-len(".weight")]


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights -> ``first_stage_model.*`` keys (attention as 1x1 convolutions)."""
    blocks = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            out["first_stage_model." + key] = tensor
            continue
        name, rest = parts[1], parts[2:]
        if name in _VAE_FIXED or name in ("conv_in", "conv_out"):
            new = f"{side}.{_VAE_FIXED.get(name, name)}.{'.'.join(rest)}"
        elif name in ("down_blocks", "up_blocks"):
            i = int(rest[0])
            ldm_i = i if name == "down_blocks" else blocks - 1 - i
            stem = "down" if name == "down_blocks" else "up"
            if rest[1] == "resnets":
                tail = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{stem}.{ldm_i}.block.{rest[2]}.{tail}"
            else:  # downsamplers.0.conv.* / upsamplers.0.conv.*
                sampler = "downsample" if name == "down_blocks" else "upsample"
                new = f"{side}.{stem}.{ldm_i}.{sampler}.{'.'.join(rest[3:])}"
        elif name == "mid_block":
            if rest[0] == "resnets":
                tail = ".".join(rest[2:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.mid.block_{int(rest[1]) + 1}.{tail}"
            else:
                tail = ".".join(rest[2:])
                for diffusers_name, ldm_name in _VAE_ATTENTION:
                    if tail.startswith(diffusers_name + "."):
                        tail = ldm_name + tail[len(diffusers_name):]
                        break
                new = f"{side}.mid.attn_1.{tail}"
                if tensor.ndim == 2:  # linear in diffusers, 1x1 conv in the original
                    tensor = tensor[:, :, None, None]
        else:
            raise ModelError(f"The VAE weight {key} has no place in the original SD layout.")
        out["first_stage_model." + new] = tensor
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights -> ``cond_stage_model.transformer.text_model.*`` (transformers 4 naming)."""
    out = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        out["cond_stage_model.transformer." + key] = tensor
    return out


def save_single_file(pipe: Any, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``pipe`` (an SD 1.x pipeline) as one original-layout ``.safetensors`` file.

    Args:
        pipe: A StableDiffusionPipeline (CLIP text encoder, UNet2DConditionModel, AutoencoderKL).
        path: The file to write.
        dtype: Storage dtype (fp16 halves the size; the usual choice for shared checkpoints).

    Raises:
        ModelError: for a text encoder that is not OpenAI CLIP (SD 2.x) or a non-standard UNet.
    """
    from safetensors.torch import save_file

    if type(pipe.text_encoder).__name__ != "CLIPTextModel" or pipe.unet.config.cross_attention_dim not in (
            pipe.text_encoder.config.hidden_size,):
        raise ModelError("Single-file export covers SD 1.x pipelines (CLIP text encoder).",
                         "Use the diffusers folder in model/ for this model.")
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    tensors.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    tensors.update(text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "modelspec.architecture": "stable-diffusion-v1"})
    return path
