"""Settings of a Stable Diffusion fine-tune: full UNet, LoRA or DreamBooth.

Field names follow diffusers' ``train_text_to_image(_lora).py`` and
``train_dreambooth(_lora).py`` arguments (``pretrained_model_name_or_path``, ``rank``,
``learning_rate``, ``lr_scheduler``, ``snr_gamma``...), so a person who knows those
scripts recognises every option. The module is torch-free: the UI, the CLI and the
tests build and validate a ``FinetuneConfig`` without loading a model.

SD 1.x, 2.x and SDXL bases are covered; for SDXL only the UNet trains (no text-encoder
LoRA), and the trainer warns up front when the UNet's training state will not fit the GPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from studio.config.base import MAX_SEED, ConfigBase, option, require, require_choice
from studio.config.data import DataConfig

#: Fine-tune methods, in the order the UI offers them (LoRA is the default).
METHODS = ("lora", "full", "dreambooth-lora", "dreambooth-full")

#: What each method means, for the UI's info line and the model card.
METHOD_HELP = {
    "lora": "LoRA adapters on the UNet attention layers (small file, little memory).",
    "full": "Every UNet weight is trained (a new full pipeline; needs the most memory).",
    "dreambooth-lora": "DreamBooth: teach a subject under a rare-token instance prompt, with LoRA.",
    "dreambooth-full": "DreamBooth with the full UNet trained.",
}

#: Learning-rate schedules (diffusers.optimization.get_scheduler names).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

#: Mixed precision modes (accelerate's names). On CPU the trainer always uses fp32.
MIXED_PRECISION = ("no", "fp16", "bf16")

#: Prediction targets; "" keeps the base scheduler's own.
PREDICTION_TYPES = ("", "epsilon", "v_prediction")

#: Default LoRA target modules of the UNet (diffusers' training scripts use these).
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")

#: LoRA target modules of the CLIP text encoder when ``train_text_encoder`` is on.
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def bitsandbytes_available() -> bool:
    """True when bitsandbytes can be imported (8-bit Adam is offered only then)."""
    return importlib.util.find_spec("bitsandbytes") is not None


@dataclass
class FinetuneConfig(ConfigBase):
    """Everything one fine-tune run needs; stored as the run's ``config.json``."""

    pretrained_model_name_or_path: str = option(
        "", "Base Stable Diffusion model: Hub id, local diffusers folder, single .safetensors file or a run here.")
    data: DataConfig = field(default_factory=DataConfig,
                             metadata={"help": "The image+caption dataset (from the Dataset tab)."})
    method: str = option("lora", "lora, full, dreambooth-lora or dreambooth-full.")
    rank: int = option(4, "LoRA rank: size of the adapters (4-64; larger learns more, weighs more).")
    lora_alpha: int = option(0, "LoRA alpha (scale = alpha / rank); 0 means alpha = rank.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch during training (0-0.5).")
    lora_target_modules: tuple[str, ...] = option(
        DEFAULT_LORA_TARGETS, "UNet modules that get LoRA adapters (attention projections by default).")
    train_text_encoder: bool = option(
        False, "Also train LoRA adapters on the text encoder (SD 1.x/2.x; disables the text cache).")
    learning_rate: float = option(1e-4, "Learning rate (1e-4 for LoRA; 1e-5 to 5e-6 for full fine-tunes).")
    text_encoder_lr: float = option(0.0, "Learning rate of the text-encoder LoRA; 0 uses learning_rate.")
    lr_scheduler: str = option("constant", "Learning-rate schedule: " + ", ".join(LR_SCHEDULERS) + ".")
    lr_warmup_steps: int = option(0, "Steps of linear warm-up at the start of the schedule.")
    train_batch_size: int = option(1, "Images per step on each device.")
    gradient_accumulation_steps: int = option(1, "Add up gradients of this many batches per optimizer step.")
    max_train_steps: int = option(500, "Optimizer steps to train for.")
    mixed_precision: str = option("no", "no, fp16 or bf16 for the frozen parts on a GPU (CPU always uses fp32).")
    gradient_checkpointing: bool = option(False, "Trade compute for memory: recompute activations in backward.")
    use_8bit_adam: bool = option(False, "8-bit AdamW from bitsandbytes (CUDA only; offered when it is installed).")
    snr_gamma: float = option(0.0, "Min-SNR loss weighting gamma (5.0 is the paper's value); 0 turns it off.")
    noise_offset: float = option(0.0, "Offset noise strength (e.g. 0.05) for darker darks and brighter brights.")
    prediction_type: str = option("", "epsilon or v_prediction; empty keeps the base model scheduler's choice.")
    use_ema: bool = option(False, "Keep an exponential moving average of the UNet weights (full fine-tune only).")
    seed: int = option(0, "Seed of everything random: data order, noise, validation images.")
    resolution: int = option(512, "Training resolution in pixels (a multiple of 8; 512 for SD 1.x, 768 for SD 2.x).")
    center_crop: bool = option(True, "Center crop (cacheable); off = random crop (VAE runs every step).")
    random_flip: bool = option(False, "Randomly flip images horizontally (both orientations are cached).")
    caption_dropout: float = option(0.0, "Share of steps trained on the empty prompt (0.05-0.1 helps guidance).")
    instance_prompt: str = option(
        "", "Prompt for every image (DreamBooth, e.g. 'a photo of sks dog'), or for images without a caption.")
    class_prompt: str = option("", "DreamBooth class prompt for prior preservation, e.g. 'a photo of a dog'.")
    with_prior_preservation: bool = option(
        False, "DreamBooth: also train on class images made by the base model, so the class is not forgotten.")
    num_class_images: int = option(50, "Class images to generate for prior preservation.")
    prior_loss_weight: float = option(1.0, "Weight of the prior-preservation loss.")
    validation_prompts: tuple[str, ...] = option((), "Prompts for the validation images (fixed seed).")
    validation_every: int = option(100, "Make validation images every N steps (0 = only before and after).")
    num_inference_steps: int = option(25, "Denoising steps for validation and class images.")
    checkpoint_every: int = option(500, "Save a resumable checkpoint every N steps (0 = only at stop and end).")
    checkpoints_total_limit: int = option(2, "Keep at most this many checkpoints (older ones are deleted).")
    cache_latents: bool = option(
        True, "Encode images and captions once before training and free the VAE/text encoder (faster).")
    save_single_file: bool = option(
        False, "Full fine-tunes: also write one original-layout .safetensors (A1111/ComfyUI) of the pipeline.")
    push_to_hub: bool = option(False, "Upload the result to the Hugging Face Hub when done (needs a token).")
    hub_model_id: str = option("", "Hub repository to push to, e.g. user/my-lora.")
    resume: str = option("", "'' for a new run, 'latest', or a checkpoint folder to resume from.")
    run_name: str = option("", "Run folder name under the workspace; empty makes finetune-<time>.")
    workspace: str = option("runs", "Folder that holds the runs and the latent cache.")
    device: str = option("auto", "auto, cpu, cuda or mps.")

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig.from_dict(self.data)
        self.lora_target_modules = tuple(self.lora_target_modules)
        self.validation_prompts = tuple(p for p in (str(p).strip() for p in self.validation_prompts) if p)
        require(bool(str(self.pretrained_model_name_or_path).strip()),
                "Choose a base model: a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), "
                "a local diffusers folder, a .safetensors file or a run.")
        require_choice(self.method, METHODS, "Method")
        require_choice(self.lr_scheduler, LR_SCHEDULERS, "LR schedule")
        require_choice(self.mixed_precision, MIXED_PRECISION, "Mixed precision")
        require_choice(self.prediction_type, PREDICTION_TYPES, "Prediction type")
        require(isinstance(self.resolution, int) and self.resolution >= 8 and self.resolution % 8 == 0,
                f"Resolution must be a multiple of 8 (the VAE downsamples by 8), e.g. 512; got {self.resolution}.")
        require(self.max_train_steps >= 1, "Max train steps must be at least 1.")
        require(self.train_batch_size >= 1, "Batch size must be at least 1.")
        require(self.gradient_accumulation_steps >= 1, "Gradient accumulation steps must be at least 1.")
        require(self.learning_rate > 0, "Learning rate must be positive.")
        require(self.text_encoder_lr >= 0, "Text-encoder learning rate must be 0 (same as learning_rate) or positive.")
        require(self.lr_warmup_steps >= 0, "Warm-up steps cannot be negative.")
        require(self.snr_gamma >= 0, "SNR gamma must be 0 (off) or positive, e.g. 5.0.")
        require(self.noise_offset >= 0, "Noise offset cannot be negative.")
        require(0.0 <= self.caption_dropout < 1.0, "Caption dropout must be between 0 and 1 (e.g. 0.05).")
        require(self.validation_every >= 0 and self.checkpoint_every >= 0,
                "Validation and checkpoint intervals must be 0 (off) or positive.")
        require(self.num_inference_steps >= 1, "Validation denoising steps must be at least 1.")
        require(self.checkpoints_total_limit >= 1, "Keep at least one checkpoint.")
        require(0 <= self.seed <= MAX_SEED, f"Seed must be a whole number from 0 to {MAX_SEED} (got {self.seed}).")
        if self.is_lora:
            require(1 <= self.rank <= 1024, "LoRA rank must be between 1 and 1024 (4-64 is typical).")
            require(self.lora_alpha >= 0, "LoRA alpha must be 0 (= rank) or positive.")
            require(0.0 <= self.lora_dropout < 1.0, "LoRA dropout must be between 0 and 1.")
            require(len(self.lora_target_modules) > 0, "Name at least one LoRA target module (e.g. to_q, to_k).")
        else:
            require(not self.train_text_encoder,
                    "Text-encoder training is offered with the LoRA methods; pick lora or dreambooth-lora.")
        require(not (self.save_single_file and self.is_lora),
                "Single-file export is for full fine-tunes; a LoRA run already writes one kohya/A1111 file.")
        require(not (self.use_ema and self.is_lora),
                "EMA applies to full fine-tunes only; turn it off for LoRA (LoRA weights are small and stable).")
        if self.use_8bit_adam:
            require(bitsandbytes_available(),
                    "8-bit Adam needs bitsandbytes, which is not installed here: pip install bitsandbytes "
                    "(CUDA GPUs), or turn 8-bit Adam off.")
        if self.is_dreambooth:
            require(bool(self.instance_prompt.strip()),
                    "DreamBooth needs an instance prompt with a rare token, e.g. 'a photo of sks dog'.")
        if self.with_prior_preservation:
            require(self.is_dreambooth, "Prior preservation is part of DreamBooth: pick a dreambooth method.")
            require(bool(self.class_prompt.strip()),
                    "Prior preservation needs a class prompt, e.g. 'a photo of a dog'.")
            require(self.num_class_images >= 1, "Generate at least one class image for prior preservation.")
            require(self.prior_loss_weight > 0, "Prior loss weight must be positive.")
        if self.push_to_hub:
            require(bool(self.hub_model_id.strip()) and "/" in self.hub_model_id,
                    "To push to the Hub, give a repository id like user/my-lora.")

    @property
    def is_lora(self) -> bool:
        """True for ``lora`` and ``dreambooth-lora``."""
        return self.method.endswith("lora")

    @property
    def is_dreambooth(self) -> bool:
        """True for the two DreamBooth methods."""
        return self.method.startswith("dreambooth")

    @property
    def alpha(self) -> int:
        """The effective LoRA alpha (``lora_alpha`` or, when 0, the rank)."""
        return self.lora_alpha or self.rank

    @property
    def trigger_words(self) -> str:
        """The instance prompt (what a person types to call up what was learned)."""
        return self.instance_prompt.strip()
