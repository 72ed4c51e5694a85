"""Page first, engine behind it: the app is served before torch loads, and the buttons
that need the engine say so until it is ready (``studio.engine``, ``tabs.engine_gate``)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CHROMIUM, ROOT, free_port
from studio.engine import FAILED, IDLE, LOADING, READY, EngineLoader
from studio.errors import ModelError


def test_engine_loader_goes_idle_loading_ready():
    gate = threading.Event()
    engine = EngineLoader(load=gate.wait)
    assert engine.state == IDLE and not engine.ready
    engine.start()
    engine.start()  # a second start is a no-op, not a second thread
    assert engine.state == LOADING
    with pytest.raises(ModelError, match="still loading"):
        engine.wait(timeout=0.05)
    gate.set()
    engine.wait(timeout=10)
    assert engine.state == READY and engine.ready and engine.error == "" and engine.seconds is not None


def test_engine_loader_failure_is_one_actionable_line():
    def broken() -> None:
        raise ImportError("No module named 'diffusers'")

    engine = EngineLoader(load=broken)
    engine.start()
    with pytest.raises(ModelError) as info:
        engine.wait(timeout=10)
    assert engine.state == FAILED
    assert "No module named 'diffusers'" in str(info.value) and "pip install -r requirements.txt" in str(info.value)


def test_wait_without_start_loads_in_the_calling_thread():
    calls = []
    engine = EngineLoader(load=lambda: calls.append(threading.current_thread().name))
    engine.wait()
    assert engine.ready and calls == [threading.current_thread().name]
    engine.start()  # already loaded: nothing more happens
    assert calls == [threading.current_thread().name]


def _gated_app(tmp_path: Path):
    from studio.context import StudioContext
    from studio.settings import LaunchSettings
    from tabs import build_app

    gate = threading.Event()
    settings = LaunchSettings(host="127.0.0.1", port=free_port(), workspace=tmp_path / "ws", device="cpu",
                              offline=True)
    ctx = StudioContext(settings, engine=EngineLoader(load=gate.wait))
    app = build_app(settings, ctx)
    assert ctx.engine.state == IDLE  # building starts nothing; launch.py starts the engine once serving
    ctx.engine.start()
    return app, gate


def test_engine_buttons_wait_for_the_engine(tmp_path):
    from tabs.engine_gate import FAILED_LABEL, LOADING_LABEL, button_updates

    app, gate = _gated_app(tmp_path)
    engine = app.studio_context.engine
    assert engine.state == LOADING
    props = {c["props"].get("elem_id"): c["props"] for c in app.get_config_file()["components"]}
    gated = ["train-start", "train-resume", "ft-start", "ft-resume", "gen-load", "gen-generate"]
    for elem_id in gated:
        assert props[elem_id]["value"] == LOADING_LABEL and props[elem_id]["interactive"] is False
    for elem_id in ("train-stop", "dataset-load", "gen-refresh"):  # these never wait for torch
        assert props[elem_id]["interactive"] is not False and props[elem_id]["value"] != LOADING_LABEL

    buttons = [b for b in app.blocks.values() if getattr(b, "ready_label", None)]
    assert sorted(b.elem_id for b in buttons) == sorted(gated)
    assert all(u == {"__type__": "update", "value": LOADING_LABEL, "interactive": False}
               for u in button_updates(engine, buttons))
    gate.set()
    engine.wait(timeout=10)
    updates = button_updates(engine, buttons)
    assert {b.elem_id: u["value"] for b, u in zip(buttons, updates)} == {
        "train-start": "Start", "train-resume": "Resume", "ft-start": "Start", "ft-resume": "Resume latest",
        "gen-load": "Load", "gen-generate": "Generate"}
    assert all(u["interactive"] is True for u in updates)

    broken = EngineLoader(load=lambda: 1 / 0)
    broken.start()
    with pytest.raises(ModelError):
        broken.wait(timeout=10)
    assert all(u["value"] == FAILED_LABEL and u["interactive"] is False for u in button_updates(broken, buttons))


def test_building_the_app_imports_no_torch(tmp_path):
    """The tabs, the app and the emoji preview need neither torch nor diffusers."""
    code = f"""
import sys
import tabs
from studio.context import StudioContext
from studio.engine import EngineLoader
from studio.settings import LaunchSettings
from studio.config.data import DataConfig
settings = LaunchSettings(workspace={str(tmp_path / 'ws')!r}, device="cpu", offline=True)
app = tabs.build_app(settings, StudioContext(settings, engine=EngineLoader(load=lambda: None)))
from tabs.dataset import preview_dataset
assert len(preview_dataset(DataConfig()).gallery) == 24
print(sorted(m for m in ("torch", "diffusers", "transformers", "accelerate", "peft") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.browser
@pytest.mark.integration
def test_page_and_emoji_preview_come_before_the_engine(browser, tmp_path):
    """With the engine held back, the emoji preview still renders and Generate says it is loading;
    once the engine is ready the button gets its label back and can be pressed."""
    from tabs import launch_kwargs
    from tabs.engine_gate import LOADING_LABEL

    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed")
    app, gate = _gated_app(tmp_path)
    kwargs = launch_kwargs(app.studio_context.settings)
    kwargs.update(prevent_thread_lock=True, quiet=True)
    app.launch(**kwargs)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(f"http://127.0.0.1:{app.studio_context.settings.port}/")
        page.wait_for_function(
            "() => { const imgs = [...document.querySelectorAll('#dataset-gallery img')];"
            " return imgs.length >= 8 && imgs.slice(0, 8).every(i => i.complete && i.naturalWidth > 0); }",
            timeout=60_000)
        assert app.studio_context.engine.state == LOADING  # the preview did not wait for the engine
        page.get_by_role("tab", name="Generate").click()
        button = page.locator("#gen-generate")
        button.wait_for(state="visible")
        time.sleep(1.0)  # a few gate polls: still loading
        assert button.inner_text().strip() == LOADING_LABEL and button.is_disabled()
        gate.set()
        page.wait_for_function(
            "() => { const b = document.querySelector('#gen-generate');"
            " return b && b.innerText.trim() === 'Generate' && !b.disabled; }", timeout=30_000)
        assert page.locator("#gen-load").is_enabled()
    finally:
        gate.set()
        context.close()
        app.close()


@pytest.mark.integration
def test_launch_serves_the_page_then_starts_the_engine(tmp_path, monkeypatch):
    import urllib.request

    import gradio as gr

    import launch

    seen = {}

    def block_thread(app):  # instead of blocking: look at the running studio, then close it
        seen["engine_state"] = app.studio_context.engine.state
        with urllib.request.urlopen(app.local_url, timeout=30) as response:
            seen["page"] = response.status
        app.studio_context.engine.wait(timeout=600)
        seen["ready"] = app.studio_context.engine.ready
        app.close()

    monkeypatch.setattr(gr.Blocks, "block_thread", block_thread)
    port = free_port()
    assert launch.main(["--port", str(port), "--workspace", str(tmp_path / "ws"), "--offline"]) == 0
    assert seen["engine_state"] in ("loading", "ready") and seen["page"] == 200 and seen["ready"]
