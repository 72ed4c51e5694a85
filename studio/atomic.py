"""Atomic file writes: a file is either its old complete version or its new one.

Every image a run leaves behind (sample grids, validation images, ``progress.gif``)
is written to a temporary file beside its target, flushed to disk and then renamed
over it with ``os.replace``. A process killed mid-write (``kill -9``, power loss)
leaves at most a stray ``.*.tmp`` file, never a truncated PNG that would break the
next resume.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it to ``path``.

    Args:
        path: The final file.
        write: Writes the whole content to the path it is given.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_image(image: Any, path: str | Path, **params: Any) -> Path:
    """``image.save(path, **params)`` (a PIL image), atomically; the format follows ``path``'s suffix."""
    path = Path(path)
    fmt = {".png": "PNG", ".gif": "GIF", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower())
    return write_atomic(path, lambda tmp: image.save(tmp, format=fmt, **params))


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete ``.*.tmp`` files a killed writer left in ``folder``."""
    for stray in Path(folder).glob(".*.tmp"):
        stray.unlink(missing_ok=True)
