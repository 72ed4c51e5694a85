"""Uploads and zips becoming a dataset folder (studio.uploads, through studio.data): unpacking,
junk left out, zip slip, zip bombs, damaged archives.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from PIL import Image

from dataset_files import folder_cfg, png_bytes, save
from studio.config.data import DataConfig
from studio.data import extract_zip, load_image_dataset, unpack_upload
from studio.errors import DataError


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
