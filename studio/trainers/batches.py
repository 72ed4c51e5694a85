"""What goes into a training batch: the decoded images and the seeded order they are drawn in.

Responsible for: the dataset as a decode-once uint8 tensor (``load_images``; with one caption
per image: ``load_captioned_images``) and its check (``check_pixels``); the seeded
shuffled batch stream shared by all processes (``BatchSampler``: its state goes into the
checkpoint, so a resumed run draws the same batches; use it in a new trainer); a batch of
those images as floats in [-1, 1] (``get_batch``, ``to_float``); the fine-tune's stateless order
(``SeededEpochs``: micro-batch number -> rows, nothing to save) and its random crops.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from studio.config.train import TrainConfig
from studio.errors import CheckpointError, ConfigError, DataError


def load_images(cfg: TrainConfig, progress: Callable[[float, str], None] | None = None,
                stop: threading.Event | None = None) -> torch.Tensor:
    """The dataset as a uint8 tensor ``[N, 3, R, R]`` from the decode-once tensor cache.

    Args:
        cfg: The run's settings (dataset, resolution, crop, workspace holding ``.cache``).
        progress: Optional ``progress(fraction, message)`` while images are decoded.
        stop: The job's stop flag (``Stopped`` within one image; no cache is written).
    """
    from studio.data import load_tensor_cache

    cache = load_tensor_cache(cfg.data, cfg.resolution, Path(cfg.workspace).expanduser() / ".cache",
                              center_crop=cfg.center_crop, progress=progress, stop=stop)
    return cache.pixels


def load_captioned_images(cfg: Any, report: Callable[..., None]) -> tuple[torch.Tensor, list[str]]:
    """The images (uint8 ``[N, 3, R, R]``, decoded once) and one caption per image ("" when none).

    Raises:
        DataError: no images, or no captions at all (text-to-image training learns from them).
    """
    from studio.data import load_tensor_cache

    report("status", message=f"loading {cfg.data.label} at {cfg.resolution} px")
    cache = load_tensor_cache(cfg.data, cfg.resolution, Path(cfg.workspace).expanduser() / ".cache",
                              center_crop=cfg.center_crop)
    if len(cache.pixels) == 0:
        raise DataError("The dataset has no images.", "Pick another dataset in the Dataset tab.")
    captions = [str(c or "") for c in (cache.captions or [""] * len(cache.pixels))]
    if not any(captions):
        raise DataError("This dataset has no captions, and text-to-image training learns from them.",
                        "Pick a captioned dataset (the emoji set, or a folder with .txt or metadata.jsonl "
                        "captions), or train in unconditional mode.")
    return cache.pixels, captions


def check_pixels(pixels: torch.Tensor, resolution: int) -> None:
    """Refuse an image cache of the wrong shape or an empty dataset."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, resolution, resolution):
        raise ConfigError(f"The image cache has shape {tuple(pixels.shape)} {pixels.dtype}; "
                          f"expected uint8 [N, 3, {resolution}, {resolution}].")
    if len(pixels) == 0:
        raise ConfigError("The dataset has no images.", "Pick another dataset in the Dataset tab.")


class BatchSampler:
    """An endless shuffled stream of image indices and flip flags, shared by all processes.

    Every process draws the same global batch of ``batch_size * world`` indices from
    one seeded generator and keeps its own slice, so the shards differ per process and
    the stream's state (generator, permutation, position) is the same everywhere:
    one ``state_dict`` restores it exactly.
    """

    def __init__(self, num_images: int, batch_size: int, rank: int, world: int, seed: int) -> None:
        self.n, self.batch_size, self.rank, self.world = num_images, batch_size, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(self.n, generator=self.generator)
        self.pos = 0
        self.epoch = 0
        self.last_indices = torch.empty(0, dtype=torch.long)

    def _take(self, k: int) -> torch.Tensor:
        parts = []
        while k > 0:
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos, self.epoch = 0, self.epoch + 1
            chunk = self.perm[self.pos:self.pos + k]
            self.pos += len(chunk)
            k -= len(chunk)
            parts.append(chunk)
        return torch.cat(parts)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's (indices, flip mask) of the next global batch."""
        total = self.batch_size * self.world
        indices = self._take(total)
        flips = torch.rand(total, generator=self.generator) < 0.5
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        self.last_indices = indices[mine]
        return indices[mine], flips[mine]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "pos": self.pos,
                "epoch": self.epoch}

    def position(self) -> dict[str, Any]:
        """Where the stream is, as JSON (for a tensor checkpoint's ``state.json``; the generator is saved apart)."""
        return {"perm": self.perm.tolist(), "pos": self.pos, "epoch": self.epoch}

    def load_position(self, position: dict[str, Any], checkpoint: str) -> None:
        """Go back to ``position`` (from ``position()``) of ``checkpoint`` (named in the refusal).

        Raises:
            CheckpointError: the checkpoint was trained on a dataset of another size.
        """
        if len(position["perm"]) != self.n:
            raise CheckpointError(f"Checkpoint {checkpoint} was trained on {len(position['perm'])} images; "
                                  f"the dataset now has {self.n}.", "Resume with the run's own dataset.")
        self.perm = torch.tensor(position["perm"], dtype=torch.long)
        self.pos, self.epoch = int(position["pos"]), int(position["epoch"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos, self.epoch = state["perm"].clone(), int(state["pos"]), int(state["epoch"])


def get_batch(pixels: torch.Tensor, sampler: BatchSampler, random_flip: bool, device: torch.device) -> torch.Tensor:
    """The sampler's next batch of ``pixels`` (uint8) as floats in [-1, 1] on ``device``, randomly
    mirrored on tensors (no PIL)."""
    indices, flips = sampler.next()
    batch = pixels[indices.to(pixels.device)].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if random_flip:
        flips = flips.to(device)[:, None, None, None]
        batch = torch.where(flips, batch.flip(-1), batch)
    return batch.contiguous()


def to_float(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images as floats in [-1, 1] on ``device``."""
    return pixels.to(device).float().div_(127.5).sub_(1.0)


class SeededEpochs:
    """The fine-tune's data order: micro-batch ``m`` of process ``rank`` -> its rows, from a seeded
    permutation per epoch. It has no state (the position follows from ``m``), so checkpoints hold none.
    """

    def __init__(self, count: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.count, self.batch_size, self.seed, self.rank, self.world = count, batch_size, seed, rank, world
        self.perms: dict[int, torch.Tensor] = {}

    def rows(self, micro: int) -> torch.Tensor:
        out = []
        for j in range(self.batch_size):
            position = (micro * self.world + self.rank) * self.batch_size + j
            epoch, offset = divmod(position, self.count)
            if epoch not in self.perms:
                self.perms.clear()  # only the current epoch is ever needed again
                self.perms[epoch] = torch.randperm(
                    self.count, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            out.append(int(self.perms[epoch][offset]))
        return torch.tensor(out, dtype=torch.long)


def random_crop(image: Any, resolution: int, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Shorter side to ``resolution``, a random square crop, an optional mirror -> [3, R, R] in [-1, 1]."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left = int(torch.randint(0, nw - resolution + 1, (1,), generator=gen))
    top = int(torch.randint(0, nh - resolution + 1, (1,), generator=gen))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float() / 127.5 - 1.0
