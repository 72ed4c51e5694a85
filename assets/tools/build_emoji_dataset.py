"""Build the bundled emoji dataset (assets/emoji/emoji.parquet) from the Twemoji npm package.

The studio ships a small captioned image set so that every tab works offline on a
fresh machine. It is made from the npm package ``emoji-datasource-twitter@16.0.0``
(emoji metadata MIT, Cal Henderson; Twemoji graphics CC-BY 4.0, Twitter Inc. and
contributors — see assets/emoji/LICENSE.md).

Captions use each emoji's CLDR short name ("red heart", "grinning face") from the npm
package ``emojibase-data@17.0.0`` (MIT, Miles Johnson), falling back to the Unicode name
that emoji-datasource gives (which calls ❤️ "heavy black heart") for an emoji it lacks.

Rebuild it with::

    cd /tmp && npm pack emoji-datasource-twitter@16.0.0 emojibase-data@17.0.0
    mkdir -p emoji-pkg emojibase && tar xzf emoji-datasource-twitter-16.0.0.tgz -C emoji-pkg
    tar xzf emojibase-data-17.0.0.tgz -C emojibase
    python assets/tools/build_emoji_dataset.py /tmp/emoji-pkg/package --names /tmp/emojibase/package/en/data.json

What it does:

1. reads ``emoji.json`` (one entry per base emoji; skin-tone variants live in each
   entry's ``skin_variations`` and are left out), keeps the entries that have a
   Twitter image, in the package's ``sort_order``;
2. opens ``img/twitter/64/<image>`` (64x64 RGBA or palette PNG), composites it on a
   white background and stores it as an RGB PNG;
3. writes a caption ``"<name>, <category>, <subcategory>"`` in lower case, e.g.
   ``"grinning face, smileys & emotion, face-smiling"`` or ``"red heart, smileys & emotion,
   heart"`` (the name is the CLDR short name, see above), and the category;
4. saves a Parquet file with the Hugging Face ``datasets`` features
   ``{image: Image(), text: Value("string"), category: Value("string")}`` embedded,
   so ``datasets.Dataset.from_parquet(path)`` gives PIL images back directly.

The output is deterministic: the same package gives the same images and captions.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from PIL import Image

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "emoji" / "emoji.parquet"
SIZE = 64


def composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten any PNG mode (RGBA, palette with transparency, LA...) onto white, as RGB."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def read_cldr_names(path: Path | None) -> dict[str, str]:
    """CLDR short names by code point sequence (upper-case hex, dashes, no FE0F) from emojibase's data.json."""
    if path is None:
        return {}
    names = {}
    for item in json.loads(path.read_text(encoding="utf-8")):
        if item.get("label"):
            names[_codepoints(item["hexcode"])] = item["label"]
    return names


def _codepoints(hexcode: str) -> str:
    """A code point sequence without variation selector 16, so qualified and unqualified forms match."""
    return "-".join(cp for cp in hexcode.upper().split("-") if cp != "FE0F")


def caption_for(entry: dict, cldr_names: dict[str, str] | None = None) -> str:
    """The caption of one emoji.json entry: name (CLDR when known), category and subcategory, lower case."""
    name = (cldr_names or {}).get(_codepoints(entry["unified"]), entry["name"])
    parts = [name, entry["category"], entry["subcategory"]]
    return ", ".join(str(p).strip().lower() for p in parts if p)


def read_package(package_dir: Path, cldr_names: dict[str, str] | None = None) -> list[dict]:
    """The base emoji that have a Twitter image, as rows {image, text, category}.

    Args:
        package_dir: The unpacked npm package (the folder holding emoji.json).
        cldr_names: CLDR short names by code points (``read_cldr_names``); Unicode names without.

    Raises:
        SystemExit: when the folder is not the expected package.
    """
    meta_path = package_dir / "emoji.json"
    image_dir = package_dir / "img" / "twitter" / str(SIZE)
    if not meta_path.is_file() or not image_dir.is_dir():
        raise SystemExit(f"{package_dir} is not an unpacked emoji-datasource-twitter package "
                         f"(expected emoji.json and img/twitter/{SIZE}/).")
    entries = json.loads(meta_path.read_text(encoding="utf-8"))
    entries = sorted((e for e in entries if e.get("has_img_twitter")), key=lambda e: e["sort_order"])
    rows = []
    for entry in entries:
        with Image.open(image_dir / entry["image"]) as im:
            im.load()
            rgb = composite_on_white(im)
        if rgb.size != (SIZE, SIZE):
            rgb = rgb.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        rgb.save(buf, format="PNG", optimize=True)
        rows.append({"image": {"bytes": buf.getvalue(), "path": entry["image"]},
                     "text": caption_for(entry, cldr_names),
                     "category": str(entry["category"]).lower()})
    return rows


def write_parquet(rows: list[dict], out: Path) -> None:
    """Write rows as Parquet with the datasets Image feature embedded in the schema."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    features = Features({"image": ImageFeature(), "text": Value("string"), "category": Value("string")})
    ds = Dataset.from_list(rows, features=features)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(out))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: package folder in, Parquet out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package_dir", type=Path, help="unpacked npm package folder (holds emoji.json)")
    parser.add_argument("--names", type=Path, default=None,
                        help="emojibase-data's en/data.json: CLDR short names for the captions")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output Parquet (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    rows = read_package(args.package_dir, read_cldr_names(args.names))
    write_parquet(rows, args.out)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {len(rows)} emoji to {args.out} ({size_mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
