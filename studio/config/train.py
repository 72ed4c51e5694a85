"""Settings of an unconditional DDPM training run (the Train tab, ``python -m studio train``).

Field names are diffusers' (``train_batch_size``, ``lr_scheduler``, ``num_train_timesteps``,
``beta_schedule``, ``prediction_type``, ``snr_gamma``...), so anyone who knows
``train_unconditional.py`` recognises them. Every field carries a help text the UI
shows. ``__post_init__`` checks everything that can be checked without torch; the
trainer checks what needs the resolved device (fp16 on a CPU, for one).

The architecture comes from ``studio.unet_presets``: when ``block_out_channels`` is
empty the preset fills it in, so a saved ``config.json`` always holds the full
architecture. So do the training settings a preset names (learning rate, warm-up,
prediction type, noise schedule, min-SNR, EMA): a field left at ``None`` takes the
preset's value, so ``TrainConfig(preset=...)`` and the Train tab's preset dropdown give
that preset's recipe, and ``config.json`` records the values used.

``run_length_warnings(cfg)`` lists settings that make no sense for the run's length
(warm-up longer than half the run, no sample grid or checkpoint before the end...);
the Train tab shows them and the trainer reports them as warnings.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from studio.config.base import MAX_SEED, ConfigBase, option, require, require_choice
from studio.config.data import DataConfig
from studio.unet_presets import (ATTENTION_HEAD_DIM, CUSTOM, DEFAULT_PRESET, DOWN_BLOCK_TYPES, PRESETS,
                                 UP_BLOCK_TYPES, attention_levels_of, preset_matching, training_defaults)

#: Learning-rate schedules (diffusers.optimization.get_scheduler names), UI order.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
#: Noise schedules of DDPMScheduler offered here.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
#: What the UNet predicts.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: accelerate's mixed-precision modes.
MIXED_PRECISIONS = ("no", "fp16", "bf16")
#: Devices a run may ask for.
TRAIN_DEVICES = ("auto", "cpu", "cuda", "mps")

BF16_CPU_WARNING = ("bf16 on a CPU without native bf16 support is about 10x slower than fp32 here; "
                    "use mixed_precision 'no' on CPU.")


@dataclass
class TrainConfig(ConfigBase):
    """Everything an unconditional DDPM run needs; JSON round trip via ``ConfigBase``."""

    # -- data and run folder --------------------------------------------------
    data: DataConfig = field(default_factory=DataConfig.starting, metadata={
        "help": "The dataset (set in the Dataset tab; by default the bundled emoji set's smileys & emotion)."})
    workspace: str = option("runs", "Folder holding every run folder.")
    run_name: str = option("", "Name of the run folder; empty makes train-<date>-<time>.")
    resume: str = option("", "Continue a run: empty = new run, 'latest' = newest intact checkpoint "
                             "of the run named above (or the newest run), or a checkpoint folder.")
    init_from: str = option("", "Start from a pretrained DDPM instead of random weights: a bundled model "
                                "(bundled:emoji-ddpm), a run of this workspace, or a DDPMPipeline folder inside "
                                "the workspace. Its architecture and noise schedule (timesteps, betas, prediction "
                                "type) replace this run's; empty = train from scratch.")
    # -- images ------------------------------------------------------------------
    resolution: int = option(32, "Training image size in pixels (images are resized once, then cached).")
    center_crop: bool = option(True, "Crop to a centred square before resizing (else squash).")
    random_flip: bool = option(True, "Flip images horizontally at random (on tensors, each step).")
    # -- optimisation ------------------------------------------------------------
    train_batch_size: int = option(16, "Images per step on each device.")
    gradient_accumulation_steps: int = option(1, "Micro-batches added up before each optimizer step.")
    learning_rate: float | None = option(None, "Peak learning rate of AdamW (empty = the preset's).")
    lr_scheduler: str = option("cosine", "Learning-rate schedule after the warm-up.")
    lr_warmup_steps: int | None = option(None, "Optimizer steps of linear warm-up from 0 to the learning rate "
                                               "(empty = the preset's).")
    adam_beta1: float = option(0.95, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(1e-6, "AdamW weight decay.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value (0 = no clipping).")
    max_train_steps: int = option(3000, "Optimizer steps to train; overrides num_epochs when > 0.")
    num_epochs: int = option(0, "Passes over the dataset, used when max_train_steps is 0.")
    mixed_precision: str = option("no", "no = fp32 (the only fast choice on CPU), fp16 or bf16 on a GPU.")
    # -- EMA -------------------------------------------------------------------
    use_ema: bool = option(True, "Keep an exponential moving average of the weights (exported and sampled).")
    ema_max_decay: float | None = option(None, "Largest EMA decay (empty = the preset's).")
    ema_power: float | None = option(None, "EMA warm-up power: decay = 1 - (1 + step / inv_gamma) ** -power; "
                                           "smaller follows the weights more closely (empty = the preset's).")
    ema_inv_gamma: float = option(1.0, "EMA warm-up inverse gamma.")
    ema_update_after_step: int = option(0, "Steps before the EMA starts averaging (it copies until then).")
    # -- diffusion ---------------------------------------------------------------
    num_train_timesteps: int = option(1000, "Diffusion steps of the DDPM noise schedule.")
    beta_schedule: str | None = option(None, "How the noise level grows over the timesteps (empty = the preset's).")
    beta_start: float = option(0.0001, "Noise level (beta) of the first timestep (linear and scaled_linear schedules; "
                                       "diffusers' default).")
    beta_end: float = option(0.02, "Noise level (beta) of the last timestep (linear and scaled_linear schedules; "
                                   "diffusers' default).")
    prediction_type: str | None = option(None, "What the UNet predicts: the noise, the velocity v, or the clean "
                                               "image (empty = the preset's).")
    snr_gamma: float | None = option(None, "Min-SNR loss weighting gamma (5 is the paper's value); 0 = off "
                                           "(empty = the preset's).")
    noise_offset: float = option(0.0, "Offset noise strength (helps very dark/bright images); 0 = off.")
    # -- reproducibility and outputs --------------------------------------------
    seed: int = option(0, "Seed of the weights, the data order, the noise and the sample grids.")
    save_every: int = option(250, "Save a resumable checkpoint every N steps (0 = only at the end or stop).")
    sample_every: int = option(100, "Draw the fixed-seed sample grid every N steps (0 = only at start and end).")
    num_samples: int = option(16, "Images in each sample grid.")
    sample_inference_steps: int = option(50, "Denoising steps (DDIM) for the sample grids.")
    checkpoints_total_limit: int = option(2, "Checkpoints kept; older ones are deleted after a new one is complete.")
    # -- architecture ------------------------------------------------------------
    preset: str = option(DEFAULT_PRESET, "UNet preset; the architecture fields below override it.")
    block_out_channels: tuple[int, ...] = option((), "Channels per resolution level (empty = from the preset).")
    layers_per_block: int = option(0, "ResNet layers per level (0 = from the preset).")
    down_block_types: tuple[str, ...] = option((), "Down blocks, one per level: DownBlock2D or AttnDownBlock2D.")
    up_block_types: tuple[str, ...] = option((), "Up blocks, lowest resolution first: UpBlock2D or AttnUpBlock2D.")
    attention_head_dim: int = option(0, "Channels per attention head (0 = the preset's; 8, diffusers' default, "
                                        "when the architecture above is spelled out; at most the channels of "
                                        "the narrowest attention layer, i.e. one head).")
    device: str = option("auto", "auto, cpu, cuda or mps. Under torchrun/accelerate launch each process uses its own.")

    def __post_init__(self) -> None:
        if self.data is None:
            self.data = DataConfig.starting()
        if isinstance(self.data, dict):
            self.data = DataConfig.from_dict(self.data)
        require(isinstance(self.data, DataConfig), "data must be a dataset description (DataConfig).")
        require(bool(str(self.workspace).strip()), "Workspace folder is empty: give the folder that holds runs.")
        self.workspace = str(self.workspace)
        if self.run_name:
            from studio.runs import check_run_name

            check_run_name(self.run_name)
        self.resume = (self.resume or "").strip()
        self.init_from = (self.init_from or "").strip()
        self._fill_from_preset()
        if self.init_from and not self.resume:  # a resumed run's config.json already holds the model's settings
            self._take_from_pretrained()
        _positive_int(self.resolution, "Resolution")
        require(self.resolution >= 8, f"Resolution must be at least 8 pixels (got {self.resolution}).")
        _positive_int(self.train_batch_size, "Batch size (train_batch_size)")
        _positive_int(self.gradient_accumulation_steps, "Gradient accumulation steps")
        _positive_number(self.learning_rate, "Learning rate")
        require_choice(self.lr_scheduler, LR_SCHEDULERS, "LR schedule (lr_scheduler)")
        _non_negative_int(self.lr_warmup_steps, "Warm-up steps (lr_warmup_steps)")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            require(_is_number(value) and 0 <= value < 1, f"{name} must be in [0, 1) (got {value!r}).")
        _non_negative_number(self.adam_weight_decay, "Weight decay (adam_weight_decay)")
        _positive_number(self.adam_epsilon, "adam_epsilon")
        _non_negative_number(self.max_grad_norm, "Gradient clipping (max_grad_norm)")
        _non_negative_int(self.max_train_steps, "Training steps (max_train_steps)")
        _non_negative_int(self.num_epochs, "Epochs (num_epochs)")
        require(self.max_train_steps > 0 or self.num_epochs > 0,
                "Set how long to train: max_train_steps or num_epochs must be more than 0.")
        require_choice(self.mixed_precision, MIXED_PRECISIONS, "Mixed precision")
        require_choice(self.device, TRAIN_DEVICES, "Device")
        check_precision_for_device(self.mixed_precision, self.device)
        require(_is_number(self.ema_max_decay) and 0 < self.ema_max_decay < 1,
                f"EMA max decay must be between 0 and 1 (got {self.ema_max_decay!r}).")
        _positive_number(self.ema_power, "EMA power")
        _positive_number(self.ema_inv_gamma, "EMA inverse gamma")
        _non_negative_int(self.ema_update_after_step, "EMA update-after step")
        _positive_int(self.num_train_timesteps, "num_train_timesteps")
        require(self.num_train_timesteps >= 2, "num_train_timesteps must be at least 2.")
        require_choice(self.beta_schedule, BETA_SCHEDULES, "beta_schedule")
        require(_is_number(self.beta_start) and _is_number(self.beta_end) and 0 < self.beta_start < self.beta_end < 1,
                f"beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1 "
                f"(got {self.beta_start!r} and {self.beta_end!r}).")
        require_choice(self.prediction_type, PREDICTION_TYPES, "prediction_type")
        _non_negative_number(self.snr_gamma, "Min-SNR gamma (snr_gamma)")
        _non_negative_number(self.noise_offset, "Noise offset")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_SEED,
                f"Seed must be a whole number from 0 to {MAX_SEED} (got {self.seed!r}).")
        _non_negative_int(self.save_every, "save_every")
        _non_negative_int(self.sample_every, "sample_every")
        _positive_int(self.num_samples, "Sample grid size (num_samples)")
        require(self.num_samples <= 64, "At most 64 images per sample grid.")
        _positive_int(self.sample_inference_steps, "Sample denoising steps")
        require(self.sample_inference_steps <= self.num_train_timesteps,
                "Sample denoising steps cannot exceed num_train_timesteps.")
        _positive_int(self.checkpoints_total_limit, "Checkpoints kept (checkpoints_total_limit)")
        self._check_architecture()

    def _fill_from_preset(self) -> None:
        """Training settings left at None take the named preset's values."""
        require(self.preset == CUSTOM or self.preset in PRESETS,
                f"Unknown preset {self.preset!r}: use one of {', '.join(PRESETS)} or '{CUSTOM}'.")
        for name, value in training_defaults(self.preset).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def _check_architecture(self) -> None:
        base = PRESETS.get(self.preset) or PRESETS[DEFAULT_PRESET]
        if not self.block_out_channels:
            require(self.preset != CUSTOM, "A custom architecture needs block_out_channels.")
            self.block_out_channels = base.block_out_channels
            self.down_block_types = self.down_block_types or base.down_block_types
            self.up_block_types = self.up_block_types or base.up_block_types
            self.attention_head_dim = self.attention_head_dim or base.attention_head_dim
        if not self.layers_per_block:
            self.layers_per_block = base.layers_per_block
        if not self.attention_head_dim:  # an architecture spelled out without it: diffusers' default
            self.attention_head_dim = ATTENTION_HEAD_DIM
        _positive_int(self.attention_head_dim, "attention_head_dim")
        self.block_out_channels = tuple(self.block_out_channels)
        levels = len(self.block_out_channels)
        require(levels >= 1, "block_out_channels needs at least one level.")
        for c in self.block_out_channels:
            require(isinstance(c, int) and not isinstance(c, bool) and c > 0,
                    f"block_out_channels must be positive whole numbers (got {self.block_out_channels!r}).")
        _positive_int(self.layers_per_block, "layers_per_block")
        if not self.down_block_types:
            self.down_block_types = (DOWN_BLOCK_TYPES[0],) * levels
        if not self.up_block_types:
            self.up_block_types = (UP_BLOCK_TYPES[0],) * levels
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        require(len(self.down_block_types) == levels and len(self.up_block_types) == levels,
                f"Give one down and one up block type per level: {levels} levels, "
                f"{len(self.down_block_types)} down and {len(self.up_block_types)} up types.")
        for name in self.down_block_types:
            require_choice(name, DOWN_BLOCK_TYPES, "Down block type")
        for name in self.up_block_types:
            require_choice(name, UP_BLOCK_TYPES, "Up block type")
        require(self.resolution % (2 ** (levels - 1)) == 0,
                f"Resolution {self.resolution} must be divisible by {2 ** (levels - 1)} "
                f"(the UNet halves it {levels - 1} times).")
        # self-attention at the chosen levels and always in the middle block (the last level's channels)
        widths = {f"attention level {level + 1}": self.block_out_channels[level]
                  for level in attention_levels_of(self.down_block_types)}
        widths["the middle block"] = self.block_out_channels[-1]
        narrowest = min(widths.values())
        if self.attention_head_dim > narrowest:  # heads wider than the channels: one head
            self.attention_head_dim = narrowest
        for where, channels in widths.items():
            require(channels % self.attention_head_dim == 0,
                    f"attention_head_dim {self.attention_head_dim} must divide the {channels} channels of {where}.")
        self.preset = preset_matching(self.block_out_channels, self.layers_per_block,
                                      self.down_block_types, self.up_block_types, self.attention_head_dim)

    def noise_schedule(self) -> dict[str, int | float | str]:
        """The DDPMScheduler settings of the run's noise schedule (``DDPMScheduler(**cfg.noise_schedule())``)."""
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": self.beta_schedule, "prediction_type": self.prediction_type}

    def _take_from_pretrained(self) -> None:
        """Architecture and noise schedule from the ``init_from`` model's JSON configs (no torch): its weights
        mean something only at its own noise levels and target, so they replace the run's settings."""
        from studio.pretrained import noise_schedule, read_ddpm_configs

        unet, scheduler = read_ddpm_configs(self.init_from, self.workspace)
        size = unet.get("sample_size")
        require(unet.get("in_channels", 3) == 3 and unet.get("out_channels", 3) == 3,
                f"{self.init_from} is not an RGB image model (in/out channels {unet.get('in_channels')}/"
                f"{unet.get('out_channels')}); start from an unconditional RGB DDPM.")
        require(size in (None, self.resolution),
                f"{self.init_from} was trained at {size} px but this run is set to {self.resolution} px; "
                f"set Resolution to {size} to start from it (or train from scratch).")
        self.preset = CUSTOM
        self.block_out_channels = tuple(int(c) for c in unet["block_out_channels"])
        self.layers_per_block = int(unet.get("layers_per_block", 2))
        self.down_block_types = tuple(unet["down_block_types"])
        self.up_block_types = tuple(unet["up_block_types"])
        self.attention_head_dim = int(unet.get("attention_head_dim") or ATTENTION_HEAD_DIM)
        for name, value in noise_schedule(scheduler, self.init_from).items():
            setattr(self, name, value)

    def run_length_warnings(self, num_images: int | None = None) -> list[str]:
        """Settings that make no sense for this run's length, one sentence each (empty when all is well).

        Args:
            num_images: Dataset size, to know the length of a run given in epochs (None: such
                runs are not checked).
        """
        if self.max_train_steps > 0:
            total = self.max_train_steps
        elif num_images:
            per_step = self.train_batch_size * self.gradient_accumulation_steps
            total = self.num_epochs * max(1, -(-num_images // per_step))
        else:
            return []
        out = []
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            out.append(f"The 'constant' LR schedule ignores the {self.lr_warmup_steps} warm-up steps; "
                       "use 'constant_with_warmup' to warm up.")
        elif self.lr_warmup_steps * 2 >= total:
            out.append(f"Warm-up ({self.lr_warmup_steps} steps) is at least half the run ({total} steps): the "
                       "learning rate is low for most of it. Use a warm-up of at most a tenth of the steps.")
        if self.sample_every > total:
            out.append(f"Sample grid every {self.sample_every} steps but the run has {total}: you see only the "
                       "grids at the start and the end.")
        if self.save_every > total:
            out.append(f"Checkpoint every {self.save_every} steps but the run has {total}: no checkpoint is "
                       "saved before the end (Stop still saves one).")
        if self.use_ema:
            averaging = total - self.ema_update_after_step
            if averaging <= 0:
                out.append(f"EMA starts averaging after step {self.ema_update_after_step}, at or after the end "
                           f"({total} steps): the EMA weights are just a copy. Lower 'EMA starts after step'.")
            else:
                decay = min(self.ema_max_decay, 1 - (1 + averaging / self.ema_inv_gamma) ** -self.ema_power)
                window = 1 / max(1e-12, 1 - decay)
                if window * 2 > total:
                    out.append(f"The EMA averages over about the last {window:,.0f} steps, more than half of "
                               f"this {total}-step run: grids and the exported model lag the training. Lower "
                               "the EMA power or max decay, or turn EMA off for short runs.")
        return out

    @property
    def run_root(self) -> Path:
        """``<workspace>/<run_name>`` (meaningful when ``run_name`` is set)."""
        return Path(self.workspace).expanduser() / self.run_name


def check_precision_for_device(mixed_precision: str, device: str) -> None:
    """Refuse fp16 on a CPU; warn (Python warning) for bf16 on a CPU.

    Raises:
        ConfigError: fp16 with device 'cpu'.
    """
    if device != "cpu":
        return
    require(mixed_precision != "fp16",
            "fp16 mixed precision needs a GPU; on CPU use mixed_precision 'no' (fp32).")
    if mixed_precision == "bf16":
        warnings.warn(BF16_CPU_WARNING, stacklevel=3)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: object, label: str) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{label} must be a whole number above 0 (got {value!r}).")


def _non_negative_int(value: object, label: str) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            f"{label} must be a whole number >= 0 (got {value!r}).")


def _positive_number(value: object, label: str) -> None:
    require(_is_number(value) and value > 0, f"{label} must be a number above 0 (got {value!r}).")


def _non_negative_number(value: object, label: str) -> None:
    require(_is_number(value) and value >= 0, f"{label} must be a number >= 0 (got {value!r}).")
