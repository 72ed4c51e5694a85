"""Sample quality without a download: sliced Wasserstein distance between image patches.

The measure of Karras et al. 2018 ("Progressive Growing of GANs", section 5 and
appendix D; their ``metrics/sliced_wasserstein.py``), needing no pretrained network:

    1. each image set becomes a Laplacian pyramid (5-tap binomial filter), from the full
       resolution down to about 16 px (one level for images under 32 px);
    2. per level, random 7x7 neighbourhoods (fixed seed) become 147-number descriptors,
       normalised per colour channel by the *reference's* mean and standard deviation
       (Karras normalise each set by its own statistics; using the reference's keeps a
       colour shift visible);
    3. the descriptors are projected on 512 random unit directions (fixed seed); along
       each direction the sorted projections of the two sets are compared (the 1-D
       Wasserstein-1 distance: mean absolute difference of their quantiles);
    4. the distance averaged over directions, times 1000, is the level's SWD; the
       quality figure is the mean over levels.

**Lower is better** (0 = the same patch statistics). It is only comparable between
sets of the same size at the same resolution against the same reference, so a
``QualityReference`` carries two reference levels measured at the sample count:

- ``noise_level``: Gaussian noise images (clipped to the image range) against the
  reference: what an untrained model scores;
- ``data_level``: held-out dataset images (as many as the samples, never part of the
  reference) against the reference: what a perfect model scores with that many samples
  (the mean over up to 4 disjoint held-out sets: one set of 16 emoji alone ranges
  from about 75 to 205, the mean of 4 is steadier).

Everything is deterministic (fixed seeds); one ``QualityReference`` is built once per
run from the image cache (about a second on one CPU thread for a few hundred 32 px
images), and scoring 16 samples takes a few tens of milliseconds. torch + numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from studio.errors import DataError

#: Neighbourhood side (pixels) of a patch descriptor, as Karras et al.
NEIGHBOURHOOD = 7
#: The pyramid stops halving once a level would be smaller than this (pixels).
MIN_LEVEL_SIZE = 16
#: Random neighbourhoods taken from each image per level (Karras: 128).
PATCHES_PER_IMAGE = 128
#: Random neighbourhoods per reference image and level (the reference has many images).
REFERENCE_PATCHES_PER_IMAGE = 64
#: Random projection directions per level (Karras: 4 repeats x 128).
NUM_PROJECTIONS = 512
#: Quantiles kept of the reference's sorted projections (the 1-D distributions compared).
NUM_QUANTILES = 2048
#: Most dataset images used as the reference (beyond the held-out ones).
MAX_REFERENCE_IMAGES = 384
#: Disjoint held-out sets the data level is averaged over.
HOLDOUT_SETS = 4
#: Images in each sample grid by default (``TrainConfig.num_samples``).
DEFAULT_SAMPLE_COUNT = 16
#: SWD is reported times this factor, as in the paper.
SCALE = 1e3

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


# ----------------------------------------------------------------------------- images
def as_images(images: Any) -> torch.Tensor:
    """Any supported image batch as float32 ``[N, 3, H, W]`` in [-1, 1] on the CPU.

    Accepted: numpy arrays ``[N, H, W, 3]`` (uint8, or float in [0, 1] as diffusers'
    ``output_type="np"``); torch tensors ``[N, 3, H, W]`` (uint8 as the studio's image
    cache, or float in [-1, 1] as the trainer's batches); a list of PIL images.

    Raises:
        DataError: an empty batch or a shape that is not an RGB image batch.
    """
    if isinstance(images, (list, tuple)):
        if images and not isinstance(images[0], np.ndarray) and hasattr(images[0], "convert"):
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        else:
            images = np.stack([np.asarray(im) for im in images]) if images else np.zeros((0, 1, 1, 3))
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"Expected images as [N, H, W, 3]; got an array of shape {images.shape}.")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = x * 2.0 - 1.0
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"Expected images as [N, 3, H, W]; got a tensor of shape {tuple(images.shape)}.")
        x = images.detach().cpu()
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
    else:
        raise DataError(f"Cannot read images from a {type(images).__name__}.")
    if len(x) == 0:
        raise DataError("There are no images to score.")
    return x.clamp(-1.0, 1.0).contiguous()


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap binomial filter, borders replicated (per channel)."""
    c = x.shape[1]
    k = _BINOMIAL.to(x.dtype)
    x = F.pad(x, (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    """Twice the size: zero insertion then the binomial filter times 4 (borders replicated first)."""
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    k2d = (_BINOMIAL[:, None] * _BINOMIAL[None, :] * 4.0).to(x.dtype).view(1, 1, 5, 5).repeat(c, 1, 1, 1)
    up = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2d, stride=2, groups=c)
    return up[..., 4:4 + 2 * h, 4:4 + 2 * w]


def laplacian_pyramid(x: torch.Tensor, min_size: int = MIN_LEVEL_SIZE) -> list[torch.Tensor]:
    """Laplacian pyramid of ``x`` ``[N, C, H, W]``, finest level first.

    Levels are halved while the next one is at least ``min_size`` pixels (and the size is
    even); the last level is the low-pass image itself. 32 px images give 32 and 16 px
    levels, 64 px images 64, 32 and 16; images under ``2 * min_size`` give one level.
    """
    levels = []
    g = x
    while min(g.shape[-2:]) // 2 >= min_size and g.shape[-1] % 2 == 0 and g.shape[-2] % 2 == 0:
        down = _blur(g)[..., ::2, ::2]
        levels.append(g - _upsample(down))
        g = down
    levels.append(g)
    return levels


# ----------------------------------------------------------------------------- descriptors
def _patch_descriptors(level: torch.Tensor, per_image: int, seed: int) -> torch.Tensor:
    """``per_image`` random neighbourhoods (fixed seed) of each image: ``[N * per_image, C, k, k]``."""
    n, c, h, w = level.shape
    k = min(NEIGHBOURHOOD, h, w)
    gen = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, h - k + 1, (n, per_image), generator=gen)
    xs = torch.randint(0, w - k + 1, (n, per_image), generator=gen)
    offsets = torch.arange(k)
    rows = (ys[:, :, None] + offsets)[:, :, :, None]          # [n, p, k, 1]
    cols = (xs[:, :, None] + offsets)[:, :, None, :]          # [n, p, 1, k]
    image = torch.arange(n)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[image, rows, cols]   # [n, p, k, k, c]
    return patches.permute(0, 1, 4, 2, 3).reshape(n * per_image, c, k, k)


def _directions(dim: int, level: int, seed: int) -> torch.Tensor:
    """``NUM_PROJECTIONS`` random unit vectors of length ``dim`` (fixed seed): ``[P, dim]``."""
    gen = torch.Generator().manual_seed(seed * 7919 + level + 1)
    d = torch.randn(NUM_PROJECTIONS, dim, generator=gen)
    return d / d.norm(dim=1, keepdim=True)


def _quantiles(sorted_values: np.ndarray, count: int) -> np.ndarray:
    """Columns of ``sorted_values`` ``[P, M]`` at the ``count`` quantile midpoints (i + 0.5) / count."""
    m = sorted_values.shape[1]
    index = np.minimum(((np.arange(count) + 0.5) * m / count).astype(np.int64), m - 1)
    return sorted_values[:, index]


@dataclass
class _Level:
    """The reference's statistics at one pyramid level."""

    mean: torch.Tensor        # [C] per-channel descriptor mean
    std: torch.Tensor         # [C] per-channel descriptor standard deviation
    directions: torch.Tensor  # [P, C * k * k] unit vectors
    quantiles: np.ndarray     # [P, NUM_QUANTILES] of the reference's projections

    def project_sorted(self, descriptors: torch.Tensor) -> np.ndarray:
        """Normalised descriptors projected on each direction, sorted: ``[P, M]``.

        numpy sorts: torch's CPU sort is 10-30x slower on these shapes.
        """
        normed = (descriptors - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return np.sort((self.directions @ normed.flatten(1).T).numpy(), axis=1)

    def distance(self, descriptors: torch.Tensor) -> float:
        """SWD (x 1000) between ``descriptors`` and the reference at this level."""
        projected = _quantiles(self.project_sorted(descriptors), NUM_QUANTILES)
        return float(np.abs(projected - self.quantiles).mean()) * SCALE


def _build_levels(reference: torch.Tensor, seed: int) -> list[_Level]:
    levels = []
    for i, level in enumerate(laplacian_pyramid(reference)):
        desc = _patch_descriptors(level, REFERENCE_PATCHES_PER_IMAGE, seed + 100 + i)
        mean = desc.mean(dim=(0, 2, 3))
        std = desc.std(dim=(0, 2, 3)).clamp_min(1e-6)
        entry = _Level(mean, std, _directions(desc[0].numel(), i, seed), np.empty(0))
        entry.quantiles = _quantiles(entry.project_sorted(desc), NUM_QUANTILES)
        levels.append(entry)
    return levels


def _level_distances(levels: list[_Level], images: torch.Tensor, seed: int) -> list[float]:
    return [entry.distance(_patch_descriptors(level, PATCHES_PER_IMAGE, seed + 200 + i))
            for i, (entry, level) in enumerate(zip(levels, laplacian_pyramid(images)))]


# ----------------------------------------------------------------------------- public API
def noise_images(count: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """``count`` images of Gaussian noise (std 1) clipped to [-1, 1]: what an untrained model draws."""
    gen = torch.Generator().manual_seed(seed + 12345)
    return torch.randn((count, 3, *size), generator=gen).clamp_(-1.0, 1.0)


@dataclass
class QualityReference:
    """A dataset's patch statistics plus the two reference levels, built once, scored against often.

    Attributes:
        size: (height, width) of the images it scores.
        sample_count: How many samples the reference levels were measured with.
        num_reference: Dataset images the statistics come from.
        noise_level: SWD of ``sample_count`` noise images (an untrained model's figure).
        data_level: SWD of ``sample_count`` held-out dataset images (a perfect model's
            figure; mean over up to ``HOLDOUT_SETS`` disjoint sets), or None when the
            dataset has fewer than 2 images.
        seed: Seed of the neighbourhoods, directions, held-out split and noise.
    """

    size: tuple[int, int]
    sample_count: int
    num_reference: int
    noise_level: float
    data_level: float | None
    seed: int
    _levels: list[_Level]

    @classmethod
    def build(cls, images: Any, sample_count: int = DEFAULT_SAMPLE_COUNT, seed: int = 0,
              max_reference: int = MAX_REFERENCE_IMAGES) -> "QualityReference":
        """The reference of a dataset: up to ``HOLDOUT_SETS`` x ``sample_count`` images held out
        (never more than half the dataset), up to ``max_reference`` of the rest kept.

        Args:
            images: The dataset (any form ``as_images`` reads), e.g. the trainer's uint8 cache.
            sample_count: Images in each scored sample set (the grid's ``num_samples``).
            seed: Seed of every random choice (the split, neighbourhoods, directions, noise).
            max_reference: Most images kept as the reference (a random, seeded subset).

        Raises:
            DataError: no images, or not an RGB image batch.
        """
        limit = HOLDOUT_SETS * int(sample_count) + max_reference
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            # pick the subset before converting: the whole cache may be large
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
            images = images.detach()[order[: limit].to(images.device)].cpu()
            data = as_images(images)
        else:
            data = as_images(images)
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
            data = data[order[: limit]]
        held = min(int(sample_count), len(data) // 2)
        sets = max(1, min(HOLDOUT_SETS, len(data) // 2 // held)) if held else 0
        held_out, reference = data[: sets * held], data[sets * held:]
        levels = _build_levels(reference, seed)
        noise = noise_images(int(sample_count), tuple(reference.shape[-2:]), seed)
        noise_level = float(np.mean(_level_distances(levels, noise, seed)))
        data_level = float(np.mean([np.mean(_level_distances(levels, held_out[i * held:(i + 1) * held], seed))
                                    for i in range(sets)])) if sets else None
        return cls(tuple(reference.shape[-2:]), int(sample_count), len(reference), noise_level, data_level, seed,
                   levels)

    @property
    def num_levels(self) -> int:
        return len(self._levels)

    def score_levels(self, samples: Any) -> list[float]:
        """SWD (x 1000) of ``samples`` per pyramid level, finest first."""
        x = as_images(samples)
        if tuple(x.shape[-2:]) != self.size:
            raise DataError(f"Samples are {x.shape[-1]}x{x.shape[-2]} px; the reference is "
                            f"{self.size[1]}x{self.size[0]} px.", "Score samples at the dataset's resolution.")
        return _level_distances(self._levels, x, self.seed)

    def score(self, samples: Any) -> float:
        """The quality figure of ``samples``: SWD x 1000 averaged over levels. Lower is better."""
        return float(np.mean(self.score_levels(samples)))

    def summary(self) -> dict[str, Any]:
        """JSON-able facts about this reference (levels, sizes, seed)."""
        return {"noise_level": self.noise_level, "data_level": self.data_level, "sample_count": self.sample_count,
                "num_reference": self.num_reference, "size": list(self.size), "levels": self.num_levels,
                "seed": self.seed}


def sliced_wasserstein(samples: Any, reference: Any, seed: int = 0) -> float:
    """SWD x 1000 between the patches of ``samples`` and of ``reference`` images (lower is better).

    A one-off comparison: all of ``reference`` is the reference (nothing held out). To
    score many sample sets against one dataset, build a ``QualityReference`` once.
    """
    ref = as_images(reference)
    levels = _build_levels(ref, seed)
    x = as_images(samples)
    if x.shape[-2:] != ref.shape[-2:]:
        raise DataError(f"Samples are {x.shape[-1]} px and the reference {ref.shape[-1]} px.",
                        "Compare images of the same size.")
    return float(np.mean(_level_distances(levels, x, seed)))


__all__ = ["QualityReference", "as_images", "laplacian_pyramid", "noise_images", "sliced_wasserstein"]
