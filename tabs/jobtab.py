"""Helpers shared by the two training tabs (Train, Fine-tune): starting, stopping and
resuming a job, and the small formatting both tabs show. No layout lives here."""

from __future__ import annotations

import logging
import math
import shutil
from typing import Any, Callable

import gradio as gr

from studio.checkpoints import find_latest_valid
from studio.context import StudioContext
from studio.errors import JobError, StudioError, describe_exception
from studio.jobs import Snapshot
from studio.runs import RunDir, list_runs

log = logging.getLogger(__name__)


def start_job(ctx: StudioContext, task: str, run: RunDir, target: Callable, resuming: bool) -> None:
    """Start ``target(events, stop)`` as the job of ``run``; a refused start leaves no empty run folder.

    Raises:
        JobError: when a job already runs on the device (naming it).
    """
    try:
        ctx.jobs.start(run.name, task, run.root, target, device=ctx.settings.device)
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
    for info in list_runs(ctx.workspace):
        if info.task != task:
            continue
        run = RunDir(info.path)
        if find_latest_valid(run.checkpoints_dir) is None:
            continue
        data = run.read_config()
        data.pop("task", None)
        return run, data
    return None


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
