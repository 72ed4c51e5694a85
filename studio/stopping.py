"""Stop in every phase: the checks a job's phases make against its stop flag.

A trainer's loop looks at ``stop`` once per step; the phases before it (reading and
checking the dataset, downloading a Hub dataset, caching latents, making DreamBooth
class images, loading a model) and the sampling between steps call ``raise_if_stopped``
between their own units of work (an image, a batch, a denoising step), so Stop takes
effect within one unit, not after the whole phase. A call that cannot be cut into
units (a Hub download inside ``datasets``) runs through ``call_stoppable``: it goes on
in a helper thread while this one watches the flag, and Stop returns at once.

``Stopped`` (a ``StudioError``) carries "Stopped while <phase>."; the trainers turn it
into their ``stopped`` event and ``studio.jobs`` ends such a job "stopped", not "failed".
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

from studio.errors import Stopped

T = TypeVar("T")

__all__ = ["Stopped", "raise_if_stopped", "call_stoppable"]


def raise_if_stopped(stop: threading.Event | None, what: str) -> None:
    """Raise ``Stopped("Stopped while <what>.")`` when ``stop`` is set."""
    if stop is not None and stop.is_set():
        raise Stopped(f"Stopped while {what}.")


def call_stoppable(fn: Callable[[], T], stop: threading.Event | None, what: str, poll_s: float = 0.1) -> T:
    """``fn()``, returning (or raising) what it does, unless ``stop`` is set first.

    With a stop flag, ``fn`` runs in a daemon thread and this thread checks the flag
    every ``poll_s`` seconds; on Stop it raises ``Stopped`` at once and leaves the helper
    to finish on its own (a download then completes or fails in the background, into
    the Hugging Face cache, which resumes a partial file the next time).
    """
    raise_if_stopped(stop, what)
    if stop is None:
        return fn()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"stoppable: {what}"[:60], daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(poll_s)
        if worker.is_alive():
            raise_if_stopped(stop, what)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
