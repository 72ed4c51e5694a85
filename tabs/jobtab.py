"""Helpers shared by the two training tabs (Train, Fine-tune): starting, stopping and
resuming a job, the run on screen (live job or history restored from its folder), and
the small formatting both tabs show. No layout lives here."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from studio.context import StudioContext
from studio.errors import JobError, StudioError, describe_exception
from studio.jobs import Snapshot, history_snapshot
from studio.runs import RunDir, check_run_name, discard_if_never_trained, resumable_runs, run_status

log = logging.getLogger(__name__)


def start_job(ctx: StudioContext, task: str, run: RunDir, target: Callable, resuming: bool) -> None:
    """Start ``target(events, stop)`` as the job of ``run``.

    A resumed run's job starts from the run's whole history (every loss point and grid
    in its folder). A new run whose start is refused, fails or is stopped before its
    first training step (bad data, a missing base model, Stop while the data loads...)
    leaves no run folder behind: nothing is then offered to resume or to open in Generate.

    Waits for the engine first (the trainers import torch and diffusers).

    Raises:
        JobError: when a job already runs on the device (naming it).
        ModelError: when the engine failed to load.
    """
    ctx.engine.wait()

    def guarded(events, stop):
        try:
            result = target(events, stop)
        except BaseException:
            if not resuming and discard_if_never_trained(run):
                log.info("removed %s: its start failed before training", run.root)
            raise
        if stop.is_set() and not resuming and discard_if_never_trained(run):
            log.info("removed %s: stopped before training", run.root)
        return result

    history = history_snapshot(run.root) if resuming else None
    try:
        ctx.jobs.start(run.name, task, run.root, guarded, device=ctx.settings.device, history=history)
    except JobError:
        if not resuming:
            remove_if_unused(run)
        raise


def remove_if_unused(run: RunDir) -> None:
    """Delete a run folder that holds nothing but its config.json and empty folders."""
    if all(p.name == "config.json" or (p.is_dir() and not any(p.iterdir())) for p in run.root.iterdir()):
        shutil.rmtree(run.root, ignore_errors=True)


def latest_resumable(ctx: StudioContext, task: str) -> tuple[RunDir, dict[str, Any]] | None:
    """The newest run of ``task`` with an intact checkpoint, and its config (without "task")."""
    runs = resumable_runs(ctx.workspace, task)
    return resumable_run(ctx, task, runs[0].name) if runs else None


def resumable_run(ctx: StudioContext, task: str, name: str) -> tuple[RunDir, dict[str, Any]] | None:
    """The run ``name`` of ``task`` and its config (without "task") if it has a checkpoint, else None."""
    for info in resumable_runs(ctx.workspace, task):
        if info.name == name:
            run = RunDir(info.path)
            data = run.read_config()
            data.pop("task", None)
            return run, data
    return None


def run_choices(ctx: StudioContext, task: str) -> list[tuple[str, str]]:
    """The run picker's (label, run name) pairs: the current job's run, then every resumable run, newest first."""
    names: list[str] = []
    job = ctx.jobs.latest(task)
    if job is not None and Path(job.snapshot().run_dir).is_dir():
        names.append(job.name)
    names += [info.name for info in resumable_runs(ctx.workspace, task) if info.name not in names]
    choices = []
    for name in names:
        if job is not None and job.running and name == job.name:
            choices.append((f"{name} · running", name))
            continue
        st = run_status(ctx.workspace / name)
        where = f" at step {st.step}" + (f"/{st.total}" if st.total else "") if st.trained else ""
        choices.append((f"{name} · {st.state or 'new'}{where}", name))
    return choices


def shown_run(ctx: StudioContext, task: str, current: str | None = None) -> str | None:
    """The run a page shows: ``current`` while it still exists, else the latest job's, else the newest resumable."""
    names = [name for _, name in run_choices(ctx, task)]
    if current and current in names:
        return current
    return names[0] if names else None


def run_snapshot(ctx: StudioContext, task: str, name: str | None) -> Snapshot | None:
    """What to draw for run ``name``: the live job's snapshot when it is that run, else its history from disk.

    With no name, the latest job's snapshot (or None before any job).
    """
    job = ctx.jobs.latest(task)
    if job is not None and (not name or job.name == name):
        return job.snapshot()
    if not name:
        return None
    try:
        root = ctx.workspace / check_run_name(name)
    except StudioError:
        return None
    return history_snapshot(root) if (root / "config.json").is_file() else None


def run_key(ctx: StudioContext, task: str, name: str | None) -> tuple:
    """Changes whenever what ``run_snapshot`` would draw changes (a poller redraws only then)."""
    job = ctx.jobs.latest(task)
    if job is not None and (not name or job.name == name):
        return ("job", job.id, job.version, job.running)
    events = ctx.workspace / (name or "") / "events.jsonl"
    try:
        stat = events.stat()
        return ("disk", name, stat.st_size, stat.st_mtime_ns)
    except OSError:
        return ("disk", name, -1, -1)


def stop_job(ctx: StudioContext, task: str, noun: str) -> str:
    """Ask the running job of ``task`` to stop after its current step; the text to show."""
    job = ctx.jobs.latest(task)
    if job is None or not job.running:
        return f"No {noun} is running."
    job.stop()
    return f"Stopping {job.snapshot().name} after the current step (a checkpoint will be saved)…"


def format_duration(seconds: float) -> str:
    """'42s', '3m 05s', '2h 07m'."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def field_label(fields: Any, name: str) -> str:
    """The UI label of config field ``name`` in a tab's FIELDS table (the name when it has none)."""
    for field_name, _, extra in fields:
        if field_name == name:
            return extra.get("label", name)
    return name


def failure(exc: BaseException, action: str) -> str:
    """Show ``exc`` as a warning toast and return the status text; bugs go to the log, not the page."""
    message = describe_exception(exc)
    if not isinstance(exc, StudioError):
        log.exception("%s action failed", action)
    gr.Warning(message)
    return f"Not started: {message}"


def latest_snapshot(ctx: StudioContext, task: str) -> Snapshot | None:
    """The snapshot of the latest job of ``task`` (what a reloaded page re-attaches to), or None."""
    job = ctx.jobs.latest(task)
    return job.snapshot() if job is not None else None


def poll_key(ctx: StudioContext, task: str) -> tuple[int, int]:
    """(job id, version) of the latest job of ``task``: a poller redraws only when it changes."""
    job = ctx.jobs.latest(task)
    return (job.id, job.version) if job is not None else (-1, -1)


def loss_frame(losses: list[tuple[int, float, str]], log_scale: bool = False):
    """A pandas DataFrame (step, loss, curve) for the loss plot, or None while there are no points.

    With ``log_scale`` the values are ``log10(loss)``. Column and curve names never
    change, and an empty plot is None rather than an empty frame: Gradio's plot keeps
    the field types and colour legend of what it first drew, so a typeless empty frame
    or renamed series would leave it broken.
    """
    import pandas as pd

    if log_scale:
        losses = [(step, math.log10(value), curve) for step, value, curve in losses if value > 0]
    if not losses:
        return None
    return pd.DataFrame(losses, columns=["step", "loss", "curve"])
