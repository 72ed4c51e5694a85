"""Per-base fine-tune defaults: the bundled emoji SD starts LoRA at a learning rate and step count that
move it (``studio.base_models.FINETUNE_DEFAULTS``), Hub SD bases keep the standard ones, and a value
the person typed is never replaced when they pick another base or method."""

from __future__ import annotations

import dataclasses

import pytest

from studio import bundled
from studio.base_models import FINETUNE_DEFAULTS, finetune_defaults
from studio.config.finetune import FinetuneConfig
from tabs.finetune import base_defaults, default_values
from tiny_pipelines import bundled_sd, tiny_sd, tiny_sd_stand_in  # noqa: F401  (fixtures)

HUB_SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"
STANDARD = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name in ("learning_rate",
                                                                                        "max_train_steps")}
EMOJI_LORA = FINETUNE_DEFAULTS["bundled:emoji-sd"]["lora"]


def test_the_table_knows_the_bundled_emoji_sd_however_it_is_named_and_nothing_else(bundled_sd):
    assert EMOJI_LORA == {"learning_rate": 1e-3, "max_train_steps": 200} and STANDARD["learning_rate"] == 1e-4
    folder = bundled.find_bundled("emoji-sd").path
    for name in (bundled_sd, "emoji-sd", str(folder), f"{folder}/"):
        assert finetune_defaults(name, "lora") == EMOJI_LORA, name
        assert finetune_defaults(name, "dreambooth-lora") == FINETUNE_DEFAULTS["bundled:emoji-sd"]["dreambooth-lora"]
    assert finetune_defaults(bundled_sd, "full") == {"learning_rate": 1e-4, "max_train_steps": 200}
    assert finetune_defaults(bundled_sd, "dreambooth-full") == finetune_defaults(bundled_sd, "full")
    for other in (HUB_SD, "stabilityai/stable-diffusion-xl-base-1.0", "", "nowhere/\x00"):
        assert finetune_defaults(other, "lora") == STANDARD, other


def test_the_tab_opens_on_the_bundled_model_with_its_defaults_and_says_so(bundled_sd):
    values = default_values()
    assert values["pretrained_model_name_or_path"] == bundled_sd
    assert (values["learning_rate"], values["max_train_steps"]) == (1e-3, 200)
    updates, suggested, note = base_defaults(bundled_sd, "lora", values, None)
    assert suggested == EMOJI_LORA and "Learning rate 0.001 and 200 steps suit this base model with lora" in note


def test_picking_a_base_or_method_moves_untouched_values_and_keeps_typed_ones(bundled_sd):
    values = default_values()
    _, previous, _ = base_defaults(bundled_sd, "lora", values, None)
    # a Hub SD base: the standard LoRA defaults come back, no note
    updates, previous, note = base_defaults(HUB_SD, "lora", values, previous)
    assert updates == STANDARD and note == ""
    values.update(updates)
    # the person types a learning rate, then picks the bundled model again: their rate stays, the steps follow
    values["learning_rate"] = 5e-4
    updates, previous, note = base_defaults(bundled_sd, "lora", values, previous)
    assert updates == {"max_train_steps": 200}
    assert "Kept your learning rate 0.0005 (suggested: 0.001)" in note
    values.update(updates)
    # method full on the bundled model: its own rate is suggested, the typed rate still stays
    updates, previous, note = base_defaults(bundled_sd, "full", values, previous)
    assert updates == {"max_train_steps": 200} and "Kept your learning rate 0.0005 (suggested: 0.0001)" in note
    # a Hub base with full: the standard steps
    updates, previous, note = base_defaults(HUB_SD, "full", values, previous)
    assert updates == {"max_train_steps": 500} and "Kept your learning rate 0.0005" in note
    # a Number box may hand back 500.0 for 500: still the suggestion, so it moves
    values.update(max_train_steps=500.0)
    assert base_defaults(bundled_sd, "lora", values, previous)[0] == {"max_train_steps": 200}


