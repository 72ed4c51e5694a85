"""What a checkpoint holds besides the weights, and restoring it: RNG states, finite weights, the DDPM state.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.errors import CheckpointError
from studio.trainers.batches import BatchSampler


def rng_state(noise_gen: torch.Generator) -> dict[str, Any]:
    """The state of every RNG this process draws from (python, numpy, torch, CUDA, its noise generator)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "noise": noise_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], noise_gen: torch.Generator) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    noise_gen.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every weight of ``model`` is finite (one foreach kernel, one host sync)."""
    norms = torch._foreach_norm([p.detach().float() for p in model.parameters()])
    return bool(torch.isfinite(torch.stack(norms)).all())


def load_checkpoint(folder: Path, unet, ema, optimizer, lr_scheduler, accelerator, sampler: BatchSampler,
                    noise_gen: torch.Generator, rank: int, device: torch.device) -> tuple[int, float, float]:
    """Restore everything a checkpoint holds; returns (step, smoothed loss, debias)."""
    from safetensors.torch import load_file

    try:
        weights = load_file(str(folder / "unet.safetensors"))  # load_state_dict copies onto the device
        missing, unexpected = unet.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"Checkpoint {folder} holds a different UNet architecture than this config "
                f"({len(missing)} missing, {len(unexpected)} unexpected weights).",
                "Resume with the run's own config.json, or start a new run.")
        state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # objects other than tensors and numbers: refused, never run
        raise CheckpointError(f"Refused to load {folder.name}/training_state.pt: it holds Python objects other "
                              "than tensors and numbers, which could run code when loaded.",
                              "Resume only from checkpoints this studio wrote, or start a new run.") from None
    except RuntimeError as exc:  # shape mismatch from load_state_dict, damaged pickle
        raise CheckpointError(f"Checkpoint {folder} does not fit this model: {str(exc).splitlines()[0]}",
                              "Resume with the run's own config.json, or start a new run.") from None
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"Checkpoint {folder} has no EMA weights but use_ema is on.",
                                  "Resume with the run's own config.json.")
        ema.load_state_dict(state["ema"])
        ema.to(device)
    if len(state["sampler"]["perm"]) != sampler.n:
        raise CheckpointError(f"Checkpoint {folder} was trained on {len(state['sampler']['perm'])} images; "
                              f"the dataset now has {sampler.n}.",
                              "Resume with the same dataset (the run's config.json), or start a new run.")
    sampler.load_state_dict(state["sampler"])
    rngs = state["rng"]
    if rank >= len(rngs):
        raise CheckpointError(f"Checkpoint {folder} was saved by {len(rngs)} process(es); "
                              f"this run has more.", "Resume with the same number of processes.")
    set_rng_state(rngs[rank], noise_gen)
    smoothed, debias = state.get("smoothed_loss", [0.0, 0.0])
    return int(state["step"]), float(smoothed), float(debias)
