"""The Train tab in headless Chromium: set up a tiny run, start it, watch loss and samples arrive, stop it."""

from __future__ import annotations

import pytest

from studio.config.data import DataConfig
from studio.context import DatasetChoice


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(value)
    box.press("Tab")  # blur: Gradio commits the value


@pytest.mark.browser
@pytest.mark.integration
def test_start_training_see_loss_and_samples_then_stop(page, launched_app):
    app, _ = launched_app
    # the Dataset tab previews (and hands over) the current set when the page opens; then pick a tiny one
    page.locator("#dataset-gallery img").first.wait_for(state="visible", timeout=60_000)
    app.studio_context.dataset.set(DatasetChoice(DataConfig(source="emoji", max_rows=8), "emoji (first 8)", 8, True))
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-start").wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#train-dataset').innerText.includes('emoji (first 8)')",
                           timeout=30_000)
    page.wait_for_function("() => document.querySelector('#train-model-summary').innerText.includes('parameters')",
                           timeout=60_000)
    _fill(page, "train-run-name", "browser")
    _fill(page, "train-resolution", "8")
    _fill(page, "train-train-batch-size", "4")
    page.get_by_text("Architecture (advanced)").click()
    _fill(page, "train-block-out-channels", "8, 16")
    _fill(page, "train-attention-levels", "2")
    page.get_by_text("Samples and checkpoints").click()
    _fill(page, "train-sample-every", "2")
    _fill(page, "train-num-samples", "4")
    _fill(page, "train-sample-inference-steps", "2")
    page.wait_for_function(
        "() => { const t = document.querySelector('#train-model-summary').innerText;"
        " return t.includes('custom') && t.includes('parameters'); }", timeout=90_000)  # 8 edits, one plan each

    page.locator("#train-start").click()
    page.wait_for_function(
        "() => { const t = document.querySelector('#train-status textarea');"
        " return t && t.value.startsWith('Started browser'); }", timeout=60_000)
    # the sample grid and the loss plot appear as training runs
    page.wait_for_function(
        "() => { const i = document.querySelector('#train-sample img');"
        " return i && i.complete && i.naturalWidth > 0; }", timeout=120_000)
    page.wait_for_function(
        "() => { const t = document.querySelector('#train-progress textarea');"
        " return t && /^step \\d+\\/3000 /.test(t.value) && t.value.includes('loss'); }", timeout=60_000)
    page.wait_for_function(
        "() => document.querySelector('#train-loss canvas, #train-loss svg') !== null", timeout=60_000)
    page.wait_for_function(  # the quality plot beside it, with the one line saying which way is better
        "() => document.querySelector('#train-quality canvas, #train-quality svg') !== null", timeout=60_000)
    assert "lower is better" in page.locator("#train-quality-help").inner_text()
    assert page.locator("#train-preset input").first.input_value() == "custom"
    assert page.locator("#train-gallery img").count() >= 1

    # a reload re-attaches to the running job: progress and the sample grid come back
    page.reload()
    page.wait_for_selector("#studio-tabs", timeout=60_000)
    page.get_by_role("tab", name="Train").click()
    page.wait_for_function(
        "() => { const t = document.querySelector('#train-status textarea');"
        " return t && t.value.startsWith('browser: running'); }", timeout=60_000)
    page.wait_for_function(
        "() => { const i = document.querySelector('#train-sample img');"
        " return i && i.complete && i.naturalWidth > 0; }", timeout=60_000)

    page.locator("#train-stop").click()
    page.wait_for_function(
        "() => { const t = document.querySelector('#train-status textarea');"
        " return t && t.value.includes('browser: stopped') && t.value.includes('Checkpoint saved'); }",
        timeout=60_000)
    assert "Traceback" not in page.content()
