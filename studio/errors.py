"""The exceptions the studio shows to a person verbatim.

Anything raised as a ``StudioError`` carries a message written for the user: what
went wrong and what to do about it. Every other exception is a bug; the UI shows a
short generic line for those and the traceback goes to the run's log, not the page.
"""

from __future__ import annotations

import errno
import re


class StudioError(Exception):
    """An error with a message a person can act on.

    Args:
        message: What went wrong, in plain words.
        hint: Optional next step ("Check the path", "Log in with `hf auth login`").
    """

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.user_message)

    @property
    def user_message(self) -> str:
        """The message plus the hint, as shown in the UI and the CLI."""
        return f"{self.message} {self.hint}".strip() if self.hint else self.message


class ConfigError(StudioError):
    """A setting is missing, out of range or inconsistent with another one."""


class DataError(StudioError):
    """A dataset source cannot be read or holds no usable images."""


class ModelError(StudioError):
    """A model reference cannot be resolved or loaded."""


class JobError(StudioError):
    """A job cannot be started, stopped or resumed (e.g. another one is running)."""


class CheckpointError(StudioError):
    """A checkpoint is missing, incomplete or damaged."""


class StorageError(StudioError):
    """The disk is full, or a file or folder cannot be written or read (permissions, a file for a folder)."""


class Stopped(StudioError):
    """The person pressed Stop (or Ctrl-C) while a phase before or between training steps ran.

    Raised by the phase itself (data loading, latent caching, class images, model loading)
    through ``studio.stopping``; a trainer turns it into its ``stopped`` event, and a job
    whose target lets it through ends "stopped", never "failed".
    """



_ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """``text`` without ANSI escape sequences or control characters (safe to show on a page)."""
    return _CONTROL.sub("", _ANSI.sub("", text))


def storage_error(exc: OSError) -> StorageError | None:
    """The ``StorageError`` a person can act on for a disk/permission ``OSError`` (None for others)."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return StorageError(f"The disk is full{where}.",
                            "Free some space, then resume: the last complete checkpoint is intact.")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"Cannot write or read here: {exc.strerror or 'permission denied'}{where}.",
                            "Choose a workspace folder you may write to (--workspace).")
    if code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return StorageError(f"A file stands where a folder should be, or the other way round{where}.",
                            "Move it aside or choose another workspace folder (--workspace).")
    if code in (errno.ENAMETOOLONG, errno.ELOOP, errno.EMFILE, errno.ENFILE, errno.EIO, errno.EFBIG):
        return StorageError(f"{exc.strerror or 'Input/output error'}{where}.",
                            "Check the disk and the path, then try again.")
    return None


_ALLOC = re.compile(r"(?:[Tt]ried to allocate|you tried to allocate) ([\d.]+ ?[KMGT]?i?B|\d+ bytes)")


def memory_error(exc: BaseException) -> StudioError | None:
    """The ``StudioError`` for running out of memory (RAM or GPU), or None for anything else.

    Recognises ``MemoryError``, torch's ``OutOfMemoryError`` (CUDA/MPS) and the CPU
    allocator's "can't allocate memory" ``RuntimeError`` without importing torch.
    """
    text = str(exc)
    lower = text.lower()
    if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and ("out of memory" in lower or "can't allocate memory" in lower
                                                   or "not enough memory" in lower))):
        return None
    where = "GPU" if ("cuda" in lower or "mps" in lower or "gpu" in lower) else "RAM"
    asked = _ALLOC.search(text)
    size = asked.group(1) if asked else ""
    if size.endswith(" bytes") and size[:-6].isdigit():
        size = f"{int(size[:-6]) / 2**30:.1f} GiB"
    return StudioError(f"Out of memory ({where}{': it asked for ' + size + ' more' if size else ''}).",
                       "Try a smaller batch size, resolution or model; the memory plan line shows what fits.")


def describe_exception(exc: BaseException) -> str:
    """One line for the UI: the StudioError message, or a generic line for bugs.

    Disk and permission errors become a ``StorageError`` message, running out of RAM or
    GPU memory a ``memory_error`` line; ANSI escapes and
    control characters never reach the page.

    Args:
        exc: The exception that ended an action.

    Returns:
        A message without a traceback.
    """
    if isinstance(exc, OSError) and not isinstance(exc, StudioError):
        exc = storage_error(exc) or exc
    if not isinstance(exc, StudioError):
        exc = memory_error(exc) or exc
    if isinstance(exc, StudioError):
        return clean_text(exc.user_message)
    plain = clean_text(str(exc)).strip()
    text = plain.splitlines()[0] if plain else ""
    name = type(exc).__name__
    return f"Unexpected error ({name}{': ' + text[:300] if text else ''}). Details are in the terminal log."
