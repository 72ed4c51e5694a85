"""Stop works in every phase, not only between training steps (issue 9).

Each test stops a real phase of a real run — reading a local folder, the bundled
Parquet set, a Hub dataset download, latent caching, DreamBooth class images, model
loading, sample grids — from the events a person would see, and checks the run ends
"stopped" within seconds, with no "failed" event or traceback, and a state a person
can go on from: a new run that never trained leaves nothing behind, a resumed run
keeps its checkpoints, no half-written cache file is trusted later.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from studio.config.data import DataConfig
from studio.errors import Stopped
from studio.stopping import call_stoppable, raise_if_stopped
from tiny_pipelines import tiny_sd  # noqa: F401  (fixture)


def make_folder(root: Path, count: int, size: int = 16) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (size, size), (i * 7 % 256, 90, 200)).save(root / f"{i:04d}.png")
    return root


def stop_on(stop: threading.Event, text: str):
    """A progress callback that sets ``stop`` once a message containing ``text`` appears (and records them)."""
    seen: list[str] = []

    def progress(fraction: float, message: str) -> None:
        seen.append(message)
        if text in message:
            stop.set()

    return progress, seen


# ----------------------------------------------------------------------------- the helpers
def test_raise_if_stopped_and_call_stoppable():
    stop = threading.Event()
    raise_if_stopped(stop, "nothing")  # not set: returns
    assert call_stoppable(lambda: 41 + 1, stop, "adding") == 42
    with pytest.raises(ZeroDivisionError):  # the call's own error comes through unchanged
        call_stoppable(lambda: 1 / 0, stop, "dividing")
    release = threading.Event()
    threading.Timer(0.2, stop.set).start()
    began = time.monotonic()
    with pytest.raises(Stopped, match="Stopped while waiting for a slow call"):
        call_stoppable(lambda: release.wait(30), stop, "waiting for a slow call")
    assert time.monotonic() - began < 2.0
    release.set()


# ----------------------------------------------------------------------------- data loading
def test_stop_while_checking_a_local_folder_ends_within_one_image(tmp_path):
    from studio.data import load_tensor_cache

    folder = make_folder(tmp_path / "pics", 200)
    stop = threading.Event()
    decoded = []
    progress, seen = stop_on(stop, "Checking images 64/")
    cfg = DataConfig(source="folder", path=str(folder))
    import studio.data as data

    real = data._decode

    def counting(*args, **kwargs):
        decoded.append(1)
        return real(*args, **kwargs)

    data._decode = counting
    try:
        with pytest.raises(Stopped, match="checking the images"):
            load_tensor_cache(cfg, 16, tmp_path / "cache", progress=progress, stop=stop)
    finally:
        data._decode = real
    assert len(decoded) == 64, "the check must end at the image where Stop was seen"
    assert not any("Cached" in m for m in seen)
    assert not list((tmp_path / "cache").rglob("*.safetensors")), "a stopped build writes no tensor cache"
    # the next load (no stop) builds the whole cache
    cache = load_tensor_cache(cfg, 16, tmp_path / "cache")
    assert cache.pixels.shape[0] == 200


def test_stop_while_reading_the_bundled_parquet_set(tmp_path):
    from studio.data import load_image_dataset

    stop = threading.Event()
    progress, seen = stop_on(stop, "Checking images 128/")
    with pytest.raises(Stopped, match=r"emoji.*\(128 of 1911 done\)"):
        load_image_dataset(DataConfig(), progress=progress, stop=stop)
    assert not any(m.startswith("Checked") for m in seen)


def test_stop_before_listing_a_folder(tmp_path):
    from studio.data import load_image_dataset

    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped, match="reading"):
        load_image_dataset(DataConfig(source="folder", path=str(make_folder(tmp_path / "p", 3))), stop=stop)


def _parquet_of(count: int, size: int) -> bytes:
    import numpy as np
    from hub_server import image_parquet

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
    return image_parquet(images, [f"noise {i}" for i in range(count)], compression="none")


def test_stop_during_a_hub_dataset_download_returns_at_once_and_the_next_load_finishes(local_hub):
    from studio.data import load_image_dataset

    payload = _parquet_of(24, 64)  # ~300 kB of incompressible pixels
    local_hub.add_repo("acme/noise", {"data/train-00000-of-00001.parquet": payload, "README.md": b"# noise\n"},
                       repo_type="dataset")
    local_hub.throttle_bps = 20_000  # ~15 s for the whole file (64 kB pieces)
    stop = threading.Event()
    cfg = DataConfig(source="hub", hub_id="acme/noise")
    stopped_at: list[float] = []

    def press_stop_once_the_parquet_flows() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("/cdn/" in p for _, p, _ in list(local_hub.requests)):
            time.sleep(0.05)
        time.sleep(0.3)
        stopped_at.append(time.monotonic())
        stop.set()

    threading.Thread(target=press_stop_once_the_parquet_flows, daemon=True).start()
    with pytest.raises(Stopped, match="downloading the dataset 'acme/noise'"):
        load_image_dataset(cfg, stop=stop)
    took = time.monotonic() - stopped_at[0]
    assert took < 2.0, f"Stop took {took:.1f} s to take effect during the download"
    local_hub.throttle_bps = None
    ds = load_image_dataset(cfg)
    assert len(ds) == 24 and ds.captions[3] == "noise 3"


# ----------------------------------------------------------------------------- latent caching
def test_stop_while_caching_latents_ends_within_one_batch(tmp_path):
    import torch

    from studio.latent_cache import build_latent_cache, build_text_cache
    from tiny_pipelines import make_tiny_sd_pipeline

    pipe = make_tiny_sd_pipeline()
    pixels = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    stop = threading.Event()
    batches: list[int] = []

    def progress(done: int, total: int) -> None:
        batches.append(done)
        if done >= 16:
            stop.set()

    with pytest.raises(Stopped, match=r"caching latents \(16 of 80"):
        build_latent_cache(pipe.vae, pixels, data_key="k", resolution=16, random_flip=True,
                           cache_root=tmp_path, device="cpu", batch_size=8, progress=progress, stop=stop)
    assert batches == [8, 16], "the encode must end at the batch after Stop"
    assert not list(tmp_path.glob("*.safetensors")), "a stopped encode writes no cache file"
    with pytest.raises(Stopped, match="encoding captions"):
        build_text_cache(pipe.tokenizer, pipe.text_encoder, ["a", "b"], cache_root=tmp_path, device="cpu",
                         stop=stop)
    stop.clear()
    cache = build_latent_cache(pipe.vae, pixels, data_key="k", resolution=16, random_flip=True,
                               cache_root=tmp_path, device="cpu", batch_size=8, stop=stop)
    assert cache.mean.shape[:2] == (40, 2) and not cache.hit


# ----------------------------------------------------------------------------- whole runs
class StopOn:
    """An event sink that presses Stop when a status message starting with ``prefix`` appears."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.events, self.stop = prefix, [], threading.Event()
        self.pressed_at: float | None = None

    def __call__(self, event) -> None:
        self.events.append(event)
        if event.kind == "status" and event.message.startswith(self.prefix) and not self.stop.is_set():
            self.pressed_at = time.monotonic()
            self.stop.set()

    @property
    def final(self):
        finals = [e for e in self.events if e.kind in ("finished", "stopped", "failed")]
        assert len(finals) == 1, [(e.kind, e.message) for e in self.events]
        return finals[0]

    def took(self) -> float:
        assert self.pressed_at is not None, f"'{self.prefix}' never appeared: {[e.message for e in self.events]}"
        return self.events[-1].time - self.pressed_at if self.events[-1].time > 1e9 else 0.0

    def messages(self) -> list[str]:
        return [e.message for e in self.events]


