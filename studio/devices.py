"""Which device and dtype to compute on.

``auto`` picks CUDA, then Apple MPS, then CPU. On CPU we always use fp32: this
machine class has no native bf16, where autocast is about 10x slower.
"""

from __future__ import annotations

import threading

from studio.errors import ConfigError

#: Serialises building and loading models across threads. diffusers' ``from_pretrained``
#: (through accelerate's ``init_empty_weights``) and peft's adapter injection patch
#: ``nn.Module.register_parameter`` for the whole process while they run, so a model
#: built meanwhile in another thread (a training job while Generate loads a model)
#: would silently get empty ``meta`` tensors. Every model construction takes this lock.
MODEL_INIT_LOCK = threading.RLock()


def resolve_device(preference: str = "auto") -> str:
    """Map auto|cpu|cuda|mps (or 'cuda:1') to a device string torch accepts.

    Raises:
        ConfigError: when the requested accelerator is not available.
    """
    import torch

    pref = (preference or "auto").strip().lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("CUDA was requested but no CUDA GPU is available to torch.",
                              "Use --device cpu, or install a CUDA build of torch.")
        return pref
    if pref == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ConfigError("MPS was requested but this machine has no Apple GPU available to torch.",
                              "Use --device cpu.")
        return "mps"
    if pref == "cpu":
        return "cpu"
    raise ConfigError(f"Unknown device {preference!r}: use auto, cpu, cuda or mps.")


def inference_dtype(device: str):
    """fp16 on CUDA/MPS (bf16 where the GPU supports it well is left to the caller), fp32 on CPU."""
    import torch

    if device.startswith("cuda") or device == "mps":
        return torch.float16
    return torch.float32
