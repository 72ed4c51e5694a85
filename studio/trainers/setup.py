"""Setting a training run up: the accelerator, the run folder, the resume point, the seeds.

A trainer calls, in order::

    accelerator = fresh_accelerator(mixed_precision, device)      # one per run
    folder = open_run(cfg, TASK, accelerator, run)                # run folder, lock, resume point
    try: ... finally: folder.release()
    run_cfg = write_run_config(folder.run, TASK, cfg, accelerator) # config.json names the run
    seed_everything(cfg.seed)

``import_diffusers`` imports diffusers' training classes safely from a worker thread.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

from studio.checkpoints import resolve_resume
from studio.config.text_to_image import UNCONDITIONAL
from studio.errors import CheckpointError, Stopped
from studio.runs import RunDir, resumable_runs

#: What "the newest run" of each task is called in messages.
TASK_NOUNS = {"train": "training run", "finetune": "fine-tune run"}


# ----------------------------------------------------------------------------- process set-up
def import_diffusers() -> tuple[Any, Any, Any, Any]:
    """diffusers' training classes, also those used later (sampling, export), imported now.

    The app imports diffusers from several threads (this job, the Generate tab...). When
    two threads import interdependent submodules at once, Python breaks the lock cycle by
    handing one of them a partly initialised module, and ``from diffusers import X`` fails
    with ImportError; a moment later the other thread has finished, so we try again.
    """
    for attempt in range(40):
        try:
            from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: F401
            from diffusers.optimization import get_scheduler
            from diffusers.training_utils import EMAModel
            return DDPMScheduler, UNet2DModel, get_scheduler, EMAModel
        except ImportError:
            if attempt == 39:
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


def training_device(device: str) -> str:
    """The device name a run trains on: ``studio.devices.resolve_device(device)`` in one process; under
    several (torchrun, accelerate launch) 'cpu' when asked, else 'auto' (each process takes its own)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "cpu" if device == "cpu" else "auto"
    from studio.devices import resolve_device

    return resolve_device(device)


