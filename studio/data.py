"""Datasets: the sources, captions, the ``ImageDataset``, the decode-once tensor cache and export.

Every source a person can pick in the Dataset tab — the bundled emoji set, a local
folder, an upload (files or a .zip, unpacked to a folder by ``studio.uploads``), a
Hugging Face dataset (its split fetched by ``studio.hub_datasets``) — becomes the same
``ImageDataset``: names, optional captions, the files that were skipped and why, and a
fingerprint that identifies the content. Images are decoded on demand (``ds.image(i)``),
never held all at once.

Each image is checked once when the dataset is loaded, by ``studio.images``: empty,
truncated or corrupt files, non-images, formats outside the allow-list and
decompression bombs are skipped with a reason; every other mode (CMYK, palette with
transparency, 16-bit, grayscale, RGBA, animated GIF, EXIF-rotated) is turned into
plain RGB on white. The names of those two modules that callers use (``open_image``,
``extract_zip``, ``unpack_upload``...) are re-exported here.

Trainers do not read PIL files every step: ``load_tensor_cache`` decodes the set
once at a resolution into a uint8 tensor ``[N, 3, R, R]`` stored as safetensors
under ``<cache_root>/datasets/<key>``; the key comes from (fingerprint, resolution,
crop), so a second call loads the tensor without decoding any image.

torch and datasets are imported inside the functions that need them, so importing
this module stays light.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image

from studio.config.data import DataConfig, dataset_summary
from studio.errors import DataError
from studio.paths import MAX_IMAGE_FILE_BYTES, MAX_TEXT_FILE_BYTES, RefusedPath, inside_name, read_confined, refusal
from studio.images import (
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    MAX_IMAGE_PIXELS,
    _decode,
    _Skip,
    open_image,
    resize_to_square,
    to_rgb,
)
from studio.uploads import (
    JUNK_NAMES,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_FILES,
    _is_junk,
    extract_zip,
    unpack_upload,
)
from studio.hub_datasets import load_hub_split
from studio.stopping import raise_if_stopped

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

# The image and upload names are re-exported: callers import them from here.
__all__ = ["EMOJI_PARQUET", "SIDECAR_EXTENSIONS", "CAPTION_COLUMNS", "IMAGE_COLUMN_NAMES", "CACHE_VERSION",
           "Progress", "SkippedFile", "SourceInfo", "ImageDataset", "load_image_dataset", "detect_columns",
           "TensorCache", "cache_key", "load_tensor_cache", "export_image_folder",
           # studio.images
           "IMAGE_EXTENSIONS", "IMAGE_FORMATS", "MAX_IMAGE_PIXELS", "open_image", "to_rgb", "resize_to_square",
           # studio.uploads
           "JUNK_NAMES", "MAX_UPLOAD_BYTES", "MAX_UPLOAD_FILES", "extract_zip", "unpack_upload"]

#: The bundled emoji set (1,911 Twemoji, 64x64, captioned); see assets/emoji/README.md.
EMOJI_PARQUET: Path = Path(__file__).resolve().parent.parent / "assets" / "emoji" / "emoji.parquet"

#: Files next to images that hold captions or metadata (never reported as skipped).
SIDECAR_EXTENSIONS = (".txt", ".caption", ".jsonl", ".json", ".csv", ".md", ".yaml", ".yml")
#: Column names that hold captions, most likely first (Hub datasets and metadata files).
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "description", "sentence", "title", "label_text")
#: Column names that hold images when no column has the datasets Image feature.
IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "photo", "pixel_values")
#: Bump when the cached tensor layout or the resize changes, so old caches are not reused.
CACHE_VERSION = 1

Progress = Callable[[float, str], None]


@dataclass
class SkippedFile:
    """A file (or row) left out of the dataset, and why, in words for the person."""

    name: str
    reason: str


@dataclass
class SourceInfo:
    """What a source offered and what was picked (fills the tab's dropdowns).

    Attributes:
        splits: Splits of a Hub dataset (["train"] for other sources).
        split: The split used.
        columns: Column names of a Hub dataset or of the metadata file.
        image_columns: Columns that hold images.
        caption_columns: Columns that could hold captions.
        image_column: The image column used ("" for folders).
        caption_column: The caption column used ("" when none).
        caption_source: Where captions came from: "column", "metadata.jsonl", ".txt files", "" (none).
    """

    splits: list[str] = field(default_factory=lambda: ["train"])
    split: str = "train"
    columns: list[str] = field(default_factory=list)
    image_columns: list[str] = field(default_factory=list)
    caption_columns: list[str] = field(default_factory=list)
    image_column: str = ""
    caption_column: str = ""
    caption_source: str = ""


# --------------------------------------------------------------------------- dataset object


class ImageDataset:
    """Checked images of one source: names, optional captions, skipped files, fingerprint.

    Images are decoded on demand by ``image(i)``; the dataset keeps only the encoded
    bytes' location (a path, a row of an Arrow table, a Parquet cell).

    Attributes:
        config: The source description it was loaded from.
        names: A name per image (relative path, or "<split>/<row>" for Hub rows).
        captions: A caption per image ("" where one is missing), or None when the
            source has no captions at all.
        skipped: Files or rows left out, with reasons.
        fingerprint: Stable content id (same files and captions -> same id).
        info: What the source offered (splits, columns) and what was picked.
    """

    def __init__(self, config: DataConfig, names: list[str], captions: list[str] | None,
                 skipped: list[SkippedFile], fingerprint: str, readers: list[Callable[[], bytes | Path]],
                 sizes: list[tuple[int, int]], info: SourceInfo | None = None) -> None:
        self.config = config
        self.names = names
        self.captions = captions
        self.skipped = skipped
        self.fingerprint = fingerprint
        self.info = info or SourceInfo()
        self._readers = readers
        self._sizes = sizes

    def __len__(self) -> int:
        return len(self.names)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB (EXIF-rotated, composited on white).

        Raises:
            DataError: if the file changed on disk since loading and can no longer be read.
        """
        try:
            return _decode(self._readers[i]())
        except _Skip as skip:
            raise DataError(f"{self.names[i]} can no longer be read: {skip.reason}.",
                            "Load the dataset again.") from None

    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every image, after EXIF rotation."""
        return list(self._sizes)

    @property
    def has_captions(self) -> bool:
        """True when at least one image has a caption."""
        return self.captions is not None and any(c.strip() for c in self.captions)

    @property
    def split(self) -> str:
        """The split the images came from ("train" for folders, uploads and emoji)."""
        return self.info.split or "train"

    def summary(self) -> str:
        """One line for the UI: '1911 images from emoji (bundled), captioned, 0 skipped'."""
        return dataset_summary(len(self), self.config.label, self.has_captions, len(self.skipped))


@dataclass
class _Scan:
    """A source listed but not yet decoded: enough to compute the fingerprint."""

    names: list[str]
    readers: list[Callable[[], bytes | Path]]
    captions: list[str] | None
    skipped: list[SkippedFile]
    fingerprint: str
    info: SourceInfo


def load_image_dataset(cfg: DataConfig, *, progress: Progress | None = None,
                       scratch: Path | None = None, stop: threading.Event | None = None) -> ImageDataset:
    """Read a source, check every image once, and return the usable ones.

    Args:
        cfg: Which source and how to read it.
        progress: Optional ``progress(fraction, message)`` callback.
        scratch: The workspace's cache folder; a local .zip is unpacked under it.
        stop: A job's stop flag: when set, reading ends within one file (or at once
            during a Hub download) with ``Stopped``.

    Raises:
        DataError: when the source cannot be read or holds no usable image, or when
            captions are required and some are missing.
        Stopped: ``stop`` was set.
    """
    scan = _scan(cfg, progress, scratch, stop)
    return _check(cfg, scan, progress, stop=stop)


def _scan(cfg: DataConfig, progress: Progress | None, scratch: Path | None = None,
          stop: threading.Event | None = None) -> _Scan:
    if progress:
        progress(0.0, f"Reading {cfg.label}")
    raise_if_stopped(stop, f"reading {cfg.label}")
    if cfg.source == "emoji":
        return _scan_emoji(cfg)
    if cfg.source in ("folder", "upload"):
        return _scan_folder(cfg, scratch, stop)
    return _scan_hub(cfg, stop)


def _check(cfg: DataConfig, scan: _Scan, progress: Progress | None,
           visit: Callable[[int, Image.Image], None] | None = None,
           draft: tuple[int, int] | None = None, stop: threading.Event | None = None) -> ImageDataset:
    """Decode every scanned image once; keep the good ones. ``visit(k, image)`` sees the k-th good one.

    ``stop`` is looked at before every image (``Stopped``: nothing is kept).
    """
    names, readers, sizes, captions = [], [], [], []
    skipped = list(scan.skipped)
    total = len(scan.names)
    for i, (name, reader) in enumerate(zip(scan.names, scan.readers)):
        if progress and (i % 64 == 0):
            progress(i / max(total, 1), f"Checking images {i}/{total}")
        raise_if_stopped(stop, f"checking the images of {cfg.label} ({i} of {total} done)")
        try:
            im = _decode(reader(), draft=draft)
        except _Skip as skip:
            skipped.append(SkippedFile(name, skip.reason))
            continue
        if visit is not None:
            visit(len(names), im)
        sizes.append(im.size)
        names.append(name)
        readers.append(reader)
        if scan.captions is not None:
            captions.append(scan.captions[i])
        im.close()
    if progress:
        progress(1.0, f"Checked {total} images")
    if not names:
        detail = f" All {len(skipped)} files were skipped; first: {skipped[0].name}: {skipped[0].reason}." if skipped else ""
        raise DataError(f"{cfg.label} holds no usable images.{detail}",
                        f"Supported formats: {', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}.")
    final_captions: list[str] | None = captions if scan.captions is not None else None
    if final_captions is not None and not any(c.strip() for c in final_captions):
        final_captions = None
    if cfg.require_captions:
        missing = [n for n, c in zip(names, final_captions or [""] * len(names)) if not c.strip()]
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise DataError(
                f"Captions are required but {len(missing)} of {len(names)} images have none ({shown}).",
                "Add a metadata.jsonl (file_name, text) or a .txt file beside each image, "
                "pick the caption column, or turn off 'require captions'.")
    return ImageDataset(cfg, names, final_captions, skipped, scan.fingerprint, readers, sizes, scan.info)


def _limit(cfg: DataConfig, items: list) -> list:
    return items[: cfg.max_rows] if cfg.max_rows else items


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------- emoji


def _scan_emoji(cfg: DataConfig) -> _Scan:
    import pyarrow.parquet as pq

    if not EMOJI_PARQUET.is_file():
        raise DataError(f"The bundled emoji set is missing ({EMOJI_PARQUET}).",
                        "Rebuild it with assets/tools/build_emoji_dataset.py (see assets/emoji/README.md).")
    table = pq.read_table(EMOJI_PARQUET, columns=["image", "text", "category"])
    rows = [i for i, c in enumerate(table.column("category").to_pylist()) if not cfg.category or c == cfg.category]
    rows = _limit(cfg, rows)
    picked = table.take(rows)  # only the chosen rows become Python objects
    images = picked.column("image").to_pylist()
    texts = picked.column("text").to_pylist()
    names = [image.get("path") or f"emoji_{i}.png" for i, image in zip(rows, images)]
    file_hash = hashlib.sha256(EMOJI_PARQUET.read_bytes()).hexdigest()
    readers = [(lambda b=image["bytes"]: b) for image in images]
    info = SourceInfo(columns=["image", "text", "category"], image_columns=["image"],
                      caption_columns=["text", "category"], image_column="image",
                      caption_column="text", caption_source="column")
    # the whole set keeps the fingerprint it always had (its cached tensors stay valid)
    fingerprint = _digest("emoji", file_hash, cfg.category, len(rows)) if cfg.category else \
        _digest("emoji", file_hash, len(rows))
    return _Scan(names, readers, [t or "" for t in texts], [], fingerprint, info)


# --------------------------------------------------------------------------- folders and uploads


def _scan_folder(cfg: DataConfig, scratch: Path | None = None, stop: threading.Event | None = None) -> _Scan:
    root = Path(cfg.path).expanduser()
    if root.is_file() and root.suffix.lower() == ".zip":
        root = _unpack_local_zip(root, scratch)
    if not root.exists():
        raise DataError(f"Folder not found: {root}.", "Check the path (it must be on the machine running the studio).")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder.", "Choose the folder that holds the images.")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):  # links to folders are listed, never entered
        raise_if_stopped(stop, f"listing {root}")
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(rel_dir / d))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not _is_junk(rel_dir / f))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"The folder {root} is empty.", "Put images (PNG, JPEG, WebP...) in it, or pick another folder.")
    skipped: list[SkippedFile] = []
    images: list[Path] = []
    readable: set[Path] = set()  # images and sidecars that are plain files inside the folder
    for k, path in enumerate(files):
        if k % 256 == 0:
            raise_if_stopped(stop, f"listing {root}")
        ext = path.suffix.lower()
        rel = path.relative_to(root).as_posix()
        if ext in IMAGE_EXTENSIONS or ext in SIDECAR_EXTENSIONS:
            why = refusal(path, root, MAX_IMAGE_FILE_BYTES if ext in IMAGE_EXTENSIONS else MAX_TEXT_FILE_BYTES)
            if why:
                skipped.append(SkippedFile(rel, why))
                continue
            readable.add(path)
            if ext in IMAGE_EXTENSIONS:
                images.append(path)
        else:
            why = f"file type {ext or '(no extension)'} is not supported"
            skipped.append(SkippedFile(rel, f"{why} (allowed: {', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})"))
    if not images:
        raise DataError(f"The folder {root} holds no images ({len(files)} other files).",
                        f"Supported formats: {', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}.")
    metadata, meta_files = _read_metadata(root, cfg.caption_column, sorted(readable), skipped)
    captions: list[str] = []
    sources: set[str] = set()
    for path in images:
        rel = path.relative_to(root).as_posix()
        text = metadata.get(rel)
        if text is not None:
            sources.add("metadata.jsonl")
        else:
            for ext in (".txt", ".caption"):
                side = path.with_suffix(ext)
                if side in readable:
                    text = _read_text(side, root, skipped)
                    if text is not None:
                        sources.add(".txt files")
                        break
        captions.append((text or "").strip())
    walked = {p.relative_to(root).as_posix() for p in files}
    for name in sorted(set(metadata) - walked):
        skipped.append(SkippedFile(name, "listed in metadata.jsonl but the file does not exist"))
    images, captions = _limit(cfg, images), _limit(cfg, captions)
    names = [p.relative_to(root).as_posix() for p in images]
    # Fingerprint from what determines the result, without decoding: paths, sizes,
    # modification times, the captions and the caption settings.
    h = hashlib.sha256()
    for path, cap in zip(images, captions):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}|{cap}\n".encode("utf-8"))
    fingerprint = _digest("folder", h.hexdigest(), cfg.caption_column, cfg.max_rows)
    has_any = any(c for c in captions)
    info = SourceInfo(caption_source=" and ".join(sorted(sources)) if has_any else "",
                      columns=meta_files, caption_column=cfg.caption_column)
    return _Scan(names, [_confined_reader(p, root) for p in images], captions if has_any else None, skipped,
                 fingerprint, info)


def _confined_reader(path: Path, root: Path) -> Callable[[], bytes]:
    """Reads one image of a folder, refusing (as a skip) whatever ``studio.paths`` refuses."""
    def read() -> bytes:
        try:
            return read_confined(path, root, MAX_IMAGE_FILE_BYTES)
        except RefusedPath as exc:
            raise _Skip(exc.reason) from None

    return read


def _read_text(path: Path, root: Path, skipped: list[SkippedFile]) -> str | None:
    """A caption or metadata file of the folder as text, or None (with a skip reason) when refused."""
    try:
        return read_confined(path, root, MAX_TEXT_FILE_BYTES).decode("utf-8", errors="replace")
    except RefusedPath as exc:
        skipped.append(SkippedFile(path.relative_to(root).as_posix(), exc.reason))
        return None


def _unpack_local_zip(archive: Path, scratch: Path | None) -> Path:
    """A local .zip, unpacked into the workspace's cache (``scratch``), never beside the zip.

    The folder is named for the zip's path, size and time, and reused while they stay the same.
    """
    import tempfile

    if scratch is None:  # a caller without a workspace (a test, a script): a private temporary folder
        scratch = Path(tempfile.gettempdir()) / f"studio-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    st = archive.stat()
    key = _digest("zip", archive.resolve(), st.st_size, st.st_mtime_ns)
    dest = Path(scratch) / "unpacked" / f"{re.sub(r'[^A-Za-z0-9_-]+', '-', archive.stem)[:40]}-{key[:12]}"
    done = dest / ".complete"
    if done.is_file():
        return dest
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    extract_zip(archive, dest)
    done.write_text("ok", encoding="utf-8")
    return dest


def _read_metadata(root: Path, caption_column: str, files: list[Path],
                   skipped: list[SkippedFile]) -> tuple[dict[str, str], list[str]]:
    """Captions from every metadata.jsonl / metadata.csv among ``files`` (diffusers imagefolder).

    ``file_name`` is relative to the metadata file's folder; a name that leaves the folder
    (absolute, ``..``) is skipped with a reason and never looked up on disk. Returns
    (relative path -> caption, columns seen).

    Raises:
        DataError: on a malformed line, naming the file and line.
    """
    captions: dict[str, str] = {}
    columns: list[str] = []
    for meta in files:
        if meta.name not in ("metadata.jsonl", "metadata.csv"):
            continue
        rows: list[dict] = []
        text = _read_text(meta, root, skipped)
        if text is None:
            continue
        if meta.suffix == ".jsonl":
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{meta.relative_to(root)} line {lineno} is not valid JSON ({exc.msg}).",
                                    'Each line must be an object like {"file_name": "a.png", "text": "a cat"}.') from None
                if not isinstance(row, dict):
                    raise DataError(f"{meta.relative_to(root)} line {lineno} is not a JSON object.",
                                    'Each line must be an object like {"file_name": "a.png", "text": "a cat"}.')
                rows.append(row)
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        for row in rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
            name = row.get("file_name")
            if not name:
                continue
            key = caption_column or next((c for c in CAPTION_COLUMNS if c in row), "")
            value = row.get(key) if key else None
            if isinstance(value, list):
                value = value[0] if value else ""
            inner = inside_name(str(name))
            if inner is None:
                skipped.append(SkippedFile(str(name)[:200], f"{meta.name} names a path outside its folder"))
                continue
            rel = (meta.parent.relative_to(root) / inner).as_posix()
            captions[rel] = "" if value is None else str(value).strip()
    return captions, columns


# --------------------------------------------------------------------------- Hub datasets: columns and rows
# (the split itself, with the Hub's offline, timeout and error handling: studio.hub_datasets)


def detect_columns(features: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Image and caption column candidates of a datasets ``Features`` mapping, best first."""
    from datasets import ClassLabel, Image as ImageFeature, Value

    image_cols = [name for name, feat in features.items() if isinstance(feat, ImageFeature)]
    image_cols += [n for n in IMAGE_COLUMN_NAMES if n in features and n not in image_cols]
    string_cols = [name for name, feat in features.items()
                   if isinstance(feat, Value) and feat.dtype in ("string", "large_string")]
    ranked = [c for c in CAPTION_COLUMNS if c in string_cols]
    ranked += [c for c in string_cols if c not in ranked]
    # Class labels (e.g. flower species) can serve as captions when picked: their names are used.
    ranked += [name for name, feat in features.items() if isinstance(feat, ClassLabel)]
    return image_cols, ranked


