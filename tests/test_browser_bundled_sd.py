"""A person in a browser, offline, on the bundled text-to-image model: "red heart" in Generate, a LoRA in Fine-tune.

Nothing is typed into the model boxes: both tabs open on ``bundled:emoji-sd`` (the real
bundled emoji SD when it is in assets/models, else a tiny SD registered in its place).

With ``STUDIO_SCREENSHOTS=<folder>`` the test also saves the screenshots the docs use
(``generate-emoji-sd.png``, ``finetune-emoji-sd.png``) and trains longer so the
validation images show learning:

    STUDIO_SCREENSHOTS=docs python -m pytest -q tests/test_browser_bundled_sd.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from studio.config.data import DataConfig
from studio.context import DatasetChoice
from studio.pnginfo import read_png_parameters
from test_bundled_sd import red_hearts
from tiny_pipelines import bundled_sd, tiny_sd_stand_in  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

SHOTS = os.environ.get("STUDIO_SCREENSHOTS", "")


def set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def shoot(page, name: str) -> None:
    """Save the top of the page, tall enough for the results beside the settings."""
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.set_viewport_size({"width": 1400, "height": 1250})
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(500)
        page.screenshot(path=str(Path(SHOTS) / name))


def test_red_heart_in_generate_and_a_lora_in_fine_tune(bundled_sd, page, launched_app, tmp_path):
    app, _ = launched_app
    ctx = app.studio_context
    # Generate: the bundled text-to-image model is already chosen; Load, prompt, Generate
    page.get_by_role("tab", name="Generate").click()
    assert "emoji-sd" in page.locator("#gen-model input").input_value()
    page.locator("#gen-load").click()
    page.wait_for_function(
        "() => document.querySelector('#gen-model-status textarea').value.startsWith('Loaded emoji-sd')",
        timeout=60_000)
    assert "StableDiffusionPipeline" in page.locator("#gen-model-status textarea").input_value()
    page.locator("#gen-prompt textarea").fill("red heart")
    set_number(page, "gen-seed", 3)
    set_number(page, "gen-batch-size", 4)
    page.locator("#gen-generate").click()
    page.wait_for_function(
        "() => document.querySelector('#gen-progress textarea').value === 'Done.'", timeout=120_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gen-gallery img')].filter(i => i.complete && i.naturalWidth).length"
        " >= 4", timeout=30_000)
    assert "emoji-sd (bundled)" in page.locator("#gen-info textarea").input_value()
    saved = sorted((ctx.workspace / "outputs").rglob("*.png"))
    assert len(saved) == 4 and read_png_parameters(saved[0]).startswith("red heart\n")
    shoot(page, "generate-emoji-sd.png")

    # Fine-tune: ten images of the person's own, the base model already chosen, LoRA
    hearts = red_hearts(tmp_path / "my-hearts")
    ctx.dataset.set(DatasetChoice(DataConfig(source="folder", path=str(hearts)), "my-hearts", 10, True))
    page.get_by_role("tab", name="Fine-tune").click()
    assert "emoji-sd" in page.locator("#ft-pretrained-model-name-or-path input").input_value()
    page.locator("#ft-validation-prompts textarea").fill("a red heart\na yellow smiling face")
    set_number(page, "ft-max-train-steps", 150 if SHOTS else 4)
    set_number(page, "ft-learning-rate", 1e-3)
    page.get_by_text("Validation, checkpoints and output").click()
    set_number(page, "ft-validation-every", 50 if SHOTS else 2)
    set_number(page, "ft-num-inference-steps", 20 if SHOTS else 2)
    page.locator("#ft-run-name textarea").fill("my-hearts-lora")
    page.locator("#ft-start").click()
    page.wait_for_function(
        "() => document.querySelector('#ft-status textarea').value.includes('my-hearts-lora: finished')",
        timeout=600_000 if SHOTS else 120_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#ft-gallery img')].filter(i => i.complete && i.naturalWidth).length"
        " >= 3", timeout=30_000)
    assert (ctx.workspace / "my-hearts-lora" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    shoot(page, "finetune-emoji-sd.png")
