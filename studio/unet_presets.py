"""The one table of UNet presets and block types, plus the parameter count.

Memory estimates live in ``studio.budget`` (one estimator for Train, Fine-tune and Generate).

The Train tab's preset dropdown, its advanced architecture editor, the CLI's
config validation and the tests all read ``PRESETS`` and the block-type tables
here. A preset is a plain description of a diffusers ``UNet2DModel``
(``block_out_channels``, ``layers_per_block`` and which levels use attention);
``unet_kwargs`` turns an architecture into the model's constructor arguments.

The module imports torch only inside ``parameter_count`` (a model built on the
``meta`` device: exact, instant, no memory), so the UI can import it freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

#: Down block without / with self-attention (index = attention on?).
DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
#: Up block without / with self-attention.
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
#: Channels per attention head of diffusers' UNet2DModel by default; what a config that spells
#: out its architecture without ``attention_head_dim`` (every run before presets had one) means.
ATTENTION_HEAD_DIM = 8

CUSTOM = "custom"


@dataclass(frozen=True)
class UNetPreset:
    """A named UNet2DModel architecture.

    Attributes:
        name: Shown in the preset dropdown.
        block_out_channels: Channels per resolution level, highest resolution first.
        layers_per_block: ResNet layers per level.
        attention_levels: 0-based levels (highest resolution first) that use self-attention.
        resolution: Image size the preset was designed for (the UI suggests it).
        description: One line for the UI.
        attention_head_dim: Channels per attention head (same parameter count for any value).
        training: The training settings this architecture is meant to start from
            (``TrainConfig`` field -> value); ``TrainConfig`` and the Train tab take
            every field named here from the preset unless it is set.
    """

    name: str
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[int, ...]
    resolution: int
    description: str
    attention_head_dim: int = ATTENTION_HEAD_DIM
    training: tuple[tuple[str, Any], ...] = ()

    @property
    def training_defaults(self) -> dict[str, Any]:
        """``training`` as a dict."""
        return dict(self.training)

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return block_types(len(self.block_out_channels), self.attention_levels)[0]

    @property
    def up_block_types(self) -> tuple[str, ...]:
        return block_types(len(self.block_out_channels), self.attention_levels)[1]


#: Training settings of diffusers' train_unconditional.py (its defaults); also what a custom
#: architecture starts from, since nothing is known about how fast it learns.
DIFFUSERS_TRAINING: tuple[tuple[str, Any], ...] = (
    ("learning_rate", 1e-4), ("lr_warmup_steps", 500), ("prediction_type", "epsilon"),
    ("beta_schedule", "linear"), ("snr_gamma", 0.0), ("ema_max_decay", 0.9999), ("ema_power", 0.75),
)

#: Every preset, in dropdown order. The first is the default. Why the tiny preset's training
#: settings are what they are: benchmarks/README.md, "Why the default run showed noise".
PRESETS: dict[str, UNetPreset] = {p.name: p for p in (
    UNetPreset("tiny (CPU demo)", (32, 64, 64), 1, (1,), 32,
               "About 1.1 M parameters; trains visibly on a laptop CPU at 32 px in minutes.",
               attention_head_dim=32,
               training=(("learning_rate", 1e-3), ("lr_warmup_steps", 50), ("prediction_type", "v_prediction"),
                         ("beta_schedule", "linear"), ("snr_gamma", 0.0), ("ema_max_decay", 0.999),
                         ("ema_power", 0.75))),
    UNetPreset("diffusers example (128 px)", (128, 128, 256, 256, 512, 512), 2, (4,), 128,
               "The UNet of diffusers' train_unconditional.py: attention at the 5th level; wants a GPU.",
               attention_head_dim=8, training=DIFFUSERS_TRAINING),
    UNetPreset("lucidrains Unet(dim=64, dim_mults=(1,2,4,8))", (64, 128, 256, 512), 2, (3,), 128,
               "denoising-diffusion-pytorch's classic tutorial UNet mapped onto UNet2DModel; wants a GPU.",
               attention_head_dim=32,
               training=(("learning_rate", 1e-4), ("lr_warmup_steps", 100), ("prediction_type", "v_prediction"),
                         ("beta_schedule", "squaredcos_cap_v2"), ("snr_gamma", 0.0), ("ema_max_decay", 0.9999),
                         ("ema_power", 0.75))),
)}
DEFAULT_PRESET = next(iter(PRESETS))
#: The TrainConfig fields a preset supplies (every preset names all of them).
PRESET_TRAINING_FIELDS: tuple[str, ...] = tuple(name for name, _ in DIFFUSERS_TRAINING)


def training_defaults(preset: str) -> dict[str, Any]:
    """The training settings ``preset`` starts from (a custom architecture: diffusers' defaults)."""
    p = PRESETS.get(preset)
    return p.training_defaults if p is not None else dict(DIFFUSERS_TRAINING)


def block_types(levels: int, attention_levels: tuple[int, ...] | list[int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down and up block type names for ``levels`` levels with attention at ``attention_levels``.

    Up blocks run from the lowest resolution back up, so their order is mirrored.

    Args:
        levels: Number of resolution levels (``len(block_out_channels)``).
        attention_levels: 0-based levels with self-attention, highest resolution first.

    Returns:
        ``(down_block_types, up_block_types)``.
    """
    attn = set(int(i) for i in attention_levels)
    down = tuple(DOWN_BLOCK_TYPES[i in attn] for i in range(levels))
    up = tuple(UP_BLOCK_TYPES[i in attn] for i in reversed(range(levels)))
    return down, up


def attention_levels_of(down_block_types: tuple[str, ...] | list[str]) -> tuple[int, ...]:
    """The 0-based levels whose down block uses attention."""
    return tuple(i for i, name in enumerate(down_block_types) if name == DOWN_BLOCK_TYPES[1])


def preset_matching(block_out_channels: tuple[int, ...], layers_per_block: int,
                    down_block_types: tuple[str, ...], up_block_types: tuple[str, ...],
                    attention_head_dim: int | None = None) -> str:
    """The name of the preset with exactly this architecture, or ``"custom"``.

    ``attention_head_dim`` None matches any head size.
    """
    for preset in PRESETS.values():
        if (tuple(block_out_channels) == preset.block_out_channels and int(layers_per_block) == preset.layers_per_block
                and tuple(down_block_types) == preset.down_block_types
                and tuple(up_block_types) == preset.up_block_types
                and (attention_head_dim is None or int(attention_head_dim) == preset.attention_head_dim)):
            return preset.name
    return CUSTOM


def norm_groups(block_out_channels: tuple[int, ...]) -> int:
    """GroupNorm groups that divide every level's channels: 32 when possible, else the gcd."""
    g = 0
    for c in block_out_channels:
        g = math.gcd(g, int(c))
    return math.gcd(g, 32) if g else 32


def unet_kwargs(resolution: int, block_out_channels: tuple[int, ...], layers_per_block: int,
                down_block_types: tuple[str, ...], up_block_types: tuple[str, ...],
                attention_head_dim: int = ATTENTION_HEAD_DIM) -> dict[str, Any]:
    """Constructor arguments of ``diffusers.UNet2DModel`` for an RGB model of this architecture."""
    return {
        "sample_size": int(resolution),
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": int(layers_per_block),
        "block_out_channels": tuple(int(c) for c in block_out_channels),
        "down_block_types": tuple(down_block_types),
        "up_block_types": tuple(up_block_types),
        "norm_num_groups": norm_groups(tuple(block_out_channels)),
        "attention_head_dim": int(attention_head_dim),
    }


@lru_cache(maxsize=64)
def _count(block_out_channels: tuple[int, ...], layers_per_block: int,
           down_block_types: tuple[str, ...], up_block_types: tuple[str, ...]) -> int:
    import torch
    from diffusers import UNet2DModel

    with torch.device("meta"):
        model = UNet2DModel(**unet_kwargs(32, block_out_channels, layers_per_block, down_block_types, up_block_types))
    return sum(p.numel() for p in model.parameters())


def parameter_count(block_out_channels: tuple[int, ...], layers_per_block: int,
                    down_block_types: tuple[str, ...], up_block_types: tuple[str, ...]) -> int:
    """Exact number of parameters (the model is built on torch's ``meta`` device, no memory).

    The count does not depend on the resolution.
    """
    return _count(tuple(int(c) for c in block_out_channels), int(layers_per_block),
                  tuple(down_block_types), tuple(up_block_types))


def human_count(n: int) -> str:
    """``1612345`` -> ``'1.61 M'``."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.2f} B"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} M"
    if n >= 1_000:
        return f"{n / 1e3:.1f} k"
    return str(n)
