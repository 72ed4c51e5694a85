"""Diffusion Studio's engine: datasets, training jobs, model loading and generation.

Nothing here imports gradio, and importing the package has no side effects (no
threads, no argv parsing, no torch patching). The Gradio tabs in ``tabs/`` and the
headless CLI (``python -m studio``) both drive these modules.
"""

__version__ = "0.1.0"

