"""TrainConfig validation and JSON round trip; the UNet preset table and its estimates."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from studio.config.train import LR_SCHEDULERS, TrainConfig
from studio.errors import ConfigError
from studio.unet_presets import (PRESETS, block_types, parameter_count,
                                 preset_matching, unet_kwargs)


def test_defaults_fill_the_architecture_from_the_preset_and_round_trip(tmp_path):
    cfg = TrainConfig()
    tiny = PRESETS["tiny (CPU demo)"]
    assert cfg.preset == tiny.name and cfg.block_out_channels == (32, 64, 64)
    assert cfg.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    assert cfg.up_block_types == ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    path = tmp_path / "run.json"
    cfg.to_json(path)
    assert TrainConfig.from_json(path) == cfg


def test_every_field_has_help_text():
    for f in dataclasses.fields(TrainConfig):
        assert TrainConfig.help_for(f.name), f.name


def test_a_preset_name_builds_its_architecture():
    cfg = TrainConfig(preset="diffusers example (128 px)", resolution=128)
    assert cfg.block_out_channels == (128, 128, 256, 256, 512, 512) and cfg.layers_per_block == 2
    assert cfg.down_block_types[4] == "AttnDownBlock2D" and cfg.up_block_types[1] == "AttnUpBlock2D"


def test_an_edited_architecture_is_custom():
    cfg = TrainConfig(block_out_channels=(16, 32), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    assert cfg.preset == "custom"


@pytest.mark.parametrize("changes, message", [
    ({"mixed_precision": "fp16", "device": "cpu"}, "fp16 mixed precision needs a GPU"),
    ({"lr_scheduler": "warp"}, "LR schedule"),
    ({"beta_schedule": "cubic"}, "beta_schedule must be one of: linear, scaled_linear, squaredcos_cap_v2"),
    ({"prediction_type": "x0"}, "prediction_type must be one of"),
    ({"train_batch_size": 0}, "Batch size"),
    ({"max_train_steps": 0, "num_epochs": 0}, "Set how long to train"),
    ({"resolution": 34}, "divisible by 4"),
    ({"block_out_channels": (8, 16), "down_block_types": ("DownBlock2D",)}, "one down and one up block type per level"),
    ({"down_block_types": ("CrossAttnDownBlock2D",) * 3}, "Down block type must be one of"),
    ({"run_name": "../escape"}, "Run name"),
    ({"adam_beta1": 1.5}, "adam_beta1"),
    ({"preset": "huge"}, "Unknown preset"),
    ({"learning_rate": -1.0}, "Learning rate"),
])
def test_bad_values_are_clear_errors(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**changes)


def test_bf16_on_cpu_is_allowed_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrainConfig(mixed_precision="bf16", device="cpu")
    assert any("10x slower" in str(w.message) for w in caught)


def test_unknown_json_keys_are_named():
    with pytest.raises(ConfigError, match="Unknown setting.*lerning_rate"):
        TrainConfig.from_dict({"lerning_rate": 1e-4})


def test_lr_schedules_are_diffusers_names():
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    names = {t.value for t in TYPE_TO_SCHEDULER_FUNCTION}
    assert set(LR_SCHEDULERS) <= names


def test_presets_match_the_issue_and_count_parameters_like_diffusers():
    import torch
    from diffusers import UNet2DModel

    lucid = PRESETS["lucidrains Unet(dim=64, dim_mults=(1,2,4,8))"]
    assert lucid.block_out_channels == (64, 128, 256, 512)
    assert PRESETS["diffusers example (128 px)"].down_block_types.index("AttnDownBlock2D") == 4
    tiny = PRESETS["tiny (CPU demo)"]
    torch.manual_seed(0)
    model = UNet2DModel(**unet_kwargs(32, tiny.block_out_channels, tiny.layers_per_block,
                                      tiny.down_block_types, tiny.up_block_types))
    assert parameter_count(tiny.block_out_channels, tiny.layers_per_block, tiny.down_block_types,
                           tiny.up_block_types) == sum(p.numel() for p in model.parameters())
    for preset in PRESETS.values():
        assert preset_matching(preset.block_out_channels, preset.layers_per_block, preset.down_block_types,
                               preset.up_block_types) == preset.name


def test_block_types_mirror_attention_levels():
    down, up = block_types(3, (0,))
    assert down == ("AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert up == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D")