def _scan_hub(cfg: DataConfig, stop: threading.Event | None = None) -> _Scan:
    ds, splits, split = load_hub_split(cfg, stop)  # first: fails fast offline, before importing datasets
    from datasets import Image as ImageFeature

    columns = list(ds.column_names)
    image_cols, caption_cols = detect_columns(ds.features)
    hub_id = cfg.hub_id.strip()
    if cfg.image_column:
        if cfg.image_column not in columns:
            raise DataError(f"'{hub_id}' has no column '{cfg.image_column}'.", f"Columns: {', '.join(columns)}.")
        image_col = cfg.image_column
    elif image_cols:
        image_col = image_cols[0]
    else:
        raise DataError(f"'{hub_id}' [{split}] has no image column (columns: {', '.join(columns)}).",
                        "Pick the column that holds the images, or choose an image dataset.")
    if cfg.caption_column:
        if cfg.caption_column not in columns:
            raise DataError(f"'{hub_id}' has no column '{cfg.caption_column}'.", f"Columns: {', '.join(columns)}.")
        caption_col = cfg.caption_column
    else:
        caption_col = next((c for c in caption_cols if c in CAPTION_COLUMNS), "")
    if cfg.max_rows and cfg.max_rows < len(ds):
        ds = ds.select(range(cfg.max_rows))
    if isinstance(ds.features[image_col], ImageFeature):
        ds = ds.cast_column(image_col, ImageFeature(decode=False))
    table = ds.select_columns([image_col])
    captions = None
    if caption_col:
        values = ds[caption_col]
        feature = ds.features[caption_col]
        if hasattr(feature, "int2str"):  # ClassLabel: the class name is the caption
            values = [None if v is None or v < 0 else feature.int2str(int(v)) for v in values]
        captions = ["" if c is None else (c[0] if isinstance(c, list) and c else str(c)).strip()
                    for c in values]
    names = [f"{split}/{i}" for i in range(len(ds))]
    readers = [(lambda i=i: _hub_cell_bytes(table, image_col, i)) for i in range(len(ds))]
    fingerprint = _digest("hub", hub_id, split, image_col, caption_col, cfg.max_rows,
                          getattr(ds, "_fingerprint", ""))
    info = SourceInfo(splits=splits, split=split, columns=columns, image_columns=image_cols,
                      caption_columns=caption_cols, image_column=image_col, caption_column=caption_col,
                      caption_source="column" if caption_col else "")
    return _Scan(names, readers, captions, [], fingerprint, info)


