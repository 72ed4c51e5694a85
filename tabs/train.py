"""The Train tab: train a model from scratch and watch it learn — mode "unconditional" (a DDPM,
``studio.trainers.ddpm``) or "text-to-image" (a small Stable Diffusion on the captions,
``studio.trainers.text_to_image_scratch``). The Mode dropdown shows only the settings its mode reads
(``mode_changes``: the other mode's widgets hide, shared ones take this mode's label, help and
default unless the person typed a value).

Layout and event wiring live in ``build_train_tab``; the settings column's widgets, mode switch,
config building and model summary in ``tabs.train_settings`` (re-exported here); the work is done by plain
functions (``build_config``, ``model_summary``, ``start_training``, ``resume_run``,
``stop_training``, ``render``, ``loss_frame``, ``quality_frame``, ``cli_command``) that take and return
plain values, so tests call them without Gradio running. Training runs in a job of
``ctx.jobs`` (``studio.trainers.ddpm.train``); a ``gr.Timer`` polls the job's
snapshot once a second and re-renders only when its version changed, so a reload
re-attaches to the running (or last) job and a slow browser never slows training.

The tab shows one run at a time, picked in "Run on screen" (the running job's run, then
every resumable run, newest first). Its whole history comes from the run folder
(``studio.jobs.history_snapshot`` replays ``events.jsonl``; a resumed job starts from
it), so a reload, a restart of the app or a resume never loses earlier loss points or
grids. Resume continues the run on screen, to its own step target unless the person
changes "Resume until step".

Presets, block types and LR schedules come from ``studio.unet_presets`` and
``studio.config.train``: the same tables the CLI and the tests read. Nothing here
imports torch at import time (the parameter count builds the UNet on torch's meta
device inside a handler, once the engine has loaded).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from studio.config.text_to_image import MODE as TEXT_TO_IMAGE
from studio.config.text_to_image import TRAIN_MODES, TextToImageConfig
from studio.config.train import TrainConfig
from studio.context import StudioContext
from studio.errors import CheckpointError, ConfigError, StudioError, describe_exception
from studio.jobs import Snapshot
from studio.runs import RunDir, check_run_name
from tabs import GPU
from tabs.engine_gate import LOADING_LABEL, engine_button
from tabs.jobtab import (cli_resume_command, failure, format_duration, latest_resumable, lay_out_fields, loss_frame,
                         resumable_run, resume_config, run_choices, run_key, run_snapshot, settings_json,
                         settings_widget, shown_run, start_run, stop_job)
from studio.pretrained import init_from_choices

log = logging.getLogger(__name__)

TASK = "train"
# The settings column (fields, mode switch, config building, summary) lives in tabs/train_settings.py;
# its names are re-exported here, where callers and tests look for the tab's functions.
from tabs.train_settings import (ARCHITECTURE, ARCHITECTURE_SECTION, ATTENTION_HELP, FIELDS,  # noqa: E402
                                 INPUT_NAMES, MODE_LABELS, PRESET_FILLED, SECTIONS, SHARED_FIELDS, TEXT_TO_IMAGE_FIELDS,
                                 TEXT_TO_IMAGE_LABELS, TEXT_TO_IMAGE_SECTION, UNCONDITIONAL_FIELDS,
                                 architecture_preset, build_config, default_values, mode_changes, mode_defaults,
                                 model_summary, preset_values, text_to_image_config)


# --------------------------------------------------------------------------- actions
def start_training(ctx: StudioContext, values: dict[str, Any]) -> tuple[str, str, str]:
    """Validate the settings, create the run folder and start the training job.

    Returns:
        (status line, run folder, CLI command).

    Raises:
        StudioError: bad settings, a taken run name, or a job already running on the device.
    """
    cfg = build_config(values, ctx)
    from studio.budget import text_to_image_plan, train_plan

    # refuse what cannot fit before making a run folder or allocating
    (text_to_image_plan if isinstance(cfg, TextToImageConfig) else train_plan)(cfg).check()
    if cfg.mixed_precision == "fp16":  # 'auto' may be a CPU: refuse before making a run folder
        from studio.config.train import check_precision_for_device
        from studio.devices import resolve_device

        check_precision_for_device(cfg.mixed_precision, resolve_device(cfg.device))
    run = RunDir.create(cfg.workspace, TASK, cfg.run_name)
    cfg = cfg.replace(run_name=run.name)
    run.write_config(TASK, cfg.to_dict())
    return _start(ctx, cfg, run)


def _start(ctx: StudioContext, cfg: TrainConfig | TextToImageConfig, run: RunDir) -> tuple[str, str, str]:
    trainer = "studio.trainers.text_to_image_scratch" if isinstance(cfg, TextToImageConfig) else "studio.trainers.ddpm"
    verb = start_run(ctx, TASK, cfg, run, trainer)
    model = "text-to-image" if isinstance(cfg, TextToImageConfig) else cfg.preset
    return (f"{verb} {run.name}: {model}, {cfg.resolution} px, batch {cfg.train_batch_size}, "
            f"{cfg.max_train_steps or str(getattr(cfg, 'num_epochs', 0)) + ' epochs'} steps on {cfg.data.label}",
            str(run.root), cli_command(run))


def resume_run(ctx: StudioContext, name: str | None = None, max_train_steps: int | None = None
               ) -> tuple[str, str, str]:
    """Resume training run ``name`` from its latest intact checkpoint, with its own settings.

    Args:
        ctx: The app context.
        name: The run to continue (the one on screen); None or "" = the newest resumable run.
        max_train_steps: Train to this many steps in total (a text-to-image run's autoencoder steps
            included, as in its progress line); None, 0 or the run's own target keep the run's
            own ``max_train_steps`` (from its config.json).

    Raises:
        CheckpointError: when the run (or, without a name, any training run) has no checkpoint.
        JobError: when a job already runs on the device.
    """
    found = resumable_run(ctx, TASK, name) if name else latest_resumable(ctx, TASK)
    if found is None:
        if name:
            raise CheckpointError(f"Run {name!r} has no checkpoint to resume.",
                                  "Pick another run in 'Run on screen', or start a new run.")
        raise CheckpointError("No training run with a checkpoint to resume in this workspace.",
                              "Start a new run; Stop saves a checkpoint you can resume.")
    run, data = found
    config_cls = TextToImageConfig if data.get("mode") == TEXT_TO_IMAGE else TrainConfig
    cfg = resume_config(ctx, config_cls, run, data)
    if max_train_steps and int(max_train_steps) > 0:
        steps = int(max_train_steps)
        if isinstance(cfg, TextToImageConfig):  # the target counts the autoencoder's steps, as the progress line does
            if steps <= cfg.vae_steps:
                raise ConfigError(f"Resume until step must be above {cfg.vae_steps}: this run's first "
                                  f"{cfg.vae_steps} steps train its autoencoder.")
            steps -= cfg.vae_steps
        cfg = cfg.replace(max_train_steps=steps)
    run.write_config(TASK, cfg.replace(resume="").to_dict())  # the new target shows at once, not when the job gets to it
    return _start(ctx, cfg, run)


def resume_latest(ctx: StudioContext, max_train_steps: int | None = None) -> tuple[str, str, str]:
    """Resume the newest training run that has a checkpoint (``resume_run`` without a name)."""
    return resume_run(ctx, None, max_train_steps)


def _run_config(ctx: StudioContext, name: str | None) -> dict[str, Any] | None:
    """Run ``name``'s config.json, read directly (a running resume rewrites it and its checkpoints
    meanwhile); None for no name, a bad name or a file that is unreadable or not a JSON object."""
    if not name:
        return None
    try:
        return _config_of(ctx.workspace / check_run_name(name))
    except StudioError:
        return None


def _config_of(run_dir: str | Path) -> dict[str, Any] | None:
    """The config.json of the run folder ``run_dir`` ({} when it has none); None when unreadable."""
    try:
        data = RunDir(Path(run_dir)).read_config()
    except (StudioError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_target(ctx: StudioContext, name: str | None) -> int | None:
    """Run ``name``'s own step target (``max_train_steps`` in its config.json, plus ``vae_steps`` for a
    text-to-image run: the total its progress line counts to), None when unknown."""
    data = _run_config(ctx, name)
    if data is None:
        return None
    try:
        autoencoder = int(data.get("vae_steps") or 0) if data.get("mode") == TEXT_TO_IMAGE else 0
        return autoencoder + int(data.get("max_train_steps") or 0)
    except (TypeError, ValueError):
        return None


def run_mode(ctx: StudioContext, name: str | None) -> str:
    """The mode run ``name`` trained in (its config.json), "unconditional" when unknown or none."""
    mode = (_run_config(ctx, name) or {}).get("mode")
    return mode if mode in TRAIN_MODES else TRAIN_MODES[0]


def stop_training(ctx: StudioContext) -> str:
    """Ask the running training job to stop after its current step (it saves a checkpoint)."""
    return stop_job(ctx, TASK, "training")


# --------------------------------------------------------------------------- rendering
@dataclass
class TrainView:
    """What the tab shows of a training job, as plain values."""

    status: str
    progress: str = ""
    losses: list[tuple[int, float, str]] = field(default_factory=list)
    quality: list[tuple[int, float]] = field(default_factory=list)
    noise_level: float | None = None
    data_level: float | None = None
    latest_sample: str | None = None
    gallery: list[tuple[str, str]] = field(default_factory=list)
    run_path: str = ""
    model_path: str = ""
    running: bool = False


#: The headline loss is the mean raw loss of this many latest steps.
RECENT_STEPS = 10
#: The loss plot's two series, as its legend names them.
RAW, SMOOTHED = "raw loss", "smoothed (EMA)"
#: The loss plot's label, naming its two series by colour.
LOSS_LEGEND = f"Loss — light: {RAW} of each step · dark: {SMOOTHED}"


def loss_points(losses: list[tuple[int, float, float]]) -> list[tuple[int, float, str]]:
    """(step, value, series) rows of the loss plot: every raw loss, then the smoothed curve."""
    return [(step, loss, RAW) for step, loss, _ in losses] + [(step, sm, SMOOTHED) for step, _, sm in losses]


def render(snapshot: Snapshot | None) -> TrainView:
    """Turn a job snapshot into status, progress line, loss points, samples and paths."""
    if snapshot is None:
        return TrainView("No training yet. Pick settings and press Start.")
    s = snapshot
    lines = [f"{s.name}: {s.status}" + (f" — {s.phase}" if s.running and s.phase else "")]
    if s.status == "failed" and s.error:
        lines.append(f"Error: {s.error}")
        if not Path(s.run_dir).is_dir():
            lines.append("Nothing was trained, so no run folder was kept.")
    if s.status == "stopped" and s.result_path:
        lines.append(f"Checkpoint saved: {s.result_path}. Press Resume to go on.")
    if s.status == "interrupted":
        lines.append("This run ended without a final event (the app was closed or crashed). "
                     "Press Resume to continue from its latest checkpoint.")
    if s.status == "finished" and s.result_path:
        lines.append(f"Model saved to {s.result_path}. Open it in Generate.")
    lines.extend(f"Warning: {w}" for w in s.warnings[-3:])
    progress = []
    if s.total:
        progress.append(f"step {s.step}/{s.total} ({100 * s.step / s.total:.0f}%)")
    if s.losses:
        recent = [loss for _, loss, _ in s.losses[-RECENT_STEPS:]]
        progress.append(f"loss {sum(recent) / len(recent):.4f} (raw, mean of last {len(recent)} steps; "
                        f"smoothed {s.losses[-1][2]:.4f})")
    if s.quality:
        progress.append(f"sample quality {s.quality[-1][1]:.0f} (lower is better)")
    if s.lr is not None:
        progress.append(f"lr {s.lr:.2e}")
    if s.running and s.images_per_s:
        progress.append(f"{s.images_per_s:.1f} img/s")
    if s.running and s.eta_s:
        progress.append(f"ETA {format_duration(s.eta_s)}")
    caption = grid_captions(s.run_dir)
    text = " · ".join(progress)
    if caption.prompts and s.quality_message:  # text-to-image: the figure of each prompt's row
        text += f"\nGrid rows, top to bottom: {' / '.join(caption.prompts)}. {s.quality_message[:1].upper()}" \
                f"{s.quality_message[1:]}"
    losses = loss_points(s.losses)
    samples = [(path, caption(step)) for step, path in s.samples if Path(path).is_file()]
    model = str(Path(s.run_dir) / "model")
    return TrainView("\n".join(lines), text, losses, latest_sample=samples[-1][0] if samples else None,
                     gallery=list(reversed(samples)), run_path=s.run_dir,
                     model_path=model if (Path(model) / "model_index.json").is_file() else "", running=s.running,
                     quality=list(s.quality), noise_level=s.noise_level, data_level=s.data_level)


@dataclass
class GridCaptions:
    """Names a run's grids by step: 'step N' (unconditional); for a text-to-image run what the grid shows
    (the autoencoder's reconstructions up to ``vae_steps``, then one row per validation prompt)."""

    vae_steps: int = 0
    prompts: tuple[str, ...] = ()

    def __call__(self, step: int) -> str:
        if not self.prompts:
            return f"step {step}"
        if step <= self.vae_steps:
            return f"step {step} · autoencoder: images (top), reconstructions (bottom)"
        return f"step {step} · rows: {' / '.join(self.prompts)}"


def grid_captions(run_dir: str | Path) -> GridCaptions:
    """The ``GridCaptions`` of the run in ``run_dir`` (read from its config.json)."""
    data = _config_of(run_dir)
    if not data or data.get("mode") != TEXT_TO_IMAGE:
        return GridCaptions()
    prompts = tuple(str(p) for p in data.get("validation_prompts") or ()) or ("(no prompts)",)
    return GridCaptions(int(data.get("vae_steps") or 0), prompts)


#: The one line under the quality plot.
QUALITY_HELP = ("**Sample quality** of each grid: how far its 7x7 patches are from the dataset's (sliced "
                "Wasserstein distance × 1000) — **lower is better**. *noise level*: pure noise (an untrained "
                "model); *data level*: held-out dataset images (a perfect model).")
#: Curve names of the quality plot (never renamed: the plot keeps the legend it first drew).
QUALITY_CURVES = ("samples", "noise level", "data level")


def quality_frame(points: list[tuple[int, float]], noise_level: float | None, data_level: float | None):
    """A pandas DataFrame (step, quality, curve) for the quality plot, or None while there are no points.

    The grid's figures are the "samples" curve; each reference level is a flat line over
    the same steps ("noise level", "data level"), so the curve is read against them.
    """
    import pandas as pd

    if not points:
        return None
    first, last = points[0][0], points[-1][0]
    rows = [(step, value, QUALITY_CURVES[0]) for step, value in points]
    for level, name in ((noise_level, QUALITY_CURVES[1]), (data_level, QUALITY_CURVES[2])):
        if level is not None:
            rows += [(first, level, name), (last, level, name)]
    return pd.DataFrame(rows, columns=["step", "quality", "curve"])


def cli_command(run: RunDir | str | None = None) -> str:
    """The headless command for this configuration: ``python -m studio train --config ...``.

    With a run folder: its own config.json names the run, so ``--resume latest`` continues
    that run from its newest intact checkpoint (not the newest run of the workspace).
    """
    if run is None:
        return "python -m studio train --config train.json   # train.json: the settings JSON below"
    resume = cli_resume_command(TASK, run)
    return f"{resume}\n# on 2 GPUs: {resume.replace('python -m studio', 'torchrun --nproc_per_node 2 -m studio')}"


def config_json(values: dict[str, Any], ctx: StudioContext) -> str:
    """The settings as the JSON file the CLI reads (or the validation error, as a comment)."""
    return settings_json(build_config, values, ctx)


def config_file(values: dict[str, Any], ctx: StudioContext) -> str | None:
    """The settings JSON written to a fresh temp folder as ``<run name>.json`` ("train.json"
    without a name), for the download button; None when the settings do not validate."""
    try:
        cfg = build_config(values, ctx)
    except StudioError:
        return None
    path = Path(tempfile.mkdtemp(prefix="studio-settings-")) / f"{cfg.run_name or TASK}.json"
    path.write_text(cfg.to_json() + "\n", encoding="utf-8")
    return str(path)


def dataset_line(ctx: StudioContext) -> str:
    """Markdown naming the dataset the run will use."""
    choice = ctx.dataset.get()
    count = f" ({choice.unsaid_count} images)" if choice.unsaid_count else ""
    return f"**Dataset:** {choice.summary}{count}. Change it in the Dataset tab."


# --------------------------------------------------------------------------- layout
def _widget(name: str, kind: str, extra: dict[str, Any], value: Any) -> gr.components.Component:
    owner = TextToImageConfig if name in (*TEXT_TO_IMAGE_FIELDS, "mode") else TrainConfig
    if name in TEXT_TO_IMAGE_FIELDS:  # the tab opens in the unconditional mode
        extra = dict(extra, visible=False)
    return settings_widget(name, kind, extra, value, owner, "train",
                           info=ATTENTION_HELP if name == "attention_levels" else None)


def build_train_tab(ctx: StudioContext) -> dict[str, Any]:
    """Lay out the Train tab and wire its events.

    Returns:
        ``{"open_in_generate": button, "run_path": textbox}``; the run path box holds the
        run's ``model/`` folder once there is one, for the Generate tab.
    """
    defaults = default_values()
    gr.Markdown("Train a diffusion model from scratch on the dataset from the **Dataset** tab: **unconditional** "
                "(a DDPM that learns the images) or **text-to-image** (a small Stable Diffusion that learns the "
                "captions too, so you can prompt it in Generate). The grids use the same starting noise every "
                "time, so you see the same images sharpen as it learns.")
    data_md = gr.Markdown(dataset_line(ctx), elem_id="train-dataset")
    with gr.Row():
        with gr.Column(scale=3):
            sections: dict[str, Any] = {}
            widgets = lay_out_fields(SECTIONS, FIELDS, lambda name, kind, extra: _widget(
                name, kind, dict(extra, choices=init_from_choices(ctx.workspace)) if kind == "pretrained" else extra,
                defaults[name]), containers=sections, hidden=(TEXT_TO_IMAGE_SECTION,))
            summary = gr.Markdown(f"*Parameter count and memory estimate: {LOADING_LABEL}*",
                                  elem_id="train-model-summary")
            with gr.Accordion("Headless (CLI)", open=False):
                cli_box = gr.Textbox(label="CLI command", value=cli_command(), interactive=False, lines=2,
                                     elem_id="train-cli", buttons=["copy"])
                show_json = gr.Button("Show settings as JSON", size="sm", elem_id="train-show-json")
                # hidden until there is JSON to show (an empty Code box is a tall blank panel)
                json_box = gr.Code(label="Settings JSON", language="json", value="", interactive=False,
                                   visible=False, buttons=["copy"], elem_id="train-config-json")
                json_file = gr.DownloadButton("Download settings", visible=False, size="sm",
                                              elem_id="train-config-download")
        with gr.Column(scale=4):
            with gr.Row():
                start_button = engine_button("Start", variant="primary", elem_id="train-start")
                stop_button = gr.Button("Stop", variant="stop", elem_id="train-stop")
                resume_button = engine_button("Resume", elem_id="train-resume")
                open_button = gr.Button("Open in Generate", elem_id="train-open-generate")
            with gr.Row():
                run_picker = gr.Dropdown(label="Run on screen", choices=run_choices(ctx, TASK), value=None,
                                         elem_id="train-run", scale=3,
                                         info="Its whole loss curve and every grid are shown; Resume continues it.")
                resume_steps = gr.Number(label="Resume until step", precision=0, minimum=0, value=None,
                                         elem_id="train-resume-steps", scale=1,
                                         info="The run's own target; raise it to train longer.")
            status = gr.Textbox(label="Status", lines=3, interactive=False, elem_id="train-status",
                                value=render(None).status)
            progress = gr.Textbox(label="Progress", interactive=False, elem_id="train-progress", lines=2)
            log_scale = gr.Checkbox(label="Plot log10(loss)", value=False, elem_id="train-log-scale")
            with gr.Row():
                # Vega's legend sits under the chart and this narrow plot clips it: the label is the legend
                loss_plot = gr.LinePlot(x="step", y="loss", color="curve", label=LOSS_LEGEND, elem_id="train-loss",
                                        height=260, color_title="", colors_in_legend=[RAW, SMOOTHED],
                                        color_map={RAW: "#a5b4fc", SMOOTHED: "#4338ca"})
                quality_plot = gr.LinePlot(x="step", y="quality", color="curve", elem_id="train-quality",
                                           label="Sample quality (lower is better)", height=260)
            gr.Markdown(QUALITY_HELP, elem_id="train-quality-help")
            with gr.Row():
                sample = gr.Image(label="Latest sample grid", type="filepath", interactive=False,
                                  elem_id="train-sample", height=320)
                gallery = gr.Gallery(label="Earlier grids (newest first)", columns=3, height=320,
                                     elem_id="train-gallery")
            run_folder = gr.Textbox(label="Run folder", interactive=False, elem_id="train-run-folder")
            run_path = gr.Textbox(label="Model folder (for Generate)", interactive=False, elem_id="train-run-path")
    seen = gr.State(value=None)
    timer = gr.Timer(1.0)
    inputs = [widgets[name] for name in INPUT_NAMES]
    view_components = [status, progress, loss_plot, quality_plot, sample, gallery, run_folder, run_path]

    def view_outputs(view: TrainView, log: bool) -> tuple:
        return (view.status, view.progress, loss_frame(view.losses, log),
                quality_frame(view.quality, view.noise_level, view.data_level), view.latest_sample, view.gallery,
                view.run_path, view.model_path)

    def show(name: str | None, log: bool) -> tuple:
        """The view outputs for run ``name`` and the key the poller compares."""
        key = (*run_key(ctx, TASK, name), bool(log))
        return (*view_outputs(render(run_snapshot(ctx, TASK, name)), bool(log)), key)

    def picker(name: str | None) -> tuple:
        """The run picker (fresh choices, ``name`` or the run to show) and that run's step target."""
        name = shown_run(ctx, TASK, name)
        return gr.update(choices=run_choices(ctx, TASK), value=name), run_target(ctx, name)

    def on_start(*values: Any):
        try:
            message, folder, command = start_training(ctx, dict(zip(INPUT_NAMES, values)))
        except Exception as exc:  # noqa: BLE001 - shown to the person, never a traceback
            return _failure(exc), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (message, folder, command, *picker(Path(folder).name))

    def on_resume(name: str | None, steps: Any):
        try:
            message, folder, command = resume_run(ctx, name or None, int(steps) if steps not in (None, "") else None)
        except Exception as exc:  # noqa: BLE001
            return _failure(exc), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        choices, target = picker(Path(folder).name)
        return message, folder, command, choices, steps if steps not in (None, "", 0) else target

    def on_status(log: bool, name: str | None = None):
        return show(name, bool(log))[:-1]

    def on_tick(last: Any, log: bool, name: str | None):
        key = (*run_key(ctx, TASK, name), bool(log))
        if last is not None and tuple(last) == key:
            return (*(gr.skip() for _ in view_components), last, gr.skip())
        # a job that started or ended changes the picker's labels (and what is resumable)
        relist = last is None or key[0] != last[0] or (key[0] == "job" and (key[1], key[3]) != (last[1], last[3]))
        return (*show(name, bool(log)), gr.update(choices=run_choices(ctx, TASK)) if relist else gr.skip())

    def on_pick(name: str | None, log: bool):
        return (*show(name, bool(log)), run_target(ctx, name))

    def on_stop():
        return stop_training(ctx)

    def on_preset(preset: str):
        values = preset_values(preset)
        if not values:
            return tuple(gr.skip() for _ in PRESET_FILLED)
        return tuple(values[name] for name in PRESET_FILLED)

    def on_summary(*values: Any):
        try:
            ctx.engine.wait()  # the parameter count builds the UNet with diffusers (on torch's meta device)
            return model_summary(dict(zip(INPUT_NAMES, values)))
        except Exception as exc:  # noqa: BLE001
            return f"⚠️ {describe_exception(exc)}"

    def on_architecture_edit(*values: Any):
        """Editing the architecture by hand shows which preset (or 'custom') it now is."""
        return architecture_preset(dict(zip(INPUT_NAMES, values)))

    def switch_mode(settings: dict[str, Any], mode: str, set_value: bool = False) -> tuple:
        """Updates of the settings widgets and the two sections for ``mode`` (``mode_changes``);
        ``set_value`` also sets the Mode dropdown."""
        changes = mode_changes(mode, settings)
        if set_value:
            changes["mode"] = {"value": mode}
        t2i = mode == TEXT_TO_IMAGE
        return (*(gr.update(**changes[name]) if name in changes else gr.skip() for name in INPUT_NAMES),
                gr.update(visible=not t2i), gr.update(visible=t2i))

    def on_mode(*values: Any):
        """The Mode dropdown shows that mode's settings (``mode_changes``) and sections."""
        settings = dict(zip(INPUT_NAMES, values))
        return switch_mode(settings, settings["mode"])

    def on_show_json(*values: Any):
        settings = dict(zip(INPUT_NAMES, values))
        path = config_file(settings, ctx)
        download = (gr.update(value=path, label=f"Download {Path(path).name}", visible=True) if path
                    else gr.update(visible=False))
        return gr.update(value=config_json(settings, ctx), visible=True), cli_command(), download

    def on_load(*values: Any):  # the model summary is its own load event: it waits for the engine
        """A (re)loaded page: the run to show, its history, and the settings column in that run's mode
        (the page starts unconditional; its values stay the defaults, as for the next run)."""
        name = shown_run(ctx, TASK)
        settings = dict(zip(INPUT_NAMES, values))
        mode = run_mode(ctx, name)
        switch = (switch_mode(settings, mode, set_value=True) if mode != settings.get("mode")
                  else tuple(gr.skip() for _ in range(len(INPUT_NAMES) + 2)))
        return (dataset_line(ctx), *show(name, False), *picker(name), *switch)

    gpu = {"concurrency_id": GPU, "concurrency_limit": 1}
    start_outputs = [status, run_folder, cli_box, run_picker, resume_steps]
    start_button.click(on_start, inputs=inputs, outputs=start_outputs, api_name="start_training", **gpu)
    resume_button.click(on_resume, inputs=[run_picker, resume_steps], outputs=start_outputs,
                        api_name="resume_training", **gpu)
    stop_button.click(on_stop, outputs=status, api_name="stop_training", queue=False)
    timer.tick(on_tick, inputs=[seen, log_scale, run_picker], outputs=[*view_components, seen, run_picker],
               api_name="poll_training", queue=False, show_progress="hidden")
    run_picker.input(on_pick, inputs=[run_picker, log_scale], outputs=[*view_components, seen, resume_steps],
                     api_name="train_show_run", queue=False)
    status_button = gr.Button("Refresh", size="sm", elem_id="train-refresh", visible=False)
    status_button.click(on_status, inputs=[log_scale, run_picker], outputs=view_components, api_name="train_status",
                        queue=False)
    widgets["preset"].input(on_preset, inputs=widgets["preset"], outputs=[widgets[n] for n in PRESET_FILLED],
                            api_name="train_preset", queue=False)
    widgets["mode"].input(on_mode, inputs=inputs,
                          outputs=[*inputs, sections[ARCHITECTURE_SECTION], sections[TEXT_TO_IMAGE_SECTION]],
                          api_name="train_mode", queue=False)
    for name in ARCHITECTURE:
        widgets[name].change(on_architecture_edit, inputs=inputs, outputs=widgets["preset"], queue=False,
                             api_name=False)
    summary_triggers = [widgets[n].change for n in ("mode", "preset", "init_from", "resolution", "train_batch_size", "use_ema",
                                                     "mixed_precision", "max_train_steps", "num_epochs",
                                                     "lr_scheduler", "lr_warmup_steps", "sample_every", "save_every",
                                                     "ema_max_decay", "ema_power", "ema_inv_gamma",
                                                     "ema_update_after_step", *ARCHITECTURE,
                                                     "validation_prompts", "vae_steps")]
    gr.on(summary_triggers, on_summary, inputs=inputs, outputs=summary, api_name="train_model_summary",
          queue=False, show_progress="hidden")
    show_json.click(on_show_json, inputs=inputs, outputs=[json_box, cli_box, json_file], api_name="train_config_json",
                    queue=False)
    tab = gr.context.Context.block
    if isinstance(tab, gr.Tab):  # refresh the dataset line and the run list whenever the tab is opened
        tab.select(lambda name: (dataset_line(ctx), gr.update(choices=run_choices(ctx, TASK))),
                   inputs=run_picker, outputs=[data_md, run_picker], api_name="train_dataset", queue=False)
        tab.select(lambda: gr.update(choices=init_from_choices(ctx.workspace)), outputs=widgets["init_from"],
                   api_name=False, queue=False)
    root = gr.context.Context.root_block
    if root is not None:
        root.load(on_load, inputs=inputs,
                  outputs=[data_md, *view_components, seen, run_picker, resume_steps, *inputs,
                           sections[ARCHITECTURE_SECTION], sections[TEXT_TO_IMAGE_SECTION]],
                  api_name="train_on_load", queue=False)
        root.load(on_summary, inputs=inputs, outputs=summary, api_name=False, queue=False, show_progress="hidden")
    return {"open_in_generate": open_button, "run_path": run_path, "status": status,
            "engine_buttons": [start_button, resume_button]}


def _failure(exc: BaseException) -> str:
    return failure(exc, "Train")


__all__ = ["FIELDS", "INPUT_NAMES", "TrainView", "architecture_preset", "build_config", "build_train_tab", "cli_command", "config_json",
           "config_file", "default_values", "loss_frame", "loss_points", "model_summary", "preset_values",
           "quality_frame", "render", "resume_latest", "resume_run", "run_mode", "run_target", "start_training",
           "stop_training",
           # re-exported from tabs.train_settings
           "MODE_LABELS", "SECTIONS", "SHARED_FIELDS", "TEXT_TO_IMAGE_FIELDS", "TEXT_TO_IMAGE_LABELS",
           "UNCONDITIONAL_FIELDS", "PRESET_FILLED", "mode_changes", "mode_defaults", "text_to_image_config"]