def ddpm_config(workspace: Path, **changes):
    from studio.config.train import TrainConfig

    values = dict(data=DataConfig(source="emoji", max_rows=8), workspace=str(workspace), resolution=8,
                  train_batch_size=4, max_train_steps=3, learning_rate=1e-3, lr_scheduler="constant",
                  lr_warmup_steps=0, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  num_samples=4, sample_inference_steps=2, sample_every=0, save_every=0, device="cpu", seed=3,
                  run_name="r")
    values.update(changes)
    return TrainConfig(**values)


def assert_clean_stop(sink: StopOn, phrase: str, limit_s: float = 5.0) -> None:
    final = sink.final
    assert final.kind == "stopped", (final.kind, final.message)
    assert phrase in final.message, final.message
    assert "Traceback" not in final.message and "Unexpected error" not in final.message
    took = time.monotonic() - sink.pressed_at
    assert took < limit_s, f"Stop took {took:.1f} s to end the run"


def test_ddpm_stop_while_its_folder_loads_ends_stopped_with_nothing_trained(tmp_path, workspace):
    from studio.checkpoints import list_checkpoints
    from studio.trainers.ddpm import train

    folder = make_folder(tmp_path / "pics", 300, size=24)
    sink = StopOn("Checking images")
    run = train(ddpm_config(workspace, data=DataConfig(source="folder", path=str(folder))), sink, sink.stop)
    assert_clean_stop(sink, "Stopped while checking the images")
    assert "Nothing was trained" in sink.final.message
    assert not list_checkpoints(run.checkpoints_dir)
    assert not any(m.startswith("Cached") for m in sink.messages())
    assert not list((workspace / ".cache").rglob("*.safetensors"))


