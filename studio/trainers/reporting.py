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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.errors import JobError, Stopped, describe_exception
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



def rows_grid(images: np.ndarray, columns: int):
    """uint8 ``[N, R, R, 3]`` in rows of ``columns`` (e.g. one row per prompt), enlarged for viewing (``make_grid``)."""
    rows = [np.concatenate(list(images[i:i + columns]), axis=1) for i in range(0, len(images), columns)]
    return make_grid(np.concatenate(rows, axis=0)[None])


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
class DecodeProgress:
    """``progress(fraction, message)`` for the image cache: a status event every 10 %."""

    def __init__(self, report: Any) -> None:
        self.report, self.shown = report, -1.0

    def __call__(self, fraction: float, message: str) -> None:
        if fraction >= 1.0 or fraction - self.shown >= 0.1:
            self.shown = fraction
            self.report("status", message=message)


class NonFiniteLossError(JobError):
    """The loss (or the weights) became NaN or infinite; the run stopped before saving bad weights."""


class Reporter:
    """Sends events to the sink, ``events.jsonl`` and TensorBoard (main process only).

    Args:
        sink: Receives every event (the job, the CLI).
        run: The run folder; None on the other processes of a data-parallel run (they report nothing).
        total: The run's optimizer steps (every event carries it; may be set later).
    """

    def __init__(self, sink: EventSink, run: RunDir | None, total: int) -> None:
        self.sink, self.run, self.total, self.writer = sink, run, total, None

    def open_tensorboard(self) -> None:
        """Log ``step`` and ``quality`` events to TensorBoard in ``logs/`` from now on (if installed)."""
        if self.run is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
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

    def warnings(self, texts: Any) -> None:
        """Report each of ``texts`` as a ``warning`` event (e.g. the run folder's, the run length's)."""
        for text in texts:
            self("warning", message=text)

    def samples(self, step: int, grid: Any, message: str) -> Path | None:
        """Write ``grid`` (a PIL image) atomically to ``samples/step-N.png``, show it in TensorBoard and
        report a ``samples`` event; returns the path (None on the other processes)."""
        if self.run is None:
            return None
        from studio.atomic import save_image

        path = save_image(grid, self.run.sample_path(step))  # atomic: a kill mid-write leaves no truncated PNG
        if self.writer is not None:
            self.writer.add_image("samples", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        self("samples", step, path=str(path), message=message)
        return path

    def stopped_early(self, exc: Stopped, resume_from: Path | None) -> None:
        """Report Stop pressed in a phase before the loop (data, model, caches): nothing trained, and
        the checkpoint resumed from (if any) is unchanged."""
        self("stopped", message=exc.message + (f" {resume_from.name} is unchanged: resume to go on."
                                               if resume_from else " Nothing was trained."))

    def failed(self, exc: BaseException, shown: BaseException | None = None) -> None:
        """Report ``exc`` as the run's ``failed`` event (one line; of ``shown`` when the error is
        translated) and its traceback in ``logs/error.txt``."""
        self("failed", message=describe_exception(shown or exc))
        if self.run is None:
            return
        try:
            import traceback

            self.run.logs_dir.mkdir(parents=True, exist_ok=True)
            (self.run.logs_dir / "error.txt").write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
        except OSError:
            pass

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class LossMeter:
    """The loss curve: pending per-step losses read back in one host sync, checked, smoothed, reported.

    ``add`` keeps a step's loss tensor on the device; ``flush`` reads all pending ones at once
    (averaged over the ``accelerator``'s processes), raises ``NonFiniteLossError`` on a NaN/inf, and
    reports a ``step`` event each with the smoothed loss (a debiased moving average), images
    per second and the time left. ``state``/``load_state`` carry the smoothing across a resume.
    """

    def __init__(self, report: Reporter, total: int, images_per_step: int, smoothing: float,
                 accelerator: Any = None) -> None:
        self.report, self.total, self.images_per_step, self.smoothing = report, total, images_per_step, smoothing
        self.accelerator = accelerator  # losses are averaged over its processes
        self.smoothed = self.debias = 0.0
        self.pending: list[tuple[int, float, torch.Tensor]] = []
        self.sec_per_step: float | None = None
        self.last_checkpoint: Path | None = None  # named in the non-finite message
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start timing afresh (after sampling or validation, which are not training time)."""
        self.window_start, self.window_steps = time.perf_counter(), 0

    def add(self, step: int, lr: float, loss: torch.Tensor) -> None:
        self.pending.append((step, lr, loss.detach()))
        self.window_steps += 1

    def flush(self) -> None:
        """Step events for every pending loss; a non-finite one ends the run here."""
        if not self.pending:
            return
        losses = torch.stack([loss for _, _, loss in self.pending])
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            losses = self.accelerator.reduce(losses, "mean")
        values = losses.tolist()
        now = time.perf_counter()
        elapsed = now - self.window_start
        rate = self.window_steps * self.images_per_step / elapsed if elapsed > 0 else None
        if self.window_steps and elapsed > 0:
            sec = elapsed / self.window_steps
            self.sec_per_step = sec if self.sec_per_step is None else 0.8 * self.sec_per_step + 0.2 * sec
        pending, self.pending = self.pending, []
        for (step, lr, _), value in zip(pending, values):
            if not math.isfinite(value):
                saved = f" (last good checkpoint: {self.last_checkpoint.name})." if self.last_checkpoint else "."
                raise NonFiniteLossError(
                    f"The loss became {value} at step {step}; training stopped and nothing from this step on "
                    "was saved" + saved,
                    "Lower the learning rate, keep gradient clipping on, or use fp32 (mixed_precision 'no').")
            self.smoothed = self.smoothing * self.smoothed + (1 - self.smoothing) * value
            self.debias = self.smoothing * self.debias + (1 - self.smoothing)
            eta = (self.total - step) * self.sec_per_step if self.sec_per_step is not None else None
            self.report("step", step, loss=value, smoothed_loss=self.smoothed / self.debias, lr=lr,
                        images_per_s=rate, eta_s=eta)
        self.restart_clock()

    def flush_if_due(self, step: int, now: bool = False) -> None:
        """``flush`` when a host sync is due: every step on a CPU (free there), every 10th on a GPU, at the
        last step, and ``now`` (before a checkpoint, a grid or a stop, which need the figures)."""
        on_cpu = self.accelerator is None or self.accelerator.device.type == "cpu"
        if step % (1 if on_cpu else 10) == 0 or step == self.total or now:
            self.flush()

    def state(self) -> list[float]:
        return [self.smoothed, self.debias]

    def load_state(self, state: Any) -> None:
        self.smoothed, self.debias = (float(v) for v in (state or [0.0, 0.0]))


def weights_sha256(tensors: Any) -> str:
    """SHA-256 of ``tensors`` (e.g. a model's parameters), in order."""
    digest = hashlib.sha256()
    for p in tensors:
        p = p.detach().cpu()
        digest.update((p.float() if p.dtype == torch.bfloat16 else p).contiguous().numpy().tobytes())
    return digest.hexdigest()


def params_sha(model: torch.nn.Module) -> str:
    """SHA-256 of all of ``model``'s weights, in parameter order."""
    return weights_sha256(model.parameters())


def write_ranks_report(run: RunDir, accelerator: Any, weights_sha: str, first_batch: list[int]) -> None:
    """``logs/processes.json``: per process, its rank, a checksum of its final weights and the
    images of its first batch (shows data-parallel runs stayed in sync on different shards).
    Every process calls it (the entries are gathered)."""
    entries = [{"rank": accelerator.process_index, "world_size": accelerator.num_processes,
                "weights_sha256": weights_sha, "device": str(accelerator.device), "first_batch": first_batch}]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        entries = gather_object(entries)
    if accelerator.is_main_process:
        (run.logs_dir / "processes.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")


def image_row(images: list[Any], resolution: int):
    """Square ``resolution`` PIL images side by side on white, one PIL image (a validation grid)."""
    from PIL import Image

    grid = Image.new("RGB", (resolution * len(images), resolution), "white")
    for i, image in enumerate(images):
        grid.paste(image, (i * resolution, 0))
    return grid
