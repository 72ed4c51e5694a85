"""What updates the weights: the optimizer, the learning-rate schedule and the EMA copy.

A trainer calls::

    optimizer = make_optimizer(params_or_groups, lr=..., device=device)   # fused AdamW (or 8-bit)
    lr_scheduler = make_lr_schedule(cfg.lr_scheduler, optimizer, warmup, total)
    # or, for two parameter groups trained one after the other (an autoencoder, then a diffusion model):
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, two_stage_lr_factors(name, warmup, total, first))
    ema = make_ema(unet, UNet2DModel, decay=..., warmup=True)            # None when EMA is off
    ... each step: optimizer.step(); lr_scheduler.step(); ema.step(unet.parameters())
    with ema_weights(ema, unet): ...                                     # sample / export with EMA weights

The EMA is diffusers' ``EMAModel`` with its own ``step``, built with ``foreach=False``: that
path computes ``ema -= (1 - decay) * (ema - p)`` exactly as the trainers always have
(``tests/test_ddpm_trainer.py`` checks it bit for bit against ``speed.ema_update_``). Its
``foreach=True`` path is not bit-exact (it folds the multiply into ``sub_(alpha=...)``, a fused
multiply-add that rounds differently), so it is not used; see DEVELOPERS.md.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from studio.trainers.speed import make_optimizer as fused_adamw


def make_optimizer(params: Iterable[Any], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   weight_decay: float = 1e-2, eps: float = 1e-8, device: Any = "cpu",
                   eight_bit: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``params`` (parameters or parameter groups): torch's fused kernel where the device
    has one (``speed.make_optimizer``), or bitsandbytes' 8-bit AdamW when ``eight_bit``."""
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    return fused_adamw(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, device=device)


def make_lr_schedule(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> Any:
    """diffusers' learning-rate schedule ``name`` (constant, cosine, ...) over ``total_steps``."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def two_stage_lr_factors(name: str, warmup_steps: int, total_steps: int, first_stage_steps: int) -> list[Any]:
    """Learning-rate factors by step of two parameter groups trained one after the other: the first
    group's constant during its ``first_stage_steps`` (0 after), the second's schedule ``name`` with its
    warm-up counted from the second stage's first step (``torch.optim.lr_scheduler.LambdaLR``'s lambdas).
    (``functools.partial``s: LambdaLR's state then holds no code, so ``weights_only`` loads it.)"""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    second = make_lr_schedule(name, probe, warmup_steps, total_steps).lr_lambdas[0]
    return [functools.partial(_until, first_stage_steps), functools.partial(_from, second, first_stage_steps)]


def _until(end: int, step: int) -> float:
    return 1.0 if step < end else 0.0


def _from(schedule: Any, start: int, step: int) -> float:
    return float(schedule(step - start)) if step >= start else 0.0


def make_ema(model: torch.nn.Module, model_cls: Any, *, decay: float = 0.9999, warmup: bool = False,
             inv_gamma: float = 1.0, power: float = 2 / 3, update_after_step: int = 0) -> Any:
    """diffusers' ``EMAModel`` of ``model``'s parameters (on their device), stepped by its own ``step``.

    Args:
        model: The model being trained (unwrapped).
        model_cls: Its class (saved in the EMA's state, for ``EMAModel.from_pretrained``).
        decay: The largest decay; with ``warmup`` it grows as 1 - (1 + step / inv_gamma) ** -power.
    """
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=decay, use_ema_warmup=warmup, inv_gamma=inv_gamma, power=power,
                    update_after_step=update_after_step, foreach=False, model_cls=model_cls,
                    model_config=model.config)


@contextlib.contextmanager
def ema_weights(ema: Any, model: torch.nn.Module) -> Iterator[None]:
    """Inside: ``model`` holds the EMA weights (for samples, validation); after: its own again.
    Does nothing when ``ema`` is None."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())
