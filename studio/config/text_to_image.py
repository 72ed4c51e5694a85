"""Settings of a text-to-image run trained from scratch (Train tab mode "text-to-image").

``python -m studio train --config x.json`` runs this when the JSON says
``"mode": "text-to-image"`` (``studio.cli``); the trainer is
``studio.trainers.text_to_image_scratch``. The model is a small Stable Diffusion in the
standard ``StableDiffusionPipeline`` layout (``studio.small_sd``): a CLIP tokenizer learnt
from the captions, a small CLIP text encoder and UNet2DConditionModel trained jointly,
and a small AutoencoderKL trained first on the same images for ``vae_steps`` steps.
Field names follow diffusers' ``train_text_to_image.py`` where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.config.base import ConfigBase, option, require, require_choice
from studio.config.data import DataConfig
from studio.config.train import LR_SCHEDULERS, MIXED_PRECISIONS, TRAIN_DEVICES, check_precision_for_device

#: The value of ``mode`` that selects this trainer in a train config.
MODE = "text-to-image"
#: The mode of a train config without one: the unconditional DDPM (``TrainConfig``).
UNCONDITIONAL = "unconditional"
#: Train modes, UI order: the unconditional DDPM and this one.
TRAIN_MODES = (UNCONDITIONAL, MODE)
#: What the UNet predicts.
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: Validation prompts when none are given: four emoji of the starting category (smileys & emotion) that differ
#: in colour and shape, so the grid shows whether the prompt steers.
DEFAULT_PROMPTS = ("red heart", "yellow smiling face", "blue heart", "pile of poo")


@dataclass
class TextToImageConfig(ConfigBase):
    """Everything a text-to-image-from-scratch run needs; JSON round trip via ``ConfigBase``."""

    mode: str = option(MODE, "Training mode: 'text-to-image' trains a small Stable Diffusion on captioned images.")
    # -- data and run folder --------------------------------------------------
    data: DataConfig = field(default_factory=DataConfig.starting, metadata={
        "help": "A captioned dataset (by default the bundled emoji set's smileys & emotion; images without a caption "
                "train as unconditional)."})
    workspace: str = option("runs", "Folder holding every run folder.")
    run_name: str = option("", "Name of the run folder; empty makes train-<date>-<time>.")
    resume: str = option("", "Continue a run: empty = new run, 'latest' = newest intact checkpoint "
                             "of the run named above (or the newest text-to-image run), or a checkpoint folder.")
    resolution: int = option(32, "Image size in pixels (the autoencoder halves it: 32 px images, 16x16 latents).")
    center_crop: bool = option(True, "Crop to a centred square before resizing (else squash).")
    random_flip: bool = option(False, "Flip images horizontally at random (off: captions may say left or right).")
    caption_dropout: float = option(0.1, "Share of captions replaced by the empty prompt, so classifier-free "
                                         "guidance works.")
    # -- model sizes ---------------------------------------------------------------
    vocab_size: int = option(2048, "Tokenizer vocabulary learnt from the captions (bytes + merges + 2 specials).")
    max_length: int = option(77, "Tokens per prompt (77 as Stable Diffusion).")
    text_width: int = option(64, "Width of the CLIP text encoder (also the UNet's cross-attention width).")
    text_layers: int = option(2, "Transformer layers of the text encoder.")
    text_heads: int = option(2, "Attention heads of the text encoder.")
    vae_channels: tuple[int, ...] = option((16, 32), "Channels of the autoencoder's two blocks.")
    unet_channels: tuple[int, ...] = option((32, 64, 64), "Channels of the UNet's levels.")
    unet_cross_attention: tuple[bool, ...] = option((False, True, True), "Cross-attention to the prompt per UNet level "
                                                         "(the lower-resolution levels are cheaper on a CPU).")
    unet_head_dim: int = option(32, "Channels per attention head in the UNet.")
    # -- autoencoder stage ---------------------------------------------------------
    vae_steps: int = option(600, "Steps training the autoencoder first (0 is refused: it starts random).")
    vae_learning_rate: float = option(2e-3, "Learning rate of the autoencoder stage (AdamW, constant).")
    # -- diffusion stage ---------------------------------------------------------------
    train_batch_size: int = option(16, "Images per step.")
    learning_rate: float = option(1e-3, "Peak learning rate of AdamW for the UNet and text encoder.")
    lr_scheduler: str = option("cosine", "Learning-rate schedule after the warm-up.")
    lr_warmup_steps: int = option(100, "Steps of linear warm-up.")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value (0 = no clipping).")
    max_train_steps: int = option(3000, "Diffusion steps (after the autoencoder's vae_steps).")
    prediction_type: str = option("v_prediction", "What the UNet predicts (v learns colour and shape sooner).")
    use_ema: bool = option(True, "Keep an EMA of the UNet and text encoder (exported and sampled).")
    ema_max_decay: float = option(0.999, "Largest EMA decay.")
    ema_power: float = option(0.75, "EMA warm-up power.")
    mixed_precision: str = option("no", "no = fp32 (the only fast choice on CPU), fp16 or bf16 on a GPU.")
    # -- outputs -------------------------------------------------------------------
    seed: int = option(0, "Seed of the weights, data order, noise and validation images.")
    validation_prompts: tuple[str, ...] = option(DEFAULT_PROMPTS, "Prompts of the validation grid (one row each).")
    images_per_prompt: int = option(4, "Validation images per prompt.")
    guidance_scale: float = option(4.0, "Classifier-free guidance of the validation images.")
    sample_inference_steps: int = option(25, "Denoising steps (PNDM) of the validation images.")
    sample_every: int = option(250, "Validation grid every N steps (0 = only at the stage ends).")
    save_every: int = option(250, "Resumable checkpoint every N steps (0 = only at the end or stop).")
    checkpoints_total_limit: int = option(2, "Checkpoints kept.")
    device: str = option("auto", "auto, cpu, cuda or mps.")

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig.from_dict(self.data)
        require(isinstance(self.data, DataConfig), "data must be a dataset description (DataConfig).")
        require(self.mode == MODE, f"mode must be '{MODE}' for this config (got {self.mode!r}).")
        require(bool(str(self.workspace).strip()), "Workspace folder is empty: give the folder that holds runs.")
        self.workspace = str(self.workspace)
        if self.run_name:
            from studio.runs import check_run_name

            check_run_name(self.run_name)
        self.resume = (self.resume or "").strip()
        for name in ("vae_channels", "unet_channels", "unet_cross_attention", "validation_prompts"):
            setattr(self, name, tuple(getattr(self, name)))
        _whole(self.resolution, "Resolution", 8)
        require(self.resolution % (2 * 2 ** (len(self.unet_channels) - 1)) == 0,
                f"Resolution {self.resolution} must be divisible by {2 * 2 ** (len(self.unet_channels) - 1)} "
                f"(the autoencoder halves it, the UNet halves it {len(self.unet_channels) - 1} more times).")
        require(_number(self.caption_dropout) and 0 <= self.caption_dropout < 1, "caption_dropout must be in [0, 1).")
        _whole(self.vocab_size, "vocab_size", 600)
        _whole(self.max_length, "max_length", 8)
        _whole(self.text_width, "text_width", 8)
        _whole(self.text_layers, "text_layers", 1)
        _whole(self.text_heads, "text_heads", 1)
        require(self.text_width % self.text_heads == 0, "text_width must be a multiple of text_heads.")
        require(len(self.vae_channels) == 2 and all(isinstance(c, int) and c >= 4 for c in self.vae_channels),
                "vae_channels needs two whole numbers >= 4 (the autoencoder has two blocks).")
        require(len(self.unet_channels) >= 1 and all(isinstance(c, int) and c >= 8 for c in self.unet_channels),
                "unet_channels needs whole numbers >= 8, one per level.")
        require(len(self.unet_cross_attention) == len(self.unet_channels),
                "unet_cross_attention needs one true/false per UNet level.")
        require(any(self.unet_cross_attention), "At least one UNet level needs cross-attention to follow prompts.")
        _whole(self.unet_head_dim, "unet_head_dim", 1)
        _whole(self.vae_steps, "vae_steps", 1)
        _whole(self.train_batch_size, "Batch size (train_batch_size)", 1)
        _whole(self.max_train_steps, "Training steps (max_train_steps)", 1)
        _whole(self.lr_warmup_steps, "Warm-up steps", 0)
        for name in ("learning_rate", "vae_learning_rate"):
            require(_number(getattr(self, name)) and getattr(self, name) > 0, f"{name} must be a number above 0.")
        require(_number(self.adam_weight_decay) and self.adam_weight_decay >= 0, "adam_weight_decay must be >= 0.")
        require(_number(self.max_grad_norm) and self.max_grad_norm >= 0, "max_grad_norm must be >= 0.")
        require_choice(self.lr_scheduler, LR_SCHEDULERS, "LR schedule (lr_scheduler)")
        require_choice(self.prediction_type, PREDICTION_TYPES, "prediction_type")
        require(_number(self.ema_max_decay) and 0 < self.ema_max_decay < 1, "ema_max_decay must be between 0 and 1.")
        require(_number(self.ema_power) and self.ema_power > 0, "ema_power must be above 0.")
        require_choice(self.mixed_precision, MIXED_PRECISIONS, "Mixed precision")
        require_choice(self.device, TRAIN_DEVICES, "Device")
        check_precision_for_device(self.mixed_precision, self.device)
        _whole(self.seed, "Seed", 0)
        require(1 <= len(self.validation_prompts) <= 8 and all(isinstance(p, str) for p in self.validation_prompts),
                "Give 1 to 8 validation prompts.")
        _whole(self.images_per_prompt, "images_per_prompt", 1)
        require(self.images_per_prompt <= 16, "At most 16 validation images per prompt.")
        require(_number(self.guidance_scale) and self.guidance_scale >= 1, "guidance_scale must be >= 1.")
        _whole(self.sample_inference_steps, "Sample denoising steps", 1)
        _whole(self.sample_every, "sample_every", 0)
        _whole(self.save_every, "save_every", 0)
        _whole(self.checkpoints_total_limit, "checkpoints_total_limit", 1)

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: the autoencoder's, then the diffusion model's."""
        return self.vae_steps + self.max_train_steps


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: object, label: str, minimum: int) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
            f"{label} must be a whole number >= {minimum} (got {value!r}).")
