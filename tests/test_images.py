"""Every bad image kind, checked once when a dataset is loaded (studio.images, through studio.data).

Every bad file is made here, in the test: truncated PNG, 0-byte file, text named .png,
CMYK JPEG, palette with transparency, 16-bit grayscale, LA, RGBA, animated GIF,
EXIF-rotated JPEG, a PNG header that claims a gigantic size, formats outside the list.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_files import folder_cfg, png_bytes, png_header_only, save, skipped_reasons
from studio.data import load_image_dataset, open_image
from studio.errors import DataError


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
