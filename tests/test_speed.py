"""The training speed levers keep the math: same loss, same gradients, same weights.

Each lever in ``studio.trainers.speed`` is run side by side with the plain path on a
tiny UNet with attention: the batch-sharded UNet (forced to 2 shards, which works at
one torch thread too), the fused AdamW, the foreach EMA (bit-exact to diffusers').
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


def test_sharded_unet_gives_the_same_loss_and_gradients():
    plain, sharded = tiny_unet(), tiny_unet()
    assert speed.prepare_unet_for_training(sharded, "cpu", shards=2) is sharded
    assert isinstance(vars(sharded)["forward"], types.MethodType)
    x, noise, t = batch(n=5)  # odd size: uneven slices
    loss_a, grads_a = loss_and_grads(plain, x, noise, t)
    loss_b, grads_b = loss_and_grads(sharded, x, noise, t)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_sharded_unet_is_deterministic_and_trains_like_the_plain_one():
    plain, sharded_1, sharded_2 = tiny_unet(), tiny_unet(), tiny_unet()
    for unet in (sharded_1, sharded_2):
        speed.prepare_unet_for_training(unet, "cpu", shards=2)
    # SGD: the weights move by the gradients themselves (Adam would magnify rounding in near-zero ones)
    weights = [train_steps(u, torch.optim.SGD(u.parameters(), lr=0.05)) for u in (plain, sharded_1, sharded_2)]
    for wa, wb, wc in zip(*weights):
        assert torch.equal(wb, wc)  # same shards, same order of sums: bit for bit
        torch.testing.assert_close(wb, wa, rtol=1e-4, atol=1e-5)


def test_sharded_unet_without_grad_and_with_a_scalar_timestep_matches():
    plain, sharded = tiny_unet(), tiny_unet()
    speed.prepare_unet_for_training(sharded, "cpu", shards=2)
    x, _, _ = batch(n=4)
    t = torch.tensor(500)
    with torch.no_grad():
        out_a = plain(x, t).sample
        out_b = sharded(x, t, return_dict=False)[0]
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(sharded(x, t).sample, out_a, rtol=1e-5, atol=1e-6)


def test_sharded_unet_passes_gradients_to_a_sample_that_requires_them():
    plain, sharded = tiny_unet(), tiny_unet()
    speed.prepare_unet_for_training(sharded, "cpu", shards=2)
    x, _, t = batch(n=4)
    grads = []
    for unet in (plain, sharded):
        xs = x.clone().requires_grad_()
        unet(xs, t).sample.square().mean().backward()
        grads.append(xs.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_sharding_leaves_weights_config_and_thread_count_alone(tmp_path):
    from diffusers import UNet2DModel

    unet = tiny_unet()
    keys = list(unet.state_dict())
    threads = torch.get_num_threads()
    speed.prepare_unet_for_training(unet, "cpu", shards=2)
    x, noise, t = batch(n=4)
    loss_and_grads(unet, x, noise, t)
    assert torch.get_num_threads() == threads
    assert list(unet.state_dict()) == keys
    unet.save_pretrained(tmp_path / "unet")
    again = UNet2DModel.from_pretrained(tmp_path / "unet")
    assert type(again) is UNet2DModel and "forward" not in vars(again)
    assert speed.unshard_unet(unet) is unet and "forward" not in vars(unet)
    assert unet(x, t).sample.shape == x.shape


def test_prepare_is_a_no_op_where_it_does_not_apply():
    layer = torch.nn.Linear(2, 2)
    assert speed.prepare_unet_for_training(layer, "cpu") is layer and "forward" not in vars(layer)
    unet = tiny_unet()
    assert speed.prepare_unet_for_training(unet, torch.device("cuda")) is unet and "forward" not in vars(unet)
    cfg = types.SimpleNamespace(device="cpu")
    assert speed.prepare_unet_for_training(unet, cfg) is unet and "forward" in vars(unet)
    with pytest.raises(ConfigError, match="shards"):
        speed.prepare_unet_for_training(tiny_unet(), "cpu", shards=0)


def test_cpu_shards_follows_threads_and_device():
    assert speed.cpu_shards("cuda", 16) == 1
    assert speed.cpu_shards("cpu", 1) == 1
    assert speed.cpu_shards("cpu", 16) == min(torch.get_num_threads(), 16)


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


needs_kernel = pytest.mark.skipif(speed.attention_kernel() is None, reason="no C compiler to build the kernel")


@needs_kernel
@pytest.mark.parametrize("length", [36, 64])  # 6x6 (a tail of 4 columns after 2 blocks of 16) and 8x8
def test_head_dim8_kernel_matches_sdpa_forward_and_backward(length):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, length, 8, generator=g).mul_(2).requires_grad_() for _ in range(3))
    grad = torch.randn(2, 4, length, 8, generator=g)
    out = speed.attention_head_dim8(q, k, v)
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    mine = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def processors(unet) -> list:
    from diffusers.models.attention_processor import Attention

    return [m.processor for m in unet.modules() if isinstance(m, Attention)]


@needs_kernel
def test_fast_attention_unet_matches_the_plain_unet():
    from diffusers.models.attention_processor import AttnProcessor2_0

    plain, fast = tiny_unet(), tiny_unet()
    assert speed.use_fast_attention(fast) == 4  # 1 down, 2 up (layers_per_block + 1), 1 mid-block
    procs = set(type(p).__name__ for p in processors(fast))
    assert procs == {"HeadDim8AttnProcessor"}
    x, noise, t = batch(n=3)
    loss_a, grads_a = loss_and_grads(plain, x, noise, t)
    loss_b, grads_b = loss_and_grads(fast, x, noise, t)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-5)
    # where the kernel does not apply (here: two torch threads) the processor is diffusers' own
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            torch.testing.assert_close(fast(x, t).sample, plain(x, t).sample, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)
    assert isinstance(processors(fast)[0].fallback, AttnProcessor2_0)


def test_prepare_installs_fast_attention_on_cpu_only():
    cpu_unet, gpu_unet = tiny_unet(), tiny_unet()
    speed.prepare_unet_for_training(cpu_unet, "cpu")
    speed.prepare_unet_for_training(gpu_unet, "cuda")
    expected = "HeadDim8AttnProcessor" if speed.attention_kernel() is not None else "AttnProcessor2_0"
    assert {type(p).__name__ for p in processors(cpu_unet)} == {expected}
    assert {type(p).__name__ for p in processors(gpu_unet)} == {"AttnProcessor2_0"}


def test_shards_run_one_thread_each_in_workers_and_restore_the_setting():
    import threading

    unet = tiny_unet()
    speed.shard_batches(unet)  # shards follow the thread count
    seen = []
    unet.conv_in.register_forward_hook(lambda *_: seen.append((threading.current_thread().name,
                                                               torch.get_num_threads())))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, noise, _ = batch(n=4)
        F.mse_loss(unet(x, torch.tensor([1, 2, 3, 4])).sample, noise).backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 2
    assert all(name.startswith("studio-shard") and n == 1 for name, n in seen)
