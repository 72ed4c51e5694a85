"""How a training run reports: events, TensorBoard, sample grids written atomically, quality, process logs.

Responsible for: the events reporter that writes ``events.jsonl`` and the TensorBoard logs in
``logs/``; the sample grids (``samples/step-N.png``, written atomically, also sent to
TensorBoard) and ``samples/progress.gif``; the grid's quality figure (``SampleQuality``: the
dataset's ``studio.quality`` reference, built once per run, scoring every grid);
``logs/processes.json`` (per-process weight checksums).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.events import Event, EventSink
from studio.runs import RunDir

log = logging.getLogger(__name__)

#: Sample grids smaller than this (pixels, longer side) are enlarged for viewing.
GRID_MIN_SIDE = 256


# ----------------------------------------------------------------------------- samples
def make_grid(images: np.ndarray):
    """uint8 [N, H, W, 3] -> one PIL image, as square as possible.

    Small grids are enlarged by a whole factor (nearest neighbour, pixels stay sharp) to
    at least ``GRID_MIN_SIDE`` pixels, so a 16 px model's samples are visible in the UI.
    """
    from PIL import Image

    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    grid = Image.fromarray(canvas)
    factor = max(1, math.ceil(GRID_MIN_SIDE / max(grid.size)))
    if factor > 1:
        grid = grid.resize((grid.width * factor, grid.height * factor), Image.Resampling.NEAREST)
    return grid



def save_samples(run: RunDir, step: int, images: np.ndarray, writer: Any = None) -> Path:
    """``samples/step-N.png``: ``images`` as one grid, also sent to TensorBoard when ``writer`` is open."""
    from studio.atomic import save_image

    path = run.sample_path(step)
    grid = make_grid(images)
    save_image(grid, path)  # atomic: a kill mid-write never leaves a truncated grid
    if writer is not None:
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    return path


def write_progress_gif(run: RunDir) -> Path | None:
    """``samples/progress.gif``: every readable ``step-N.png`` grid in step order (None when fewer than 2)."""
    from PIL import Image

    from studio.atomic import remove_stale_temporaries, save_image

    remove_stale_temporaries(run.samples_dir)
    images = []
    for frame in sorted(run.samples_dir.glob("step-*.png")):
        try:  # a grid damaged earlier (a 0-byte file from a killed run) is left out, not fatal
            with Image.open(frame) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    if len(images) < 2:
        return None
    size = images[-1].size
    images = [im if im.size == size else im.resize(size) for im in images]
    target = run.samples_dir / "progress.gif"
    durations = [400] * (len(images) - 1) + [1500]
    save_image(images[0], target, save_all=True, append_images=images[1:], duration=durations, loop=0)
    return target


class SampleQuality:
    """Scores each fixed-seed sample grid against the dataset (``studio.quality``, lower is better).

    The reference (the dataset's patch statistics plus the noise and data levels) is
    built on the first grid and kept for the run: about a second once, then a few tens
    of milliseconds per grid. Its seed is fixed (not the run's seed), so figures of
    different runs on the same data, resolution and sample count compare directly. A
    failure never ends the run: it is reported once as a warning and scoring stops.
    """

    def __init__(self, pixels: torch.Tensor, sample_count: int) -> None:
        self.pixels, self.sample_count = pixels, sample_count
        self.reference: Any = None
        self.failed = False

    def __call__(self, images: np.ndarray, step: int, report: Any) -> float | None:
        """Score ``images`` (uint8 [N, R, R, 3]) and report a ``quality`` event; None when unavailable."""
        if self.failed:
            return None
        try:
            from studio.quality import QualityReference

            if self.reference is None:
                self.reference = QualityReference.build(self.pixels, sample_count=self.sample_count)
                self.pixels = None  # the reference keeps what it needs
            value = self.reference.score(images)
        except Exception as exc:  # noqa: BLE001 - a figure must never end a training run
            log.exception("sample quality failed")
            self.failed = True
            report("warning", step, message=f"The sample-quality figure is unavailable for this run: {exc}")
            return None
        ref = self.reference
        data = "n/a" if ref.data_level is None else f"{ref.data_level:.1f}"
        report("quality", step, quality=value, noise_level=ref.noise_level, data_level=ref.data_level,
               message=f"sample quality {value:.1f} at step {step} (noise {ref.noise_level:.1f}, data {data}; "
                       "lower is better)")
        return value


# ----------------------------------------------------------------------------- events and logs/
class Reporter:
    """Sends events to the sink and ``events.jsonl`` (main process only) and TensorBoard."""

    def __init__(self, sink: EventSink, run: RunDir | None, total: int) -> None:
        self.sink, self.run, self.total, self.writer = sink, run, total, None

    def open_tensorboard(self) -> None:
        if self.run is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run.logs_dir))

    def __call__(self, kind: str, step: int = 0, **fields: Any) -> None:
        if self.run is None:
            return
        event = Event(kind, step=step, total=self.total, **fields)
        self.run.append_event(event)
        if self.writer is not None and kind == "step":
            self.writer.add_scalar("train/loss", event.loss, step)
            self.writer.add_scalar("train/smoothed_loss", event.smoothed_loss, step)
            self.writer.add_scalar("train/lr", event.lr, step)
        elif self.writer is not None and kind == "quality":
            for tag in ("quality", "noise_level", "data_level"):  # lower is better; the levels are flat lines
                if getattr(event, tag) is not None:
                    self.writer.add_scalar(f"quality/{tag}", getattr(event, tag), step)
        self.sink(event)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def params_sha(model: torch.nn.Module) -> str:
    """SHA-256 of all of ``model``'s weights, in parameter order."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_ranks_report(run: RunDir, rank: int, world: int, unet, first_indices: list[int], accelerator,
                       is_main: bool) -> None:
    """``logs/processes.json``: per process, its rank, a checksum of its final weights and the
    images of its first batch (shows data-parallel runs stayed in sync on different shards)."""
    entry = {"rank": rank, "world_size": world, "weights_sha256": params_sha(unet),
             "device": str(accelerator.device), "first_batch": first_indices}
    entries = [entry]
    if world > 1:
        from accelerate.utils import gather_object

        entries = gather_object(entries)
    if is_main:
        (run.logs_dir / "processes.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")


def save_grid(images: list[Any], resolution: int, path: Path) -> Path:
    """Paste square ``resolution`` images side by side on white and save them to ``path``."""
    from PIL import Image

    grid = Image.new("RGB", (resolution * len(images), resolution), "white")
    for i, image in enumerate(images):
        grid.paste(image, (i * resolution, 0))
    from studio.atomic import save_image

    return save_image(grid, path)  # atomic: a kill mid-write never leaves a truncated PNG
