"""The parts of a small Stable Diffusion built from scratch on a captioned dataset.

Everything here is the standard ``StableDiffusionPipeline`` layout, just small, so a
trained model loads with plain ``diffusers.StableDiffusionPipeline.from_pretrained``:

- ``train_tokenizer(captions)``: a ``CLIPTokenizer`` whose byte-pair vocabulary is
  learnt from the captions with the ``tokenizers`` library (CLIP's normaliser,
  pre-tokeniser and ``</w>`` end-of-word suffix; every byte is in the vocabulary, so
  any prompt tokenizes). ``save_tokenizer`` writes ``tokenizer.json`` (transformers 5)
  *and* ``vocab.json`` + ``merges.txt`` (the files transformers 4.x's slow
  ``CLIPTokenizer`` reads).
- ``build_text_encoder``: a small ``CLIPTextModel`` (trained jointly with the UNet).
- ``build_vae``: a small ``AutoencoderKL`` with two blocks (scale factor 2: 32 px images
  become 16x16x4 latents), trained first on the same images by ``vae_loss``.
- ``build_unet``: a ``UNet2DConditionModel`` with cross-attention to the text encoder.
- ``train_scheduler`` / ``inference_scheduler``: a ``DDPMScheduler`` and a
  ``PNDMScheduler`` with Stable Diffusion's configuration (scaled-linear betas
  0.00085-0.012, 1000 steps, steps_offset 1), epsilon or v-prediction.
- ``encode_prompts``: tokenize (padded to the model length, as the pipeline does) and
  encode; ``drop_captions``: classifier-free-guidance caption dropout.

No trainer machinery lives here; ``SmallSDSpec`` holds the sizes (JSON-friendly).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

#: CLIP's special tokens (the pipeline pads with the end token, as SD does).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: CLIP's pre-tokenisation pattern (words, single digits, runs of punctuation).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
#: Files a saved tokenizer folder holds (both transformers 4.x and 5.x read one of them).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


@dataclass
class SmallSDSpec:
    """Sizes of the small Stable Diffusion (all JSON-friendly; ``config.json`` records them).

    Attributes:
        resolution: Image side in pixels (the VAE halves it: latents are resolution / 2).
        vocab_size: Target vocabulary size of the caption tokenizer (bytes + merges + 2 specials).
        max_length: Tokens per prompt (the model length the pipeline pads to).
        text_width: Hidden size of the text encoder (= the UNet's cross-attention dim).
        text_layers: Transformer layers of the text encoder.
        text_heads: Attention heads of the text encoder.
        vae_channels: Channels of the VAE's two blocks.
        latent_channels: Latent channels (4, like SD).
        unet_channels: Channels of the UNet's levels.
        unet_cross_attention: Which UNet levels have cross-attention (True/False per level).
        unet_head_dim: Channels per attention head in the UNet.
        unet_layers: ResNet layers per UNet level.
        prediction_type: "epsilon" or "v_prediction".
    """

    resolution: int = 32
    vocab_size: int = 1024
    max_length: int = 77
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    vae_channels: tuple[int, int] = (16, 32)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_cross_attention: tuple[bool, ...] = (True, True, False)
    unet_head_dim: int = 32
    unet_layers: int = 1
    prediction_type: str = "v_prediction"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, cfg: Any) -> "SmallSDSpec":
        """The sizes a ``TextToImageConfig`` asks for."""
        return cls(resolution=cfg.resolution, vocab_size=cfg.vocab_size, max_length=cfg.max_length,
                   text_width=cfg.text_width, text_layers=cfg.text_layers, text_heads=cfg.text_heads,
                   vae_channels=tuple(cfg.vae_channels), unet_channels=tuple(cfg.unet_channels),
                   unet_cross_attention=tuple(cfg.unet_cross_attention), unet_head_dim=cfg.unet_head_dim,
                   prediction_type=cfg.prediction_type)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2


# ----------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    """A ``tokenizers.Tokenizer`` set up exactly as transformers' fast CLIP tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def learn_merges(captions: Iterable[str], vocab_size: int) -> list[tuple[str, str]]:
    """Byte-pair merges learnt from ``captions`` by ``tokenizers``' BPE trainer (CLIP's pre-tokenisation).

    The vocabulary is then every byte, every byte ending a word, one token per merge and the
    two specials, so ``vocab_size`` allows ``vocab_size - 514`` merges.
    """
    from tokenizers import Tokenizer, trainers
    from tokenizers.models import BPE

    alphabet = sorted(_bytes_to_unicode().values())
    tok = _clip_backend({}, [])
    tok.model = BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS)
    # The trainer counts the alphabet twice (plain and word-final) only as seen; size it for merges alone.
    seen = set()
    texts = [str(c) for c in captions]
    for text in texts:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            seen.update(word[:-1])
            seen.add(word[-1] + "</w>")
    wanted_merges = max(0, vocab_size - 2 * len(alphabet) - 2)
    trainer = trainers.BpeTrainer(vocab_size=len(seen) + wanted_merges + 2, min_frequency=2, show_progress=False,
                                  special_tokens=[BOS, EOS], initial_alphabet=[],
                                  continuing_subword_prefix="", end_of_word_suffix="</w>")
    tok.train_from_iterator(texts, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    return [(a, b) for a, b in pairs][:wanted_merges]


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + ``</w>``, one token per merge, then the two specials."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab


def write_tokenizer(vocab: dict[str, int], merges: Sequence[tuple[str, str]], folder: str | Path,
                    max_length: int = 77) -> Path:
    """Write a CLIP tokenizer folder that transformers 5 (``tokenizer.json``) and 4.x (``vocab.json`` +
    ``merges.txt``, its slow ``CLIPTokenizer``) both load with ``CLIPTokenizer.from_pretrained``."""
    from tokenizers import processors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = _clip_backend(dict(vocab), list(merges))
    backend.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),
                                                          trim_offsets=False, add_prefix_space=False)
    backend.save(str(folder / "tokenizer.json"))
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (folder / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True, "errors": "replace",
              "clean_up_tokenization_spaces": False, "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2), encoding="utf-8")
    return folder


def load_tokenizer(folder: str | Path) -> Any:
    """``CLIPTokenizer.from_pretrained(folder)`` (a folder ``write_tokenizer`` or ``save_tokenizer`` wrote)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def train_tokenizer(captions: Iterable[str], folder: str | Path, vocab_size: int = 1024, max_length: int = 77) -> Any:
    """A ``CLIPTokenizer`` whose vocabulary is learnt from ``captions``, written to ``folder`` and loaded back."""
    merges = learn_merges(captions, vocab_size)
    return load_tokenizer(write_tokenizer(clip_vocab(merges), merges, folder, max_length))


def tokenizer_merges(tokenizer: Any) -> list[tuple[str, str]]:
    """The merges of a CLIP tokenizer (fast backend or 4.x slow), in rank order."""
    if hasattr(tokenizer, "bpe_ranks"):
        return [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def save_tokenizer(tokenizer: Any, folder: str | Path) -> Path:
    """Save ``tokenizer`` in both formats (see ``write_tokenizer``); replaces what ``save_pretrained`` wrote."""
    return write_tokenizer(tokenizer.get_vocab(), tokenizer_merges(tokenizer), folder, tokenizer.model_max_length)


# ----------------------------------------------------------------------------- models
def build_text_encoder(spec: SmallSDSpec, tokenizer: Any) -> Any:
    """A small ``CLIPTextModel`` for ``tokenizer`` (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    return CLIPTextModel(CLIPTextConfig(**text_encoder_kwargs(spec, len(vocab), vocab[BOS], vocab[EOS])))


def text_encoder_kwargs(spec: SmallSDSpec, vocab_size: int, bos: int = 0, eos: int = 1) -> dict[str, Any]:
    """The ``CLIPTextConfig`` arguments of the text encoder (also what ``studio.budget`` simulates)."""
    return dict(vocab_size=int(vocab_size), hidden_size=spec.text_width, intermediate_size=4 * spec.text_width,
                num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                max_position_embeddings=spec.max_length, projection_dim=spec.text_width,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 as SD, fewer for narrow layers (at least 2 channels per group)."""
    return max(g for g in (1, 2, 4, 8, 16, 32) if channels % g == 0 and channels // g >= 2)


def build_vae(spec: SmallSDSpec) -> Any:
    """A small ``AutoencoderKL``: two blocks, so latents are half the image size; no attention in its
    middle block (at 16x16 it cost a third of the VAE's training time and emoji do not need it)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_kwargs(spec))


def vae_kwargs(spec: SmallSDSpec) -> dict[str, Any]:
    """The ``AutoencoderKL`` arguments of ``build_vae``."""
    c = tuple(spec.vae_channels)
    return dict(sample_size=spec.resolution, in_channels=3, out_channels=3, block_out_channels=c,
                down_block_types=("DownEncoderBlock2D",) * len(c), up_block_types=("UpDecoderBlock2D",) * len(c),
                latent_channels=spec.latent_channels, layers_per_block=1, norm_num_groups=_groups(c[0]),
                mid_block_add_attention=False)


def build_unet(spec: SmallSDSpec) -> Any:
    """A ``UNet2DConditionModel`` with cross-attention (to the text encoder) at the chosen levels."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_kwargs(spec))


def unet_kwargs(spec: SmallSDSpec) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` arguments of ``build_unet``."""
    channels = tuple(spec.unet_channels)
    attn = tuple(spec.unet_cross_attention)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    heads = tuple(max(1, c // spec.unet_head_dim) for c in channels)
    return dict(sample_size=spec.latent_size, in_channels=spec.latent_channels,
                out_channels=spec.latent_channels, layers_per_block=spec.unet_layers,
                block_out_channels=channels, down_block_types=down, up_block_types=up,
                mid_block_type="UNetMidBlock2DCrossAttn" if attn[-1] else None,
                cross_attention_dim=spec.text_width, attention_head_dim=heads,
                norm_num_groups=_groups(channels[0]))


class _FullVocabulary:
    """Stands in for a tokenizer whose vocabulary reached ``spec.vocab_size`` (for counting parameters)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_vocab(self) -> dict[str, int]:
        return {BOS: 0, EOS: 1, **{f"t{i}": i for i in range(2, self.size)}}


def parameter_counts(spec: SmallSDSpec) -> dict[str, int]:
    """Parameters of the autoencoder, the text encoder (with the whole ``vocab_size``: a vocabulary
    learnt from few captions can stay smaller) and the UNet, built on torch's ``meta`` device (no memory)."""
    with torch.device("meta"):
        parts = {"autoencoder": build_vae(spec), "text encoder": build_text_encoder(spec, _FullVocabulary(
            spec.vocab_size)), "UNet": build_unet(spec)}
    return {name: sum(p.numel() for p in model.parameters()) for name, model in parts.items()}


def _sd_schedule(prediction_type: str) -> dict[str, Any]:
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "prediction_type": prediction_type}


def train_scheduler(prediction_type: str) -> Any:
    """The training noise schedule: ``DDPMScheduler`` with Stable Diffusion's configuration."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(clip_sample=False, **_sd_schedule(prediction_type))


def inference_scheduler(prediction_type: str) -> Any:
    """The pipeline's scheduler: ``PNDMScheduler`` as in Stable Diffusion 1.x (PLMS, no Runge-Kutta steps)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **_sd_schedule(prediction_type))


# ----------------------------------------------------------------------------- training helpers
def drop_captions(captions: Sequence[str], probability: float, generator: torch.Generator) -> list[str]:
    """Each caption replaced by "" with ``probability`` (classifier-free guidance's unconditional case)."""
    if probability <= 0:
        return list(captions)
    keep = torch.rand(len(captions), generator=generator) >= probability
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``[N, model_max_length]``, padded and truncated exactly as ``StableDiffusionPipeline`` does."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(text_encoder: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """The UNet's cross-attention states: the text encoder's last hidden state (no attention mask, as SD)."""
    return text_encoder(input_ids.to(text_encoder.device))[0]


def vae_loss(vae: Any, images: torch.Tensor, kl_weight: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction loss (MSE) plus a small KL term, as SD's autoencoder without the GAN; also the MSE."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample()).sample
    mse = F.mse_loss(recon, images)
    kl = posterior.kl().mean() / images[0].numel()
    return mse + kl_weight * kl, mse.detach()


@torch.no_grad()
def latent_scaling_factor(vae: Any, images: torch.Tensor, batch: int = 64) -> float:
    """1 / standard deviation of the latents of ``images`` (how SD chose 0.18215), rounded to 4 digits."""
    means = [vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)]
    return round(1.0 / float(torch.cat(means).std()), 4)


def build_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, prediction_type: str) -> Any:
    """The ``StableDiffusionPipeline`` of the parts (no safety checker: a small emoji model)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=inference_scheduler(prediction_type), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)


@torch.no_grad()
def reconstructions(vae: Any, images: torch.Tensor) -> Any:
    """``images`` (float in [-1, 1]) over their autoencoder reconstructions: uint8 ``[2N, R, R, 3]``."""
    was_training = vae.training
    vae.eval()
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    vae.train(was_training)
    return torch.cat([images, recon]).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def replace_pipeline_folder(pipeline: Any, folder: Path, card: str) -> Path:
    """Write ``pipeline`` (``save_pipeline``) and its ``README.md`` to ``folder`` atomically: into a temporary
    sibling first, then swapped in, so a kill never leaves a half-written model."""
    import os
    import shutil

    folder = Path(folder)
    tmp, old = folder.with_name(f".{folder.name}-tmp"), folder.with_name(f".{folder.name}-old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline(pipeline, tmp)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def save_pipeline(pipeline: Any, folder: str | Path) -> Path:
    """``save_pretrained`` (safetensors) plus the tokenizer files and text-encoder layout transformers 4.x needs."""
    from studio.transformers_compat import rewrite_text_encoder

    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(pipeline.tokenizer, folder / "tokenizer")
    rewrite_text_encoder(folder / "text_encoder")  # text_model.* keys: 4.x loads the encoder, not random weights
    return folder


MODEL_CARD = """---
license: other
library_name: diffusers
pipeline_tag: text-to-image
tags:
- diffusers
- stable-diffusion
- text-to-image
- diffusion-studio
---

# {name}

A small Stable Diffusion trained from scratch with Diffusion Studio (Train tab, mode
"text-to-image"): a CLIP tokenizer learnt from the captions, a CLIP text encoder and a
UNet2DConditionModel trained jointly, an AutoencoderKL trained first on the same images.

| | |
|---|---|
| dataset | {dataset} |
| resolution | {resolution} px ({latent} x {latent} x 4 latents) |
| steps | {vae_steps} autoencoder + {steps} diffusion (of {max_steps}) |
| batch size | {batch} |
| learning rate | {lr} ({schedule}, {warmup} warm-up steps); autoencoder {vae_lr} |
| prediction | {prediction}, Stable Diffusion's scaled-linear schedule, caption dropout {dropout} |
| weights | {weights} |

## Use

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{path}")
image = pipe("{prompt}", height={resolution}, width={resolution}, guidance_scale={guidance}).images[0]
```

Training configuration: `../config.json`; loss history: `../events.jsonl`. The licence of
the weights follows the licence of the training images.
"""


def model_card(name: str, cfg: dict[str, Any], step: int) -> str:
    """The ``README.md`` of an exported run (``cfg`` is the run's ``TextToImageConfig.to_dict()``)."""
    from studio.config.data import DataConfig

    vae_steps = int(cfg["vae_steps"])
    return MODEL_CARD.format(
        name=name, dataset=DataConfig.from_dict(cfg["data"]).label, resolution=cfg["resolution"],
        latent=cfg["resolution"] // 2, vae_steps=min(step, vae_steps), steps=max(0, step - vae_steps),
        max_steps=cfg["max_train_steps"], batch=cfg["train_batch_size"], lr=cfg["learning_rate"],
        schedule=cfg["lr_scheduler"], warmup=cfg["lr_warmup_steps"], vae_lr=cfg["vae_learning_rate"],
        prediction=cfg["prediction_type"], dropout=cfg["caption_dropout"],
        weights="EMA" if cfg["use_ema"] else "final", path=f"{name}/model",
        prompt=(cfg.get("validation_prompts") or ["a photo"])[0], guidance=cfg["guidance_scale"])
