"""A person in a browser: load a model, pick "DPM++ 2M Karras", generate, see the image."""

from __future__ import annotations

import pytest

from tiny_pipelines import tiny_ddpm, tiny_sd  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def test_generate_an_image_with_dpm_2m_karras(page, tiny_sd, tiny_ddpm, launched_app):
    app, _ = launched_app
    page.get_by_role("tab", name="Generate").click()
    model = page.locator("#gen-model input")
    model.click()
    model.fill(str(tiny_sd))
    model.press("Enter")
    page.locator("#gen-load").click()
    status = page.locator("#gen-model-status textarea")
    page.wait_for_function(
        "() => document.querySelector('#gen-model-status textarea').value.startsWith('Loaded')", timeout=60_000)
    assert "StableDiffusionPipeline" in status.input_value()

    # Only compatible samplers are offered: LCM is not, DPM++ 2M Karras is.
    box = page.locator("#gen-scheduler input")
    box.click()
    page.get_by_role("option", name="Euler a", exact=True).wait_for(state="visible")
    offered = page.get_by_role("option").all_inner_texts()
    assert "DPM++ 2M Karras" in offered and "DDPM" in offered
    assert "LCM" not in offered and "Flow Match Euler" not in offered
    box.fill("DPM++ 2M Karras")
    page.get_by_role("option", name="DPM++ 2M Karras", exact=True).click()
    page.wait_for_function("() => document.querySelector('#gen-scheduler input').value === 'DPM++ 2M Karras'")

    page.locator("#gen-prompt textarea").fill("a blue bird")
    steps = page.locator("#gen-steps input[type=number]")
    steps.fill("3")
    steps.press("Enter")
    seed = page.locator("#gen-seed input")
    seed.fill("31")
    seed.press("Enter")
    page.locator("#gen-generate").click()

    page.wait_for_function(
        "() => document.querySelector('#gen-progress textarea').value === 'Done.'", timeout=60_000)
    image = page.locator("#gen-gallery img").first
    image.wait_for(state="visible")
    page.wait_for_function(  # visible comes before decoded: wait for the picture itself
        "() => { const i = document.querySelector('#gen-gallery img'); return !!i && i.complete && i.naturalWidth > 0; }",
        timeout=30_000)
    assert image.evaluate("img => img.naturalWidth") == 16
    info = page.locator("#gen-info textarea").input_value()
    assert "DPM++ 2M Karras" in info and "seed 31" in info
    saved = list((app.studio_context.workspace / "outputs").rglob("*-31.png"))
    assert len(saved) == 1

    # Reuse parameters: change the fields, upload the saved PNG, get them back.
    page.locator("#gen-prompt textarea").fill("something else")
    seed.fill("-1")
    seed.press("Enter")
    page.get_by_text("Reuse parameters from a PNG").click()
    page.locator("#gen-reuse-file input[type=file]").set_input_files(str(saved[0]))
    page.wait_for_function(
        "() => document.querySelector('#gen-prompt textarea').value === 'a blue bird'", timeout=30_000)
    assert seed.input_value() == "31"
    assert page.locator("#gen-scheduler input").input_value() == "DPM++ 2M Karras"
    assert page.locator("#gen-steps input[type=number]").input_value() == "3"
    table = page.locator("#gen-reuse-table")  # every field read is shown, A1111's names among them
    table.wait_for(state="visible")
    assert "Model hash" in table.inner_text() and "Schedule type" in table.inner_text()

    # An unconditional model (typed in and confirmed: local folders load at once) has no prompt box.
    assert page.locator("#gen-prompt").is_visible()
    model.click()
    model.fill(str(tiny_ddpm))
    model.press("Enter")
    page.wait_for_function(
        "() => document.querySelector('#gen-model-status textarea').value.includes('DDPMPipeline')", timeout=60_000)
    page.locator("#gen-prompt").wait_for(state="hidden")
    assert not page.locator("#gen-guidance").is_visible()
