"""Checkpoints of a training run: writing them, and restoring everything so the next step is the one
that would have come (bit-exact resume).

Two layouts, both written atomically by ``studio.checkpoints.save_checkpoint``:

* the **tensor checkpoint** (fine-tune; use it in a new trainer): ``trainable.safetensors``
  (named weights, ``<module>.<parameter>``), ``optimizer.pt`` and ``scheduler.pt`` (torch state
  dicts, read back with ``weights_only=True``), ``ema.safetensors``, ``rng.safetensors`` (each
  process's generators) and ``state.json`` (step, world size, config, extras).
  ``save_tensor_checkpoint`` / ``load_tensor_checkpoint``.
* the **DDPM checkpoint**: ``unet.safetensors``, ``training_state.pt`` (optimizer, schedule,
  EMA, every RNG, the batch sampler, the loss curve; ``weights_only=True``) and
  ``trainer_state.json``. ``save_ddpm_checkpoint`` / ``load_checkpoint``.

A torch file holding anything but tensors, numbers, strings, lists and dicts is refused
unread (``load_plain``): such a pickle could run code.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.checkpoints import save_checkpoint
from studio.errors import CheckpointError
from studio.runs import RunDir
from studio.trainers.batches import BatchSampler
from studio.trainers.reporting import NonFiniteLossError


# ----------------------------------------------------------------------------- shared
def load_plain(path: Path) -> Any:
    """A torch file of tensors, numbers, strings, lists and dicts only (``weights_only=True``).

    Raises:
        CheckpointError: when the file holds anything else: such a pickle could run code
            when loaded, so it is refused without being run.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"Refused to load {path.parent.name}/{path.name}: it holds Python objects other than "
                              "tensors and numbers, which could run code when loaded.",
                              "Resume only from checkpoints this studio wrote, or start a new run.") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"Cannot read {path.parent.name}/{path.name}: {str(exc).splitlines()[0][:200]}",
                              "Resume from another checkpoint, or start a new run.") from None


def check_weights_finite(model: torch.nn.Module, step: int) -> None:
    """Refuse to checkpoint non-finite weights.

    Raises:
        NonFiniteLossError: when a weight of ``model`` is NaN or infinite.
    """
    if not weights_finite(model):
        raise NonFiniteLossError(f"The weights became non-finite before step {step}; nothing was saved.",
                                 "Lower the learning rate or enable gradient clipping.")


def gather_from_processes(value: Any, accelerator: Any) -> list[Any]:
    """``[value]`` of this process, or every process's in rank order (all processes must call it)."""
    if accelerator.num_processes <= 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


