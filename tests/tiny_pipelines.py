"""Tiny diffusers pipelines for offline tests, built from configs in well under a second.

Builders save a pipeline with ``save_pretrained`` (safetensors) into a folder and return
the folder, so tests load it by path through the same code that handles Hub ids:

    make_tiny_sd(path)      StableDiffusionPipeline: tiny UNet2DConditionModel, AutoencoderKL,
                            CLIPTextModel and a CLIPTokenizer built from a small vocab written here
    make_tiny_ddpm(path)    DDPMPipeline: tiny UNet2DModel + DDPMScheduler

Session-scoped fixtures (``from tiny_pipelines import tiny_sd, tiny_ddpm``) build each once.

transformers 5 saves only ``tokenizer.json``, and ``CLIPTokenizer.from_pretrained`` on an id
that is not cached returns an empty two-token tokenizer instead of raising, so
``TINY_VOCAB_SIZE`` is exported for tests (and studio.models) to check the loaded tokenizer.
"""

from __future__ import annotations

import functools

import string
from pathlib import Path

import pytest

#: Characters of the tiny byte-pair vocabulary (lower-case text prompts tokenize fully).
_CHARS = list(string.ascii_lowercase + string.digits + ".,!?'-")
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>")]



def _model_init_locked(build):
    """Build under the studio's model-construction lock: an app thread loading a pipeline
    (diffusers patches module construction process-wide) must not hand us meta tensors."""

    @functools.wraps(build)
    def locked(*args, **kwargs):
        from studio.devices import MODEL_INIT_LOCK

        with MODEL_INIT_LOCK:
            return build(*args, **kwargs)

    return locked


def _tiny_vocab() -> dict[str, int]:
    """Special tokens, each character alone and word-final, and the merged pairs."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
    for c in _CHARS:
        vocab[c + "</w>"] = len(vocab)
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    return vocab


#: Number of tokens of the tiny tokenizer (what a correct load must report).
TINY_VOCAB_SIZE = len(_tiny_vocab())


def make_tiny_tokenizer():
    """A CLIPTokenizer over the tiny vocabulary (max length 77 like real SD)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_tiny_vocab(), merges=list(_MERGES), model_max_length=77)


@_model_init_locked
def make_tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """Build (not save) a tiny StableDiffusionPipeline with random weights.

    Args:
        prediction_type: "epsilon" (default) or "v_prediction" for the scheduler config.
        seed: torch seed for the random weights (same seed -> same weights).

    Returns:
        A StableDiffusionPipeline on CPU in float32; 8x8 latents, 16x16 images by default.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
    )
    tokenizer = make_tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=TINY_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def make_tiny_sd(path: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny StableDiffusionPipeline (safetensors) into ``path`` and return it.

    Args:
        path: Folder to create (parents too) and fill with the diffusers layout.
        prediction_type: "epsilon" (default) or "v_prediction".
        seed: Seed of the random weights.

    Returns:
        The folder, which holds model_index.json and one subfolder per component.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tiny_sd_pipeline(prediction_type=prediction_type, seed=seed).save_pretrained(
        path, safe_serialization=True
    )
    return path


@_model_init_locked
def make_tiny_ddpm_pipeline(seed: int = 0):
    """Build (not save) a tiny DDPMPipeline: UNet2DModel (8, 16) channels, 8x8 RGB samples."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    return DDPMPipeline(unet=unet, scheduler=scheduler)


def make_tiny_ddpm(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny DDPMPipeline (safetensors) into ``path`` and return it.

    Args:
        path: Folder to create (parents too) and fill with the diffusers layout.
        seed: Seed of the random weights.

    Returns:
        The folder, which holds model_index.json, unet/ and scheduler/.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tiny_ddpm_pipeline(seed=seed).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny StableDiffusionPipeline folder, built once per test session."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """A tiny v-prediction StableDiffusionPipeline folder, built once per test session."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v") / "pipeline", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_ddpm(tmp_path_factory) -> Path:
    """A tiny DDPMPipeline folder, built once per test session."""
    return make_tiny_ddpm(tmp_path_factory.mktemp("tiny-ddpm") / "pipeline")


