"""Setting a training run up: importing diffusers from a thread, a fresh accelerator per run.
"""

from __future__ import annotations

import os
import time
from typing import Any

from studio.config.train import TrainConfig


def import_diffusers() -> tuple[Any, Any, Any, Any]:
    """diffusers' training classes, also those used later (sampling, export), imported now.

    The app imports diffusers from several threads (this job, the Generate tab...). When
    two threads import interdependent submodules at once, Python breaks the lock cycle by
    handing one of them a partly initialised module, and ``from diffusers import X`` fails
    with ImportError; a moment later the other thread has finished, so we try again.
    """
    for attempt in range(40):
        try:
            from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: F401
            from diffusers.optimization import get_scheduler
            from diffusers.training_utils import EMAModel
            return DDPMScheduler, UNet2DModel, get_scheduler, EMAModel
        except ImportError:
            if attempt == 39:
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


def fresh_accelerator(cfg: TrainConfig, device: str):
    """An Accelerator for this run; in a single process the global accelerate state is reset
    first, so runs with different settings can follow each other in one app."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=device == "cpu")

