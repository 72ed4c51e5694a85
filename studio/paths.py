"""Paths a person gives, confined: writes stay in the workspace, reads stay in the chosen folder.

The studio is shared through a browser (``--share``, a LAN bind); whoever holds a
login must not write outside the workspace nor read outside the dataset folder they
picked. Every user-given path goes through here:

- ``confine(path, root)``: a path to write to, resolved (``..`` and symlinks
  followed) and refused unless it lands inside ``root``; relative paths are taken
  inside ``root``.
- ``refusal(path, root, max_bytes)``: why a file found in a dataset folder must not
  be read (a link leading out of the folder, a FIFO/device/socket, too big), or "".
  The reason never depends on whether a file outside the folder exists.
- ``read_confined(path, root, max_bytes)``: the bytes of such a file, checked again
  on the open file descriptor (no FIFO can block, no file can grow past the limit).
- ``inside_name(name)``: a relative name from a metadata file, or None when it
  names something outside its folder (absolute, ``..``, a drive).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

from studio.errors import ConfigError

#: Largest image file read from a folder (the pixel limit of ``studio.images`` catches bombs
#: after decoding; this stops an endless or giant file before it is read into memory).
MAX_IMAGE_FILE_BYTES = 256 * 2**20
#: Largest caption or metadata file read from a folder.
MAX_TEXT_FILE_BYTES = 16 * 2**20


class RefusedPath(OSError):
    """A file the studio will not read; ``reason`` says why, in words for the person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_inside(path: str | Path, root: str | Path) -> bool:
    """True when ``path`` (symlinks resolved) is ``root`` or inside it."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def confine(path: str | Path, root: str | Path, what: str = "This path") -> Path:
    """``path`` resolved inside ``root`` (relative paths are taken inside it).

    Args:
        path: What the person typed (absolute, relative, with ``~``).
        root: The folder writes must stay in (usually the workspace).
        what: How the message names the path ("The export folder").

    Raises:
        ConfigError: when the resolved path (``..`` and symlinks followed) leaves ``root``.
    """
    root = Path(root).expanduser().resolve()
    text = str(path).strip()
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise ConfigError(f"{what} {text!r} is outside the workspace {root}; the studio writes only there.",
                          "Give a folder name inside the workspace (e.g. exports/my-set), or leave it empty.")
    return resolved


def inside_name(name: str) -> PurePosixPath | None:
    """A relative name from a metadata file, normalised; None when it leaves its folder."""
    text = str(name).replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return None
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return PurePosixPath(*parts)


def refusal(path: str | Path, root: str | Path, max_bytes: int) -> str:
    """Why ``path`` (found in the folder ``root``) must not be read, or "" when it may be.

    A symlink may point elsewhere inside ``root``; one that leads out is refused with the
    same words whether or not its target exists, so nothing is learnt about other files.
    """
    path, root = Path(path), Path(root).resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return "is a link that cannot be followed"
    if not resolved.is_relative_to(root):
        return "is a link that points outside the chosen folder"
    try:
        st = resolved.stat()
    except OSError:
        return "is a link to nothing" if path.is_symlink() else "cannot be read"
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file (a {_kind(st.st_mode)})"
    if st.st_size > max_bytes:
        return f"is too big ({st.st_size / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB)"
    return ""


def read_confined(path: str | Path, root: str | Path, max_bytes: int) -> bytes:
    """The bytes of a file in the folder ``root``, refused as ``refusal`` says.

    The checks are repeated on the open descriptor (opened non-blocking, without following
    a link swapped in meanwhile), and at most ``max_bytes`` are ever read.

    Raises:
        RefusedPath: with the reason.
    """
    reason = refusal(path, root, max_bytes)
    if reason:
        raise RefusedPath(reason)
    resolved = Path(path).resolve()
    try:
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise RefusedPath(f"cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise RefusedPath(f"is not a regular file (a {_kind(st.st_mode)})")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RefusedPath(f"is too big (over {max_bytes / 2**20:.0f} MB)")
    return data


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISDIR(mode):
        return "folder"
    return "special file"
