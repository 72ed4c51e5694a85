"""Uploads: uploaded files and .zip archives gathered, safely, into one folder.

``unpack_upload`` copies uploaded images and caption files into a new folder and
unpacks each .zip there with ``extract_zip``, which refuses paths that escape the
folder (zip slip), stops at a byte and file-count limit (zip bombs) and skips links.
Only dataset content is kept (``KEPT_EXTENSIONS``: images, .txt/.caption captions,
metadata.jsonl/.csv): an HTML, SVG or script file never lands in the workspace,
which the app serves. Junk (``__MACOSX``, ``.DS_Store``, ``._*``...) is left out
here and when ``studio.data`` lists a folder (``_is_junk``). A refused upload or
zip leaves nothing behind. ``unpack_limit`` ties the unpacked total to the
``--max-file-size`` upload limit.
"""

from __future__ import annotations

import re
import shutil
import stat
import zipfile
import zlib
from pathlib import Path
from typing import Iterable

from studio.errors import DataError
from studio.images import IMAGE_EXTENSIONS

#: Names that are never dataset content (macOS / Windows / editor junk).
JUNK_NAMES = ("__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini")
#: Most uncompressed bytes an uploaded .zip may expand to.
MAX_UPLOAD_BYTES = 4 * 1024**3
#: Most files an uploaded .zip may hold.
MAX_UPLOAD_FILES = 200_000
#: An upload may unpack to at most this many times the upload limit (``--max-file-size``).
UNPACK_FACTOR = 10
#: What an upload keeps: images, caption files and metadata files. Everything else is left out.
KEPT_EXTENSIONS = IMAGE_EXTENSIONS + (".txt", ".caption")
KEPT_NAMES = ("metadata.jsonl", "metadata.csv")


def is_kept(name: str) -> bool:
    """True for an image, a caption file or a metadata file: the only things an upload keeps."""
    path = Path(name)
    return path.suffix.lower() in KEPT_EXTENSIONS or path.name.lower() in KEPT_NAMES


