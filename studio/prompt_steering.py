"""Does the prompt steer a text-to-image model? Figures per prompt, no download needed.

- ``matching_images(captions, prompt)``: the dataset images whose captions share the
  most words with the prompt (at least ``minimum`` of them), e.g. "flag" -> the 270 flags,
  "yellow smiling face" -> the captions with "smiling" and "face".
- ``PromptQuality``: the quality figure of ``studio.quality`` (sliced Wasserstein distance
  of patches, lower is better) of each prompt's validation images against its matching
  images; the trainer reports the mean as the ``quality`` event and each prompt in its
  message and in TensorBoard.
- ``colour_stats(images)``: the mean hue of the coloured pixels (circular mean, degrees:
  0 red, 60 yellow, 120 green, 240 blue), the share of coloured pixels and of white
  background, and the share of coloured pixels that are red / yellow. "red heart" and
  "yellow smiling face" differ in hue when the prompt steers.

torch + numpy only.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: A pixel is "coloured" above this saturation and value (HSV, 0-1).
MIN_SATURATION, MIN_VALUE = 0.3, 0.25
#: Hue bands (degrees) of the red and yellow shares.
RED_BAND, YELLOW_BAND = (340.0, 20.0), (40.0, 70.0)


def words(text: str) -> set[str]:
    """Lower-case words of ``text`` (letters and digits)."""
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def matching_images(captions: Sequence[str], prompt: str, minimum: int = 4) -> list[int]:
    """Indices of the images whose captions share the most words with ``prompt`` (at least ``minimum`` images,
    fewer shared words when needed; every image when no caption shares a word)."""
    wanted = words(prompt)
    shared = np.array([len(wanted & words(c)) for c in captions])
    for count in range(len(wanted), 0, -1):
        found = np.flatnonzero(shared >= count)
        if len(found) >= minimum:
            return found.tolist()
    return list(range(len(captions)))


class PromptQuality:
    """Scores each prompt's validation images against its matching images (built once, on first use).

    A failure never ends a run: it is reported once as a warning and scoring stops.
    """

    def __init__(self, pixels: Any, captions: Sequence[str], prompts: Sequence[str], per_prompt: int) -> None:
        self.pixels, self.captions, self.prompts, self.per_prompt = pixels, list(captions), list(prompts), per_prompt
        self.references: list[Any] | None = None
        self.failed = False

    def build(self) -> list[Any]:
        from studio.quality import QualityReference

        if self.references is None:
            self.references = [QualityReference.build(self.pixels[matching_images(self.captions, p)],
                                                      sample_count=self.per_prompt) for p in self.prompts]
        return self.references

    def scores(self, images: np.ndarray) -> list[float]:
        """The figure of each prompt's images (``images`` holds ``per_prompt`` per prompt, in prompt order)."""
        k = self.per_prompt
        return [ref.score(images[i * k:(i + 1) * k]) for i, ref in enumerate(self.build())]

    def __call__(self, images: np.ndarray, step: int, report: Any) -> list[float] | None:
        if self.failed:
            return None
        try:
            values = self.scores(images)
        except Exception as exc:  # noqa: BLE001 - a figure must never end a training run
            log.exception("prompt quality failed")
            self.failed = True
            report("warning", step, message=f"The per-prompt quality figure is unavailable for this run: {exc}")
            return None
        refs = self.references or []
        noise = float(np.mean([r.noise_level for r in refs]))
        data = [r.data_level for r in refs if r.data_level is not None]
        data_level = float(np.mean(data)) if data else None
        each = ", ".join(f"'{p}' {v:.0f}" for p, v in zip(self.prompts, values))
        report("quality", step, quality=float(np.mean(values)), noise_level=noise, data_level=data_level,
               message=f"quality per prompt at step {step}: {each} (noise {noise:.0f}; lower is better)")
        if getattr(report, "writer", None) is not None:
            for p, v in zip(self.prompts, values):
                report.writer.add_scalar(f"quality_per_prompt/{p}", v, step)
        return values


def _hsv(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value of uint8 or [0, 1] float ``[N, H, W, 3]`` images, flattened."""
    x = images.astype(np.float64)
    if images.dtype == np.uint8:
        x = x / 255.0
    r, g, b = (x[..., i].ravel() for i in range(3))
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    delta = mx - mn
    safe = np.where(delta == 0, 1.0, delta)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    sat = np.where(mx == 0, 0.0, delta / np.where(mx == 0, 1.0, mx))
    return np.where(delta == 0, 0.0, hue), sat, mx


def colour_stats(images: np.ndarray) -> dict[str, float]:
    """Colour figures of a set of images (uint8 or [0, 1] float ``[N, H, W, 3]``).

    Returns:
        ``hue``: circular mean hue of the coloured pixels (degrees, NaN when none);
        ``coloured``: share of coloured pixels; ``white``: share of near-white pixels;
        ``red`` / ``yellow``: share of the coloured pixels in the red / yellow hue band.
    """
    hue, sat, val = _hsv(images)
    coloured = (sat > MIN_SATURATION) & (val > MIN_VALUE)
    h = hue[coloured]
    white = (val > 0.9) & (sat < 0.1)
    if len(h) == 0:
        return {"hue": float("nan"), "coloured": 0.0, "white": float(white.mean()), "red": 0.0, "yellow": 0.0}
    angle = np.radians(h)
    mean_hue = float(np.degrees(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360)
    red = ((h >= RED_BAND[0]) | (h < RED_BAND[1])).mean()
    yellow = ((h >= YELLOW_BAND[0]) & (h < YELLOW_BAND[1])).mean()
    return {"hue": mean_hue, "coloured": float(coloured.mean()), "white": float(white.mean()), "red": float(red),
            "yellow": float(yellow)}
