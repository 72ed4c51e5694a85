"""The exceptions the studio shows to a person verbatim.

Anything raised as a ``StudioError`` carries a message written for the user: what
went wrong and what to do about it. Every other exception is a bug; the UI shows a
short generic line for those and the traceback goes to the run's log, not the page.
"""

from __future__ import annotations


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


def describe_exception(exc: BaseException) -> str:
    """One line for the UI: the StudioError message, or a generic line for bugs.

    Args:
        exc: The exception that ended an action.

    Returns:
        A message without a traceback.
    """
    if isinstance(exc, StudioError):
        return exc.user_message
    if isinstance(exc, MemoryError):
        return "Out of memory. Try a smaller batch size or resolution."
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"Unexpected error ({name}{': ' + text[:300] if text else ''}). Details are in the terminal log."
