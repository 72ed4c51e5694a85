"""The Fine-tune tab: fine-tune a Stable Diffusion pipeline (LoRA, full, DreamBooth) as a job.

Layout and wiring live in ``build_finetune_tab``; the work is done by plain functions
(``build_config``, ``start_finetune``, ``stop_finetune``, ``resume_latest``, ``render``,
``cli_command``) that take and return plain values, so tests call them without Gradio
running. Every widget is named after its ``FinetuneConfig`` field (``FIELDS``), and a
handler receives the values as a dict built from those names: widget order never leaks
into the engine.

The job runs in ``ctx.jobs`` (one training job per device, shared with the Train tab).
A ``gr.Timer`` polls ``job.snapshot()`` and re-renders only when it changed; a reload
re-attaches to the running (or last) fine-tune. The trainer (which imports torch) is
imported only when a run starts.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from studio.base_models import (default_base_model, finetune_base_choices, finetune_defaults, native_resolution,
                                tuned_finetune_defaults)
from studio.config.finetune import (
    LR_SCHEDULERS,
    METHOD_HELP,
    METHODS,
    MIXED_PRECISION,
    PREDICTION_TYPES,
    FinetuneConfig,
    bitsandbytes_available,
)
from studio.context import StudioContext
from studio.errors import CheckpointError, describe_exception
from studio.jobs import Snapshot
from studio.model_refs import resolve_reference
from studio.runs import RunDir
from tabs import GPU
from tabs.engine_gate import engine_button
from tabs.jobtab import (cli_resume_command, failure, field_label, format_duration, latest_resumable,
                         latest_snapshot, lay_out_fields, loss_frame, parse_values, poll_key, resume_config,
                         same_value, settings_json, settings_widget, start_run, stop_job, widget_value)

log = logging.getLogger(__name__)

TASK = "finetune"

#: Widgets of the tab, in layout order: (config field, kind, extra widget arguments).
FIELDS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("pretrained_model_name_or_path", "model", {"label": "Base model"}),
    ("method", "choice", {"label": "Method", "choices": list(METHODS)}),
    ("instance_prompt", "text", {"label": "Instance prompt / trigger words"}),
    ("validation_prompts", "lines", {"label": "Validation prompts (one per line)", "lines": 2,
                                          "placeholder": "empty: the instance prompt, or the first caption"}),
    ("max_train_steps", "int", {"label": "Max train steps"}),
    ("learning_rate", "float", {"label": "Learning rate"}),
    ("resolution", "int", {"label": "Resolution"}),
    ("train_batch_size", "int", {"label": "Batch size"}),
    # LoRA
    ("rank", "int", {"label": "LoRA rank"}),
    ("lora_alpha", "int", {"label": "LoRA alpha"}),
    ("lora_dropout", "float", {"label": "LoRA dropout"}),
    ("lora_target_modules", "csv", {"label": "LoRA target modules"}),
    ("train_text_encoder", "bool", {"label": "Train text encoder (LoRA)"}),
    ("text_encoder_lr", "float", {"label": "Text-encoder learning rate"}),
    # DreamBooth
    ("class_prompt", "text", {"label": "Class prompt"}),
    ("with_prior_preservation", "bool", {"label": "Prior preservation"}),
    ("num_class_images", "int", {"label": "Class images"}),
    ("prior_loss_weight", "float", {"label": "Prior loss weight"}),
    # Data and schedule
    ("center_crop", "bool", {"label": "Center crop"}),
    ("random_flip", "bool", {"label": "Random flip"}),
    ("caption_dropout", "float", {"label": "Caption dropout"}),
    ("lr_scheduler", "choice", {"label": "LR schedule", "choices": list(LR_SCHEDULERS)}),
    ("lr_warmup_steps", "int", {"label": "Warm-up steps"}),
    ("gradient_accumulation_steps", "int", {"label": "Gradient accumulation"}),
    ("seed", "int", {"label": "Seed"}),
    # Advanced
    ("mixed_precision", "choice", {"label": "Mixed precision", "choices": list(MIXED_PRECISION)}),
    ("gradient_checkpointing", "bool", {"label": "Gradient checkpointing"}),
    ("use_8bit_adam", "bool", {"label": "8-bit Adam"}),
    ("snr_gamma", "float", {"label": "SNR gamma"}),
    ("noise_offset", "float", {"label": "Noise offset"}),
    ("prediction_type", "choice", {"label": "Prediction type",
                                   "choices": [("from the base model", "")] + [(p, p) for p in PREDICTION_TYPES if p]}),
    ("use_ema", "bool", {"label": "EMA (full only)"}),
    ("cache_latents", "bool", {"label": "Cache latents and text embeddings"}),
    # Validation, checkpoints, output
    ("validation_every", "int", {"label": "Validation every N steps"}),
    ("num_inference_steps", "int", {"label": "Validation denoising steps"}),
    ("checkpoint_every", "int", {"label": "Checkpoint every N steps"}),
    ("checkpoints_total_limit", "int", {"label": "Checkpoints to keep"}),
    ("run_name", "text", {"label": "Run name", "placeholder": "finetune-<time>"}),
    ("save_single_file", "bool", {"label": "Also save a single-file checkpoint (full)"}),
    ("push_to_hub", "bool", {"label": "Push to the Hub when done"}),
    ("hub_model_id", "text", {"label": "Hub repository", "placeholder": "user/my-lora"}),
)

#: The config field behind each input, in the order handlers receive them.
INPUT_NAMES = tuple(name for name, _, _ in FIELDS)

#: Groups of fields for the layout: (accordion title or "" for the top, open, fields).
SECTIONS = (
    ("", True, INPUT_NAMES[:8]),
    ("LoRA", False, ("rank", "lora_alpha", "lora_dropout", "lora_target_modules", "train_text_encoder",
                     "text_encoder_lr")),
    ("DreamBooth", False, ("class_prompt", "with_prior_preservation", "num_class_images", "prior_loss_weight")),
    ("Data and schedule", False, ("center_crop", "random_flip", "caption_dropout", "lr_scheduler", "lr_warmup_steps",
                                  "gradient_accumulation_steps", "seed")),
    ("Advanced", False, ("mixed_precision", "gradient_checkpointing", "use_8bit_adam", "snr_gamma", "noise_offset",
                         "prediction_type", "use_ema", "cache_latents")),
    ("Validation, checkpoints and output", False, ("validation_every", "num_inference_steps", "checkpoint_every",
                                                   "checkpoints_total_limit", "run_name", "save_single_file",
                                                   "push_to_hub",
                                                   "hub_model_id")),
)

EIGHT_BIT_NOTE = "8-bit Adam needs bitsandbytes (CUDA); it is not installed here, so this stays off."


# --------------------------------------------------------------------------- plain functions
def default_values() -> dict[str, Any]:
    """The widget value of every field, from ``FinetuneConfig``'s defaults.

    The base model is the bundled text-to-image model (``studio.base_models.default_base_model``)
    and the resolution its native size, so Start works offline from the first click.
    """
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(FinetuneConfig)}
    values = {name: widget_value(kind, defaults[name]) for name, kind, _ in FIELDS}
    base = default_base_model()
    if base:
        values.update(pretrained_model_name_or_path=base, resolution=native_resolution(base) or values["resolution"])
        values.update(finetune_defaults(base, values["method"]))
    return values


def base_defaults(base: str, method: str, values: dict[str, Any], previous: dict[str, Any] | None
                  ) -> tuple[dict[str, Any], dict[str, Any], str]:
    """What picking base model ``base`` or method ``method`` does to the learning rate and steps.

    Args:
        base, method: The base model and method now chosen.
        values: The widgets' current values by field name.
        previous: The suggestion applied before (this function's second result); None = none yet.

    Returns:
        (new widget values, the suggestion now in force, a note). A field still holding the
        previous suggestion takes the new one (``studio.base_models.finetune_defaults``); a value
        the person typed is kept, and the note names what this base and method suggest instead.
    """
    suggested = finetune_defaults(base, method)
    updates: dict[str, Any] = {}
    kept = []
    for name, value in suggested.items():
        current = values.get(name)
        if previous is None or same_value(current, previous.get(name)):
            updates[name] = value
        elif not same_value(current, value):
            kept.append(f"{field_label(FIELDS, name).lower()} {current:g} (suggested: {value:g})")
    tuned = tuned_finetune_defaults(base, method)
    note = (f"*Learning rate {suggested['learning_rate']:g} and {suggested['max_train_steps']} steps suit this base "
            f"model with {method}.*" if tuned else "")
    if kept:
        note = (note + " " if note else "") + f"*Kept your {' and '.join(kept)}.*"
    return updates, suggested, note


def resolution_for(reference: str, workspace: str | Path | None = None) -> int | None:
    """The training resolution to show for a newly picked base model: its native size, when it can be read."""
    return native_resolution(reference, workspace)


def _strings(value: Any, label: str) -> tuple[str, ...]:
    """A comma list as stripped, non-empty strings."""
    return tuple(part.strip() for part in str(value or "").split(",") if part.strip())


def build_config(values: dict[str, Any], ctx: StudioContext | None = None, **overrides: Any) -> FinetuneConfig:
    """Turn named widget values into a validated ``FinetuneConfig``.

    Args:
        values: Field name -> widget value (missing fields keep their defaults).
        ctx: Supplies the dataset chosen in the Dataset tab, the workspace and the device.
        **overrides: Extra fields (``resume``...).

    Raises:
        ConfigError: with the message the tab shows.
    """
    data = parse_values(values, FIELDS, typing.get_type_hints(FinetuneConfig), "fine-tune", _strings)
    if ctx is not None:
        data.update(data=ctx.dataset.get().config, workspace=str(ctx.workspace), device=ctx.settings.device)
    data.update(overrides)
    return FinetuneConfig(**data)


def start_finetune(ctx: StudioContext, values: dict[str, Any]) -> tuple[str, str, str]:
    """Validate the settings, create the run folder and start the job.

    Returns:
        (status line, run folder, CLI command).

    Raises:
        StudioError: bad settings, a taken run name, or another job on the device.
    """
    cfg = build_config(values, ctx)
    # refuse an unknown or (offline) uncached base model and what cannot fit before making a run folder
    resolve_reference(cfg.pretrained_model_name_or_path, cfg.workspace, ctx.settings.offline)
    _plan(cfg).check()
    return _start(ctx, cfg, RunDir.create(cfg.workspace, TASK, cfg.run_name))


def _plan(cfg: FinetuneConfig):
    from studio.budget import finetune_plan, local_unet_config

    return finetune_plan(cfg, unet_config=local_unet_config(cfg.pretrained_model_name_or_path, cfg.workspace))


def memory_plan(ctx: StudioContext, values: dict[str, Any]) -> str:
    """Markdown: the predicted peak memory of these settings, the GPUs it fits, what would make it fit."""
    try:
        return _plan(build_config(values, ctx)).markdown()
    except Exception as exc:  # noqa: BLE001 - a half-typed setting: say what is wrong, never a traceback
        return f"Memory plan: {describe_exception(exc)}"


def _start(ctx: StudioContext, cfg: FinetuneConfig, run: RunDir) -> tuple[str, str, str]:
    verb = start_run(ctx, TASK, cfg, run, "studio.trainers.text_to_image")
    return f"{verb} {run.name}: {cfg.method} on {cfg.pretrained_model_name_or_path}", str(run.root), cli_command(run)


def resume_latest(ctx: StudioContext) -> tuple[str, str, str]:
    """Resume the newest fine-tune run of the workspace from its latest intact checkpoint.

    Raises:
        CheckpointError: when there is no fine-tune run with a checkpoint.
        JobError: when a job already runs on the device.
    """
    found = latest_resumable(ctx, TASK)
    if found is not None:
        run, data = found
        return _start(ctx, resume_config(ctx, FinetuneConfig, run, data), run)
    raise CheckpointError("No fine-tune run with a checkpoint to resume in this workspace.",
                          "Start a new fine-tune; Stop saves a checkpoint you can resume.")


def stop_finetune(ctx: StudioContext) -> str:
    """Ask the running fine-tune to stop after its current step (it saves a checkpoint)."""
    return stop_job(ctx, TASK, "fine-tune")


@dataclass
class FinetuneView:
    """What the tab shows of a fine-tune job, as plain values."""

    status: str
    losses: list[tuple[int, float, str]] = field(default_factory=list)
    gallery: list[tuple[str, str]] = field(default_factory=list)
    run_path: str = ""
    running: bool = False


def render(snapshot: Snapshot | None) -> FinetuneView:
    """Turn a job snapshot into the status line, loss points, validation gallery and run path."""
    if snapshot is None:
        return FinetuneView("No fine-tune yet. Pick a base model and press Start.")
    s = snapshot
    parts = [f"{s.name}: {s.status}"]
    if s.running:
        parts.append(s.phase)
    if s.total:
        parts.append(f"step {s.step}/{s.total}")
    if s.losses:
        parts.append(f"loss {s.losses[-1][2]:.4f}")
    if s.running and s.images_per_s:
        parts.append(f"{s.images_per_s:.2f} img/s")
    if s.running and s.eta_s:
        parts.append(f"ETA {format_duration(s.eta_s)}")
    lines = [" · ".join(parts)]
    if s.status == "failed" and s.error:
        lines.append(f"Error: {s.error}")
    if s.status == "stopped" and s.result_path:
        lines.append(f"Checkpoint saved: {s.result_path}. Press Resume latest to go on.")
    if s.status == "finished" and s.result_path:
        lines.append(f"Saved to {s.result_path}. Open it in Generate.")
    lines.extend(f"Note: {w}" for w in s.warnings[-3:])
    losses = [(step, loss, "loss") for step, loss, _ in s.losses] + [(step, sm, "smoothed") for step, _, sm in s.losses]
    gallery = [(path, f"step {step}" + (" (base model)" if step == 0 else "")) for step, path in s.samples
               if Path(path).is_file()]
    if s.status == "failed" and not Path(s.run_dir).is_dir():
        lines.append("Nothing was trained, so no run folder was kept.")
    # no folder (a start that failed before training) is nothing to open in Generate
    return FinetuneView("\n".join(lines), losses, list(reversed(gallery)),
                        s.run_dir if Path(s.run_dir).is_dir() else "", s.running)


def cli_command(run: RunDir | str | None = None) -> str:
    """The headless command that runs (or resumes) this fine-tune: ``python -m studio finetune ...``."""
    if run is None:
        return "python -m studio finetune --config finetune.json   # settings: the JSON below"
    return cli_resume_command(TASK, run)


def config_json(values: dict[str, Any], ctx: StudioContext) -> str:
    """The settings as the JSON file the CLI reads (or the validation error, as text)."""
    return settings_json(build_config, values, ctx)


# --------------------------------------------------------------------------- layout
def _widget(name: str, kind: str, extra: dict[str, Any], value: Any) -> gr.components.Component:
    if name == "use_8bit_adam" and not bitsandbytes_available():
        return settings_widget(name, kind, dict(extra, interactive=False), False, FinetuneConfig, "ft",
                               info=EIGHT_BIT_NOTE)
    return settings_widget(name, kind, extra, value, FinetuneConfig, "ft")


def build_finetune_tab(ctx: StudioContext) -> dict[str, Any]:
    """Lay out the Fine-tune tab and wire its events.

    Returns:
        ``{"open_in_generate": button, "run_path": textbox}`` for the cross-tab link.
    """
    defaults = default_values()
    gr.Markdown("Fine-tune a Stable Diffusion model on the dataset from the **Dataset** tab: LoRA (small, fast, "
                "the default), the full UNet, or DreamBooth with a trigger word. Validation images from fixed "
                "prompts and a fixed seed arrive as it trains; step 0 is the untouched base model.")
    dataset_line = gr.Markdown(_dataset_line(ctx), elem_id="ft-dataset")
    method_help = gr.Markdown(f"*{METHOD_HELP[defaults['method']]}*", elem_id="ft-method-help")
    first = base_defaults(defaults["pretrained_model_name_or_path"], defaults["method"], defaults, None)
    defaults_note = gr.Markdown(first[2], elem_id="ft-defaults-note")
    suggestion = gr.State(value=first[1])
    plan_md = gr.Markdown("", elem_id="ft-memory-plan")
    with gr.Row():
        with gr.Column(scale=3):
            widgets = lay_out_fields(SECTIONS, FIELDS, lambda name, kind, extra: _widget(
                name, kind, dict(extra, choices=finetune_base_choices(ctx.workspace)) if kind == "model" else extra,
                defaults[name]))
            with gr.Accordion("Headless (CLI)", open=False):
                cli_box = gr.Textbox(label="Command", value=cli_command(), interactive=False, elem_id="ft-cli")
                json_box = gr.Code(label="Settings JSON (save as finetune.json)", language="json",
                                   value="", interactive=False, elem_id="ft-config-json")
                show_json = gr.Button("Show settings as JSON", size="sm", elem_id="ft-show-json")
        with gr.Column(scale=4):
            with gr.Row():
                start_button = engine_button("Start", variant="primary", elem_id="ft-start")
                stop_button = gr.Button("Stop", variant="stop", elem_id="ft-stop")
                resume_button = engine_button("Resume latest", elem_id="ft-resume")
                open_button = gr.Button("Open in Generate", elem_id="ft-open-generate")
            status = gr.Textbox(label="Status", lines=3, interactive=False, elem_id="ft-status",
                                value=render(None).status)
            loss_plot = gr.LinePlot(x="step", y="loss", color="curve", label="Loss", elem_id="ft-loss",
                                    height=240)
            gallery = gr.Gallery(label="Validation images (newest first)", columns=3, height=360,
                                 elem_id="ft-gallery", show_label=True)
            run_path = gr.Textbox(label="Run folder", interactive=False, elem_id="ft-run-path")
    seen = gr.State(value=(-1, -1))
    timer = gr.Timer(1.0)
    inputs = [widgets[name] for name in INPUT_NAMES]

    def view_outputs(view: FinetuneView) -> tuple:
        return view.status, loss_frame(view.losses), view.gallery, view.run_path

    def current_view() -> FinetuneView:
        return render(latest_snapshot(ctx, TASK))

    def on_start(*values: Any):
        try:
            message, path, command = start_finetune(ctx, dict(zip(INPUT_NAMES, values)))
        except Exception as exc:  # noqa: BLE001 - shown to the person, never a traceback
            return _failure(exc), gr.skip(), gr.skip()
        return message, path, command

    def on_resume():
        try:
            return resume_latest(ctx)
        except Exception as exc:  # noqa: BLE001
            return _failure(exc), gr.skip(), gr.skip()

    def on_status():
        return view_outputs(current_view())

    def on_tick(last: tuple[int, int]):
        key = poll_key(ctx, TASK)
        if tuple(last) == key:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), last
        return (*view_outputs(current_view()), key)

    gpu = {"concurrency_id": GPU, "concurrency_limit": 1}
    start_button.click(on_start, inputs=inputs, outputs=[status, run_path, cli_box], api_name="start_finetune", **gpu)
    resume_button.click(on_resume, outputs=[status, run_path, cli_box], api_name="resume_finetune", **gpu)
    stop_button.click(lambda: stop_finetune(ctx), outputs=status, api_name="stop_finetune", queue=False)
    timer.tick(on_tick, inputs=seen, outputs=[status, loss_plot, gallery, run_path, seen], api_name="poll_finetune",
               queue=False, show_progress="hidden")
    status_refresh = gr.Button("Refresh", size="sm", elem_id="ft-refresh", visible=False)
    status_refresh.click(on_status, outputs=[status, loss_plot, gallery, run_path], api_name="finetune_status",
                         queue=False)
    widgets["method"].change(lambda m: f"*{METHOD_HELP.get(m, '')}*", inputs=widgets["method"], outputs=method_help,
                             api_name="finetune_method_help", queue=False)
    show_json.click(lambda *values: config_json(dict(zip(INPUT_NAMES, values)), ctx), inputs=inputs,
                    outputs=json_box, api_name="finetune_config_json", queue=False)
    base_box, resolution_box = widgets["pretrained_model_name_or_path"], widgets["resolution"]
    base_box.change(lambda ref, res: resolution_for(ref, ctx.workspace) or res, inputs=[base_box, resolution_box],
                    outputs=resolution_box, api_name="finetune_base_resolution", queue=False, show_progress="hidden")

    def on_base_or_method(base: str, method: str, lr: Any, steps: Any, previous: dict[str, Any] | None):
        updates, suggested, note = base_defaults(base, method, {"learning_rate": lr, "max_train_steps": steps},
                                                 previous)
        return (updates.get("learning_rate", gr.skip()), updates.get("max_train_steps", gr.skip()), suggested, note)

    for trigger in (base_box, widgets["method"]):
        trigger.change(on_base_or_method, inputs=[base_box, widgets["method"], widgets["learning_rate"],
                                                  widgets["max_train_steps"], suggestion],
                       outputs=[widgets["learning_rate"], widgets["max_train_steps"], suggestion, defaults_note],
                       api_name=False, queue=False, show_progress="hidden")

    def base_choices() -> Any:
        return gr.update(choices=finetune_base_choices(ctx.workspace))

    tab = gr.context.Context.block
    if isinstance(tab, gr.Tab):  # the dataset line and the base-model list follow other tabs without a reload
        tab.select(lambda: _dataset_line(ctx), outputs=dataset_line, api_name="finetune_dataset", queue=False)
        tab.select(base_choices, outputs=base_box, api_name="finetune_base_models", queue=False)
    plan_triggers = [widgets[n].change for n in ("pretrained_model_name_or_path", "method", "resolution",
                                                 "train_batch_size", "mixed_precision", "gradient_checkpointing",
                                                 "use_8bit_adam", "train_text_encoder", "cache_latents", "use_ema",
                                                 "rank", "with_prior_preservation") if n in widgets]
    gr.on(plan_triggers, lambda *values: memory_plan(ctx, dict(zip(INPUT_NAMES, values))), inputs=inputs,
          outputs=plan_md, api_name="finetune_memory_plan", show_progress="hidden")
    root = gr.context.Context.root_block
    if root is not None:
        root.load(lambda: (_dataset_line(ctx), *view_outputs(current_view())),
                  outputs=[dataset_line, status, loss_plot, gallery, run_path], api_name="finetune_on_load",
                  queue=False)
    return {"open_in_generate": open_button, "run_path": run_path, "status": status, "gallery": gallery,
            "engine_buttons": [start_button, resume_button]}


def _dataset_line(ctx: StudioContext) -> str:
    choice = ctx.dataset.get()
    captions = "with captions" if choice.has_captions else "no captions (set an instance prompt)"
    count = f"{choice.unsaid_count} images, " if choice.unsaid_count else ""
    return f"**Dataset:** {choice.summary} ({count}{captions}). Change it in the Dataset tab."


def _failure(exc: BaseException) -> str:
    return failure(exc, "Fine-tune")


__all__ = ["FIELDS", "INPUT_NAMES", "FinetuneView", "build_config", "build_finetune_tab", "cli_command",
           "config_json", "default_values", "memory_plan", "render", "resolution_for", "resume_latest",
           "start_finetune", "stop_finetune"]
