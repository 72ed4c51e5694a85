"""Stop works in every phase, not only between training steps (issue 9).

Each test stops a real phase of a real run — reading a local folder, the bundled
Parquet set, a Hub dataset download, latent caching, DreamBooth class images, model
loading, sample grids — from the events a person would see, and checks the run ends
"stopped" within seconds, with no "failed" event or traceback, and a state a person
can go on from: a new run that never trained leaves nothing behind, a resumed run
keeps its checkpoints, no half-written cache file is trusted later.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from studio.config.data import DataConfig
from studio.errors import Stopped
from studio.stopping import call_stoppable, raise_if_stopped


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        rows.append({"image": {"bytes": buf.getvalue(), "path": f"{i}.png"}, "text": f"noise {i}"})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string())]))
    table = table.replace_schema_metadata({"huggingface": '{"info": {"features": {"image": {"_type": "Image"}, '
                                                          '"text": {"dtype": "string", "_type": "Value"}}}}'})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="none")
    return sink.getvalue()


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
