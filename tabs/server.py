"""HTTP guards around Gradio's server: login rate limit, unknown endpoints, no public API map.

``server_app_kwargs()`` goes to ``Blocks.launch(app_kwargs=...)`` (see
``tabs.launch_kwargs``), which builds the FastAPI app with it:

* ``LoginRateLimit``: after ``LOGIN_FAILURES`` wrong passwords from one client address
  within ``LOGIN_WINDOW_S`` seconds, further login attempts from it get HTTP 429 with
  a line saying how long to wait (a share link's tunnel shows as one address, so there
  the limit is shared by everyone).
* An unknown API endpoint (``/gradio_api/call/<nope>``) is a 404 naming it, not a 500.
* FastAPI's own ``/openapi.json`` and docs are off: before login nobody sees a map of
  the app's routes (Gradio's ``/gradio_api/info`` stays behind the login).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.middleware import Middleware

#: Wrong passwords allowed from one address per window before logins are refused.
LOGIN_FAILURES = 5
#: The window, in seconds.
LOGIN_WINDOW_S = 60.0


class LoginRateLimit:
    """ASGI middleware: refuse logins from an address with too many recent failures."""

    def __init__(self, app: Any, failures: int = LOGIN_FAILURES, window_s: float = LOGIN_WINDOW_S) -> None:
        self.app = app
        self.failures = failures
        self.window_s = window_s
        self._lock = threading.Lock()
        self._recent: dict[str, collections.deque] = {}

    def _wait_s(self, address: str, now: float) -> float:
        with self._lock:
            times = self._recent.get(address)
            if not times:
                return 0.0
            while times and now - times[0] > self.window_s:
                times.popleft()
            if len(times) < self.failures:
                return 0.0
            return self.window_s - (now - times[0])

    def _failed(self, address: str, now: float) -> None:
        with self._lock:
            if len(self._recent) > 10_000:  # bounded memory under a flood of addresses
                self._recent.clear()
            self._recent.setdefault(address, collections.deque(maxlen=self.failures * 4)).append(now)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        is_login = (scope.get("type") == "http" and scope.get("method") == "POST"
                    and scope.get("path", "").rstrip("/").endswith("/login"))
        if not is_login:
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("unknown", 0))[0]
        wait = self._wait_s(address, time.monotonic())
        if wait > 0:
            body = json.dumps({"detail": f"Too many failed logins from this address: wait {wait:.0f} s "
                                         "and try again."}).encode("utf-8")
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"retry-after", str(int(wait) + 1).encode())]})
            await send({"type": "http.response.body", "body": body})
            return

        async def watch(message: dict) -> None:
            if message.get("type") == "http.response.start" and message.get("status") in (400, 401, 403):
                self._failed(address, time.monotonic())
            await send(message)

        await self.app(scope, receive, watch)


async def _unknown_endpoint(request: Request, exc: Exception) -> JSONResponse:
    name = request.path_params.get("api_name", "") if hasattr(request, "path_params") else ""
    return JSONResponse({"detail": f"No API endpoint named {name!r}." if name else "No such API endpoint."},
                        status_code=404)


def server_app_kwargs(extra_middleware: list[Middleware] | None = None) -> dict[str, Any]:
    """Keyword arguments for the FastAPI app Gradio builds (``launch(app_kwargs=...)``).

    Args:
        extra_middleware: Other middleware to install alongside the login rate limit.
    """
    from gradio.route_utils import FnIndexInferError

    return {
        "openapi_url": None, "docs_url": None, "redoc_url": None,
        "middleware": [*(extra_middleware or []), Middleware(LoginRateLimit)],
        "exception_handlers": {FnIndexInferError: _unknown_endpoint},
    }
