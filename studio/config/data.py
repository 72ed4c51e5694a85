"""Which images to use: the dataset source a person picked in the Dataset tab.

A ``DataConfig`` is a description, not the images: it is small, goes into every
run's ``config.json``, and lets the CLI rebuild exactly the dataset the UI used.
``studio.data`` turns it into images.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.config.base import ConfigBase, option, require, require_choice

#: Dataset sources, in the order the Dataset tab offers them.
DATA_SOURCES = ("emoji", "folder", "upload", "hub")
#: Categories of the bundled emoji set (its ``category`` column), in the set's order, with their sizes.
EMOJI_CATEGORIES = {"smileys & emotion": 169, "people & body": 386, "component": 5, "animals & nature": 159,
                    "food & drink": 131, "travel & places": 218, "activities": 85, "objects": 264,
                    "symbols": 224, "flags": 270}
#: The category the studio starts with: round faces and hearts, the part of the set a small model learns
#: on a CPU in minutes (benchmarks/README.md, "Why the default run showed noise").
STARTING_CATEGORY = "smileys & emotion"


def dataset_summary(count: int, label: str, captioned: bool, skipped: int) -> str:
    """One line for the UI: '1911 images from emoji (bundled), captioned, 0 skipped'."""
    return f"{count} images from {label}, {'captioned' if captioned else 'no captions'}, {skipped} skipped"


@dataclass
class DataConfig(ConfigBase):
    """A dataset source and how to read it."""

    source: str = option("emoji", "Where the images come from: emoji (bundled), folder, upload or hub.")
    path: str = option("", "Folder of images (source 'folder'), or the folder/zip an upload was unpacked to.")
    hub_id: str = option("", "Hugging Face dataset id, e.g. huggan/smithsonian_butterflies_subset (source 'hub').")
    split: str = option("", "Dataset split; empty picks 'train' or the first split.")
    image_column: str = option("", "Column holding the images; empty detects it.")
    caption_column: str = option("", "Column holding captions; empty detects one (or none).")
    category: str = option("", "Bundled emoji only: use one category of the set, e.g. 'smileys & emotion' "
                                 "(empty = all 1,911).")
    max_rows: int = option(0, "Use at most this many images (0 = all).")
    require_captions: bool = option(False, "Refuse the dataset when an image has no caption.")

    def __post_init__(self) -> None:
        require_choice(self.source, DATA_SOURCES, "Dataset source")
        require(isinstance(self.max_rows, int) and self.max_rows >= 0, "Row limit must be 0 (all) or a positive number.")
        if self.category:
            require(self.source == "emoji", "An emoji category applies to the bundled emoji set only; "
                                            f"clear it for source {self.source!r}.")
            require_choice(self.category, EMOJI_CATEGORIES, "Emoji category")
        if self.source in ("folder", "upload"):
            require(bool(str(self.path).strip()), "Choose a folder (or upload files) first: the path is empty.")
        if self.source == "hub":
            require(bool(self.hub_id.strip()), "Enter a Hugging Face dataset id, e.g. huggan/smithsonian_butterflies_subset.")

    @classmethod
    def starting(cls) -> "DataConfig":
        """The dataset the studio starts with: the bundled emoji set's ``STARTING_CATEGORY``."""
        return cls(category=STARTING_CATEGORY)

    @property
    def label(self) -> str:
        """Short human name: 'emoji (bundled)', 'folder /data/cats', 'hub user/set [train]'."""
        if self.source == "emoji":
            return f"emoji (bundled, {self.category})" if self.category else "emoji (bundled)"
        if self.source == "hub":
            return f"hub {self.hub_id}" + (f" [{self.split}]" if self.split else "")
        return f"{self.source} {self.path}"
