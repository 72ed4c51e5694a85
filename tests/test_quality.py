"""The sample-quality measure (sliced Wasserstein distance of patches) on known inputs.

The bundled emoji set at 32 px is the dataset: 16 images kept aside play "perfect
samples", noise plays "untrained model", and blurred or colour-shifted copies of the
16 play "a model halfway there". Lower is better, so the order must be
data < changed data < noise.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from studio.errors import DataError
from studio.quality import QualityReference, as_images, laplacian_pyramid, noise_images, sliced_wasserstein

SAMPLES = 16


@pytest.fixture(scope="module")
def emoji_32(tmp_path_factory) -> torch.Tensor:
    """240 bundled emoji (a seeded draw over every category) at 32 px, as the trainer's uint8 cache."""
    from studio.config.data import DataConfig
    from studio.data import load_tensor_cache

    pixels = load_tensor_cache(DataConfig(), 32, tmp_path_factory.mktemp("quality-cache")).pixels
    return pixels[torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0))[:240]]


@pytest.fixture(scope="module")
def split(emoji_32):
    """(16 images outside the reference, a QualityReference built from the rest)."""
    aside = emoji_32[:SAMPLES]
    return aside, QualityReference.build(emoji_32[SAMPLES:], sample_count=SAMPLES)


def blurred(images: torch.Tensor) -> torch.Tensor:
    x = as_images(images)
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def colour_shifted(images: torch.Tensor) -> torch.Tensor:
    x = as_images(images)
    return (x + torch.tensor([0.35, -0.25, 0.0]).view(1, 3, 1, 1)).clamp(-1, 1)


def test_pyramid_levels_down_to_16_px_and_flat_images_have_no_detail():
    flat = torch.full((2, 3, 64, 64), 0.3)
    levels = laplacian_pyramid(flat)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    assert levels[0].abs().max() < 1e-5 and levels[1].abs().max() < 1e-5   # no detail at any band
    assert torch.allclose(levels[-1], flat[..., :16, :16], atol=1e-5)       # the low-pass keeps the colour
    assert [lv.shape[-1] for lv in laplacian_pyramid(torch.zeros(1, 3, 32, 32))] == [32, 16]
    assert [lv.shape[-1] for lv in laplacian_pyramid(torch.zeros(1, 3, 8, 8))] == [8]


def test_held_out_data_scores_far_better_than_noise(split):
    aside, ref = split
    assert ref.num_levels == 2 and ref.size == (32, 32) and ref.sample_count == SAMPLES
    assert ref.data_level is not None
    assert ref.data_level * 5 < ref.noise_level             # "clearly better": measured ~95 vs ~1300
    unseen = ref.score(aside)
    assert unseen * 5 < ref.noise_level
    assert ref.score(noise_images(SAMPLES, (32, 32), seed=5)) > 0.8 * ref.noise_level


@pytest.mark.parametrize("change", [blurred, colour_shifted], ids=["blurred", "colour-shifted"])
def test_damaged_data_scores_between_data_and_noise(split, change):
    aside, ref = split
    clean, damaged = ref.score(aside), ref.score(change(aside))
    assert clean < damaged < ref.noise_level
    assert damaged > 1.2 * clean


def test_input_forms_agree_and_score_is_deterministic(split, emoji_32):
    aside, ref = split
    as_numpy_uint8 = aside.permute(0, 2, 3, 1).numpy()                # sample_images' output
    as_numpy_float = as_numpy_uint8.astype(np.float32) / 255.0        # diffusers' output_type="np"
    scores = {ref.score(aside), ref.score(as_numpy_uint8), ref.score(as_numpy_float), ref.score(as_images(aside))}
    assert max(scores) - min(scores) < 1e-3
    small = QualityReference.build(emoji_32[SAMPLES:96], sample_count=SAMPLES)
    again = QualityReference.build(emoji_32[SAMPLES:96], sample_count=SAMPLES)
    assert (again.noise_level, again.data_level) == (small.noise_level, small.data_level)
    assert again.score(aside) == small.score(aside)
    assert ref.score_levels(aside) == ref.score_levels(aside)
    other_seed = QualityReference.build(emoji_32[SAMPLES:96], sample_count=SAMPLES, seed=1)
    assert other_seed.noise_level != small.noise_level                 # the seed is really used


def test_one_off_comparison_and_wrong_sizes(emoji_32):
    a, b = emoji_32[:SAMPLES], emoji_32[SAMPLES:96]
    same = sliced_wasserstein(a, b)
    assert same < sliced_wasserstein(blurred(a), b) < sliced_wasserstein(noise_images(SAMPLES, (32, 32)), b)
    ref = QualityReference.build(emoji_32[:24], sample_count=8)
    with pytest.raises(DataError, match="32x32"):
        ref.score(torch.zeros(4, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(DataError):
        as_images(np.zeros((4, 3, 16, 16), dtype=np.uint8))           # channels-first numpy is refused
    with pytest.raises(DataError):
        as_images(torch.zeros(0, 3, 8, 8))


def test_tiny_datasets_and_tiny_images_still_score():
    gen = torch.Generator().manual_seed(0)
    few = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=gen)
    ref = QualityReference.build(few, sample_count=4)     # 3 images: 1 held out, 2 kept
    assert ref.num_reference == 2 and ref.data_level is not None and ref.num_levels == 1
    assert np.isfinite(ref.score(few))
    single = QualityReference.build(few[:1], sample_count=4)
    assert single.data_level is None and single.num_reference == 1


def test_scoring_costs_little_next_to_drawing_the_grid_it_scores(split):
    """Speed as a ratio: scoring 16 samples vs one denoising step of the tiny preset's UNet
    on them (a grid takes 50 such steps); building the reference vs one training step."""
    from diffusers import UNet2DModel

    from studio.unet_presets import DEFAULT_PRESET, PRESETS, unet_kwargs

    aside, ref = split
    preset = PRESETS[DEFAULT_PRESET]
    unet = UNet2DModel(**unet_kwargs(32, preset.block_out_channels, preset.layers_per_block,
                                     preset.down_block_types, preset.up_block_types))
    x, t = torch.randn(SAMPLES, 3, 32, 32), torch.tensor(500)

    def best_of(fn, n=3) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        unet_step = best_of(lambda: unet(x, t), n=2)
    score = best_of(lambda: ref.score(aside), n=2)
    assert score < 3 * unet_step, (score, unet_step)       # < 6% of a 50-step grid; measured ~0.5x
    pixels = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    build = best_of(lambda: QualityReference.build(pixels, sample_count=SAMPLES), n=1)
    assert build < 40 * unet_step, (build, unet_step)      # once per run; measured ~10x (about 3 training steps)
