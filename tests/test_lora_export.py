"""LoRA export: kohya/A1111 key names, alpha, the round trip back, and diffusers loading both files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from studio.lora_export import DIFFUSERS_WEIGHT_NAME, kohya_to_peft, load_kohya, peft_to_kohya, save_lora


@pytest.fixture
def pipe_with_lora():
    """The tiny SD pipeline with random (non-zero) LoRA adapters on the UNet and the text encoder."""
    from peft import LoraConfig, inject_adapter_in_model

    from tiny_pipelines import make_tiny_sd_pipeline

    pipe = make_tiny_sd_pipeline(seed=1)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    te_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    inject_adapter_in_model(te_config, pipe.text_encoder, adapter_name="default")
    pipe.text_encoder.peft_config = {"default": te_config}
    torch.manual_seed(5)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    return pipe


def peft_states(pipe):
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)


def test_kohya_key_names_for_unet_and_text_encoder(pipe_with_lora):
    unet_state, te_state = peft_states(pipe_with_lora)
    kohya = peft_to_kohya(unet_state, te_state, alpha=8)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= kohya.keys()
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in kohya
    te = "lora_te_text_model_encoder_layers_1_self_attn_out_proj"
    assert {f"{te}.lora_down.weight", f"{te}.lora_up.weight", f"{te}.alpha"} <= kohya.keys()
    # transformers 5 drops the text_model wrapper; kohya and A1111 still expect it
    assert not any(k.startswith(("lora_te1_", "lora_te_encoder")) for k in kohya)
    assert kohya[f"{stem}.lora_down.weight"].shape == (4, 32) and kohya[f"{stem}.lora_up.weight"].shape == (32, 4)
    assert float(kohya[f"{stem}.alpha"]) == 8.0  # the training alpha, not the rank
    assert len([k for k in kohya if k.endswith(".alpha")]) * 2 == len([k for k in kohya if k.endswith(("_down.weight", "_up.weight"))])


def test_kohya_converts_back_to_the_same_tensors(pipe_with_lora):
    unet_state, te_state = peft_states(pipe_with_lora)
    kohya = peft_to_kohya(unet_state, te_state, alpha=8)
    unet_back, te_back, alphas = kohya_to_peft(kohya, [n for n, _ in pipe_with_lora.unet.named_modules()],
                                               [n for n, _ in pipe_with_lora.text_encoder.named_modules()])
    assert unet_back.keys() == unet_state.keys() and te_back.keys() == te_state.keys()
    assert all(torch.equal(unet_back[k], unet_state[k]) for k in unet_state)
    assert all(torch.equal(te_back[k], te_state[k]) for k in te_state)
    assert set(alphas.values()) == {8.0}
    with pytest.raises(ValueError, match="names no module"):
        kohya_to_peft({"lora_unet_nowhere.lora_down.weight": torch.zeros(1)}, ["a"])


def test_save_lora_writes_files_that_diffusers_loads_identically(pipe_with_lora, tmp_path):
    from tiny_pipelines import make_tiny_sd_pipeline

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red ball", height=16, width=16, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        return torch.from_numpy(out.images)

    trained = image(pipe_with_lora)
    folder = save_lora(tmp_path / "lora", pipe_with_lora.unet, pipe_with_lora.text_encoder,
                       kohya_name="mine-kohya.safetensors", metadata={"base_model": "tiny"})
    with safe_open(str(folder / "mine-kohya.safetensors"), framework="pt") as fh:
        header = fh.metadata()
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8.0" and header["base_model"] == "tiny"
    # our own reader gives back what was trained
    unet_back, te_back, _ = load_kohya(folder / "mine-kohya.safetensors", pipe_with_lora.unet, pipe_with_lora.text_encoder)
    unet_state, te_state = peft_states(pipe_with_lora)
    assert all(torch.equal(unet_back[k], unet_state[k]) for k in unet_state)
    # diffusers reads both files into a fresh base pipeline and produces the trained images
    for weight_name in (DIFFUSERS_WEIGHT_NAME, "mine-kohya.safetensors"):
        fresh = make_tiny_sd_pipeline(seed=1)
        assert not torch.allclose(image(fresh), trained, atol=1e-4)
        fresh.load_lora_weights(str(folder), weight_name=weight_name)
        assert torch.allclose(image(fresh), trained, atol=1e-5), weight_name
    assert "lora_unet_" not in " ".join(load_file(str(folder / DIFFUSERS_WEIGHT_NAME)))


def test_single_file_export_uses_the_original_sd15_key_layout():
    """An SD-1.5-sized UNet and VAE (built on the meta device: keys and shapes, no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from studio.single_file import unet_to_ldm, vae_to_ldm

    with init_empty_weights():
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    keys = unet_to_ldm(unet.state_dict(), dict(unet.config))
    assert len(keys) == len(unet.state_dict()) == 686
    for key in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.middle_block.2.emb_layers.1.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
                "model.diffusion_model.time_embed.0.weight", "model.diffusion_model.out.2.bias"):
        assert key in keys, key
    vae_keys = vae_to_ldm(vae.state_dict(), dict(vae.config))
    assert "first_stage_model.decoder.up.3.block.0.conv1.weight" in vae_keys
    assert "first_stage_model.encoder.down.0.downsample.conv.weight" in vae_keys
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in vae_keys
    assert vae_keys["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "first_stage_model.decoder.norm_out.weight" in vae_keys


def test_sdxl_kohya_names_follow_the_original_layout():
    from studio.single_file import ldm_unet_module

    sdxl = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    assert ldm_unet_module("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", sdxl) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert ldm_unet_module("up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0", sdxl) == \
        "output_blocks.2.1.transformer_blocks.9.attn2.to_out.0"
    assert ldm_unet_module("mid_block.attentions.0.transformer_blocks.0.ff.net.2", sdxl) == \
        "middle_block.1.transformer_blocks.0.ff.net.2"
