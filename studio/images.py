"""One image file: decode it, check it, and turn it into plain RGB; resize it for training.

``open_image`` reads an encoded file (bytes or a path) and either returns a loaded
RGB image or says, in words for the person, why it cannot be used: empty (0 bytes),
unreadable, not an image, a format outside the allow-list (``IMAGE_FORMATS``),
truncated or corrupt, or over the pixel limit (``MAX_IMAGE_PIXELS``: decompression
bombs). Every other mode — CMYK, palette with transparency, 16-bit, grayscale,
RGBA, the first frame of an animated GIF, EXIF-rotated — becomes RGB on white
(``to_rgb``). ``resize_to_square`` is the resize/crop the tensor cache uses.

Datasets (many images, their sources and captions) live in ``studio.data``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.errors import DataError

#: File extensions read as images (lower case). Anything else in a folder is skipped with a reason.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: PIL format names accepted (the real format, whatever the extension says). MPO is a multi-frame JPEG.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF")
#: Largest image accepted, in pixels (width x height). Anything bigger is treated as a
#: decompression bomb and skipped: a few hundred bytes of PNG can expand to gigabytes.
MAX_IMAGE_PIXELS = 64_000_000


class _Skip(Exception):
    """Internal (raised here, caught in ``studio.data``): this image cannot be used; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- images


def _format_pixels(n: int) -> str:
    return f"{n / 1e6:.0f} megapixels" if n >= 1e6 else f"{n} pixels"


def open_image(data: bytes | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode one image and turn it into RGB: EXIF rotation applied, alpha composited on white.

    Args:
        data: The encoded file (bytes) or a path to it.
        max_pixels: Refuse images larger than this (decompression bombs).

    Returns:
        A loaded RGB image (the first frame of an animation).

    Raises:
        DataError: when the file is empty, not an image, in a format outside the
            allow-list, too large, or truncated/corrupt.
    """
    try:
        return _decode(data, max_pixels=max_pixels)
    except _Skip as skip:
        name = data.name if isinstance(data, Path) else "image"
        raise DataError(f"Cannot use {name}: {skip.reason}.") from None


def _decode(data: bytes | Path, *, max_pixels: int = MAX_IMAGE_PIXELS,
            draft: tuple[int, int] | None = None) -> Image.Image:
    """``open_image`` raising ``_Skip`` (the loader turns those into skipped files).

    ``draft`` lets JPEG decode at a reduced scale (1/2 .. 1/8) that stays at least
    that size: much faster when the image is only needed small (the tensor cache).
    """
    if isinstance(data, Path):
        try:
            data = data.read_bytes()
        except OSError as exc:
            raise _Skip(f"cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise _Skip("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Our own pixel limit below is the check; PIL's warning must never reach the person.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise _Skip("not an image (the content is not a known image format)") from None
        except Image.DecompressionBombError:
            raise _Skip(f"too large: over {_format_pixels(max_pixels)} (possible decompression bomb)") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise _Skip(f"truncated or corrupt image header ({exc})") from None
        fmt = im.format or "unknown"
        if fmt not in IMAGE_FORMATS:
            raise _Skip(f"format {fmt} is not supported (use PNG, JPEG, WebP, BMP, GIF or TIFF)")
        width, height = im.size
        if width * height > max_pixels:
            raise _Skip(f"too large: {width}x{height} is over the limit of {_format_pixels(max_pixels)} "
                        "(possible decompression bomb)")
        if width < 1 or height < 1:
            raise _Skip("image has no pixels")
        try:
            im.seek(0)  # first frame of an animated GIF/WebP/TIFF
            if draft is not None and fmt in ("JPEG", "MPO"):
                im.draft(None, draft)
            im.load()
            return to_rgb(im)
        except Image.DecompressionBombError:
            raise _Skip(f"too large: over {_format_pixels(max_pixels)} (possible decompression bomb)") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise _Skip(f"truncated or corrupt image data ({exc})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as RGB: EXIF orientation applied, 16-bit scaled to 8-bit, alpha on white.

    Args:
        im: A loaded image in any mode (CMYK, P, PA, LA, I;16, I, F, 1, L, RGBA...).
    """
    try:
        im = ImageOps.exif_transpose(im)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        pass  # a damaged EXIF block: keep the pixels as stored
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        im = _high_depth_to_l(im)
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im.copy() if im.readonly else im
    return im.convert("RGB")


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale to 8-bit L, scaling the range rather than clipping."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
    else:
        top = 65535.0 if arr.size and float(arr.max()) > 255 else 255.0
    arr = np.clip(np.nan_to_num(arr) / top * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(arr, mode="L")


# --------------------------------------------------------------------------- resize


def resize_to_square(im: Image.Image, resolution: int, *, center_crop: bool = True) -> Image.Image:
    """Resize for training: shorter side to ``resolution`` then center crop, or squash to RxR.

    PIL's resize filters are antialiased (they widen with the scale factor), so
    downscaling does not alias.
    """
    r = int(resolution)
    if not center_crop:
        return im.resize((r, r), Image.Resampling.LANCZOS, reducing_gap=3.0)
    w, h = im.size
    scale = r / min(w, h)
    nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (nw - r) // 2, (nh - r) // 2
    return im.crop((left, top, left + r, top + r))