@_model_init_locked
def make_tiny_lora(pipeline_path: str | Path, out_dir: str | Path, seed: int = 0, rank: int = 4) -> Path:
    """Save random (non-zero) LoRA weights for a tiny SD pipeline's UNet; return the file.

    The LoRA is made with peft on the UNet's attention projections and saved with
    ``StableDiffusionPipeline.save_lora_weights`` (diffusers' own layout), so loading
    it changes the pipeline's output.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_path) / "unet", use_safetensors=True)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank * 4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
    return out_dir / "pytorch_lora_weights.safetensors"


# --------------------------------------------------------------------------- a bundled text-to-image model
@_model_init_locked
def make_small_sd(path: str | Path, seed: int = 0) -> Path:
    """A random-weight pipeline built by ``studio.small_sd`` (the code that builds the bundled emoji SD), tiny.

    The same layout as ``assets/models/emoji-sd``: a caption-learnt CLIP tokenizer saved in
    both formats, a VAE that halves the image, cross-attention on the last UNet level only
    and no middle block, v-prediction, a VAE ``scaling_factor`` of its own. 16 px images.
    """
    import torch

    from studio import small_sd

    torch.manual_seed(seed)
    spec = small_sd.SmallSDSpec(resolution=16, vocab_size=600, text_width=32, text_layers=1, text_heads=2,
                                vae_channels=(8, 16), unet_channels=(32, 64), unet_cross_attention=(False, True),
                                unet_head_dim=16)
    path = Path(path)
    captions = ["red heart", "yellow smiling face", "flag of france", "blue circle", "a red apple"] * 3
    tokenizer = small_sd.train_tokenizer(captions, path / "tokenizer", vocab_size=spec.vocab_size)
    vae = small_sd.build_vae(spec)
    vae.register_to_config(scaling_factor=1.5)
    pipe = small_sd.build_pipeline(vae, small_sd.build_text_encoder(spec, tokenizer), tokenizer,
                                   small_sd.build_unet(spec), spec.prediction_type)
    small_sd.save_pipeline(pipe, path)
    return path


@pytest.fixture(scope="session")
def tiny_sd_stand_in(tmp_path_factory) -> Path:
    """A tiny pipeline in the bundled emoji SD's layout (``.../models/emoji-sd``), built once."""
    return make_small_sd(tmp_path_factory.mktemp("models") / "emoji-sd")


@pytest.fixture
def bundled_sd(monkeypatch, tiny_sd_stand_in) -> str:
    """``bundled:emoji-sd``: the real bundled emoji SD when it ships, else a tiny SD registered in its place.

    The stand-in goes into ``studio.bundled.BUNDLED_MODELS`` for this test only, so every
    code path (Generate's list, Fine-tune's default, ``resolve_reference``) treats it as
    the bundled model it stands for.
    """
    from dataclasses import dataclass

    from studio import bundled

    if real_bundled_sd():
        return "bundled:emoji-sd"

    @dataclass(frozen=True)
    class StandIn(bundled.BundledModel):
        folder: str = ""

        @property
        def path(self) -> Path:
            return Path(self.folder)

    stand_in = StandIn("emoji-sd", "sd", "tiny stand-in for the bundled emoji SD", folder=str(tiny_sd_stand_in))
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "emoji-sd", stand_in)
    return stand_in.reference


def real_bundled_sd() -> bool:
    """True when the bundled emoji SD itself (not the tiny stand-in) is in assets/models."""
    from studio import bundled

    real = bundled.find_bundled("emoji-sd")
    return real is not None and real.path == bundled.MODELS_DIR / "emoji-sd" and (real.path / "unet").is_dir()
