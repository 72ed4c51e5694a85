"""The DDPM trainer for real on tiny UNets: learning, events, stop, exact resume, bad checkpoints, NaN."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

import studio.trainers.ddpm as ddpm
from studio.checkpoints import list_checkpoints
from studio.config.data import DataConfig
from studio.config.train import TrainConfig
from studio.errors import CheckpointError, JobError
from studio.jobs import JobManager
from studio.runs import RunDir


def tiny_config(workspace: Path, **changes) -> TrainConfig:
    """A (8, 16) UNet with attention at the second level, 8 px, batch 4, emoji subset."""
    values = dict(
        data=DataConfig(source="emoji", max_rows=8), workspace=str(workspace), resolution=8, train_batch_size=4,
        max_train_steps=4, learning_rate=1e-3, lr_scheduler="constant", lr_warmup_steps=0,
        block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_samples=4, sample_inference_steps=2,
        sample_every=0, save_every=0, device="cpu", seed=3,
    )
    values.update(changes)
    return TrainConfig(**values)


class Recorder:
    """An event sink that keeps every event and can set ``stop`` at a chosen step."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.events = []
        self.stop = threading.Event()
        self.stop_at = stop_at

    def __call__(self, event) -> None:
        self.events.append(event)
        if self.stop_at is not None and event.kind == "step" and event.step >= self.stop_at:
            self.stop.set()

    def kinds(self, kind: str):
        return [e for e in self.events if e.kind == kind]


def state_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "unet.safetensors"))
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    for i, p in enumerate(state["ema"]["shadow_params"]):
        weights[f"ema.{i}"] = p
    for i, s in state["optimizer"]["state"].items():
        weights[f"adam.{i}.exp_avg"] = s["exp_avg"]
    return weights


