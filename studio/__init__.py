"""Diffusion Studio's engine: datasets, training jobs, model loading and generation.

Nothing here imports gradio, and importing the package has no side effects (no
threads, no argv parsing, no torch patching). The Gradio tabs in ``tabs/`` and the
headless CLI (``python -m studio``) both drive these modules.
"""

__version__ = "0.1.0"


def preload_engine() -> None:
    """Import the heavy libraries once, in the calling thread.

    diffusers resolves its classes lazily; two threads resolving them at the same
    time (a training job and a page-load handler) can fail with ImportError. The
    app calls this once while it is built, before any worker thread runs.
    """
    import diffusers  # noqa: F401
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler,  # noqa: F401
                           DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel)
    from diffusers.optimization import get_scheduler  # noqa: F401
    from diffusers.training_utils import EMAModel  # noqa: F401
