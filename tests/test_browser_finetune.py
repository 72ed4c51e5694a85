"""A person in a browser: fine-tune a LoRA for a few steps, watch a validation image arrive, open it in Generate."""

from __future__ import annotations

import pytest

from studio.config.data import DataConfig
from studio.context import DatasetChoice
from tiny_pipelines import tiny_sd  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def test_finetune_a_lora_and_see_a_validation_image(page, tiny_sd, launched_app):
    app, _ = launched_app
    # the Dataset tab's hand-off: four bundled emoji
    app.studio_context.dataset.set(DatasetChoice(DataConfig(max_rows=4), "4 emoji (bundled)", 4, True))
    page.get_by_role("tab", name="Fine-tune").click()
    page.locator("#ft-pretrained-model-name-or-path textarea").fill(str(tiny_sd))
    page.locator("#ft-validation-prompts textarea").fill("a smiling face")
    set_number(page, "ft-max-train-steps", 3)
    set_number(page, "ft-resolution", 16)
    page.get_by_text("Validation, checkpoints and output").click()
    set_number(page, "ft-validation-every", 2)
    set_number(page, "ft-num-inference-steps", 2)
    page.locator("#ft-run-name textarea").fill("browser-lora")
    page.locator("#ft-start").click()

    page.wait_for_function(
        "() => document.querySelector('#ft-status textarea').value.includes('browser-lora: finished')",
        timeout=120_000)
    image = page.locator("#ft-gallery img").first
    image.wait_for(state="visible")
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0
    assert page.locator("#ft-run-path textarea").input_value().endswith("browser-lora")
    assert (app.studio_context.workspace / "browser-lora" / "lora" / "pytorch_lora_weights.safetensors").is_file()

    # the run goes to the Generate tab as a model
    page.locator("#ft-open-generate").click()
    page.wait_for_function(
        "() => (document.querySelector('#gen-model input') || {}).value?.endsWith('browser-lora')", timeout=30_000)
