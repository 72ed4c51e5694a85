"""Helpers shared by the two training tabs (Train, Fine-tune): the settings widgets (one per
config field, laid out in sections, read back into a config), starting, stopping and
resuming a job, the run on screen (live job or history restored from its folder), the CLI
command and JSON of a run, and the small formatting both tabs show. Each tab keeps its own
layout of everything else."""

from __future__ import annotations

import importlib
import logging
import math
import shlex
import shutil
import typing
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from studio.context import StudioContext
from studio.errors import ConfigError, JobError, StudioError, describe_exception
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


class TrainerCall:
    """A job's ``target(events, stop)``: ``<module>.train(cfg, events, stop, run)``, the trainer module
    (which imports torch) imported only when the job runs."""

    def __init__(self, module: str, cfg: Any, run: RunDir) -> None:
        self.module, self.cfg, self.run = module, cfg, run

    def __call__(self, events: Any, stop: Any) -> Any:
        return importlib.import_module(self.module).train(self.cfg, events, stop, self.run)


def start_run(ctx: StudioContext, task: str, cfg: Any, run: RunDir, module: str) -> str:
    """Start (or, with ``cfg.resume``, resume) ``run`` as the job of ``task`` trained by ``module``;
    returns the verb to show ("Started" / "Resuming"). Raises as ``start_job``."""
    start_job(ctx, task, run, TrainerCall(module, cfg, run), resuming=bool(cfg.resume))
    return "Resuming" if cfg.resume else "Started"


def resume_config(ctx: StudioContext, config_cls: Any, run: RunDir, data: dict[str, Any]) -> Any:
    """The config that resumes ``run`` (its saved settings ``data``) here, from its latest checkpoint."""
    return config_cls.from_dict(data).replace(resume="latest", workspace=str(ctx.workspace), run_name=run.name,
                                              device=ctx.settings.device)


def cli_resume_command(task: str, run: RunDir | str) -> str:
    """``python -m studio <task> --config <run>/config.json --resume latest``: continues that run headless."""
    root = run.root if isinstance(run, RunDir) else Path(run)
    return f"python -m studio {task} --config {shlex.quote(str(root / 'config.json'))} --resume latest"


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
    """Ask the running job of ``task`` to stop (after its step, or its image, batch or denoising step); the text."""
    job = ctx.jobs.latest(task)
    if job is None or not job.running:
        return f"No {noun} is running."
    job.stop()
    s = job.snapshot()
    if s.step or s.phase == "training":
        return f"Stopping {s.name} after the current step (a checkpoint will be saved)…"
    return f"Stopping {s.name} before its first step ({s.phase})…"


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


# ----------------------------------------------------------------------------- settings widgets
#: Widget kinds whose value is a stripped string (a model reference is one too).
TEXT_KINDS = ("text", "pretrained", "model")


def widget_value(kind: str, value: Any) -> Any:
    """A config value as its widget shows it (a comma list or one line per item for tuples)."""
    if kind == "csv" and isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if kind == "lines" and isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value)
    return value


def is_int_hint(hint: Any) -> bool:
    """Whether a field's type hint is ``int`` or ``int | None``."""
    return hint is int or (int in typing.get_args(hint) and float not in typing.get_args(hint))


def parse_values(values: dict[str, Any], fields: Any, hints: dict[str, Any], what: str,
                 parse_csv: Callable[[Any, str], tuple]) -> dict[str, Any]:
    """Named widget values -> config field values: numbers checked (whole numbers for the int fields
    of ``hints``, the config's type hints), text stripped, one-per-line and comma lists
    (``parse_csv(value, label)``) split.

    Raises:
        ConfigError: naming the widget's label (or the unknown setting, ``what`` being "training"...).
    """
    kinds = {name: kind for name, kind, _ in fields}
    data: dict[str, Any] = {}
    for name, value in values.items():
        if name not in kinds:
            raise ConfigError(f"Unknown {what} setting {name!r}.")
        kind, label = kinds[name], field_label(fields, name)
        if kind == "csv":
            value = parse_csv(value, label)
        elif kind == "lines":
            value = tuple(line.strip() for line in str(value or "").splitlines() if line.strip())
        elif kind in ("int", "float"):
            if value is None or value == "":
                raise ConfigError(f"{label} needs a number.")
            number = float(value)
            if is_int_hint(hints.get(name)):
                if not math.isfinite(number) or number != int(number):
                    raise ConfigError(f"{label} must be a whole number (got {value}).")
                value = int(number)
            else:
                value = number
        elif kind == "bool":
            value = bool(value)
        elif kind in TEXT_KINDS:
            value = str(value or "").strip()
        data[name] = value
    return data


def settings_widget(name: str, kind: str, extra: dict[str, Any], value: Any, config_cls: Any, prefix: str,
                    info: str | None = None) -> gr.components.Component:
    """The widget of config field ``name``: its help as info, ``<prefix>-<name>`` as elem_id."""
    kwargs = dict(extra, info=config_cls.help_for(name) if info is None else info,
                  elem_id=f"{prefix}-{name.replace('_', '-')}", value=value)
    if kind == "pretrained":
        return gr.Dropdown(allow_custom_value=True, **kwargs)
    if kind == "model":  # the list offers what is here; any other reference can be typed
        return gr.Dropdown(**dict(kwargs, value=value or None), allow_custom_value=True, filterable=True)
    if kind == "choice":
        return gr.Dropdown(**kwargs)
    if kind == "bool":
        return gr.Checkbox(**kwargs)
    if kind == "int":
        return gr.Number(precision=0, **kwargs)
    if kind == "float":
        return gr.Number(**kwargs)
    return gr.Textbox(**kwargs)  # text, csv, lines


def lay_out_fields(sections: Any, fields: Any, make: Callable[[str, str, dict[str, Any]], Any],
                   containers: dict[str, Any] | None = None, hidden: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings column: per section an accordion (or a plain group for the untitled one), in it
    ``make(name, kind, extra)`` for each field; returns the widgets by field name. The accordions go
    into ``containers`` by title when given (to show or hide a section); those titled in ``hidden``
    start hidden."""
    widgets: dict[str, Any] = {}
    for title, open_, names in sections:
        block = gr.Accordion(title, open=open_, visible=title not in hidden) if title else gr.Group()
        if containers is not None and title:
            containers[title] = block
        with block:
            for name in names:
                kind, extra = next((k, e) for n, k, e in fields if n == name)
                widgets[name] = make(name, kind, extra)
    return widgets


def settings_json(build: Callable[..., Any], values: dict[str, Any], ctx: StudioContext) -> str:
    """The settings as the JSON file the CLI reads (or the validation error, as a comment)."""
    try:
        return build(values, ctx).to_json()
    except StudioError as exc:
        return f"// {exc.user_message}"


def same_value(a: Any, b: Any) -> bool:
    """Two widget values equal as a person reads them: numbers by value (a Number box may hold 0.001 as
    1e-3, 16 as 16.0, or a number as text through the API), anything else by ``==``."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


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
