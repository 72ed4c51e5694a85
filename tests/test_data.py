"""Tests of studio.data: every source, every bad image kind, the tensor cache and export.

Every bad file is made here, in the test: truncated PNG, 0-byte file, text named .png,
CMYK JPEG, palette with transparency, 16-bit grayscale, LA, RGBA, animated GIF,
EXIF-rotated JPEG, a PNG header that claims a gigantic size, formats outside the list.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio import data as data_mod
from studio.config.data import DataConfig
from studio.data import (
    EMOJI_PARQUET,
    ImageDataset,
    SkippedFile,
    TensorCache,
    export_image_folder,
    extract_zip,
    load_image_dataset,
    load_tensor_cache,
    open_image,
    unpack_upload,
)
from studio.errors import DataError

# --------------------------------------------------------------------------- helpers


def png_bytes(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def save(path: Path, im: Image.Image, fmt: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, **kwargs)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries one tiny IDAT: a bomb's header."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def folder_cfg(path: Path, **kwargs) -> DataConfig:
    return DataConfig(source="folder", path=str(path), **kwargs)


def skipped_reasons(ds: ImageDataset) -> dict[str, str]:
    return {s.name: s.reason for s in ds.skipped}


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    """Three small RGB images with metadata.jsonl captions, one in a subfolder."""
    root = tmp_path / "good"
    save(root / "red.png", Image.new("RGB", (20, 10), (255, 0, 0)))
    save(root / "green.jpg", Image.new("RGB", (12, 12), (0, 255, 0)), quality=95)
    save(root / "sub" / "blue.webp", Image.new("RGB", (8, 16), (0, 0, 255)), lossless=True)
    (root / "metadata.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [
            {"file_name": "red.png", "text": "a red block"},
            {"file_name": "green.jpg", "text": "a green square"},
            {"file_name": "sub/blue.webp", "text": "a blue bar"},
        ]) + "\n", encoding="utf-8")
    return root


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


# --------------------------------------------------------------------------- image checks


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    """One good image and one file of every bad kind."""
    root = tmp_path / "bad"
    save(root / "good.png", Image.new("RGB", (8, 8), "red"))
    whole = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image", encoding="utf-8")
    (root / "garbage.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 garbage")
    save(root / "icon.ico", Image.new("RGB", (16, 16), "blue"), fmt="ICO")
    save(root / "ppm_named.png", Image.new("RGB", (8, 8), "blue"), fmt="PPM")
    (root / "bomb.png").write_bytes(png_header_only(10_000, 10_000))
    (root / "huge_bomb.png").write_bytes(png_header_only(30_000, 30_000))
    return root


def test_bad_files_are_skipped_with_reasons(bad_folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning (or any other) may escape
        ds = load_image_dataset(folder_cfg(bad_folder))
    assert ds.names == ["good.png"]
    reasons = skipped_reasons(ds)
    assert "truncated or corrupt" in reasons["truncated.png"]
    assert "truncated or corrupt" in reasons["truncated.jpg"]
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert reasons["text.jpg"].startswith("not an image")
    assert "not" in reasons["garbage.webp"] or "corrupt" in reasons["garbage.webp"]
    assert "file type .ico is not supported" in reasons["icon.ico"]
    assert "format PPM is not supported" in reasons["ppm_named.png"]
    assert "10000x10000 is over the limit" in reasons["bomb.png"] and "decompression bomb" in reasons["bomb.png"]
    assert "decompression bomb" in reasons["huge_bomb.png"]
    assert len(ds.skipped) == 9


def test_explicit_pixel_limit_is_a_clear_error():
    data = png_bytes(Image.new("RGB", (20, 20)))
    with pytest.raises(DataError, match=r"too large: 20x20 is over the limit of 100 pixels"):
        open_image(data, max_pixels=100)
    assert open_image(data, max_pixels=400).size == (20, 20)


def test_cmyk_becomes_rgb():
    im = open_image(_encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    assert im.mode == "RGB"
    r, g, b = im.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_composited_on_white():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    data = png_bytes(pal, transparency=0)
    im = open_image(data)
    assert im.mode == "RGB"
    assert im.getpixel((1, 1)) == (255, 255, 255)  # transparent red -> white
    assert im.getpixel((0, 0)) == (0, 0, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    arr[0, 0] = 65535
    src = Image.fromarray(arr)
    assert src.mode.startswith("I")
    im = open_image(png_bytes(src))
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255)
    assert im.getpixel((2, 2)) == (128, 128, 128)


def test_grayscale_and_la():
    gray = open_image(png_bytes(Image.new("L", (4, 4), 100)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (100, 100, 100)
    la = open_image(png_bytes(Image.new("LA", (4, 4), (0, 0))))
    assert la.getpixel((0, 0)) == (255, 255, 255)
    one_bit = open_image(png_bytes(Image.new("1", (4, 4), 1)))
    assert one_bit.getpixel((0, 0)) == (255, 255, 255)


def test_rgba_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 128))
    rgba.putpixel((2, 2), (0, 0, 255, 255))
    im = open_image(png_bytes(rgba))
    assert im.getpixel((0, 0)) == (255, 255, 255)
    assert im.getpixel((1, 1)) in ((255, 127, 127), (255, 128, 128))
    assert im.getpixel((2, 2)) == (0, 0, 255)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    im = open_image(buf.getvalue())
    assert im.mode == "RGB" and im.getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path: Path):
    src = Image.new("RGB", (40, 20), (255, 0, 0))
    src.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = save(tmp_path / "rot" / "rotated.jpg", src, fmt="JPEG", exif=exif, quality=100)
    ds = load_image_dataset(folder_cfg(path.parent))
    assert ds.sizes() == [(20, 40)]
    im = ds.image(0)
    assert im.size == (20, 40)
    top = im.getpixel((10, 5))
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


def test_tiff_and_bmp_are_accepted(tmp_path: Path):
    root = tmp_path / "fmts"
    save(root / "a.tiff", Image.new("RGB", (8, 8), "red"))
    save(root / "b.bmp", Image.new("RGB", (8, 8), "blue"))
    save(root / "c.tif", Image.new("L", (8, 8), 5))
    assert len(load_image_dataset(folder_cfg(root))) == 3


def test_open_image_names_the_file_on_error(tmp_path: Path):
    path = tmp_path / "zero.png"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"Cannot use zero.png: empty file"):
        open_image(path)


def _encoded(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# --------------------------------------------------------------------------- uploads


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in entries.items():
            zf.writestr(name, payload)
    return path


def test_upload_of_files_and_zip(tmp_path: Path):
    red = tmp_path / "in" / "red.png"
    save(red, Image.new("RGB", (8, 8), "red"))
    (tmp_path / "in" / "red.txt").write_text("a red square")
    archive = _zip(tmp_path / "in" / "more.zip", {
        "set/blue.png": png_bytes(Image.new("RGB", (8, 8), "blue")),
        "set/blue.txt": b"a blue square",
        "__MACOSX/set/._blue.png": b"junk",
        "set/.DS_Store": b"junk",
    })
    dest = unpack_upload([red, tmp_path / "in" / "red.txt", archive], tmp_path / "ws" / "uploads" / "u1")
    ds = load_image_dataset(DataConfig(source="upload", path=str(dest)))
    assert ds.names == ["more/set/blue.png", "red.png"]
    assert ds.captions == ["a blue square", "a red square"]
    assert not (dest / "more" / "__MACOSX").exists()


def test_folder_source_given_a_zip_unpacks_it_into_the_cache(tmp_path: Path):
    archive = _zip(tmp_path / "tiles.zip", {"a.png": png_bytes(Image.new("RGB", (8, 8), "red")), "a.txt": b"red"})
    ds = load_image_dataset(folder_cfg(archive), scratch=tmp_path / "cache")
    assert ds.names == ["a.png"] and ds.captions == ["red"]
    assert not (tmp_path / "tiles-unpacked").exists()
    assert [p.name for p in (tmp_path / "cache" / "unpacked" / next(iter(
        (tmp_path / "cache" / "unpacked").iterdir())).name).iterdir() if p.suffix] == ["a.png", "a.txt"]


def test_upload_nothing_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DataError, match="No files were uploaded"):
        unpack_upload([], tmp_path / "u")


def test_zip_slip_is_refused(tmp_path: Path):
    archive = _zip(tmp_path / "evil.zip", {"../../escape.png": b"x"})
    with pytest.raises(DataError, match="unsafe path"):
        extract_zip(archive, tmp_path / "dest" / "inner")
    assert not (tmp_path / "escape.png").exists()
    archive = _zip(tmp_path / "abs.zip", {"/tmp/abs-escape.png": b"x"})
    with pytest.raises(DataError, match="unsafe path"):
        extract_zip(archive, tmp_path / "dest2")


def test_zip_bomb_is_stopped(tmp_path: Path):
    archive = _zip(tmp_path / "bomb.zip", {"a.bin": b"\0" * 2_000_000})
    assert archive.stat().st_size < 50_000
    with pytest.raises(DataError, match="expands to"):
        extract_zip(archive, tmp_path / "dest", max_bytes=1_000_000)


def test_zip_with_lying_header_never_writes_past_the_cap(tmp_path: Path, monkeypatch):
    archive = _zip(tmp_path / "liar.zip", {"a.png": b"\0" * 2_000_000})
    real_infolist = zipfile.ZipFile.infolist

    def lying_infolist(self):
        infos = real_infolist(self)
        for info in infos:
            info.file_size = 10  # the header claims a tiny file
        return infos

    monkeypatch.setattr(zipfile.ZipFile, "infolist", lying_infolist)
    with pytest.raises(DataError, match="possible zip bomb|damaged"):
        extract_zip(archive, tmp_path / "dest", max_bytes=1_000_000)
    written = tmp_path / "dest" / "a.png"
    assert not written.exists() or written.stat().st_size <= 1_000_000


def test_zip_cap_counts_all_zips_of_an_upload(tmp_path: Path):
    first = _zip(tmp_path / "one.zip", {"a.bin": b"\0" * 600_000})
    second = _zip(tmp_path / "two.zip", {"b.bin": b"\0" * 600_000})
    unpack_upload([first], tmp_path / "ok", max_bytes=1_000_000)
    with pytest.raises(DataError, match="expands to"):
        unpack_upload([first, second], tmp_path / "u", max_bytes=1_000_000)


def test_damaged_zip(tmp_path: Path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match="not a readable .zip"):
        unpack_upload([bad], tmp_path / "u")


# --------------------------------------------------------------------------- Hub (offline)


@pytest.fixture
def hub_folder(tmp_path: Path) -> Path:
    """A local dataset folder (Parquet with an Image column): load_dataset reads it like a Hub id."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    root = tmp_path / "hubset" / "data"
    root.mkdir(parents=True)
    colors = ["red", "green", "blue", "yellow", "white"]
    rows = [{"picture": {"bytes": png_bytes(Image.new("RGB", (8 + i, 8), c)), "path": f"{c}.png"},
             "prompt": f"a {c} tile", "id": str(i)} for i, c in enumerate(colors)]
    feats = Features({"picture": ImageFeature(), "prompt": Value("string"), "id": Value("string")})
    Dataset.from_list(rows[:4], features=feats).to_parquet(str(root / "train-00000.parquet"))
    Dataset.from_list(rows[4:], features=feats).to_parquet(str(root / "test-00000.parquet"))
    return tmp_path / "hubset"


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