def _hub_cell_bytes(table: Any, column: str, i: int) -> bytes | Path:
    """The encoded bytes of row ``i`` of an image column (bytes, or a path to a local file)."""
    value = table[i][column]
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"])
        return b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return Path(value)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise _Skip(f"the column '{column}' holds {type(value).__name__}, not an image")


# --------------------------------------------------------------------------- tensor cache


@dataclass
class TensorCache:
    """A dataset decoded once at one resolution: what trainers read every step.

    Attributes:
        pixels: uint8 tensor [N, 3, R, R], contiguous.
        captions: One caption per image, or None when the source has none.
        names: One name per image (same order).
        key: Cache key (from the dataset fingerprint, resolution and crop).
    """

    pixels: "torch.Tensor"
    captions: list[str] | None
    names: list[str]
    key: str


def cache_key(fingerprint: str, resolution: int, center_crop: bool) -> str:
    """The tensor-cache key of a dataset fingerprint at a resolution and crop mode."""
    return _digest("tensors", CACHE_VERSION, fingerprint, int(resolution), "crop" if center_crop else "whole")


def load_tensor_cache(cfg: DataConfig, resolution: int, cache_root: Path, *, center_crop: bool = True,
                      progress: Progress | None = None, stop: threading.Event | None = None) -> TensorCache:
    """The dataset of ``cfg`` as uint8 tensors at ``resolution``, decoded at most once.

    The tensors live at ``cache_root/datasets/<key>.safetensors`` with names and
    captions in ``<key>.json``; the key comes from the dataset's fingerprint (computed
    without decoding), the resolution and the crop mode, so a second call loads from
    disk without decoding any image.

    Args:
        cfg: The dataset source.
        resolution: Side of the square images, in pixels.
        cache_root: Cache folder (trainers pass ``workspace / ".cache"``).
        center_crop: Resize the shorter side and crop the middle; False squashes the
            whole image to a square.
        progress: Optional ``progress(fraction, message)`` callback.
        stop: A job's stop flag, as for ``load_image_dataset`` (a stopped build writes no cache).

    Raises:
        DataError: as ``load_image_dataset``, or when the resolution is not positive.
        Stopped: ``stop`` was set.
    """
    import torch
    from safetensors.torch import load_file, save_file

    if int(resolution) < 1:
        raise DataError(f"Resolution must be a positive number of pixels (got {resolution}).")
    scan = _scan(cfg, progress, Path(cache_root), stop)
    key = cache_key(scan.fingerprint, resolution, center_crop)
    folder = Path(cache_root) / "datasets"
    tensor_path, meta_path = folder / f"{key}.safetensors", folder / f"{key}.json"
    if tensor_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            pixels = load_file(str(tensor_path))["pixels"]
            if pixels.shape[0] == len(meta["names"]) and tuple(pixels.shape[1:]) == (3, resolution, resolution):
                if progress:
                    progress(1.0, f"Loaded {pixels.shape[0]} cached images")
                return TensorCache(pixels.contiguous(), meta["captions"], meta["names"], key)
        except Exception:  # noqa: BLE001 - any damage (truncated file, bad header): rebuild below
            pass
    # One pass: each image is checked, resized and stored as it is decoded (never decoded twice).
    pixels = torch.empty((len(scan.names), 3, resolution, resolution), dtype=torch.uint8)

    def store(k: int, im: Image.Image) -> None:
        small = resize_to_square(im, resolution, center_crop=center_crop)
        pixels[k] = torch.from_numpy(np.asarray(small, dtype=np.uint8).copy()).permute(2, 0, 1)

    ds = _check(cfg, scan, progress, visit=store, draft=(resolution, resolution), stop=stop)
    if len(ds) < pixels.shape[0]:  # some files were skipped
        pixels = pixels[: len(ds)].clone()
    folder.mkdir(parents=True, exist_ok=True)
    # Unique temp names: several processes (torchrun) may build the same cache at once;
    # each renames its own complete file into place, and the last rename wins.
    tag = f".{os.getpid()}-{os.urandom(3).hex()}.tmp"
    tmp_tensor = tensor_path.with_name(tensor_path.name + tag)
    tmp_meta = meta_path.with_name(meta_path.name + tag)
    save_file({"pixels": pixels.contiguous()}, str(tmp_tensor))
    tmp_meta.write_text(json.dumps({"key": key, "source": cfg.to_dict(), "resolution": resolution,
                                    "center_crop": center_crop, "names": ds.names, "captions": ds.captions}),
                        encoding="utf-8")
    os.replace(tmp_tensor, tensor_path)  # tensor first: the json marks the pair as complete
    os.replace(tmp_meta, meta_path)
    if progress:
        progress(1.0, f"Cached {len(ds)} images at {resolution}px")
    return TensorCache(pixels.contiguous(), ds.captions, list(ds.names), key)


