"""The diffusion training loss: the noise drawn, the target of each prediction type, min-SNR weighting.

``diffusion_loss`` is the DDPM's (one number per batch); ``per_sample_loss`` the fine-tune's
(one number per image, so DreamBooth can weigh instance and class images). Min-SNR-gamma
(Hang et al. 2023) weights each sample by min(SNR, gamma) divided by SNR (epsilon),
SNR + 1 (v-prediction) or 1 (clean-image prediction).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at ``timesteps`` (as diffusers' compute_snr)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return (a.sqrt() / (1.0 - a).sqrt()) ** 2


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, device: Any, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise of ``shape`` from ``generator``, plus offset noise (one value per sample and
    channel, times ``offset``) when ``offset`` is not 0 (drawn after the noise, from the same generator)."""
    noise = torch.randn(shape, generator=generator, device=device)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device)
    return noise


def diffusion_target(noise_scheduler: Any, prediction_type: str, clean: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: the noise (epsilon), the velocity, or the clean sample."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    return clean


def diffusion_loss(pred: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   noise_scheduler: Any, prediction_type: str, snr_gamma: float) -> torch.Tensor:
    """MSE against the target of ``prediction_type`` over the batch, optionally min-SNR weighted."""
    target = diffusion_target(noise_scheduler, prediction_type, clean, noise, timesteps)
    if not snr_gamma:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    s = snr(noise_scheduler.alphas_cumprod, timesteps)
    weights = torch.clamp(s, max=snr_gamma)
    if prediction_type == "epsilon":
        weights = weights / s
    elif prediction_type == "v_prediction":
        weights = weights / (s + 1)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any,
                    prediction_type: str, snr_gamma: float) -> torch.Tensor:
    """MSE of each sample against ``target``, optionally min-SNR weighted (diffusers' ``compute_snr``)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        from diffusers.training_utils import compute_snr

        s = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(s, max=snr_gamma)
        weights = weights / s if prediction_type == "epsilon" else weights / (s + 1)
        per_sample = per_sample * weights
    return per_sample
