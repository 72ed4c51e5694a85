"""Uploads: uploaded files and .zip archives gathered, safely, into one folder.

``unpack_upload`` copies uploaded images and caption files into a new folder and
unpacks each .zip there with ``extract_zip``, which refuses paths that escape the
folder (zip slip), stops at a byte and file-count limit (zip bombs) and skips links.
Junk that is never dataset content (``__MACOSX``, ``.DS_Store``, ``._*``...) is
left out here and when ``studio.data`` lists a folder (``_is_junk``).
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

#: Names that are never dataset content (macOS / Windows / editor junk).
JUNK_NAMES = ("__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini")
#: Most uncompressed bytes an uploaded .zip may expand to.
MAX_UPLOAD_BYTES = 4 * 1024**3
#: Most files an uploaded .zip may hold.
MAX_UPLOAD_FILES = 200_000


def _is_junk(rel: Path) -> bool:
    """True when any part of the relative path is junk (``JUNK_NAMES``, ``._*``) or hidden (``.*``)."""
    return any(part in JUNK_NAMES or part.startswith("._") or (part.startswith(".") and part not in (".", ".."))
               for part in rel.parts)


def extract_zip(zip_path: Path, dest: Path, *, max_bytes: int = MAX_UPLOAD_BYTES,
                max_files: int = MAX_UPLOAD_FILES) -> Path:
    """Unpack a .zip safely into ``dest`` and return ``dest``.

    Refuses entries that would land outside ``dest`` (absolute paths, ``..``:
    "zip slip"), stops when the uncompressed total passes ``max_bytes`` (zip bombs;
    the count is of bytes actually written, headers can lie), writes links as
    nothing, and leaves out junk (``__MACOSX``, ``.DS_Store``, ``._*``).

    Raises:
        DataError: on a damaged zip, an unsafe path, or too much content.
    """
    dest = Path(dest)
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
            raise DataError(f"{Path(zip_path).name} expands to {declared / 1e9:.1f} GB; the limit is "
                            f"{max_bytes / 1e9:.1f} GB.", "Split it into smaller uploads or use a local folder.")
        written = 0
        for entry in entries:
            name = entry.filename.replace("\\", "/")
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                raise DataError(f"{Path(zip_path).name} holds an unsafe path ({entry.filename!r}) that points "
                                "outside the upload folder; refusing to unpack it.")
            if not parts or _is_junk(Path(*parts)):
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
                            raise DataError(f"{Path(zip_path).name} expands to more than {max_bytes / 1e9:.1f} GB "
                                            "(possible zip bomb); stopped unpacking.")
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise DataError(f"{Path(zip_path).name} is damaged: cannot unpack {entry.filename} ({exc}).") from None
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def unpack_upload(files: Iterable[str | Path], dest: Path, *, max_bytes: int = MAX_UPLOAD_BYTES) -> Path:
    """Gather uploaded files into one folder: images and caption files copied, zips unpacked.

    Args:
        files: Paths of the uploaded files (images, .txt / metadata.jsonl, .zip).
        dest: A new folder (e.g. ``<workspace>/uploads/<id>``).
        max_bytes: Most bytes all zips together may expand to.

    Returns:
        ``dest``, ready for ``DataConfig(source="upload", path=str(dest))``.

    Raises:
        DataError: when nothing was uploaded or a zip is unsafe or damaged.
    """
    paths = [Path(f) for f in files if f]
    if not paths:
        raise DataError("No files were uploaded.", "Drop image files or a .zip on the upload box first.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    budget = max_bytes
    for path in paths:
        if not path.is_file():
            raise DataError(f"The uploaded file {path.name} is gone.", "Upload it again.")
        if path.suffix.lower() == ".zip":
            folder = extract_zip(path, dest / _unique(path.stem, used), max_bytes=budget)
            budget -= sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            continue
        name = _unique(path.name, used)
        if _is_junk(Path(name)):
            continue
        shutil.copyfile(path, dest / name)
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
