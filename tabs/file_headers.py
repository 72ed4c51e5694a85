"""Served files are images or downloads, never pages: headers for Gradio's file routes.

Gradio serves every file under ``allowed_paths`` (the workspace) inline with the type
its extension suggests, so an ``.html`` or ``.svg`` that reached the workspace would
run script from the studio's own origin (stored XSS). This ASGI middleware rewrites
the response of every file route: raster images (PNG, JPEG, GIF, WebP) stay inline,
anything else becomes ``application/octet-stream`` with ``Content-Disposition:
attachment``; every response carries ``X-Content-Type-Options: nosniff`` so no
browser second-guesses the type. It is passed to ``launch(app_kwargs=...)`` by
``tabs.launch_kwargs``.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

#: Types a file route may serve inline: raster images only (SVG can carry script).
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})

Scope = dict[str, Any]
Message = dict[str, Any]


def is_file_route(path: str) -> bool:
    """True for Gradio's routes that serve files from disk (``/gradio_api/file=...``, ``/file/...``)."""
    return "/file=" in path or "/file/" in path


def safe_file_headers(headers: list[tuple[bytes, bytes]], file_route: bool) -> list[tuple[bytes, bytes]]:
    """The response headers with nosniff added and, on a file route, non-images made downloads."""
    out = [(k, v) for k, v in headers if k.lower() != b"x-content-type-options"]
    out.append((b"x-content-type-options", b"nosniff"))
    if not file_route:
        return out
    content_type = next((v for k, v in out if k.lower() == b"content-type"), b"")
    base = content_type.split(b";")[0].strip().lower().decode("latin-1")
    if base in INLINE_TYPES:
        return out
    out = [(k, v) for k, v in out if k.lower() not in (b"content-type", b"content-disposition")]
    out += [(b"content-type", b"application/octet-stream"), (b"content-disposition", b"attachment")]
    return out


class SafeFileHeaders:
    """ASGI middleware applying ``safe_file_headers`` to every HTTP response."""

    def __init__(self, app: Callable[[Scope, Callable, Callable], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        file_route = is_file_route(scope.get("path", ""))

        async def send_safe(message: Message) -> None:
            if message.get("type") == "http.response.start":
                message = dict(message, headers=safe_file_headers(list(message.get("headers", [])), file_route))
            await send(message)

        await self.app(scope, receive, send_safe)
