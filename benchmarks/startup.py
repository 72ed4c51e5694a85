"""Benchmark: seconds from ``python launch.py`` to the page, against a bare Gradio app.

Each round starts two servers, one after the other, each in a fresh subprocess of the
same Python (``sys.executable``), and times them from the moment the process is
spawned:

* **studio** — ``python launch.py --port P --workspace <tmp> --offline``: the whole
  studio (the engine then loads in the background).
* **bare** — ``python benchmarks/startup.py --serve-bare --port P``: a ``gr.Blocks``
  with the same number of tabs (``tabs.TABS``), one Markdown in each, launched the
  same way (``launch(server_name="127.0.0.1", server_port=P)``, analytics off).

Two moments are timed for each: the **first byte** of ``GET /`` (polled every 50 ms),
and the page **rendered** in headless Chromium (Debian's ``/usr/bin/chromium`` driven
by Playwright, the flags of ``tests/conftest.py`` and a fresh ``--user-data-dir`` per
round, started before the server so its own start-up is not counted): for the studio,
the Dataset tab's emoji preview with all its thumbnails decoded; for the bare app, the
first tab's text. ``studio_s`` / ``bare_s`` are the medians of the rendered moment over
the rounds, the two kinds alternating (studio, bare, studio, bare, ...).

The last line printed is one JSON object:
``{"studio_s": ..., "bare_s": ..., "ratio": ..., "studio_first_byte_s": ..., "bare_first_byte_s": ..., "rounds": N}``.

    python benchmarks/startup.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [  # the flags of tests/conftest.py
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]
PREVIEW_COUNT = 24  # tabs.dataset.PREVIEW_COUNT (not imported: this process stays light)
STUDIO_RENDERED = f"""() => {{
    const imgs = [...document.querySelectorAll('#dataset-gallery img')];
    return imgs.length >= {PREVIEW_COUNT} && imgs.every(i => i.complete && i.naturalWidth > 0);
}}"""
BARE_RENDERED = "() => { const e = document.querySelector('#bare-text-0'); return !!e && e.innerText.includes('tab 0'); }"


def serve_bare(port: int, tab_count: int) -> None:
    """The reference: a bare Gradio Blocks app with ``tab_count`` tabs (blocks until killed)."""
    import gradio as gr

    with gr.Blocks(title="bare") as app:
        gr.Markdown("# bare")
        with gr.Tabs():
            for i in range(tab_count):
                with gr.Tab(f"Tab {i}"):
                    gr.Markdown(f"tab {i}", elem_id=f"bare-text-{i}")
    app.queue()
    app.launch(server_name="127.0.0.1", server_port=port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONUNBUFFERED="1")
    return env


def _first_byte(url: str, proc: subprocess.Popen, started: float, limit: float) -> float:
    """Seconds from ``started`` until ``GET url`` answers with a first byte."""
    while time.perf_counter() - started < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before serving a page")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                response.read(1)
                return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.05)
    raise TimeoutError(f"no page within {limit:.0f} s")


def time_one(kind: str, pw, limit: float, tab_count: int) -> tuple[float, float]:
    """Start one server of ``kind`` and return (first byte s, rendered s)."""
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="startup-chromium-")
    workspace = tempfile.mkdtemp(prefix="startup-workspace-")
    browser = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                    args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
    if kind == "studio":
        cmd = [sys.executable, str(ROOT / "launch.py"), "--port", str(port), "--workspace", workspace, "--offline"]
        rendered = STUDIO_RENDERED
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", "--port", str(port),
               "--tabs", str(tab_count)]
        rendered = BARE_RENDERED
    url = f"http://127.0.0.1:{port}/"
    page = browser.pages[0] if browser.pages else browser.new_page()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = _first_byte(url, proc, started, limit)
        page.goto(url, wait_until="commit", timeout=limit * 1000)
        page.wait_for_function(rendered, timeout=limit * 1000, polling=50)
        done = time.perf_counter() - started
    except Exception:
        proc.kill()
        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
        print(f"{kind} failed; its stderr ends with:\n{err}", file=sys.stderr)
        raise
    finally:
        browser.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
        shutil.rmtree(workspace, ignore_errors=True)
    return first, done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="studio/bare pairs, alternating")
    p.add_argument("--limit", type=float, default=180.0, help="seconds before one start counts as failed")
    p.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--tabs", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.port, args.tabs)
        return 0

    sys.path.insert(0, str(ROOT))
    from tabs import TABS  # the studio's tab table (gradio is imported here, not in the timed servers)

    from playwright.sync_api import sync_playwright

    times: dict[str, list[tuple[float, float]]] = {"studio": [], "bare": []}
    with sync_playwright() as pw:
        for round_ in range(1, args.rounds + 1):
            for kind in ("studio", "bare"):
                first, done = time_one(kind, pw, args.limit, len(TABS))
                times[kind].append((first, done))
                print(f"round {round_} {kind:6s} first byte {first:6.2f} s · rendered {done:6.2f} s", flush=True)

    def median(kind: str, index: int) -> float:
        return round(statistics.median(t[index] for t in times[kind]), 2)

    studio, bare = median("studio", 1), median("bare", 1)
    print(json.dumps({"studio_s": studio, "bare_s": bare, "ratio": round(studio / bare, 2),
                      "studio_first_byte_s": median("studio", 0), "bare_first_byte_s": median("bare", 0),
                      "rounds": args.rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
