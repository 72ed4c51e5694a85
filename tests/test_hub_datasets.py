"""Hugging Face datasets by id (studio.hub_datasets and the Hub source of studio.data): split and
column detection on local dataset folders, and the clear errors of an offline, unknown, gated or
unreachable Hub (the loopback Hub of tests/hub_server.py, or a patched ``datasets``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dataset_files import good_folder, hub_folder, png_bytes  # noqa: F401  (fixtures)
from studio.config.data import DataConfig
from studio.data import load_image_dataset
from studio.errors import DataError


def test_hub_local_dataset_autodetects_split_and_columns(hub_folder: Path):
    ds = load_image_dataset(DataConfig(source="hub", hub_id=str(hub_folder)))
    assert ds.info.split == "train" and set(ds.info.splits) == {"train", "test"}
    assert ds.info.image_column == "picture" and ds.info.caption_column == "prompt"
    assert ds.info.image_columns == ["picture"] and "prompt" in ds.info.caption_columns
    assert len(ds) == 4
    assert ds.captions == ["a red tile", "a green tile", "a blue tile", "a yellow tile"]
    assert ds.sizes()[1] == (9, 8)
    assert ds.image(0).getpixel((0, 0)) == (255, 0, 0)


def test_hub_overrides_and_row_limit(hub_folder: Path):
    ds = load_image_dataset(DataConfig(source="hub", hub_id=str(hub_folder), split="test", caption_column="id"))
    assert ds.names == ["test/0"] and ds.captions == ["4"]
    ds = load_image_dataset(DataConfig(source="hub", hub_id=str(hub_folder), max_rows=2))
    assert len(ds) == 2
    with pytest.raises(DataError, match="has no column 'nope'"):
        load_image_dataset(DataConfig(source="hub", hub_id=str(hub_folder), image_column="nope"))


def test_hub_class_label_column_gives_class_names_as_captions(tmp_path: Path):
    from datasets import ClassLabel, Dataset, Features, Image as ImageFeature

    root = tmp_path / "flowers"
    root.mkdir()
    feats = Features({"image": ImageFeature(), "label": ClassLabel(names=["daisy", "rose"])})
    rows = [{"image": {"bytes": png_bytes(Image.new("RGB", (8, 8), c)), "path": None}, "label": i % 2}
            for i, c in enumerate(["white", "red", "yellow"])]
    Dataset.from_list(rows, features=feats).to_parquet(str(root / "train.parquet"))
    auto = load_image_dataset(DataConfig(source="hub", hub_id=str(root)))
    assert auto.captions is None and auto.info.caption_columns == ["label"]
    picked = load_image_dataset(DataConfig(source="hub", hub_id=str(root), caption_column="label"))
    assert picked.captions == ["daisy", "rose", "daisy"]


def test_hub_imagefolder_with_metadata(good_folder: Path):
    ds = load_image_dataset(DataConfig(source="hub", hub_id=str(good_folder)))
    assert len(ds) == 3 and ds.info.image_column == "image"
    assert sorted(ds.captions) == ["a blue bar", "a green square", "a red block"]


def test_hub_dataset_without_image_column(tmp_path: Path):
    from datasets import Dataset

    root = tmp_path / "textonly"
    root.mkdir()
    Dataset.from_list([{"text": "hello", "n": 1}]).to_parquet(str(root / "train.parquet"))
    with pytest.raises(DataError, match=r"has no image column \(columns: text, n\)"):
        load_image_dataset(DataConfig(source="hub", hub_id=str(root)))


def test_hub_uncached_id_offline_is_clear():
    with pytest.raises(DataError, match="not in the local cache and the studio is offline"):
        load_image_dataset(DataConfig(source="hub", hub_id="nobody-here/no-such-dataset-xyz"))


def _raise(exc: BaseException):
    def fake(*args, **kwargs):
        raise exc
    return fake


def test_hub_unknown_id_online(local_hub):
    # the loopback Hub answers 401 RepoNotFound, as the Hub does for an unknown (or private) id
    with pytest.raises(DataError, match=r"Dataset 'x/y' was not found on the Hugging Face Hub"):
        load_image_dataset(DataConfig(source="hub", hub_id="x/y"))


def test_hub_gated_says_how_to_log_in(local_hub):
    local_hub.add_repo("x/y", {"data/train-00000-of-00001.parquet": b"PAR1", "README.md": b"# y\n"},
                       repo_type="dataset", gated=True)
    with pytest.raises(DataError, match=r"gated.*hf auth login"):
        load_image_dataset(DataConfig(source="hub", hub_id="x/y"))


def test_hub_no_network_online(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets, "load_dataset", _raise(ConnectionError("Couldn't reach 'x/y' on the Hub (LocalEntryNotFoundError)")))
    with pytest.raises(DataError, match="Could not reach the Hugging Face Hub"):
        load_image_dataset(DataConfig(source="hub", hub_id="x/y"))


def test_hub_offline_mode_exception(monkeypatch):
    import datasets
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setattr(datasets, "load_dataset", _raise(OfflineModeIsEnabled("offline")))
    with pytest.raises(DataError, match="studio is offline"):
        load_image_dataset(DataConfig(source="hub", hub_id="x/y"))
