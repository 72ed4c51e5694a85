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


def wait_for_status(page, text: str, timeout: int) -> None:
    page.wait_for_function(
        "text => { const box = document.querySelector('#ft-status textarea'); return !!box && box.value.includes(text); }",
        arg=text, timeout=timeout)


def wait_for_image(page) -> None:
    """A validation image is shown and has really loaded (not just an empty <img>)."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('#ft-gallery img')].some(img => img.complete && img.naturalWidth > 0)",
        timeout=60_000)


def test_finetune_a_lora_and_see_a_validation_image(page, tiny_sd, launched_app):
    app, _ = launched_app
    # the Dataset tab's hand-off: four bundled emoji
    app.studio_context.dataset.set(DatasetChoice(DataConfig(max_rows=4), "4 emoji (bundled)", 4, True))
    page.get_by_role("tab", name="Fine-tune").click()
    base = page.locator("#ft-pretrained-model-name-or-path input")
    base.fill(str(tiny_sd))  # a folder typed into the list (free text is allowed)
    base.press("Enter")
    page.wait_for_function(  # the base model's native size (16 px) replaces the 512 default
        "() => document.querySelector('#ft-resolution input[type=number]').value === '16'", timeout=30_000)
    page.locator("#ft-validation-prompts textarea").fill("a smiling face")
    set_number(page, "ft-max-train-steps", 3)
    set_number(page, "ft-resolution", 16)
    page.get_by_text("Validation, checkpoints and output").click()
    set_number(page, "ft-validation-every", 2)
    set_number(page, "ft-num-inference-steps", 2)
    page.locator("#ft-run-name textarea").fill("browser-lora")
    page.locator("#ft-start").click()

    wait_for_status(page, "browser-lora: finished", 120_000)
    wait_for_image(page)
    assert page.locator("#ft-run-path textarea").input_value().endswith("browser-lora")
    assert (app.studio_context.workspace / "browser-lora" / "lora" / "pytorch_lora_weights.safetensors").is_file()

    # a reload re-attaches to the (finished) job: status, loss and images come back
    page.reload()
    page.wait_for_selector("#studio-tabs", timeout=60_000)
    page.get_by_role("tab", name="Fine-tune").click()
    wait_for_status(page, "browser-lora: finished", 60_000)
    wait_for_image(page)

    # the run goes to the Generate tab as a model (shown by path, or as "run: browser-lora (LoRA)" once listed)
    page.locator("#ft-open-generate").click()
    page.wait_for_function(
        "() => (document.querySelector('#gen-model input') || {}).value?.includes('browser-lora')", timeout=30_000)
