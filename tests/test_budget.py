"""The memory plan (studio.budget): one estimator for Train, Fine-tune and Generate.

Predictions come from a simulated allocator running the real model on torch's meta
device; these tests check its shape (monotonic, linear in batch, GPU table, suggestions)
and that every entry point refuses what cannot fit BEFORE allocating anything.
``benchmarks/memory.py`` compares the predictions with peaks measured on CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from studio import budget, memory_sim
from studio.budget import GIB, BudgetError, finetune_plan, generate_plan, train_plan
from studio.config.data import DataConfig
from studio.config.finetune import FinetuneConfig
from studio.config.generate import GenerateConfig
from studio.config.train import TrainConfig
from tiny_pipelines import tiny_sd  # noqa: F401  (fixture)

TINY_UNET = dict(sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                 attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), in_channels=3, out_channels=3)


def tiny_train(**changes) -> TrainConfig:
    base = dict(device="cpu", resolution=16, train_batch_size=4, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                preset="custom", num_samples=4)
    base.update(changes)
    return TrainConfig(**base)


def test_train_estimate_grows_with_batch_and_resolution_and_is_linear_in_batch():
    one, two, four, eight = (train_plan(tiny_train(train_batch_size=b)) for b in (1, 2, 4, 8))
    assert one.peak < two.peak < four.peak < eight.peak
    assert train_plan(tiny_train(resolution=32)).peak > four.peak
    act = [p.parts["activations"] for p in (one, two, four, eight)]
    assert act[2] == 2 * act[1] and act[3] == 4 * act[1]  # linear from batch 2 on
    assert act[0] <= act[1]
    # on a CPU the glibc heap's share is counted, but the GPU table is judged without it
    assert four.parts["CPU heap fragmentation"] > 0
    assert four.gpus == budget._gpus(int(sum(v for k, v in four.parts.items() if k != "CPU heap fragmentation")
                                         * (1 + budget.OVERHEAD)))
    no_ema = train_plan(tiny_train(use_ema=False))
    assert no_ema.parts["EMA"] == 0 and four.parts["EMA"] == four.parts["weights"]
    assert four.parts["AdamW"] == 2 * four.parts["weights"]
    assert budget.human_bytes(1536) == "1.5 KiB"


def test_simulated_forward_matches_live_tensors_of_a_real_cpu_forward_at_batch_4():
    """Batch 1 is not representative (some reshapes are views only at batch 1): the plan's
    activations at batch 4 equal what a real CPU forward keeps alive, within 2 %."""
    import torch
    from diffusers import UNet2DModel

    from studio.unet_presets import unet_kwargs

    cfg = tiny_train(train_batch_size=4, num_samples=1)
    predicted = train_plan(cfg).parts["activations"]
    torch.manual_seed(0)
    model = UNet2DModel(**unet_kwargs(16, cfg.block_out_channels, cfg.layers_per_block, cfg.down_block_types,
                                      cfg.up_block_types))
    alloc = memory_sim.Allocator()
    x, t = torch.randn(4, 3, 16, 16), torch.randint(0, 1000, (4,))
    with alloc.mode:
        out = model(x, t).sample
        live = alloc.live
    del out
    assert abs(predicted - live) <= 0.02 * live, (predicted, live)


def test_generate_estimate_grows_with_size_and_batch():
    small = generate_plan(16, 16, 1, unet_config=TINY_UNET, unconditional=True)
    big = generate_plan(64, 64, 1, unet_config=TINY_UNET, unconditional=True)
    batch = generate_plan(64, 64, 4, unet_config=TINY_UNET, unconditional=True)
    assert small.peak < big.peak < batch.peak


def test_gpu_table_names_what_fits():
    assert budget._gpus(10 * GIB) == tuple((g.name, True) for g in budget.GPUS)
    table = dict(budget._gpus(30 * GIB))
    assert not table["T4 16 GB"] and not table["L4 / A10 24 GB"] and table["A100 40 GB"] and table["H200 141 GB"]
    assert not any(ok for _, ok in budget._gpus(200 * GIB))
    plan = budget.Plan("train", {"weights": 30 * GIB}, 30 * GIB, "cpu", 64 * GIB, "test RAM", gpus=budget._gpus(30 * GIB))
    assert plan.fits and "fits A100 40 GB" in plan.gpu_line() and "T4" not in plan.gpu_line()
    assert "**Memory plan**" in plan.markdown() and "30.0 GiB" in plan.markdown()


@pytest.mark.slow
def test_train_batch_of_a_billion_is_refused_at_once_naming_the_limit(workspace):
    from studio.trainers.ddpm import train

    cfg = tiny_train(train_batch_size=10 ** 9, workspace=str(workspace), run_name="huge",
                     data=DataConfig(source="emoji", max_rows=4))
    import psutil

    train_plan(tiny_train())  # warm the simulation (imports) so the timing below is the check itself
    started, rss = time.process_time(), psutil.Process().memory_info().rss
    with pytest.raises(BudgetError) as info:
        train(cfg)
    # CPU time, not wall time: the check is a few meta-device simulations, whatever else runs here
    assert time.process_time() - started < 10
    assert psutil.Process().memory_info().rss - rss < 200 * 2 ** 20
    text = info.value.user_message
    assert "batch 1000000000" in text and "free RAM" in text and "batch size" in text, text
    assert not (workspace / "huge").exists()  # nothing made, nothing loaded


def test_suggestion_is_the_cheapest_change_that_fits(monkeypatch):
    plan = train_plan(tiny_train(train_batch_size=4096))
    per_sample = (sum(train_plan(tiny_train(train_batch_size=8192)).parts.values()) - sum(plan.parts.values())) // 4096
    fixed = sum(plan.parts.values()) - 4096 * per_sample
    limit_gib = (fixed + 100 * per_sample) * 1.1 / GIB
    monkeypatch.setenv(budget.MEMORY_LIMIT_ENV, f"{limit_gib:.9f}")
    plan = train_plan(tiny_train(train_batch_size=4096))
    assert not plan.fits and "memory limit" in plan.limit_name
    fitting = int(plan.suggestion.split("batch size ")[1].split()[0])
    assert 90 <= fitting <= 100, plan.suggestion
    assert train_plan(tiny_train(train_batch_size=fitting)).fits


@pytest.mark.slow
def test_generate_4096_on_cpu_is_refused_before_any_work(tiny_sd, workspace, monkeypatch):
    from studio.generate import generate
    from studio.models import PipelineManager

    manager = PipelineManager("cpu", workspace, offline=True)
    cfg = GenerateConfig(model=str(tiny_sd), prompt="fox", width=4096, height=4096, num_inference_steps=2, seed=1)
    monkeypatch.setenv(budget.MEMORY_LIMIT_ENV, "2")
    with pytest.raises(BudgetError, match=r"4096x4096 px, batch 1\) needs about .* memory limit"):
        generate(manager, cfg, save=False)
    assert not (workspace / "outputs").exists()
    monkeypatch.delenv(budget.MEMORY_LIMIT_ENV)
    assert generate(manager, cfg.replace(width=32, height=32), save=False).images  # the same model still works


@pytest.mark.slow
def test_sd15_sized_generate_at_4096_does_not_fit_8_gib_but_512_does(monkeypatch):
    monkeypatch.setenv(budget.MEMORY_LIMIT_ENV, "8")
    big = generate_plan(4096, 4096, 1, device="cpu", family="sd1")
    assert not big.fits and big.suggestion and "x" in big.suggestion
    with pytest.raises(BudgetError, match="STUDIO_MEMORY_LIMIT_GB=8"):
        big.check()
    assert generate_plan(512, 512, 1, device="cpu", family="sd1").fits


@pytest.mark.slow
def test_finetune_oversize_is_refused_before_loading_the_model(workspace, monkeypatch):
    from studio.trainers.text_to_image import train

    monkeypatch.setenv(budget.MEMORY_LIMIT_ENV, "8")
    cfg = FinetuneConfig(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
                         method="full", resolution=1024, train_batch_size=4, workspace=str(workspace),
                         run_name="big", device="cpu", max_train_steps=1)
    plan = finetune_plan(cfg)
    assert not plan.fits and "SD 1.x" in plan.summary
    lora = finetune_plan(cfg.replace(method="lora"))
    assert lora.parts["optimizer"] < plan.parts["optimizer"] / 100  # adapters only
    ckpt = finetune_plan(cfg.replace(gradient_checkpointing=True))
    assert ckpt.parts["activations"] < plan.parts["activations"] / 2
    with pytest.raises(BudgetError, match="needs about") as info:
        train(cfg, lambda event: None, __import__("threading").Event())
    assert "Try:" in info.value.user_message and "memory limit" in info.value.user_message


@pytest.mark.integration
@pytest.mark.slow
def test_refusals_through_the_launched_app(launched_app, client, monkeypatch):
    from tabs import train as train_tab

    app, _ = launched_app
    app.studio_context.dataset.set(budget_dataset())
    values = train_tab.default_values()
    values.update(run_name="huge", train_batch_size=10 ** 9, resolution=16, block_out_channels="8, 16",
                  layers_per_block=1, attention_levels="2")
    started = time.perf_counter()
    status, *_ = client.predict(*[values[n] for n in train_tab.INPUT_NAMES], api_name="/start_training")
    assert time.perf_counter() - started < 30
    assert "needs about" in status and "free RAM" in status, status
    assert not (Path(app.studio_context.workspace) / "huge").exists()
    plan = client.predict(4096, 4096, 1, 7.0, api_name="/generate_memory_plan")
    assert "Memory plan" in plan and "GiB" in plan


def budget_dataset():
    from studio.context import DatasetChoice

    return DatasetChoice(DataConfig(source="emoji", max_rows=4), "emoji (first 4)", 4, True)
