"""The training speed levers keep the math: same loss, same gradients, same weights.

Each lever in ``studio.trainers.speed`` is run side by side with the plain path on a
tiny UNet with attention: the fused AdamW, the foreach EMA (bit-exact to diffusers').
The UNet itself trains on the stock kernels: no C code, no thread-count changes, no
flush-to-zero (the removed attention kernel's fast-math build turned it on).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from studio.errors import ConfigError
from studio.trainers import speed


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                       attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def batch(n: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    noise = torch.randn(n, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, noise, t


def loss_and_grads(unet, x, noise, t):
    unet.zero_grad(set_to_none=True)
    loss = F.mse_loss(unet(x, t).sample, noise)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in unet.parameters()]


def train_steps(unet, optimizer, steps: int = 3):
    for i in range(steps):
        x, noise, t = batch(seed=10 + i)
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(unet(x, t).sample, noise).backward()
        optimizer.step()
    return [p.detach().clone() for p in unet.parameters()]


def processors(unet) -> list:
    from diffusers.models.attention_processor import Attention

    return [m.processor for m in unet.modules() if isinstance(m, Attention)]


def test_prepare_leaves_the_unet_threads_and_float_mode_alone(tmp_path):
    from diffusers import UNet2DModel

    unet = tiny_unet()
    keys = list(unet.state_dict())
    threads = torch.get_num_threads()
    for device in ("cpu", torch.device("cuda"), types.SimpleNamespace(device="cpu")):
        assert speed.prepare_unet_for_training(unet, device) is unet and "forward" not in vars(unet)
    x, noise, t = batch(n=4)
    loss_and_grads(unet, x, noise, t)
    assert torch.get_num_threads() == threads
    assert {type(p).__name__ for p in processors(unet)} == {"AttnProcessor2_0"}
    # denormals survive (a -ffast-math library loaded into the process turns on flush-to-zero)
    assert 1e-39 * 1.0 != 0.0 and torch.tensor([1e-39]).mul(1.0).item() != 0.0
    assert list(unet.state_dict()) == keys
    unet.save_pretrained(tmp_path / "unet")
    assert type(UNet2DModel.from_pretrained(tmp_path / "unet")) is UNet2DModel
    assert not hasattr(speed, "attention_kernel") and not hasattr(speed, "shard_batches")


def test_nan_in_attention_keys_propagates_like_sdpa():
    unet = tiny_unet()
    speed.prepare_unet_for_training(unet, "cpu")
    x, _, t = batch(n=2)
    attn = next(m for m in unet.modules() if type(m).__name__ == "Attention")
    handle = attn.to_k.register_forward_hook(lambda m, i, out: out.index_fill(1, torch.tensor([0]), float("nan")))
    try:
        with torch.no_grad():
            out = unet(x, t).sample
    finally:
        handle.remove()
    assert torch.isnan(out).any()


def test_make_optimizer_matches_default_adamw():
    a, b = tiny_unet(), tiny_unet()
    kwargs = dict(lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    default = torch.optim.AdamW(a.parameters(), **kwargs)
    fast = speed.make_optimizer(b.parameters(), device="cpu", **kwargs)
    assert fast.defaults["fused"] is True
    # one step: the fused kernel rounds differently by about one ulp (Adam magnifies that later)
    for wa, wb in zip(train_steps(a, default, steps=1), train_steps(b, fast, steps=1)):
        torch.testing.assert_close(wb, wa, rtol=1e-6, atol=1e-7)
    assert speed.make_optimizer([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, device="mps").defaults["foreach"]


def test_ema_update_is_bit_exact_to_diffusers_ema():
    from diffusers.training_utils import EMAModel

    unet = tiny_unet()
    params = list(unet.parameters())
    params[0].requires_grad_(False)  # a frozen tensor is copied, not averaged
    reference = EMAModel(params, decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    shadow = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.1)
    for i in range(4):
        x, noise, t = batch(seed=20 + i)
        optimizer.zero_grad()
        F.mse_loss(unet(x, t).sample, noise).backward()
        optimizer.step()
        with torch.no_grad():
            params[0].add_(0.5)
        reference.step(params)
        speed.ema_update_(shadow, params, reference.cur_decay_value)
        assert reference.cur_decay_value > 0 or i == 0
    for s, r in zip(shadow, reference.shadow_params):
        assert torch.equal(s, r)
    with pytest.raises(ConfigError, match="EMA"):
        speed.ema_update_(shadow[:-1], params, 0.9)