def test_ddpm_stop_while_drawing_the_first_grid_saves_a_resumable_step_0(workspace):
    from studio.checkpoints import list_checkpoints
    from studio.trainers.ddpm import train

    cfg = ddpm_config(workspace, sample_inference_steps=400)  # the whole grid: many seconds; Stop: one step
    sink = StopOn("sampling at step 0")
    run = train(cfg, sink, sink.stop)
    assert_clean_stop(sink, "stopped at step 0")
    assert any("the sample grid of step 0 is not drawn" in m for m in sink.messages())
    assert not run.sample_path(0).exists()
    assert [(c.step, c.valid) for c in list_checkpoints(run.checkpoints_dir)] == [(0, True)]
    # and it goes on from there
    resumed = StopOn("never")
    train(ddpm_config(workspace, resume="latest"), resumed, resumed.stop)
    assert resumed.final.kind == "finished" and resumed.final.step == 3


def test_a_job_stopped_while_its_data_loads_ends_stopped_and_leaves_no_run(tmp_path, workspace):
    """Through the Train tab's job path: status 'stopped', no error, and no half-made run to resume."""
    from studio.context import StudioContext
    from studio.runs import RunDir
    from studio.settings import LaunchSettings
    from studio.trainers.ddpm import train
    from tabs.jobtab import start_job

    ctx = StudioContext(LaunchSettings(workspace=workspace, device="cpu"))
    folder = make_folder(tmp_path / "pics", 300, size=24)
    cfg = ddpm_config(workspace, data=DataConfig(source="folder", path=str(folder)), run_name="early")
    run = RunDir.create(workspace, "train", "early")
    pressed: list[float] = []

    def target(events, stop):
        def watch(event):
            events(event)
            if event.message.startswith("Checking images") and not stop.is_set():
                pressed.append(time.monotonic())
                stop.set()
        return train(cfg, watch, stop, run)

    start_job(ctx, "train", run, target, resuming=False)
    job = ctx.jobs.latest("train")
    assert job.wait(120)
    s = job.snapshot()
    assert s.status == "stopped" and not s.error, (s.status, s.error, s.phase)
    assert "Stopped while checking the images" in s.phase
    assert time.monotonic() - pressed[0] < 10
    assert not run.root.exists(), "a new run stopped before training leaves no folder"
    ctx.jobs.stop_all()


# ----------------------------------------------------------------------------- fine-tune phases
def finetune_config(base: Path, workspace: Path, **changes):
    from studio.config.finetune import FinetuneConfig

    values = dict(pretrained_model_name_or_path=str(base), data=DataConfig(max_rows=4), resolution=16,
                  max_train_steps=2, validation_every=0, num_inference_steps=2, checkpoint_every=0,
                  workspace=str(workspace), device="cpu", validation_prompts=("a smiling face",), seed=3,
                  run_name="ft")
    values.update(changes)
    return FinetuneConfig(**values)


def run_finetune(cfg, prefix: str) -> tuple[StopOn, object]:
    from studio.trainers.text_to_image import train

    sink = StopOn(prefix)
    run = train(cfg, sink, sink.stop)
    return sink, run


def test_finetune_stop_while_caching_latents(tiny_sd, workspace):
    sink, run = run_finetune(finetune_config(tiny_sd, workspace, data=DataConfig(max_rows=48)), "caching latents 8/")
    assert_clean_stop(sink, "Stopped while caching latents (8 of 48 images encoded)")
    assert "Nothing was trained" in sink.final.message
    assert not list((workspace / ".cache" / "finetune").glob("latents-*.safetensors"))


