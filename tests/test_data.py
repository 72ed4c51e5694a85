"""Tests of studio.data's local sources: the emoji set, folders (captions, metadata files,
fingerprints), sources that cannot be read, and export.

The Hub, image checks, uploads and the tensor cache have their own files: test_hub_datasets.py,
test_images.py, test_uploads.py and test_tensor_cache.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_files import folder_cfg, good_folder, hub_folder, save, skipped_reasons  # noqa: F401  (fixtures)
from studio.config.data import DataConfig
from studio.data import EMOJI_PARQUET, SkippedFile, export_image_folder, load_image_dataset
from studio.errors import ConfigError, DataError


# --------------------------------------------------------------------------- the emoji set


def test_emoji_parquet_loads_with_datasets_as_images():
    from datasets import Dataset, Image as ImageFeature

    ds = Dataset.from_parquet(str(EMOJI_PARQUET))
    assert len(ds) == 1911
    assert isinstance(ds.features["image"], ImageFeature)
    assert set(ds.column_names) == {"image", "text", "category"}
    row = ds[0]
    assert row["text"] == "grinning face, smileys & emotion, face-smiling"
    assert row["category"] == "smileys & emotion"
    assert row["image"].mode == "RGB" and row["image"].size == (64, 64)
    assert row["image"].getpixel((0, 0)) == (255, 255, 255)  # transparent corner composited on white
    assert not any("skin tone" in t and ":" in t for t in ds["text"])
    assert (EMOJI_PARQUET.parent / "LICENSE.md").read_text().count("CC-BY 4.0") >= 1


def test_emoji_source_loads_all_with_captions():
    ds = load_image_dataset(DataConfig(source="emoji"))
    assert len(ds) == 1911
    assert ds.captions is not None and ds.captions[0].startswith("grinning face")
    assert ds.skipped == []
    assert set(ds.sizes()) == {(64, 64)}
    im = ds.image(5)
    assert im.mode == "RGB" and im.size == (64, 64)
    assert ds.fingerprint == load_image_dataset(DataConfig(source="emoji")).fingerprint


def test_emoji_row_limit_and_progress():
    calls = []
    ds = load_image_dataset(DataConfig(source="emoji", max_rows=10), progress=lambda f, m: calls.append((f, m)))
    assert len(ds) == 10
    assert calls[-1][0] == 1.0 and all(0.0 <= f <= 1.0 for f, _ in calls)
    assert ds.fingerprint != load_image_dataset(DataConfig(source="emoji", max_rows=11)).fingerprint


def test_emoji_category_picks_its_rows_and_is_its_own_dataset():
    import pyarrow.parquet as pq

    from studio.config.data import EMOJI_CATEGORIES

    column = pq.read_table(EMOJI_PARQUET, columns=["category"]).column("category").to_pylist()
    assert EMOJI_CATEGORIES == {c: column.count(c) for c in dict.fromkeys(column)}  # the set's order and sizes
    whole = load_image_dataset(DataConfig(source="emoji", max_rows=3))
    faces = load_image_dataset(DataConfig(source="emoji", category="smileys & emotion"))
    assert len(faces) == 169 and faces.captions[-1].startswith("zzz") and "smileys & emotion" in faces.summary()
    flags = load_image_dataset(DataConfig(source="emoji", category="flags", max_rows=4))
    assert len(flags) == 4 and all(", flags, " in c for c in flags.captions)
    assert flags.image(0).tobytes() != whole.image(0).tobytes()
    # the first 169 rows of the whole set are the smileys, but a category is its own dataset (cache key)
    assert faces.fingerprint != load_image_dataset(DataConfig(source="emoji", max_rows=169)).fingerprint
    assert [faces.image(i).tobytes() for i in (0, 168)] == \
        [load_image_dataset(DataConfig(source="emoji", max_rows=169)).image(i).tobytes() for i in (0, 168)]
    with pytest.raises(ConfigError, match="Emoji category must be one of: smileys & emotion, people & body"):
        DataConfig(source="emoji", category="Smileys")
    with pytest.raises(ConfigError, match="bundled emoji set only"):
        DataConfig(source="folder", path="/data", category="flags")


# --------------------------------------------------------------------------- folders


def test_folder_with_metadata_jsonl_recursive(good_folder: Path):
    ds = load_image_dataset(folder_cfg(good_folder))
    assert ds.names == ["green.jpg", "red.png", "sub/blue.webp"]
    assert ds.captions == ["a green square", "a red block", "a blue bar"]
    assert ds.info.caption_source == "metadata.jsonl"
    assert ds.sizes() == [(12, 12), (20, 10), (8, 16)]
    assert ds.image(1).getpixel((0, 0)) == (255, 0, 0)
    assert ds.skipped == []


def test_metadata_jsonl_in_a_subfolder_is_relative_to_it(tmp_path: Path):
    root = tmp_path / "nested"
    save(root / "train" / "a.png", Image.new("RGB", (8, 8), "white"))
    (root / "train" / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "white"}\n')
    ds = load_image_dataset(folder_cfg(root))
    assert ds.names == ["train/a.png"] and ds.captions == ["white"]


def test_folder_with_kohya_txt_captions(tmp_path: Path):
    root = tmp_path / "kohya"
    save(root / "one.png", Image.new("RGB", (8, 8), "red"))
    save(root / "two.png", Image.new("RGB", (8, 8), "blue"))
    (root / "one.txt").write_text("a red square, simple\n", encoding="utf-8")
    ds = load_image_dataset(folder_cfg(root))
    assert ds.captions == ["a red square, simple", ""]
    assert ds.info.caption_source == ".txt files"
    assert ds.has_captions


def test_folder_without_captions_has_none(tmp_path: Path):
    root = tmp_path / "plain"
    save(root / "a.png", Image.new("RGB", (8, 8)))
    ds = load_image_dataset(folder_cfg(root))
    assert ds.captions is None and not ds.has_captions


def test_require_captions_names_the_missing_ones(tmp_path: Path):
    root = tmp_path / "half"
    save(root / "a.png", Image.new("RGB", (8, 8)))
    save(root / "b.png", Image.new("RGB", (8, 8)))
    (root / "a.txt").write_text("has one")
    with pytest.raises(DataError, match=r"Captions are required but 1 of 2 images have none \(b.png\)"):
        load_image_dataset(folder_cfg(root, require_captions=True))
    save(root / "c.png", Image.new("RGB", (8, 8)))
    (root / "a.txt").unlink()
    with pytest.raises(DataError, match="3 of 3"):
        load_image_dataset(folder_cfg(root, require_captions=True))


def test_folder_junk_and_hidden_files_are_ignored(tmp_path: Path):
    root = tmp_path / "junk"
    save(root / "a.png", Image.new("RGB", (8, 8)))
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._a.png").write_bytes(b"\0\x05\x16\x07junk")
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "._a.png").write_bytes(b"junk")
    (root / "notes.md").write_text("readme")
    ds = load_image_dataset(folder_cfg(root))
    assert ds.names == ["a.png"] and ds.skipped == []


def test_missing_file_listed_in_metadata_is_reported(good_folder: Path):
    with open(good_folder / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"file_name": "gone.png", "text": "lost"}) + "\n")
    ds = load_image_dataset(folder_cfg(good_folder))
    assert len(ds) == 3
    assert "does not exist" in skipped_reasons(ds)["gone.png"]


def test_malformed_metadata_line_is_a_clear_error(good_folder: Path):
    with open(good_folder / "metadata.jsonl", "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(DataError, match=r"metadata.jsonl line 4 is not valid JSON"):
        load_image_dataset(folder_cfg(good_folder))


def test_row_limit_on_folder(good_folder: Path):
    assert len(load_image_dataset(folder_cfg(good_folder, max_rows=2))) == 2


def test_fingerprint_is_stable_and_follows_content(good_folder: Path):
    first = load_image_dataset(folder_cfg(good_folder)).fingerprint
    assert first == load_image_dataset(folder_cfg(good_folder)).fingerprint
    text = (good_folder / "metadata.jsonl").read_text().replace("a red block", "a crimson block")
    (good_folder / "metadata.jsonl").write_text(text)
    assert load_image_dataset(folder_cfg(good_folder)).fingerprint != first


# --------------------------------------------------------------------------- bad sources


def test_missing_folder(tmp_path: Path):
    with pytest.raises(DataError, match="Folder not found"):
        load_image_dataset(folder_cfg(tmp_path / "nope"))


def test_empty_folder(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_image_dataset(folder_cfg(tmp_path / "empty"))


def test_folder_with_no_images(tmp_path: Path):
    root = tmp_path / "texts"
    root.mkdir()
    (root / "a.txt").write_text("caption without image")
    (root / "b.csv").write_text("x,y\n")
    with pytest.raises(DataError, match=r"holds no images \(2 other files\)"):
        load_image_dataset(folder_cfg(root))


def test_folder_where_every_image_is_bad(tmp_path: Path):
    root = tmp_path / "allbad"
    root.mkdir()
    (root / "a.png").write_bytes(b"")
    (root / "b.jpg").write_text("hello")
    with pytest.raises(DataError, match=r"holds no usable images. All 2 files were skipped; first: a.png: empty file"):
        load_image_dataset(folder_cfg(root))


def test_empty_path_and_hub_id_are_config_errors():
    from studio.errors import ConfigError

    with pytest.raises(ConfigError, match="path is empty"):
        DataConfig(source="folder", path="")
    with pytest.raises(ConfigError, match="Hugging Face dataset id"):
        DataConfig(source="hub", hub_id=" ")


# --------------------------------------------------------------------------- export


def test_export_image_folder_round_trip(tmp_path: Path):
    ds = load_image_dataset(DataConfig(source="emoji", max_rows=5))
    calls = []
    out = export_image_folder(ds, tmp_path / "export", progress=lambda f, m: calls.append(f))
    assert sorted(p.name for p in out.glob("*.png")) == [f"train_{i}.png" for i in range(5)]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert rows[0] == {"file_name": "train_0.png", "text": ds.captions[0]}
    assert calls[-1] == 1.0
    back = load_image_dataset(folder_cfg(out))
    assert sorted(back.captions) == sorted(ds.captions)
    assert np.array_equal(np.asarray(back.image(back.names.index("train_0.png"))), np.asarray(ds.image(0)))
    with pytest.raises(DataError, match="not empty"):
        export_image_folder(ds, out)


def test_export_uses_the_hub_split_name(hub_folder: Path, tmp_path: Path):
    ds = load_image_dataset(DataConfig(source="hub", hub_id=str(hub_folder), split="test"))
    out = export_image_folder(ds, tmp_path / "exp")
    assert (out / "test_0.png").is_file()


def test_skipped_file_is_plain_data():
    s = SkippedFile("a.png", "empty file (0 bytes)")
    assert (s.name, s.reason) == ("a.png", "empty file (0 bytes)")
