"""The engine behind the page: torch, diffusers and the trainers, loaded in the background.

Importing torch and diffusers takes 10-20 s on a small machine, longer than Gradio
itself. The app serves its page first and loads the engine in one background thread
(``EngineLoader.start``, called by ``launch.py`` once the page is served, never
at import time); the buttons that need it say "loading the engine…" until ``ready``. Code that
needs the engine calls ``EngineLoader.wait()`` first, so nothing resolves diffusers'
lazy imports while the loader thread does (two threads resolving them at once can
fail with ImportError). Nothing here imports torch at import time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from studio.errors import ModelError, describe_exception

log = logging.getLogger(__name__)

#: The states an ``EngineLoader`` goes through: idle -> loading -> ready | failed.
IDLE, LOADING, READY, FAILED = "idle", "loading", "ready", "failed"


def load_engine() -> None:
    """Import the heavy libraries and the studio modules that use them, in the calling thread.

    diffusers resolves its classes lazily; resolving the ones the studio uses here, once,
    means no two threads resolve them at the same time later.
    """
    import torch  # noqa: F401
    import diffusers  # noqa: F401
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler,  # noqa: F401
                           DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel)
    from diffusers.optimization import get_scheduler  # noqa: F401
    from diffusers.training_utils import EMAModel  # noqa: F401

    import studio.generate  # noqa: F401
    import studio.models  # noqa: F401
    import studio.trainers.ddpm  # noqa: F401
    import studio.trainers.text_to_image  # noqa: F401


class EngineLoader:
    """Loads the engine once, in a background thread, and says when it is ready.

    Args:
        load: What loading means (``load_engine``; tests pass a function they control).
    """

    def __init__(self, load: Callable[[], None] = load_engine) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._state = IDLE
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.seconds: float | None = None  # how long loading took, once done

    @property
    def state(self) -> str:
        """idle, loading, ready or failed."""
        return self._state

    @property
    def ready(self) -> bool:
        return self._state == READY

    @property
    def error(self) -> str:
        """The reason loading failed, as one line ("" unless failed)."""
        return describe_exception(self._error) if self._error is not None else ""

    def start(self) -> None:
        """Start loading in a background thread (once; later calls do nothing)."""
        with self._lock:
            if self._state != IDLE:
                return
            self._state = LOADING
            self._thread = threading.Thread(target=self._run, args=(True,), name="studio-engine", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the engine is loaded; load it here and now when nobody started it.

        Raises:
            ModelError: when loading failed (or did not finish within ``timeout`` seconds).
        """
        with self._lock:
            inline = self._state == IDLE
            if inline:
                self._state = LOADING
        if inline:
            self._run(background=False)
        elif not self._done.wait(timeout):
            raise ModelError(f"The engine is still loading after {timeout:g} s.", "Try again in a moment.")
        if self._state == FAILED:
            raise ModelError(f"The engine (torch, diffusers) failed to load: {self.error}",
                             "Check the install: pip install -r requirements.txt, then restart the studio.")

    def _run(self, background: bool) -> None:
        if background:
            _lower_priority()
        started = time.perf_counter()
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - kept and reported by wait() and the page
            log.exception("Loading the engine failed")
            self._error = exc
            self._state = FAILED
        else:
            self._state = READY
        self.seconds = time.perf_counter() - started
        if background and self._state == READY:
            log.info("Engine loaded in %.1f s", self.seconds)
        self._done.set()


def _lower_priority() -> None:
    """Let the page's threads go first: raise the calling thread's nice value (Linux: per thread)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
    except (AttributeError, OSError):  # not Linux, or not permitted: load at normal priority
        pass
