"""Test set-up: every test offline and steady, plus shared fixtures.

The environment is fixed before any Hugging Face or Gradio module is imported:
no Hub access (``HF_HUB_OFFLINE=1``), a throw-away ``HF_HOME``, no analytics, one
torch thread (two threads on the 2-core CI machines make timings erratic).

Fixtures:
    workspace       a fresh workspace folder
    settings        LaunchSettings on a free loopback port with that workspace
    launched_app    the real app launched in this process -> (app, url)
    client          a gradio_client.Client connected to launched_app
    page            a headless Chromium page (Debian's chromium via Playwright)
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="studio-hf-home-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="studio-gradio-tmp-"))
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Device locks are machine-wide: each test session gets its own folder, so tests never
# wait on (or block) the studio or another test run using the same CPU.
os.environ["STUDIO_LOCK_DIR"] = tempfile.mkdtemp(prefix="studio-locks-")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard requirement
    pass

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
def train_ctx(workspace: Path):
    """A CPU ``StudioContext`` on ``workspace`` with the first 8 emoji as its dataset (Train tab tests);
    its jobs are stopped afterwards."""
    from studio.config.data import DataConfig
    from studio.context import DatasetChoice, StudioContext
    from studio.settings import LaunchSettings

    c = StudioContext(LaunchSettings(workspace=workspace, device="cpu"))
    c.dataset.set(DatasetChoice(DataConfig(source="emoji", max_rows=8), "emoji (first 8)", 8, True))
    yield c
    c.jobs.stop_all()


@pytest.fixture
def settings(workspace: Path):
    from studio.settings import LaunchSettings

    return LaunchSettings(host="127.0.0.1", port=free_port(), workspace=workspace, device="cpu", offline=True)


def launch_app(settings):
    """Build and launch the real app without blocking; returns (app, url)."""
    from tabs import build_app, launch_kwargs

    app = build_app(settings)
    kwargs = launch_kwargs(settings)
    kwargs.update(prevent_thread_lock=True, quiet=True)
    app.launch(**kwargs)
    app.studio_context.engine.wait()  # loads it here: tests drive the app, not its loading state (test_startup does)
    return app, f"http://127.0.0.1:{settings.port}/"


@pytest.fixture
def launched_app(settings):
    app, url = launch_app(settings)
    try:
        yield app, url
    finally:
        app.studio_context.jobs.stop_all()
        app.close()


@pytest.fixture
def client(launched_app):
    from gradio_client import Client

    _, url = launched_app
    return Client(url, verbose=False, download_files=tempfile.mkdtemp(prefix="studio-client-"))


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium; skipped locally when absent, an error in CI."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: .ci/run installs it with apt-get.")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=CHROMIUM_ARGS)  # Playwright gives each launch a fresh temp profile
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, launched_app):
    """A fresh page already showing the launched app."""
    _, url = launched_app
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(url)
    pg.wait_for_selector("#studio-tabs", timeout=60_000)
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture
def local_hub(monkeypatch):
    """A loopback Hub (tests/hub_server.py) with this process's Hub clients pointed at it."""
    from hub_server import LocalHub, point_clients_at

    with LocalHub() as hub:
        point_clients_at(hub, monkeypatch)
        yield hub
