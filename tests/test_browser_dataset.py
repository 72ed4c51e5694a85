"""The Dataset tab in headless Chromium, as a person uses it.

Also makes the README screenshot: with ``STUDIO_SCREENSHOT=1`` it rewrites
docs/screenshot.png; otherwise the screenshot goes to the test's temp folder so a
test run never dirties the tree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.browser
@pytest.mark.integration
def test_emoji_gallery_fills_and_screenshot(page, tmp_path: Path):
    gallery_images = page.locator("#dataset-gallery img")
    # A new user sees images at once: the page load previews the current set (the emoji smileys).
    gallery_images.first.wait_for(state="visible", timeout=60_000)
    assert "169" in page.locator("#dataset-counts").inner_text()

    # A slip first: "Local folder" with no path gives a clear message and an empty gallery.
    page.get_by_label("Local folder").check()
    page.locator("#dataset-folder textarea, #dataset-folder input").first.wait_for(state="visible")
    page.locator("#dataset-load").click()
    page.wait_for_function(
        "() => { const t = document.querySelector('#dataset-status textarea');"
        " return t && t.value.startsWith('Not loaded'); }", timeout=60_000)
    assert "Choose a folder" in page.locator("#dataset-status textarea").input_value()
    assert page.locator("#dataset-gallery img").count() == 0

    # Then choose the emoji set and press Load, as a person would: the gallery fills.
    page.get_by_label("Bundled emoji set").check()
    page.locator("#dataset-load").click()
    page.wait_for_function(
        "() => { const t = document.querySelector('#dataset-status textarea');"
        " return t && t.value.startsWith('Loaded 169 images'); }", timeout=60_000)
    assert "training dataset" in page.locator("#dataset-status textarea").input_value()
    page.wait_for_function(
        "() => { const imgs = Array.from(document.querySelectorAll('#dataset-gallery img'));"
        " return imgs.length >= 8 && imgs.slice(0, 8).every(i => i.complete && i.naturalWidth > 0)"
        " && document.querySelectorAll('.eta-bar, .progress-text').length === 0; }", timeout=60_000)
    assert "169" in page.locator("#dataset-counts").inner_text()
    for close in page.locator(".toast-close").all():  # the warning of the slip, out of the picture
        close.click()
    page.locator(".toast-close").first.wait_for(state="detached")
    page.wait_for_timeout(500)  # the gallery's fade-in

    target = ROOT / "docs" / "screenshot.png" if os.environ.get("STUDIO_SCREENSHOT") == "1" \
        else tmp_path / "screenshot.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), full_page=False)
    assert target.stat().st_size > 10_000


@pytest.mark.browser
@pytest.mark.integration
def test_broken_folder_shows_the_reason(page, tmp_path: Path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    page.locator("#dataset-gallery img").first.wait_for(state="visible", timeout=60_000)
    page.get_by_label("Local folder").check()
    page.locator("#dataset-folder textarea, #dataset-folder input").first.fill(str(broken))
    page.locator("#dataset-load").click()
    page.wait_for_function(
        "() => { const t = document.querySelector('#dataset-status textarea');"
        " return t && t.value.startsWith('Not loaded'); }", timeout=60_000)
    text = page.locator("#dataset-status textarea").input_value()
    assert "holds no usable images" in text and "empty file (0 bytes)" in text
    assert "Traceback" not in page.content()


@pytest.mark.browser
@pytest.mark.integration
def test_a_picked_emoji_category_loads_and_the_train_tab_follows(page):
    category = page.locator("#dataset-category input")
    page.locator("#dataset-gallery img").first.wait_for(state="visible", timeout=60_000)
    assert category.input_value() == "smileys & emotion (169)"
    # the dropdown belongs to the emoji set: it hides for another source and comes back with it
    page.get_by_label("Local folder").check()
    category.wait_for(state="hidden")
    page.get_by_label("Bundled emoji set").check()
    category.wait_for(state="visible")

    category.click()
    page.get_by_role("option", name="All 1,911 emoji", exact=True).wait_for(state="visible")
    page.get_by_role("option", name="flags (270)", exact=True).click()
    page.wait_for_function("() => document.querySelector('#dataset-category input').value === 'flags (270)'")
    page.locator("#dataset-load").click()
    page.wait_for_function(
        "() => { const t = document.querySelector('#dataset-status textarea');"
        " return t && t.value.startsWith('Loaded 270 images from emoji (bundled, flags)'); }", timeout=60_000)
    assert page.locator("#dataset-counts").inner_text().startswith("270 images")

    page.get_by_role("tab", name="Train").click()
    page.wait_for_function(
        "() => document.querySelector('#train-dataset').innerText.includes('270 images from emoji (bundled, flags)')",
        timeout=30_000)