# --------------------------------------------------------------------------- export


def export_image_folder(ds: ImageDataset, out_dir: Path, progress: Progress | None = None) -> Path:
    """Write the dataset as PNGs ``<split>_<index>.png`` plus ``metadata.jsonl`` (file_name, text).

    The folder loads back as a ``folder`` source or with ``load_dataset("imagefolder")``.

    Args:
        ds: A loaded dataset.
        out_dir: A new or empty folder.
        progress: Optional ``progress(fraction, message)`` callback.

    Raises:
        DataError: when ``out_dir`` already holds files or cannot be written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} already exists and is not empty.", "Choose a new folder for the export.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        split = re.sub(r"[^A-Za-z0-9_-]+", "-", ds.split) or "train"
        rows = []
        total = len(ds)
        for i in range(total):
            if progress and i % 32 == 0:
                progress(i / max(total, 1), f"Exporting {i}/{total}")
            name = f"{split}_{i}.png"
            ds.image(i).save(out_dir / name, format="PNG")
            row = {"file_name": name}
            if ds.captions is not None:
                row["text"] = ds.captions[i]
            rows.append(row)
        with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise DataError(f"Cannot write the export to {out_dir} ({exc.strerror or exc}).",
                        "Choose a folder you can write to.") from None
    if progress:
        progress(1.0, f"Exported {total} images to {out_dir}")
    return out_dir
