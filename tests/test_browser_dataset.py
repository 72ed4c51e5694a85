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
    # A new user sees images at once: the page load previews the current (emoji) set.
    gallery_images.first.wait_for(state="visible", timeout=60_000)
    assert "1911" in page.locator("#dataset-counts").inner_text()

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
        " return t && t.value.startsWith('Loaded 1911 images'); }", timeout=60_000)
    assert "training dataset" in page.locator("#dataset-status textarea").input_value()
    page.wait_for_function(
        "() => { const imgs = Array.from(document.querySelectorAll('#dataset-gallery img'));"
        " return imgs.length >= 8 && imgs.slice(0, 8).every(i => i.complete && i.naturalWidth > 0)"
        " && document.querySelectorAll('.eta-bar, .progress-text').length === 0; }", timeout=60_000)
    assert "1911" in page.locator("#dataset-counts").inner_text()
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