# ----------------------------------------------------------------------------- tensor checkpoint
def generator_states(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """This process's RNG states as uint8 tensors: torch's global one, ``generators`` by name, each CUDA device."""
    state = {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return {k: v.cpu().contiguous() for k, v in state.items()}


def trainable_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every tensor that trains (``requires_grad``) of ``modules``, named ``<key>.<parameter>``."""
    return {f"{prefix}.{name}": p.detach() for prefix, module in modules.items()
            for name, p in module.named_parameters() if p.requires_grad}


def save_tensor_checkpoint(run: RunDir, step: int, *, trainable: dict[str, torch.Tensor], optimizer: Any,
                           lr_scheduler: Any, ema: Any, rngs: list[dict[str, torch.Tensor]], config: dict,
                           keep: int, extra: dict | None = None) -> Path:
    """Write a tensor checkpoint (main process; ``rngs`` from ``gather_from_processes(generator_states(...))``).

    Args:
        trainable: Every trained tensor by name, ``<module>.<parameter>`` (e.g. ``unet.conv_in.weight``).
        ema: diffusers' ``EMAModel`` or None.
        keep: How many checkpoints to keep (older ones are removed).
        extra: More JSON values for ``state.json``.
    """
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                  str(folder / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), folder / "scheduler.pt")
        if ema is not None:
            state = ema.state_dict()
            shadow = state.pop("shadow_params")
            save_file({f"shadow.{i}": t.detach().contiguous().cpu() for i, t in enumerate(shadow)},
                      str(folder / "ema.safetensors"), metadata={"state": json.dumps(state)})
        save_file({f"rank{r}.{name}": t for r, state in enumerate(rngs) for name, t in state.items()},
                  str(folder / "rng.safetensors"))
        (folder / "state.json").write_text(json.dumps({"step": step, "world_size": len(rngs), "config": config,
                                                       **(extra or {})}, indent=1))

    return save_checkpoint(run.checkpoints_dir, step, write, keep=keep)


def load_tensor_checkpoint(folder: Path, *, modules: dict[str, torch.nn.Module], optimizer: Any, lr_scheduler: Any,
                           ema: Any, generators: dict[str, torch.Generator], rank: int, world: int) -> dict[str, Any]:
    """Restore everything ``save_tensor_checkpoint`` wrote; returns ``state.json`` (``step``, extras).

    Args:
        modules: The (unwrapped) modules by the prefix their weights carry, e.g. ``{"unet": unet}``.
        generators: This process's generators by name, as given to ``generator_states``.

    Raises:
        CheckpointError: a checkpoint for another model, saved by fewer processes, or holding a
            torch file with anything but plain tensors and numbers (refused unread).
    """
    from safetensors.torch import load_file

    for key, tensor in load_file(str(folder / "trainable.safetensors")).items():
        prefix, name = key.split(".", 1)
        param = dict(modules[prefix].named_parameters()).get(name) if prefix in modules else None
        if param is None or param.shape != tensor.shape:
            raise CheckpointError(f"Checkpoint {folder.name} does not match this model ({key}).",
                                  "Resume with the same base model and method, or start a new run.")
        with torch.no_grad():
            param.copy_(tensor.to(param.device, param.dtype))
    optimizer.load_state_dict(load_plain(folder / "optimizer.pt"))
    lr_scheduler.load_state_dict(load_plain(folder / "scheduler.pt"))
    if ema is not None:
        load_ema(folder, ema)
    restore_generator_states(folder, generators, rank, world)
    return json.loads((folder / "state.json").read_text())


def load_ema(folder: Path, ema: Any) -> None:
    """The EMA weights and counters from ``ema.safetensors`` (or an older ``ema.pt``, tensors only)."""
    from safetensors import safe_open

    if (folder / "ema.safetensors").is_file():
        with safe_open(str(folder / "ema.safetensors"), framework="pt") as fh:
            state = json.loads((fh.metadata() or {}).get("state", "{}"))
            shadow = [fh.get_tensor(f"shadow.{i}") for i in range(len(list(fh.keys())))]
    elif (folder / "ema.pt").is_file():
        state = load_plain(folder / "ema.pt")
        shadow = state.pop("shadow_params", None) or []
    else:
        return
    if len(shadow) != len(ema.shadow_params) or any(a.shape != b.shape for a, b in zip(shadow, ema.shadow_params)):
        raise CheckpointError(f"The EMA weights of checkpoint {folder.name} do not match this model.",
                              "Resume with the same base model and method, or start a new run.")
    state["shadow_params"] = [t.to(p.device, p.dtype) for t, p in zip(shadow, ema.shadow_params)]
    ema.load_state_dict(state)


def restore_generator_states(folder: Path, generators: dict[str, torch.Generator], rank: int, world: int) -> None:
    """Give this process back its own RNG states (each rank draws its own noise and timesteps)."""
    from safetensors.torch import load_file

    if (folder / "rng.safetensors").is_file():
        saved = load_file(str(folder / "rng.safetensors"))
        ranks = {key.split(".", 1)[0] for key in saved}
        if f"rank{rank}" not in ranks:
            raise CheckpointError(f"Checkpoint {folder.name} was saved by {len(ranks)} process(es); "
                                  f"this run has {world}.", "Resume with the same number of processes.")
        state = {key.split(".", 1)[1]: t for key, t in saved.items() if key.startswith(f"rank{rank}.")}
    else:  # checkpoints written before per-process states: one state for all
        state = load_plain(folder / "rng.pt")
        state.update({f"cuda.{i}": s for i, s in enumerate(state.pop("cuda", []))})
    torch.set_rng_state(state["torch"])
    for name, generator in generators.items():
        generator.set_state(state[name])
    cuda = [state[f"cuda.{i}"] for i in range(len(state)) if f"cuda.{i}" in state]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- DDPM checkpoint
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


def load_ddpm_checkpoint(folder: Path, unet, ema, optimizer, lr_scheduler, accelerator, sampler: BatchSampler,
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


def save_ddpm_checkpoint(run: RunDir, step: int, *, unet: torch.nn.Module, optimizer: Any, lr_scheduler: Any,
                         ema: Any, accelerator: Any, sampler: BatchSampler, noise_gen: torch.Generator,
                         smoothed_loss: list[float], config: dict, total: int, keep: int) -> Path:
    """Write a DDPM checkpoint; every process takes part (each one's RNG states are gathered).

    Returns:
        The checkpoint folder (on the other processes: the run's ``checkpoints/``).

    Raises:
        NonFiniteLossError: the weights are not finite (nothing is written).
    """
    check_weights_finite(unet, step)
    rng = gather_from_processes(rng_state(noise_gen), accelerator)
    path = run.checkpoints_dir
    if accelerator.is_main_process:
        state = {"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                 "ema": ema.state_dict() if ema is not None else None, "rng": rng,
                 "sampler": sampler.state_dict(), "smoothed_loss": list(smoothed_loss)}
        trainer_state = {"step": step, "total": total, "world_size": accelerator.num_processes,
                         "epoch": sampler.epoch, "config": config}
        path = save_checkpoint(run.checkpoints_dir, step, _DDPMWriter(unet, state, trainer_state), keep=keep)
    accelerator.wait_for_everyone()
    return path


class _DDPMWriter:
    """Writes a DDPM checkpoint's files into the folder ``save_checkpoint`` hands it."""

    def __init__(self, unet: torch.nn.Module, state: dict, trainer_state: dict) -> None:
        self.unet, self.state, self.trainer_state = unet, state, trainer_state

    def __call__(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.unet.state_dict().items()},
                  str(folder / "unet.safetensors"))
        torch.save(self.state, folder / "training_state.pt")
        (folder / "trainer_state.json").write_text(json.dumps(self.trainer_state, indent=1), encoding="utf-8")
