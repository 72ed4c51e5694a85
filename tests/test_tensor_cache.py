"""The decode-once tensor cache of studio.data: every image decoded once, a cache hit decodes
nothing, the key follows resolution and crop, two writers at once, damage rebuilt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_files import folder_cfg, save
from studio import data as data_mod
from studio.config.data import DataConfig
from studio.data import TensorCache, load_image_dataset, load_tensor_cache
from studio.errors import DataError


# --------------------------------------------------------------------------- tensor cache


def test_tensor_cache_decodes_once(tmp_path: Path, monkeypatch):
    cfg = DataConfig(source="emoji", max_rows=12)
    cache = load_tensor_cache(cfg, 16, tmp_path / ".cache")
    assert isinstance(cache, TensorCache)
    assert tuple(cache.pixels.shape) == (12, 3, 16, 16)
    assert str(cache.pixels.dtype) == "torch.uint8" and cache.pixels.is_contiguous()
    assert cache.captions[0].startswith("grinning face") and len(cache.names) == 12
    assert (tmp_path / ".cache" / "datasets" / f"{cache.key}.safetensors").is_file()
    assert (tmp_path / ".cache" / "datasets" / f"{cache.key}.json").is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded on a cache hit")

    monkeypatch.setattr(data_mod, "_decode", no_decoding)
    monkeypatch.setattr(Image, "open", no_decoding)
    again = load_tensor_cache(cfg, 16, tmp_path / ".cache")
    assert again.key == cache.key
    assert bool((again.pixels == cache.pixels).all())
    assert again.captions == cache.captions


def test_tensor_cache_decodes_each_image_once_and_leaves_out_skipped(tmp_path: Path, monkeypatch):
    root = tmp_path / "mixed"
    for i, color in enumerate(["red", "green", "blue"]):
        save(root / f"{i}.png", Image.new("RGB", (12, 12), color))
    (root / "3.png").write_bytes(b"")
    real_decode = data_mod._decode
    calls = []

    def counting(data, **kwargs):
        calls.append(data)
        return real_decode(data, **kwargs)

    monkeypatch.setattr(data_mod, "_decode", counting)
    cache = load_tensor_cache(folder_cfg(root), 8, tmp_path / "c")
    assert len(calls) == 4  # three good images and the empty file, each read once
    assert cache.names == ["0.png", "1.png", "2.png"] and tuple(cache.pixels.shape) == (3, 3, 8, 8)
    assert cache.pixels.is_contiguous()
    assert cache.pixels[2, :, 4, 4].tolist() == [0, 0, 255]


def test_tensor_cache_of_big_jpegs_matches_a_full_decode(tmp_path: Path):
    """Big JPEGs decode at a reduced scale for the cache; the result stays close to full decode + resize."""
    from studio.data import resize_to_square

    root = tmp_path / "photos"
    grid = np.indices((60, 80)).sum(axis=0) % 255
    arr = np.stack([grid, 255 - grid, np.full_like(grid, 90)], axis=-1).astype(np.uint8)
    save(root / "photo.jpg", Image.fromarray(arr).resize((800, 600), Image.Resampling.BILINEAR), quality=95)
    cache = load_tensor_cache(folder_cfg(root), 32, tmp_path / "c")
    reference = np.asarray(resize_to_square(load_image_dataset(folder_cfg(root)).image(0), 32))
    got = cache.pixels[0].permute(1, 2, 0).numpy()
    assert got.shape == reference.shape == (32, 32, 3)
    assert np.abs(got.astype(int) - reference.astype(int)).mean() < 6


def test_tensor_cache_key_depends_on_resolution_and_crop(tmp_path: Path):
    root = tmp_path / "wide"
    src = Image.new("RGB", (40, 20), (255, 0, 0))
    src.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the far left
    save(root / "wide.png", src)
    crop = load_tensor_cache(folder_cfg(root), 8, tmp_path / "c")
    whole = load_tensor_cache(folder_cfg(root), 8, tmp_path / "c", center_crop=False)
    other = load_tensor_cache(folder_cfg(root), 4, tmp_path / "c")
    assert len({crop.key, whole.key, other.key}) == 3
    assert captions_none(crop)
    # Center crop keeps the red middle; the whole image squashed keeps the blue band.
    assert int(crop.pixels[0, 2].max()) < 40
    assert int(whole.pixels[0, 2, 4, 0]) > 200
    assert tuple(other.pixels.shape) == (1, 3, 4, 4)


def captions_none(cache: TensorCache) -> bool:
    return cache.captions is None


def test_tensor_cache_built_by_two_writers_at_once(tmp_path: Path, monkeypatch):
    """Two processes (torchrun) may build the same cache at once: interleave them deterministically."""
    import safetensors.torch as st

    cfg = DataConfig(source="emoji", max_rows=4)
    real_save = st.save_file
    nested = []

    def save_then_let_the_other_writer_finish(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)
        if not nested:  # the first writer pauses here while a second one writes the whole cache
            nested.append(None)
            nested[0] = load_tensor_cache(cfg, 8, tmp_path)

    monkeypatch.setattr(st, "save_file", save_then_let_the_other_writer_finish)
    first = load_tensor_cache(cfg, 8, tmp_path)
    assert first.key == nested[0].key
    files = sorted(f.name for f in (tmp_path / "datasets").iterdir())
    assert files == [f"{first.key}.json", f"{first.key}.safetensors"]  # no temp file left behind


def test_damaged_cache_is_rebuilt(tmp_path: Path):
    cfg = DataConfig(source="emoji", max_rows=3)
    cache = load_tensor_cache(cfg, 8, tmp_path)
    (tmp_path / "datasets" / f"{cache.key}.safetensors").write_bytes(b"broken")
    again = load_tensor_cache(cfg, 8, tmp_path)
    assert bool((again.pixels == cache.pixels).all())


def test_tensor_cache_bad_resolution(tmp_path: Path):
    with pytest.raises(DataError, match="Resolution must be a positive"):
        load_tensor_cache(DataConfig(source="emoji", max_rows=2), 0, tmp_path)
