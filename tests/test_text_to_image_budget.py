"""The memory plan of the text-to-image-from-scratch mode (``studio.budget.text_to_image_plan``):
both stages counted, an absurd request refused in one line before any run folder exists (Train tab
and CLI), a tiny one accepted and trained."""

from __future__ import annotations

import json

import pytest

from studio import small_sd
from studio.budget import BudgetError, text_to_image_plan
from test_text_to_image_scratch import tiny_config


def test_plan_counts_all_three_models_and_grows_with_batch_and_resolution(tmp_path):
    cfg = tiny_config(tmp_path)
    plan = text_to_image_plan(cfg)
    params = sum(small_sd.parameter_counts(small_sd.SmallSDSpec.of(cfg)).values())
    assert plan.parts["weights"] == 4 * params and plan.parts["AdamW"] == 8 * params
    assert 0 < plan.parts["EMA"] < plan.parts["weights"]  # text encoder + UNet, not the autoencoder
    assert text_to_image_plan(cfg.replace(use_ema=False)).parts["EMA"] == 0
    big_batch = text_to_image_plan(cfg.replace(train_batch_size=64))
    big_size = text_to_image_plan(cfg.replace(resolution=64))
    assert big_batch.peak > plan.peak and big_size.peak > plan.peak
    assert plan.fits and "text-to-image, batch 4, 16 px" in plan.summary


def test_absurd_request_is_refused_in_one_line_by_the_tab_and_the_cli_and_a_tiny_one_trains(workspace, tmp_path,
                                                                                             capsys):
    from studio import cli
    from studio.config.data import DataConfig
    from studio.context import DatasetChoice, StudioContext
    from studio.settings import LaunchSettings
    from tabs import train as tab

    # the Train tab: refused before a run folder is made, with the change that fits
    ctx = StudioContext(LaunchSettings(workspace=workspace, device="cpu"))
    ctx.dataset.set(DatasetChoice(DataConfig(source="emoji", max_rows=8), "emoji (first 8)", 8, True))
    values = tab.default_values()
    values.update(mode="text-to-image", run_name="huge", resolution=16, train_batch_size=10 ** 9)
    assert "does not fit" in tab.model_summary(values)
    with pytest.raises(BudgetError) as info:
        tab.start_training(ctx, values)
    text = info.value.user_message
    assert "batch 1000000000" in text and "free RAM" in text and "Try: batch size" in text, text
    assert "\n" not in text and not (workspace / "huge").exists()

    # the CLI: exit 2, one line on stderr, no run folder
    config = tmp_path / "huge.json"
    config.write_text(json.dumps(dict(tiny_config(workspace, run_name="huge-cli", train_batch_size=10 ** 9).to_dict())))
    assert cli.main(["train", "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: This training run (text-to-image, batch 1000000000") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 2, err  # the line and its "Try: ..." hint
    assert not (workspace / "huge-cli").exists()

    # a tiny one fits and trains to the end
    tiny = tiny_config(workspace, run_name="tiny", vae_steps=1, max_train_steps=1, train_batch_size=2,
                       data={"source": "emoji", "max_rows": 8}, images_per_prompt=1, sample_inference_steps=1)
    assert text_to_image_plan(tiny).fits
    config.write_text(json.dumps(tiny.to_dict()))
    assert cli.main(["train", "--config", str(config), "--quiet"]) == 0
    assert (workspace / "tiny" / "model" / "model_index.json").is_file()