def fresh_accelerator(mixed_precision: str, device: str):
    """An Accelerator for this run (``device`` 'cpu' forces the CPU); in a single process the
    global accelerate state is reset first, so runs with different settings can follow each
    other in one app."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=device == "cpu")


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def stop_requested(stop: Any, accelerator: Any) -> bool:
    """Whether to stop now: ``stop`` is set (on any process; all of them agree to stop at the same step)."""
    should_stop = stop.is_set()
    if accelerator.num_processes > 1:
        import torch

        flag = accelerator.reduce(torch.tensor([float(should_stop)], device=accelerator.device), "sum")
        should_stop = bool(flag.item() > 0)
    return should_stop


def phase_stop(stop: Any, accelerator: Any) -> Any:
    """The stop flag the phases before the loop may act on alone (``studio.stopping``), or None.

    One process: the job's own flag, so Stop ends data loading, caching, class images or
    model loading at once. Several processes must stop at the same point or the others
    wait forever at their next collective call, and only the loop agrees on that
    (``stop_requested``): there the phases run to their end.
    """
    return stop if accelerator.num_processes == 1 else None


# ----------------------------------------------------------------------------- the run folder
@dataclasses.dataclass
class RunFolder:
    """The run folder a trainer writes, where it resumes from, and what to warn about.

    ``lock`` is the folder's process lock (held by the main process only); call ``release``
    when the run ends.
    """

    run: RunDir
    resume_from: Path | None
    warnings: list[str]
    lock: Any = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def find_resume_run(cfg: Any, task: str) -> RunDir:
    """The run folder a ``resume`` request refers to.

    A checkpoint path names its run (``<run>/checkpoints/step-N``); "latest" uses the
    run named ``run_name``, or the newest run of ``task`` in the workspace that has a checkpoint.

    Raises:
        CheckpointError: when there is no such run.
    """
    resume = (cfg.resume or "").strip()
    if resume != "latest":
        path = Path(resume).expanduser()
        if not path.exists():
            raise CheckpointError(f"Checkpoint not found: {path}.", "Check the path, or use 'latest'.")
        return RunDir(path.resolve().parent.parent)
    if cfg.run_name:
        root = Path(cfg.workspace).expanduser() / cfg.run_name
        if not root.is_dir():
            raise CheckpointError(f"No run named {cfg.run_name!r} in {cfg.workspace} to resume.",
                                  "Check the run name, or leave it empty to resume the newest run.")
        return RunDir(root)
    runs = resumable_runs(cfg.workspace, task)  # never a run whose start failed (no checkpoint)
    if not runs:
        raise CheckpointError(f"No {TASK_NOUNS.get(task, task + ' run')} with a checkpoint in {cfg.workspace} "
                              "to resume.", "Start a new run first.")
    return RunDir(runs[0].path)


def newest_run_of_mode(cfg: Any, task: str, mode: str) -> RunDir | None:
    """For ``resume: latest`` without a run name: the newest run of ``task`` with a checkpoint whose
    config.json says ``mode`` (e.g. a text-to-image run, never a DDPM run of the same task; a config
    without a mode is an unconditional DDPM run); None when the run is named, a checkpoint is given,
    or nothing is resumed.

    Raises:
        CheckpointError: when no run of that mode has a checkpoint.
    """
    if cfg.resume != "latest" or cfg.run_name:
        return None
    for info in resumable_runs(cfg.workspace, task):
        if (RunDir(info.path).read_config().get("mode") or UNCONDITIONAL) == mode:
            return RunDir(info.path)
    raise CheckpointError(f"No {mode} training run with a checkpoint in {cfg.workspace} to resume.", "Start a new run first.")


def open_run(cfg: Any, task: str, accelerator: Any, run: RunDir | None = None) -> RunFolder:
    """The run folder to train in, locked, and the checkpoint to resume from (None: a fresh start).

    The main process picks the folder: ``run`` when given (the UI makes it first), the run
    being resumed, or a new ``<workspace>/<run_name or task-time>``; it takes the folder's lock
    (one trainer per run folder, across processes) and resolves ``cfg.resume``. The other
    processes learn both from it.

    Raises:
        CheckpointError: no run or checkpoint to resume. ConfigError: a new run's name is taken.
        JobError: another process trains in that folder.
    """
    warnings: list[str] = []
    resume_from: Path | None = None
    lock = None
    if accelerator.is_main_process:
        if run is None:
            run = find_resume_run(cfg, task) if (cfg.resume or "").strip() else \
                RunDir.create(cfg.workspace, task, cfg.run_name)
        for sub in (run.samples_dir, run.checkpoints_dir, run.logs_dir):
            sub.mkdir(parents=True, exist_ok=True)
        lock = run.lock(f"{task} '{run.name}'").acquire()
        try:
            resume_from = resolve_resume(cfg.resume, run.checkpoints_dir, warn=warnings.append)
        except BaseException:
            lock.release()
            raise
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = [str(run.root) if run else None, str(resume_from) if resume_from else None]
        broadcast_object_list(shared)
        run = RunDir(shared[0])
        resume_from = Path(shared[1]) if shared[1] else None
    return RunFolder(run, resume_from, warnings, lock)


def write_run_config(run: RunDir, task: str, cfg: Any, accelerator: Any) -> Any:
    """Write ``config.json`` (main process) naming this run, so ``--resume latest`` with it continues
    here; returns that config (``workspace``/``run_name`` of this run, no ``resume``)."""
    run_cfg = dataclasses.replace(cfg, workspace=str(run.root.parent), run_name=run.name, resume="")
    if accelerator.is_main_process:
        run.write_config(task, run_cfg.to_dict())
    return run_cfg


def run_reported(folder: RunFolder, report: Any, body: Callable[[], Any],
                 translate: Callable[[BaseException], BaseException] | None = None) -> RunDir:
    """Run a trainer's ``body`` in its run folder and report how it ended; returns ``folder.run``.

    Stop pressed in a phase before the loop (``Stopped``) is reported with ``report.stopped_early``
    (nothing trained, the checkpoint resumed from unchanged); any other exception as ``failed``
    (``translate`` may turn it into the error shown and raised, e.g. an out-of-memory line) and
    raised again. The reporter is closed and the folder's lock released in every case.
    """
    try:
        body()
    except Stopped as exc:
        report.stopped_early(exc, folder.resume_from)
    except BaseException as exc:
        shown = translate(exc) if translate is not None else exc
        report.failed(exc, shown=shown)
        if shown is exc:
            raise
        raise shown from exc
    finally:
        report.close()
        folder.release()
    return folder.run
