"""Data, process set-up and resume state for the DDPM trainer: what the loop uses but does not own.

Responsible for: the dataset as a decode-once uint8 tensor, the seeded shuffled batch
stream shared by all processes (``BatchSampler``), importing diffusers safely from a
thread, a fresh accelerate ``Accelerator`` per run, the RNG states a checkpoint holds,
and restoring everything a checkpoint holds. ``studio.trainers.ddpm`` calls these; the
loop itself (and writing checkpoints) lives there.
"""

from __future__ import annotations

import os
import pickle
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.config.train import TrainConfig
from studio.errors import CheckpointError


# ----------------------------------------------------------------------------- data
def load_images(cfg: TrainConfig, progress: Callable[[float, str], None] | None = None) -> torch.Tensor:
    """The dataset as a uint8 tensor ``[N, 3, R, R]`` from the decode-once tensor cache.

    Args:
        cfg: The run's settings (dataset, resolution, crop, workspace holding ``.cache``).
        progress: Optional ``progress(fraction, message)`` while images are decoded.
    """
    from studio.data import load_tensor_cache

    cache = load_tensor_cache(cfg.data, cfg.resolution, Path(cfg.workspace).expanduser() / ".cache",
                              center_crop=cfg.center_crop, progress=progress)
    return cache.pixels


class BatchSampler:
    """An endless shuffled stream of image indices and flip flags, shared by all processes.

    Every process draws the same global batch of ``batch_size * world`` indices from
    one seeded generator and keeps its own slice, so the shards differ per process and
    the stream's state (generator, permutation, position) is the same everywhere:
    one ``state_dict`` restores it exactly.
    """

    def __init__(self, num_images: int, batch_size: int, rank: int, world: int, seed: int) -> None:
        self.n, self.batch_size, self.rank, self.world = num_images, batch_size, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(self.n, generator=self.generator)
        self.pos = 0
        self.epoch = 0
        self.last_indices = torch.empty(0, dtype=torch.long)

    def _take(self, k: int) -> torch.Tensor:
        parts = []
        while k > 0:
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos, self.epoch = 0, self.epoch + 1
            chunk = self.perm[self.pos:self.pos + k]
            self.pos += len(chunk)
            k -= len(chunk)
            parts.append(chunk)
        return torch.cat(parts)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's (indices, flip mask) of the next global batch."""
        total = self.batch_size * self.world
        indices = self._take(total)
        flips = torch.rand(total, generator=self.generator) < 0.5
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        self.last_indices = indices[mine]
        return indices[mine], flips[mine]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "pos": self.pos,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos, self.epoch = state["perm"].clone(), int(state["pos"]), int(state["epoch"])


# ----------------------------------------------------------------------------- process set-up
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


# ----------------------------------------------------------------------------- resume state
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
