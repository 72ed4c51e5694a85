"""What the data tests build for themselves: image bytes and files, and two dataset folders.

``good_folder`` (images with metadata.jsonl captions) and ``hub_folder`` (Parquet with an
Image column, read by ``datasets`` like a Hub id) are fixtures: import them into a test module.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from studio.config.data import DataConfig
from studio.data import ImageDataset


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