@pytest.mark.browser
@pytest.mark.integration
def test_the_fine_tune_tab_applies_the_defaults_in_a_browser(bundled_sd, tiny_sd, page, launched_app):
    page.get_by_role("tab", name="Fine-tune").click()

    def number(elem_id: str) -> str:
        return page.locator(f"#{elem_id} input[type=number]").input_value()

    assert (float(number("ft-learning-rate")), number("ft-max-train-steps")) == (1e-3, "200")
    assert "suit this base model with lora" in page.locator("#ft-defaults-note").inner_text()
    base = page.locator("#ft-pretrained-model-name-or-path input")
    # another SD base typed into the list (a folder: a Hub id would start SD-1.5's memory plan, which
    # outlives a short test)
    base.fill(str(tiny_sd))
    base.press("Enter")
    page.wait_for_function("() => document.querySelector('#ft-max-train-steps input[type=number]').value === '500'",
                           timeout=30_000)
    assert float(number("ft-learning-rate")) == 1e-4
    box = page.locator("#ft-learning-rate input[type=number]")
    box.fill("0.0005")
    box.press("Tab")
    base.fill(bundled_sd)  # back to the bundled model: the steps follow it, the typed rate stays
    base.press("Enter")
    page.wait_for_function("() => document.querySelector('#ft-max-train-steps input[type=number]').value === '200'",
                           timeout=30_000)
    page.wait_for_function("() => document.querySelector('#ft-defaults-note').innerText.includes('Kept your')",
                           timeout=30_000)
    assert float(number("ft-learning-rate")) == 5e-4


@pytest.mark.slow  # two 50-step LoRAs and 12 images on the real bundled model: ~40 s on a loaded 2-core machine
def test_the_bundled_defaults_move_a_lora_toward_the_persons_images_where_1e_4_barely_does(settings, bundled_sd,
                                                                                           tmp_path):
    import numpy as np
    from PIL import Image

    from studio.config.data import DataConfig
    from studio.config.generate import GenerateConfig
    from studio.context import DatasetChoice, StudioContext
    from studio.generate import generate
    from tabs.finetune import start_finetune
    from test_bundled_sd import red_hearts
    from tiny_pipelines import real_bundled_sd

    if not real_bundled_sd():
        pytest.skip("needs the bundled emoji SD's weights (a tiny stand-in learns nothing to measure)")
    hearts = red_hearts(tmp_path / "hearts")
    target = np.stack([np.asarray(Image.open(p).convert("RGB")).astype(float) for p in sorted(hearts.glob("*.png"))])
    ctx = StudioContext(settings)
    try:
        ctx.dataset.set(DatasetChoice(DataConfig(source="folder", path=str(hearts)), "hearts", 10, True))

        def distance(lora: str) -> float:
            pictures = [np.asarray(generate(ctx.pipelines, GenerateConfig(
                model=bundled_sd, prompt="a red heart", num_inference_steps=12, seed=seed, lora=lora,
                scheduler="DPM++ 2M", guidance_scale=4.0), save=False).images[0].image).astype(float)
                for seed in range(4)]
            return float(np.abs(np.stack(pictures) - target.mean(0)).mean())

        base = distance("")
        moved = {}
        for name, rate in (("tab-default", None), ("standard", 1e-4)):
            values = dict(default_values(), max_train_steps=50, validation_every=0, num_inference_steps=2,
                          checkpoint_every=0, validation_prompts="a red heart", run_name=name)
            if rate is not None:
                values["learning_rate"] = rate
            start_finetune(ctx, values)
            job = ctx.jobs.latest("finetune")
            assert job.wait(300) and job.snapshot().status == "finished", job.snapshot().error
            moved[name] = 1 - distance(name) / base  # share of the distance to the hearts covered
    finally:
        ctx.jobs.stop_all()
    # measured (benchmarks/finetune_defaults.py, 50 steps): 1e-3 covers 24 % of the way, 1e-4 2 %
    assert moved["tab-default"] > 0.1 and moved["tab-default"] > 3 * moved["standard"], moved