def parse_size(text: str | int) -> int:
    """Bytes of a size in Gradio's notation ("1gb", "500 MB", "5mb", "1024"), as ``--max-file-size`` takes it."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(text).lower())
    if not m:
        raise DataError(f"Cannot read the size {text!r}.", "Write it like 500mb or 1gb.")
    unit = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[m.group(2)[:1] or ""]
    return int(float(m.group(1)) * unit)


def unpack_limit(max_file_size: str | int) -> int:
    """Most bytes an upload may unpack to: ``UNPACK_FACTOR`` x the upload limit, at most ``MAX_UPLOAD_BYTES``."""
    return min(MAX_UPLOAD_BYTES, UNPACK_FACTOR * parse_size(max_file_size))


def _is_junk(rel: Path) -> bool:
    """True when any part of the relative path is junk (``JUNK_NAMES``, ``._*``) or hidden (``.*``)."""
    return any(part in JUNK_NAMES or part.startswith("._") or (part.startswith(".") and part not in (".", ".."))
               for part in rel.parts)


def extract_zip(zip_path: Path, dest: Path, *, max_bytes: int = MAX_UPLOAD_BYTES,
                max_files: int = MAX_UPLOAD_FILES) -> Path:
    """Unpack a .zip safely into ``dest`` and return ``dest``.

    Refuses entries that would land outside ``dest`` (absolute paths, ``..``:
    "zip slip"), stops when the uncompressed total passes ``max_bytes`` (zip bombs;
    the declared sizes are checked before anything is written, and the count is of
    bytes actually written, since headers can lie), writes links as nothing, and
    keeps only images, captions and metadata files (``is_kept``), never junk. When it
    refuses, nothing it wrote is left behind.

    Raises:
        DataError: on a damaged zip, an unsafe path, or too much content.
    """
    _extract_counted(Path(zip_path), Path(dest), max_bytes, max_files)
    return Path(dest)


def _extract_counted(zip_path: Path, dest: Path, max_bytes: int, max_files: int = MAX_UPLOAD_FILES,
                     left_out: list[str] | None = None) -> int:
    """``extract_zip``, returning the bytes it used of the budget (what the headers declare, or more
    when they lie); removes ``dest`` again when it made it and then refused."""
    existed = dest.exists()
    try:
        used = _extract_zip(zip_path, dest, max_bytes, max_files, left_out)
    except BaseException:
        if not existed:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    dest.mkdir(parents=True, exist_ok=True)
    return used


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def _extract_zip(zip_path: Path, dest: Path, max_bytes: int, max_files: int,
                 left_out: list[str] | None = None) -> int:
    """The unpacking itself; returns max(declared, written) bytes."""
    dest_resolved = dest.resolve()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{Path(zip_path).name} is not a readable .zip file ({exc}).") from None
    with zf:
        entries = [e for e in zf.infolist() if not e.is_dir()]
        if len(entries) > max_files:
            raise DataError(f"{Path(zip_path).name} holds {len(entries)} files; the limit is {max_files}.")
        declared = sum(e.file_size for e in entries)
        if declared > max_bytes:
            raise DataError(f"{Path(zip_path).name} expands to {_size(declared)}; the limit is "
                            f"{_size(max_bytes)}.", "Split it into smaller uploads or use a local folder.")
        written = 0
        for entry in entries:
            name = entry.filename.replace("\\", "/")
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                raise DataError(f"{Path(zip_path).name} holds an unsafe path ({entry.filename!r}) that points "
                                "outside the upload folder; refusing to unpack it.")
            if not parts or _is_junk(Path(*parts)):
                continue
            if not is_kept(parts[-1]):
                if left_out is not None:
                    left_out.append(f"{zip_path.name}/{'/'.join(parts)}")
                continue
            if stat.S_ISLNK(entry.external_attr >> 16):
                continue  # symbolic links could point anywhere on disk
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(dest_resolved):
                raise DataError(f"{Path(zip_path).name} holds an unsafe path ({entry.filename!r}); refusing to unpack it.")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(entry) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise DataError(f"{Path(zip_path).name} expands to more than {_size(max_bytes)} "
                                            "(possible zip bomb); stopped unpacking.")
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise DataError(f"{Path(zip_path).name} is damaged: cannot unpack {entry.filename} ({exc}).") from None
    return max(declared, written)


def unpack_upload(files: Iterable[str | Path], dest: Path, *, max_bytes: int = MAX_UPLOAD_BYTES,
                  left_out: list[str] | None = None) -> Path:
    """Gather uploaded files into one folder: images and caption files copied, zips unpacked.

    Args:
        files: Paths of the uploaded files (images, .txt / metadata.jsonl, .zip).
        dest: A new folder (e.g. ``<workspace>/uploads/<id>``).
        max_bytes: Most bytes all zips together may expand to.
        left_out: When given, receives the name of every file left out as not dataset content.

    Returns:
        ``dest``, ready for ``DataConfig(source="upload", path=str(dest))``.

    Raises:
        DataError: when nothing was uploaded or a zip is unsafe or damaged.
    """
    paths = [Path(f) for f in files if f]
    if not paths:
        raise DataError("No files were uploaded.", "Drop image files or a .zip on the upload box first.")
    dest = Path(dest)
    existed = dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        used: set[str] = set()
        budget = max_bytes
        for path in paths:
            if not path.is_file():
                raise DataError(f"The uploaded file {path.name} is gone.", "Upload it again.")
            if path.suffix.lower() == ".zip":
                budget -= _extract_counted(path, dest / _unique(path.stem, used), budget, left_out=left_out)
                continue
            if _is_junk(Path(path.name)):
                continue
            if not is_kept(path.name):
                if left_out is not None:
                    left_out.append(path.name)
                continue
            size = path.stat().st_size
            if size > budget:
                raise DataError(f"The upload is bigger than {_size(max_bytes)} in all.",
                                "Upload fewer files at once, or use a local folder.")
            budget -= size
            shutil.copyfile(path, dest / _unique(path.name, used))
    except BaseException:
        if not existed:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _unique(name: str, used: set[str]) -> str:
    """``name`` or ``stem-2.ext``... not yet in ``used`` (uploads may share names)."""
    name = Path(name).name or "file"
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, n = name, 1
    while candidate.lower() in used:
        n += 1
        candidate = f"{stem}-{n}{suffix}"
    used.add(candidate.lower())
    return candidate
