"""A bounded fuzz of the launched app's API: every named endpoint, a few hundred junk calls.

Fixed seed; 326 calls took 188 s on a 2-core box at load ~10 (marked slow).
Asserts what an attacker with a login must never
get: an HTTP 5xx, traceback text in any response, a file written outside the
workspace, a call that hangs, a job left running after Stop, or a server that stops
serving. The junk: wrong types, huge and negative numbers, NaN, path traversal and
absolute paths, NUL bytes and ANSI escapes, oversized strings, file references to
system files, nested lists and objects.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 20261201
CALLS_PER_ENDPOINT = 6
CALL_TIMEOUT_S = 30.0
#: Wall-clock budget for the endpoint calls (STUDIO_FUZZ_BUDGET_S overrides it on a loaded machine).
#: Text that only a traceback puts in a response.
TRACEBACK_MARKS = ("Traceback (most recent call last)", 'File "/', "site-packages/")


def junk_values(outside: Path) -> list:
    """Hostile values of every type (the same list every run)."""
    return [
        None, "", " ", "a" * 20_000, "../../../../etc/passwd", "/etc/passwd", str(outside / "x"),
        str(outside / "export"), "..", "~", "\x00", "\x1b[31mred\x1b[0m", "<script>alert(1)</script>",
        "名前", "\ud83d\ude00", "NaN", "-1", "1e309", "http://127.0.0.1:1/x", "owner/name@../../x",
        "/dev/zero", "/proc/self/environ", 0, -1, 1, 7, 2**63, -2**63, 1e308, -1e308, 0.5, math.inf,
        True, False, [], [1, 2], [[[]]], {}, {"path": "/etc/passwd"},
        {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}, "orig_name": "passwd.png"},
        {"path": str(outside / "x.png"), "meta": {"_type": "gradio.FileData"}},
        {"a": {"b": {"c": [None]}}}, [{"path": "/etc/shadow", "meta": {"_type": "gradio.FileData"}}],
    ]


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; send them as text
    return value


def _call(http, name: str, data: list) -> tuple[int, str, bool]:
    """POST /gradio_api/call/<name>, then read its event stream: (status, text, hung)."""
    response = http.post(f"/gradio_api/call/{name}", content=json.dumps({"data": data}),
                         headers={"content-type": "application/json"})
    if response.status_code != 200:
        return response.status_code, response.text, False
    event_id = response.json().get("event_id")
    text, hung = "", False
    try:
        with http.stream("GET", f"/gradio_api/call/{name}/{event_id}", timeout=CALL_TIMEOUT_S) as stream:
            if stream.status_code != 200:
                return stream.status_code, stream.read().decode("utf-8", "replace"), False
            for chunk in stream.iter_text():
                text += chunk
                if "event: complete" in text or "event: error" in text:
                    break
    except Exception as exc:  # noqa: BLE001 - a read timeout is a hang
        hung = "timeout" in type(exc).__name__.lower() or "timeout" in str(exc).lower()
        if not hung:
            raise
    return 200, text, hung


def _files_outside(roots: list[Path], since: float, workspace: Path) -> list[str]:
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if here == workspace or workspace in here.parents:
                dirnames.clear()
                continue
            dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__", ".pytest_cache")]
            for name in filenames:
                path = here / name
                try:
                    if path.stat().st_mtime >= since:
                        found.append(str(path))
                except OSError:
                    continue
    return found


def test_api_fuzz(launched_app, tmp_path):
    import httpx

    app, url = launched_app
    ctx = app.studio_context
    workspace = ctx.workspace
    outside = tmp_path / "outside"
    outside.mkdir()
    root = Path(__file__).resolve().parent.parent
    git_before = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                                capture_output=True, text=True).stdout
    started = time.time() - 1
    rng = random.Random(SEED)
    junk = junk_values(outside)
    totals = {"calls": 0, "5xx": 0, "tracebacks": 0, "hangs": 0, "unexpected": 0}
    problems: list[str] = []
    with httpx.Client(base_url=url, timeout=CALL_TIMEOUT_S) as http:
        info = http.get("/gradio_api/info").json()
        endpoints = sorted(info["named_endpoints"])
        assert len(endpoints) >= 20, endpoints
        deadline = time.monotonic() + float(os.environ.get("STUDIO_FUZZ_BUDGET_S", "300"))
        for name in endpoints:
            params = info["named_endpoints"][name]["parameters"]
            for i in range(CALLS_PER_ENDPOINT):
                if i == 0:
                    data = []  # nothing at all
                elif i == 1:
                    data = [rng.choice(junk) for _ in range(len(params) + 3)]  # too many
                else:
                    data = [rng.choice(junk) for _ in params]
                data = [_json_safe(v) for v in data]
                status, text, hung = _call(http, name.lstrip("/"), data)
                totals["calls"] += 1
                if status >= 500:
                    totals["5xx"] += 1
                    problems.append(f"{name} {status}: {text[:200]}")
                if any(mark in text for mark in TRACEBACK_MARKS):
                    totals["tracebacks"] += 1
                    problems.append(f"{name} traceback: {text[:300]}")
                if "Unexpected error" in text:
                    totals["unexpected"] += 1
                    problems.append(f"{name} generic error: {text[:300]}")
                if hung:
                    totals["hangs"] += 1
                    problems.append(f"{name} hung")
            assert time.monotonic() < deadline, f"fuzz too slow at {name}: {totals}"
        # Raw junk at the HTTP layer too: unknown endpoints, bad JSON, wrong methods.
        for body in (b"", b"{", b"[]", b'{"data": 5}', b'{"data": [' + b"[" * 5000 + b"]}", b"\xff\xfe"):
            for path in ("/gradio_api/call/generate", "/gradio_api/call/../../x", "/gradio_api/queue/join",
                         "/gradio_api/upload", "/gradio_api/call/" + "x" * 3000):
                response = http.post(path, content=body, headers={"content-type": "application/json"})
                totals["calls"] += 1
                if response.status_code >= 500:
                    totals["5xx"] += 1
                    problems.append(f"POST {path[:60]} {body[:20]!r}: {response.status_code}")
                if any(mark in response.text for mark in TRACEBACK_MARKS):
                    totals["tracebacks"] += 1
                    problems.append(f"POST {path[:60]} traceback")
        # Whatever the junk started is stopped; nothing is left running.
        for stop in ("stop_training", "stop_finetune", "stop_generate"):
            if f"/{stop}" in endpoints:
                _call(http, stop, [])
        if ctx.jobs.running() is not None:
            assert ctx.jobs.running().wait(60), "a job started by the fuzz did not stop"
        assert ctx.jobs.running() is None
        deadline = time.monotonic() + 60
        while any(t.name == "studio-generate" for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(t.name == "studio-generate" for t in threading.enumerate())
        # Still serving.
        assert http.get("/").status_code == 200
        status, text, _ = _call(http, "refresh_models", [])
        assert status == 200 and "event: complete" in text
    outside_files = _files_outside([tmp_path, root], started, workspace)
    git_after = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                               capture_output=True, text=True).stdout
    print(f"\nfuzz totals: {totals}")
    assert not outside_files, outside_files
    assert git_after == git_before, "the fuzz changed files in the repository"
    assert totals["calls"] >= 200
    assert not problems, "\n".join(problems[:40]) + f"\n{totals}"