def test_loss_decreases_over_50_steps(workspace):
    rec = Recorder()
    cfg = tiny_config(workspace, max_train_steps=50, data=DataConfig(source="emoji", max_rows=4), random_flip=False,
                      use_ema=False)
    ddpm.train(cfg, rec, rec.stop)
    losses = [e.loss for e in rec.kinds("step")]
    assert len(losses) == 50
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_events_arrive_in_order_and_match_the_run_folder(workspace):
    rec = Recorder()
    cfg = tiny_config(workspace, max_train_steps=4, save_every=2, sample_every=2, run_name="ordered")
    run = ddpm.train(cfg, rec, rec.stop)
    kinds = [e.kind for e in rec.events]
    assert kinds[0] == "status" and kinds[-1] == "finished"
    assert kinds.index("samples") < kinds.index("step")  # the step-0 grid comes first
    steps = [e.step for e in rec.kinds("step")]
    assert steps == [1, 2, 3, 4]
    step_events = rec.kinds("step")
    assert all(e.total == 4 and e.lr == pytest.approx(1e-3) and e.images_per_s > 0 for e in step_events)
    assert all(e.smoothed_loss is not None and e.eta_s is not None for e in step_events)
    assert [e.step for e in rec.kinds("samples")] == [0, 2, 4]
    assert [e.step for e in rec.kinds("checkpoint")] == [2, 4]
    assert [e.kind for e in run.read_events()] == kinds
    assert run.root == workspace / "ordered"
    assert json.loads(run.config_path.read_text())["task"] == "train"
    assert sorted(p.name for p in run.samples_dir.iterdir()) == [
        "progress.gif", "step-000000.png", "step-000002.png", "step-000004.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run.logs_dir))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in board.Images("samples")] == [0, 2, 4]
    from PIL import Image

    grid = Image.open(run.sample_path(4))
    assert grid.size == (256, 256)  # 2x2 grid of 8 px samples, enlarged 16x (nearest) for viewing
    assert (run.model_dir / "README.md").read_text().startswith("---\nlibrary_name: diffusers\nlicense: ")


def test_stop_ends_within_one_step_with_a_resumable_checkpoint(workspace):
    rec = Recorder(stop_at=2)
    run = ddpm.train(tiny_config(workspace, max_train_steps=50), rec, rec.stop)
    final = rec.events[-1]
    assert final.kind == "stopped" and final.step == 2
    assert max(e.step for e in rec.kinds("step")) == 2
    assert Path(final.path) == run.checkpoints_dir / "step-00000002"
    assert [c.step for c in list_checkpoints(run.checkpoints_dir) if c.valid] == [2]


def test_resume_is_bit_exact(workspace):
    changes = dict(max_train_steps=6, gradient_accumulation_steps=2, noise_offset=0.1, snr_gamma=5.0,
                   lr_scheduler="cosine", lr_warmup_steps=2, save_every=0)
    whole = ddpm.train(tiny_config(workspace, run_name="whole", **changes))
    rec = Recorder(stop_at=3)
    split = ddpm.train(tiny_config(workspace, run_name="split", **changes), rec, rec.stop)
    assert rec.events[-1].kind == "stopped" and rec.events[-1].step == 3
    resumed = Recorder()
    ddpm.train(tiny_config(workspace, run_name="split", resume="latest", **changes), resumed, resumed.stop)
    assert resumed.events[-1].kind == "finished" and resumed.kinds("step")[0].step == 4
    a = state_of(whole.checkpoints_dir / "step-00000006")
    b = state_of(split.checkpoints_dir / "step-00000006")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(workspace):
    run = ddpm.train(tiny_config(workspace, max_train_steps=4, save_every=2, checkpoints_total_limit=3))
    newest = run.checkpoints_dir / "step-00000004" / "unet.safetensors"
    data = bytearray(newest.read_bytes())
    data[-10:] = b"\x00" * 10
    newest.write_bytes(bytes(data))
    rec = Recorder()
    ddpm.train(tiny_config(workspace, max_train_steps=5, run_name=run.name, resume="latest"), rec, rec.stop)
    warnings = [e.message for e in rec.kinds("warning")]
    assert any("step-00000004" in w and "falling back" in w for w in warnings), warnings
    assert rec.kinds("step")[0].step == 3 and rec.events[-1].kind == "finished"


def test_mistyped_resume_path_is_an_error(workspace):
    with pytest.raises(CheckpointError, match="not found"):
        ddpm.train(tiny_config(workspace, resume=str(workspace / "nope" / "checkpoints" / "step-00000002")))


def test_resume_with_another_architecture_is_an_error(workspace):
    run = ddpm.train(tiny_config(workspace, max_train_steps=1, run_name="arch"))
    other = tiny_config(workspace, run_name="arch", resume="latest", max_train_steps=2, block_out_channels=(16, 16))
    with pytest.raises(CheckpointError, match="does not fit|different UNet"):
        ddpm.train(other)
    assert run.read_events()[-1].kind == "failed"


def test_resume_with_another_dataset_is_an_error(workspace):
    ddpm.train(tiny_config(workspace, max_train_steps=1, run_name="data"))
    other = tiny_config(workspace, run_name="data", resume="latest", max_train_steps=2,
                        data=DataConfig(source="emoji", max_rows=6))
    with pytest.raises(CheckpointError, match="trained on 8 images; the dataset now has 6"):
        ddpm.train(other)


def test_non_finite_loss_stops_and_saves_nothing(workspace, monkeypatch):
    real = ddpm.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(ddpm, "diffusion_loss", poisoned)
    rec = Recorder()
    with pytest.raises(JobError, match="loss became nan at step 3"):
        ddpm.train(tiny_config(workspace, max_train_steps=10, save_every=2, run_name="nan"), rec, rec.stop)
    run = RunDir(workspace / "nan")
    assert rec.events[-1].kind == "failed" and "nan" in rec.events[-1].message
    assert [c.step for c in list_checkpoints(run.checkpoints_dir)] == [2]  # only the good one, before the NaN
    assert not run.model_dir.exists()


def test_output_folder_loads_with_ddpm_pipeline(workspace):
    from diffusers import DDPMPipeline

    run = ddpm.train(tiny_config(workspace, max_train_steps=2))
    pipe = DDPMPipeline.from_pretrained(run.model_dir)
    assert pipe.unet.config.block_out_channels == [8, 16]
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    assert (run.model_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_second_job_on_the_same_device_is_refused(workspace):
    jobs = JobManager()
    cfg = tiny_config(workspace, max_train_steps=10_000, run_name="first")
    run = RunDir.create(workspace, "train", "first")
    job = jobs.start(run.name, "train", run.root, lambda ev, st: ddpm.train(cfg, ev, st, run), device="cpu")
    try:
        with pytest.raises(JobError, match="already running on cpu: 'first'"):
            jobs.start("second", "train", workspace / "second", lambda ev, st: None, device="cpu")
    finally:
        job.stop()
        assert job.wait(60)
    snap = job.snapshot()
    # Stop lands wherever the first job is: in a phase before training (nothing trained) or in the loop
    assert snap.status == "stopped", (snap.status, snap.phase)
    assert snap.result_path.endswith(f"step-{snap.step:08d}") or "Nothing was trained" in snap.phase, snap.phase


def test_min_snr_loss_matches_diffusers_formula():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(num_train_timesteps=100)
    g = torch.Generator().manual_seed(0)
    clean, noise, pred = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([1, 10, 50, 99])
    for prediction_type in ("epsilon", "v_prediction"):
        snr = compute_snr(sched, t)
        weights = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        target = noise if prediction_type == "epsilon" else sched.get_velocity(clean, noise, t)
        expected = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
        got = ddpm.diffusion_loss(pred, clean, noise, t, sched, prediction_type, 5.0)
        assert torch.allclose(got, expected, rtol=1e-5)
    plain = ddpm.diffusion_loss(pred, clean, noise, t, sched, "sample", 0.0)
    assert torch.allclose(plain, ((pred - clean) ** 2).mean())


def test_sampler_shards_differ_per_process_and_restore_exactly():
    a = ddpm.BatchSampler(10, 3, rank=0, world=2, seed=1)
    b = ddpm.BatchSampler(10, 3, rank=1, world=2, seed=1)
    ia, _ = a.next()
    ib, _ = b.next()
    assert not set(ia.tolist()) & set(ib.tolist())
    state = a.state_dict()
    ahead = [a.next()[0].tolist() for _ in range(4)]  # crosses an epoch boundary
    a.load_state_dict(state)
    assert [a.next()[0].tolist() for _ in range(4)] == ahead
    assert a.epoch >= 1


def test_ema_is_diffusers_own_step_and_bit_exact_with_the_foreach_update():
    """The trainers step diffusers' EMAModel themselves (``make_ema``: foreach=False); that equals,
    bit for bit, the foreach update (``speed.ema_update_`` with ``get_decay``) they used before."""
    from diffusers import UNet2DModel

    from studio.trainers.optimization import make_ema
    from studio.trainers.speed import ema_update_

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    next(unet.parameters()).requires_grad_(False)  # frozen tensors are copied, not averaged
    ema = make_ema(unet, UNet2DModel, decay=0.999, warmup=True, inv_gamma=1.0, power=0.75, update_after_step=1)
    assert not ema.foreach
    shadow = [p.detach().clone() for p in unet.parameters()]
    for step in range(1, 6):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p))
        ema.step(unet.parameters())
        ema_update_(shadow, list(unet.parameters()), ema.get_decay(step))
    assert ema.optimization_step == 5
    for a, b in zip(ema.shadow_params, shadow):
        assert torch.equal(a, b)