def test_finetune_stop_while_making_class_images_keeps_the_ones_made(tiny_sd, workspace):
    cfg = finetune_config(tiny_sd, workspace, method="dreambooth-lora", instance_prompt="a sks emoji",
                          class_prompt="an emoji", with_prior_preservation=True, num_class_images=3,
                          num_inference_steps=300)
    sink, run = run_finetune(cfg, "generating 3 class images")
    assert_clean_stop(sink, "Stopped while generating class images (0 of 3 made")
    assert not list((run.root / "class_images").glob("*.png"))


def test_finetune_stop_while_drawing_the_base_models_validation_images(tiny_sd, workspace):
    cfg = finetune_config(tiny_sd, workspace, num_inference_steps=300)
    sink, run = run_finetune(cfg, "validation images at step 0")
    assert_clean_stop(sink, "Stopped while drawing the validation images of the base model")
    assert not run.sample_path(0).exists() and not any(e.kind == "step" for e in sink.events)


def test_finetune_stop_while_the_base_model_downloads(local_hub, tiny_sd, workspace, monkeypatch):
    """Stop returns at once; the download goes on into the cache but then loads nothing, and it never
    held the model-construction lock (another job or Generate can build or load a model meanwhile)."""
    from hub_server import files_of

    import studio.models as models
    from studio.devices import MODEL_INIT_LOCK

    local_hub.add_repo("acme/tiny-sd-slow", files_of(tiny_sd))
    local_hub.throttle_bps = 30_000  # the weights take tens of seconds
    cfg = finetune_config("acme/tiny-sd-slow", workspace)
    sink = StopOn("(Stop is pressed by the watcher below)")
    loads, lock_free = [], []
    real_load = models._load_target
    monkeypatch.setattr(models, "_load_target", lambda ref, *a, **k: loads.append(ref.label) or real_load(ref, *a, **k))

    def press_stop_once_weights_flow() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("/cdn/" in p for _, p, _ in list(local_hub.requests)):
            time.sleep(0.05)
        time.sleep(0.3)
        if MODEL_INIT_LOCK.acquire(timeout=2):
            lock_free.append(True)
            MODEL_INIT_LOCK.release()
        sink.pressed_at = time.monotonic()
        sink.stop.set()

    threading.Thread(target=press_stop_once_weights_flow, daemon=True).start()
    from studio.trainers.text_to_image import train

    train(cfg, sink, sink.stop)
    local_hub.throttle_bps = None
    assert_clean_stop(sink, "Stopped while loading the base model acme/tiny-sd-slow", limit_s=2.0)
    assert lock_free == [True]
    # the abandoned download finishes (no throttle now) and ends there: nothing loads into memory
    for helper in [t for t in threading.enumerate() if t.name.startswith("stoppable: loading the base model")]:
        helper.join(60)
        assert not helper.is_alive()
    assert loads == []


def test_the_stop_button_says_what_stop_does_before_the_first_step(tmp_path, workspace):
    from studio.context import StudioContext
    from studio.runs import RunDir
    from studio.settings import LaunchSettings
    from studio.trainers.ddpm import train
    from tabs.jobtab import start_job, stop_job

    ctx = StudioContext(LaunchSettings(workspace=workspace, device="cpu"))
    folder = make_folder(tmp_path / "pics", 300, size=24)
    cfg = ddpm_config(workspace, data=DataConfig(source="folder", path=str(folder)), run_name="button")
    run = RunDir.create(workspace, "train", "button")
    loading = threading.Event()
    release = threading.Event()

    def target(events, stop):
        def watch(event):
            events(event)
            if event.message.startswith("Checking images"):
                loading.set()
                release.wait(30)  # hold the phase until the button was pressed
        return train(cfg, watch, stop, run)

    start_job(ctx, "train", run, target, resuming=False)
    assert loading.wait(60)
    text = stop_job(ctx, "train", "training")
    release.set()
    assert text.startswith("Stopping button before its first step (Checking images"), text
    job = ctx.jobs.latest("train")
    assert job.wait(60) and job.snapshot().status == "stopped"
    ctx.jobs.stop_all()
