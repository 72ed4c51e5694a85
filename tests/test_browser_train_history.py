"""The Train tab in headless Chromium keeps its history: a tiny run, stopped, resumed with the
Resume button, and a reloaded page still shows the whole curve and every earlier grid."""

from __future__ import annotations

import os

import pytest

from studio.config.data import DataConfig
from studio.context import DatasetChoice
from tabs import train as tab

TINY = dict(resolution=8, train_batch_size=4, learning_rate=1e-3, lr_warmup_steps=0, block_out_channels="8, 16",
            layers_per_block=1, attention_levels="", sample_every=2, num_samples=4, sample_inference_steps=2,
            save_every=2)


def _status_has(page, text: str, timeout: int = 120_000) -> None:
    page.wait_for_function("(t) => { const s = document.querySelector('#train-status textarea');"
                           " return s && s.value.includes(t); }", arg=text, timeout=timeout)


@pytest.mark.browser
@pytest.mark.integration
def test_resume_and_reload_show_the_whole_curve_and_every_grid(page, launched_app, tmp_path):
    app, _ = launched_app
    ctx = app.studio_context
    ctx.dataset.set(DatasetChoice(DataConfig(source="emoji", max_rows=8), "emoji (first 8)", 8, True))
    # two finished runs: the older one (4 steps) is the one we will continue
    for name, steps in (("hist-older", 4), ("hist-newer", 2)):
        values = tab.default_values()
        values.update(TINY, run_name=name, max_train_steps=steps)
        tab.start_training(ctx, values)
        assert ctx.jobs.latest("train").wait(120)
    page.reload()
    page.wait_for_selector("#studio-tabs", timeout=60_000)
    page.get_by_role("tab", name="Train").click()
    _status_has(page, "hist-newer: finished")
    # pick the older run: its history comes back from disk and its own target fills the box
    page.locator("#train-run input").first.click()
    page.get_by_role("option", name="hist-older", exact=False).first.click()
    _status_has(page, "hist-older: finished")
    page.wait_for_function("() => { const n = document.querySelector('#train-resume-steps input');"
                           " return n && n.value === '4'; }", timeout=30_000)
    page.locator("#train-resume-steps input").first.fill("6")
    page.locator("#train-resume-steps input").first.press("Tab")
    page.locator("#train-resume").click()
    _status_has(page, "hist-older: finished")
    page.wait_for_function("() => document.querySelector('#train-progress textarea').value.startsWith('step 6/6')",
                           timeout=120_000)
    # a reload shows the whole run: grids of steps 0-6 and the loss plot with its legend
    page.reload()
    page.wait_for_selector("#studio-tabs", timeout=60_000)
    page.get_by_role("tab", name="Train").click()
    _status_has(page, "hist-older: finished")
    page.wait_for_function("() => document.querySelectorAll('#train-gallery img').length >= 4", timeout=60_000)
    captions = page.locator("#train-gallery").inner_text()
    for step in (0, 2, 4, 6):
        assert f"step {step}" in captions, captions
    page.wait_for_function("() => document.querySelector('#train-loss canvas, #train-loss svg') !== null",
                           timeout=60_000)
    assert tab.LOSS_LEGEND in page.locator("#train-loss").inner_text()  # the series are named on screen
    progress = page.locator("#train-progress textarea").input_value()
    assert progress.startswith("step 6/6") and "raw, mean of last" in progress
    shots = os.environ.get("STUDIO_SCREENSHOTS")
    if shots:
        page.locator("#train-loss").screenshot(path=os.path.join(shots, "train-history-loss.png"))
        page.screenshot(path=os.path.join(shots, "train-history.png"), full_page=True)
    # the restored curve: every step 1-6 is in the plot's data (the job's snapshot is the run's whole history)
    snap = tab.render(ctx.jobs.latest("train").snapshot())
    assert sorted({step for step, _, _ in snap.losses}) == [1, 2, 3, 4, 5, 6]
    assert "Traceback" not in page.content()
