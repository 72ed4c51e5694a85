"""Per-preset training defaults, the run-length warnings, and the Train tab following the preset."""

from __future__ import annotations

import pytest

from studio.config.train import TrainConfig
from studio.unet_presets import (DEFAULT_PRESET, DIFFUSERS_TRAINING, PRESET_TRAINING_FIELDS, PRESETS,
                                 training_defaults)
from tabs import train as tab

TINY = PRESETS[DEFAULT_PRESET]
DIFFUSERS = "diffusers example (128 px)"


def test_every_preset_names_every_training_field():
    for preset in PRESETS.values():
        assert set(preset.training_defaults) == set(PRESET_TRAINING_FIELDS), preset.name
    assert training_defaults("custom") == dict(DIFFUSERS_TRAINING)


def test_the_default_config_is_the_tiny_presets_recipe():
    cfg = TrainConfig()
    assert cfg.preset == DEFAULT_PRESET
    assert {name: getattr(cfg, name) for name in PRESET_TRAINING_FIELDS} == TINY.training_defaults
    assert cfg.attention_head_dim == TINY.attention_head_dim == 32
    assert cfg.prediction_type == "v_prediction" and cfg.learning_rate == 1e-3
    assert cfg.run_length_warnings() == []  # the default run makes sense as it is


def test_another_preset_brings_its_own_defaults_and_explicit_values_win():
    cfg = TrainConfig(preset=DIFFUSERS, resolution=128)
    assert cfg.learning_rate == 1e-4 and cfg.prediction_type == "epsilon" and cfg.attention_head_dim == 8
    assert cfg.lr_warmup_steps == 500 and cfg.preset == DIFFUSERS
    cfg = TrainConfig(learning_rate=3e-4, prediction_type="epsilon", ema_power=0.5)
    assert (cfg.learning_rate, cfg.prediction_type, cfg.ema_power) == (3e-4, "epsilon", 0.5)
    assert cfg.lr_warmup_steps == TINY.training_defaults["lr_warmup_steps"]


def test_saved_configs_round_trip_and_old_runs_keep_head_dim_8():
    cfg = TrainConfig()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["attention_head_dim"]  # a config.json written before presets had a head size
    restored = TrainConfig.from_dict(old)
    assert restored.attention_head_dim == 8 and restored.preset == "custom"  # built exactly as it was trained


def test_head_dim_wider_than_an_attention_level_means_one_head_and_must_divide():
    arch = dict(block_out_channels=(8, 16), layers_per_block=1, resolution=8,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    assert TrainConfig(**arch, attention_head_dim=32).attention_head_dim == 16
    from studio.errors import ConfigError

    with pytest.raises(ConfigError, match="attention_head_dim 6 must divide the 16 channels"):
        TrainConfig(**arch, attention_head_dim=6)


@pytest.mark.parametrize("changes, phrase", [
    (dict(max_train_steps=80, lr_warmup_steps=40), "Warm-up (40 steps) is at least half the run (80 steps)"),
    (dict(lr_scheduler="constant", lr_warmup_steps=10), "ignores the 10 warm-up steps"),
    (dict(max_train_steps=50, sample_every=100, lr_warmup_steps=0), "you see only the grids at the start and the end"),
    (dict(max_train_steps=200, save_every=250), "no checkpoint is saved before the end"),
    (dict(max_train_steps=100, ema_update_after_step=100), "the EMA weights are just a copy"),
    (dict(max_train_steps=1000, ema_power=1.0, ema_max_decay=0.9999), "EMA averages over about the last 1,001"),
])
def test_run_length_warnings_name_the_setting(changes, phrase):
    warnings = TrainConfig(**changes).run_length_warnings()
    assert any(phrase in w for w in warnings), warnings


def test_epoch_runs_are_checked_once_the_dataset_size_is_known():
    cfg = TrainConfig(max_train_steps=0, num_epochs=1, lr_warmup_steps=60)  # 1911 emoji / 16 = 120 steps
    assert cfg.run_length_warnings() == []
    assert any("Warm-up (60 steps)" in w for w in cfg.run_length_warnings(num_images=1911))


def test_the_train_tab_starts_from_the_preset_and_the_dropdown_fills_its_recipe():
    values = tab.default_values()
    assert values["learning_rate"] == 1e-3 and values["attention_head_dim"] == 32 and values["init_from"] == ""
    filled = tab.preset_values(DIFFUSERS)
    assert set(filled) == set(tab.PRESET_FILLED)
    values.update(filled, preset=DIFFUSERS)
    cfg = tab.build_config(values)
    assert cfg.preset == DIFFUSERS and cfg.learning_rate == 1e-4 and cfg.lr_warmup_steps == 500
    assert cfg.prediction_type == "epsilon" and cfg.attention_head_dim == 8 and cfg.resolution == 128
    assert tab.architecture_preset(values) == DIFFUSERS
    assert tab.architecture_preset(dict(values, attention_head_dim=16)) == "custom"


def test_the_summary_shows_run_length_warnings():
    values = dict(tab.default_values(), max_train_steps=60)
    text = tab.model_summary(values)
    assert "⚠️ Warm-up (50 steps) is at least half the run (60 steps)" in text
    assert "⚠️" not in tab.model_summary(tab.default_values())


def test_head_dim_also_fits_the_middle_blocks_attention():
    # no attention levels, but UNet2DModel's middle block always attends over the last level's 16 channels
    cfg = TrainConfig(block_out_channels=(8, 16), layers_per_block=1, resolution=8, attention_head_dim=32,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    assert cfg.attention_head_dim == 16
