"""The Generate tab: pick a model and a scheduler, write a prompt, get images.

Layout and event wiring live in ``build_generate_tab``; the work is done by plain
functions (``build_config``, ``load_model``, ``reuse_parameters``, ``stream_generation``)
that take and return plain values, so tests call them without Gradio running. Models,
schedulers and generation live in ``studio.models``, ``studio.schedulers`` and
``studio.generate`` (imported lazily where they pull in torch).

The model box accepts any reference (Hub id, folder, .safetensors file, run folder);
setting it to a local folder (as "Open in Generate" does) loads it at once, a Hub id is
one click on Load away. After a load, the scheduler list holds only the samplers that
model can use, and the prompt, guidance, size and LoRA controls show only when the
pipeline takes them. Generation streams progress and a cheap live preview; Stop sets a
flag the per-step callback checks (Gradio's ``cancels=`` cannot interrupt it).

Stop and progress belong to the browser session that started the request: each
request gets its own stop flag, filed under the session's hash in ``SessionStops``,
so Stop in one tab never ends another person's image. A request holds its device
under the job rule (``JobManager.use_device``): while a training job runs on the
device, Generate is refused with a message naming the job.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from studio.base_models import default_generate_model
from studio.config.generate import MAX_BATCH_COUNT, MAX_BATCH_SIZE, GenerateConfig
from studio.context import StudioContext
from studio.errors import ConfigError, StudioError, describe_exception
from studio.models import lora_choices, model_choices
from studio.pnginfo import config_updates, parse_parameters, read_png_parameters
from studio.schedulers import DEFAULT_SCHEDULER, SCHEDULER_NAMES
from tabs import GPU
from tabs.engine_gate import engine_button

log = logging.getLogger(__name__)

#: How often (seconds) the stream pushes a progress line without a new preview.
UPDATE_INTERVAL = 0.25
#: Live previews are enlarged to about this many pixels on the long side.
PREVIEW_SIDE = 256


@dataclass
class ModelView:
    """What the tab shows after a model load, as plain values.

    Attributes:
        status: One-line status.
        schedulers: Compatible scheduler names (the model's own first).
        prompt, negative, guidance, size, lora: Whether those controls apply to this pipeline.
        width, height: The model's native size.
        kind: "sd", "sdxl", "unconditional", ...
    """

    status: str
    schedulers: list[str]
    prompt: bool
    negative: bool
    guidance: bool
    size: bool
    lora: bool
    width: int
    height: int
    kind: str


def build_config(model: str, prompt: str, negative_prompt: str, width: float | int | None, height: float | int | None,
                 num_inference_steps: float | int | None, guidance_scale: float | int | None,
                 seed: float | int | None, batch_size: float | int | None, batch_count: float | int | None,
                 scheduler: str | None, lora: str | None, lora_scale: float | int | None) -> GenerateConfig:
    """Widget values -> a validated ``GenerateConfig``.

    Raises:
        ConfigError: for values out of range (sizes not multiples of 8, ...).
    """
    def whole(value: Any, label: str, default: int) -> int:
        if value is None or value == "":
            return default
        number = float(value)
        if number != int(number):
            raise ConfigError(f"{label} must be a whole number (got {value}).")
        return int(number)

    return GenerateConfig(
        model=(model or "").strip(),
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        width=whole(width, "Width", 0),
        height=whole(height, "Height", 0),
        num_inference_steps=whole(num_inference_steps, "Steps", 25),
        guidance_scale=float(guidance_scale if guidance_scale is not None else 7.0),
        seed=whole(seed, "Seed", -1),
        batch_size=whole(batch_size, "Batch size", 1),
        batch_count=whole(batch_count, "Batch count", 1),
        scheduler=scheduler or DEFAULT_SCHEDULER,
        lora=(lora or "").strip(),
        lora_scale=float(lora_scale if lora_scale is not None else 1.0),
    )


def load_model(ctx: StudioContext, reference: str,
               progress: Callable[[float, str], None] | None = None) -> ModelView:
    """Load ``reference`` into the app's pipeline manager and describe it.

    Raises:
        StudioError: when the reference cannot be resolved or loaded.
    """
    manager = ctx.pipelines
    started = time.perf_counter()
    loaded = manager.load(reference, progress=progress)
    caps = loaded.capabilities
    width, height = loaded.size
    what = "text-to-image" if caps["prompt"] else "unconditional (no prompt)"
    status = (f"Loaded {loaded.label}: {type(loaded.pipe).__name__}, {what}, {width}x{height}, "
              f"on {manager.device} in {time.perf_counter() - started:.1f} s.")
    return ModelView(status=status, schedulers=manager.scheduler_names(), prompt=caps["prompt"],
                     negative=caps["negative_prompt"], guidance=caps["guidance_scale"], size=caps["size"], lora=caps["lora"],
                     width=width, height=height, kind=loaded.kind)


def is_local_model(reference: str, workspace: Path) -> bool:
    """True when ``reference`` names a folder or file on this machine (cheap to load at once)."""
    text = (reference or "").strip()
    if not text:
        return False
    path = Path(text).expanduser()
    return path.exists() or (not path.is_absolute() and "/" not in text and (workspace / text).is_dir())


def reuse_parameters(path: str | Path, lookup: Any = None) -> tuple[dict[str, Any], list[str], list[list[str]]]:
    """Read an uploaded PNG's "parameters" into GenerateConfig field values, notes and every field read.

    Args:
        path: The PNG.
        lookup: ``studio.model_names.NameLookup`` finding models/LoRAs by name or hash (None: Hub ids only).

    Raises:
        ConfigError: when the file carries no parameters.
    """
    from studio.pnginfo import parameter_rows

    parsed = parse_parameters(read_png_parameters(path))
    updates, notes = config_updates(parsed, lookup)
    return updates, notes, parameter_rows(parsed)


def enlarge(image: Any, side: int = PREVIEW_SIDE) -> Any:
    """Scale a small preview (latents are 1/8 of the image) up so the page shows it at a useful size."""
    from PIL import Image

    longest = max(image.size)
    if longest >= side:
        return image
    factor = max(1, side // longest)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.BILINEAR)


def gallery_items(images: list[Any]) -> list[tuple[str, str]]:
    """(file, caption) pairs for the gallery: the saved PNG and its seed."""
    return [(str(img.path), f"seed {img.seed}") for img in images if img.path is not None]


class SessionStops:
    """The stop flags of running Generate requests, per browser session (thread-safe).

    One per app (made in ``build_generate_tab``). ``begin`` files a fresh flag for a
    session's request, ``stop`` sets the flags of that session only.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[str, list[threading.Event]] = {}

    def begin(self, session: str) -> threading.Event:
        """A new stop flag for a request of ``session``."""
        flag = threading.Event()
        with self._lock:
            self._flags.setdefault(session, []).append(flag)
        return flag

    def end(self, session: str, flag: threading.Event) -> None:
        """Forget ``flag`` (its request has ended)."""
        with self._lock:
            flags = self._flags.get(session, [])
            if flag in flags:
                flags.remove(flag)
            if not flags:
                self._flags.pop(session, None)

    def stop(self, session: str) -> int:
        """Set the flags of ``session``'s running requests; how many there were."""
        with self._lock:
            flags = list(self._flags.get(session, []))
        for flag in flags:
            flag.set()
        return len(flags)


def session_key(request: gr.Request | None) -> str:
    """The browser session a request comes from ("" outside a Gradio request)."""
    return str(getattr(request, "session_hash", "") or "") if request is not None else ""


def stream_generation(ctx: StudioContext, cfg: GenerateConfig,
                      stop: threading.Event | None = None) -> Iterator[dict[str, Any]]:
    """Run ``cfg`` in a worker thread and yield what to show as it goes.

    Args:
        ctx: The app context (its pipeline manager and job rule for the device).
        cfg: The request.
        stop: This request's stop flag (set by its session's Stop; set here when the
            stream is closed early).

    Yields:
        dicts with "progress" (text), optionally "preview" (PIL), "images" (finished
        GeneratedImage list), and finally "result" (GenerateResult) or "error" (message).
    """
    from studio.generate import generate

    manager = ctx.pipelines
    stop = stop if stop is not None else threading.Event()
    updates: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            with ctx.jobs.use_device(manager.device, "Generate"):
                outcome["result"] = generate(manager, cfg, on_progress=updates.put, stop=stop)
        except Exception as exc:  # noqa: BLE001 - reported to the page as a message
            outcome["error"] = exc
        finally:
            updates.put(None)

    worker = threading.Thread(target=work, name="studio-generate", daemon=True)
    worker.start()
    shown_images = 0
    last = 0.0
    try:
        while True:
            item = updates.get()
            if item is None:
                break
            now = time.monotonic()
            new_images = len(item.images) != shown_images
            if item.preview is None and not new_images and now - last < UPDATE_INTERVAL:
                continue
            last = now
            update: dict[str, Any] = {"progress": f"{item.message} ({item.fraction:.0%})"}
            if item.preview is not None:
                update["preview"] = enlarge(item.preview)
            if new_images:
                shown_images = len(item.images)
                update["images"] = item.images
            yield update
    finally:
        if worker.is_alive():  # nobody is watching any more (page closed): stop after this step
            stop.set()
    worker.join()
    if "error" in outcome:
        exc = outcome["error"]
        if not isinstance(exc, StudioError):
            log.error("Generation failed", exc_info=exc)
        yield {"error": describe_exception(exc)}
    else:
        yield {"result": outcome["result"]}


# --------------------------------------------------------------------------- layout and events


def build_generate_tab(ctx: StudioContext) -> dict:
    """Lay out the Generate tab and wire its events.

    Returns:
        {"model": the model box (other tabs set it to a run folder), "status": the status box}.
    """
    workspace = ctx.workspace
    help_ = GenerateConfig.help_for
    stops = SessionStops()
    with gr.Row():
        with gr.Column(scale=3):
            model = gr.Dropdown(model_choices(workspace), value=default_generate_model(), allow_custom_value=True,
                                label="Model", info=help_("model"), elem_id="gen-model", filterable=True)
        with gr.Column(scale=1, min_width=200):
            with gr.Row():
                load_button = engine_button("Load", variant="primary", elem_id="gen-load")
                refresh_button = gr.Button("↻ Refresh list", size="sm", elem_id="gen-refresh")
            download_button = gr.Button("Download for offline use", size="sm", elem_id="gen-download")
    model_status = gr.Textbox(label="Model status", interactive=False, elem_id="gen-model-status",
                              value="No model loaded. Pick one and press Load.", elem_classes=["studio-status"])
    with gr.Row():
        with gr.Column(scale=1, min_width=360):
            with gr.Group() as prompt_box:
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a watercolor fox in the snow",
                                    elem_id="gen-prompt")
                negative_prompt = gr.Textbox(label="Negative prompt", lines=2, elem_id="gen-negative-prompt",
                                             placeholder="blurry, low quality")
            scheduler = gr.Dropdown(list(SCHEDULER_NAMES), value=DEFAULT_SCHEDULER, label="Scheduler (sampler)",
                                    info="Only samplers the loaded model can use are listed.",
                                    elem_id="gen-scheduler")
            with gr.Row() as size_row:
                width = gr.Number(value=0, precision=0, minimum=0, step=8, label="Width",
                                  info="multiple of 8; 0 = model's size", elem_id="gen-width")
                height = gr.Number(value=0, precision=0, minimum=0, step=8, label="Height",
                                   info="multiple of 8; 0 = model's size", elem_id="gen-height")
            with gr.Row():
                steps = gr.Slider(1, 150, value=25, step=1, label="Steps", info=help_("num_inference_steps"),
                                  elem_id="gen-steps")
                guidance = gr.Slider(0, 20, value=7.0, step=0.5, label="Guidance scale (CFG)",
                                     info=help_("guidance_scale"), elem_id="gen-guidance")
            with gr.Row():
                seed = gr.Number(value=-1, precision=0, minimum=-1, label="Seed", info="-1 = random",
                                 elem_id="gen-seed")
                reuse_seed = gr.Button("♻ Last seed", size="sm", elem_id="gen-reuse-seed")
            with gr.Row():
                batch_size = gr.Slider(1, MAX_BATCH_SIZE, value=1, step=1, label="Batch size",
                                       info=help_("batch_size"), elem_id="gen-batch-size")
                batch_count = gr.Slider(1, min(MAX_BATCH_COUNT, 32), value=1, step=1, label="Batch count",
                                        info=help_("batch_count"), elem_id="gen-batch-count")
            with gr.Accordion("LoRA", open=False) as lora_box:
                lora = gr.Dropdown(lora_choices(workspace), value=None, allow_custom_value=True,
                                   label="LoRA (.safetensors or .bin file, or a Fine-tune run)", elem_id="gen-lora")
                lora_scale = gr.Slider(-1, 2, value=1.0, step=0.05, label="LoRA scale", info=help_("lora_scale"),
                                       elem_id="gen-lora-scale")
            plan_md = gr.Markdown("", elem_id="gen-memory-plan")
            with gr.Row():
                generate_button = engine_button("Generate", variant="primary", elem_id="gen-generate")
                stop_button = gr.Button("Stop", variant="stop", elem_id="gen-stop")
            with gr.Accordion("Reuse parameters from a PNG", open=False):
                reuse_file = gr.File(label="PNG saved by the studio or another SD tool", file_types=[".png"],
                                     type="filepath", elem_id="gen-reuse-file")
                reuse_table = gr.Dataframe(headers=["Field", "Value"], label="Read from the image (every field)",
                                           interactive=False, visible=False, wrap=True, elem_id="gen-reuse-table")
        with gr.Column(scale=1, min_width=360):
            progress_box = gr.Textbox(label="Progress", interactive=False, elem_id="gen-progress")
            preview = gr.Image(label="Live preview", type="pil", interactive=False, height=192,
                               elem_id="gen-preview")
            gallery = gr.Gallery(label="Results", columns=4, height="auto", object_fit="contain",
                                 elem_id="gen-gallery")
            info = gr.Textbox(label="Last result", interactive=False, elem_id="gen-info")
            used_seed = gr.Number(value=-1, precision=0, label="Seed used (first image)", interactive=False,
                                  elem_id="gen-used-seed")

    gpu = {"concurrency_id": GPU, "concurrency_limit": 1}
    model_outputs = [model_status, scheduler, prompt_box, negative_prompt, guidance, size_row, lora_box, width,
                     height]
    config_inputs = [model, prompt, negative_prompt, width, height, steps, guidance, seed, batch_size,
                     batch_count, scheduler, lora, lora_scale]

    def on_plan(w: Any, h: Any, b: Any, g: Any) -> str:
        try:
            from studio.budget import request_plan

            plan = request_plan(ctx.pipelines, int(w or 0), int(h or 0), int(b or 1), float(g or 0) > 1)
            return plan.markdown() if plan is not None else ""
        except Exception as exc:  # noqa: BLE001 - a half-typed size: say what is wrong, never a traceback
            return f"Memory plan: {describe_exception(exc)}"

    gr.on([width.change, height.change, batch_size.change], on_plan, inputs=[width, height, batch_size, guidance],
          outputs=plan_md, api_name="generate_memory_plan", show_progress="hidden")

    def view_updates(view: ModelView, current_scheduler: str | None) -> tuple:
        value = current_scheduler if current_scheduler in view.schedulers else DEFAULT_SCHEDULER
        return (view.status, gr.update(choices=view.schedulers, value=value), gr.update(visible=view.prompt),
                gr.update(visible=view.negative), gr.update(visible=view.guidance), gr.update(visible=view.size), gr.update(visible=view.lora),
                view.width, view.height)

    def load_failed(exc: Exception) -> tuple:
        message = describe_exception(exc)
        if not isinstance(exc, StudioError):
            log.exception("Model load failed")
        gr.Warning(message)
        return (f"Not loaded: {message}",) + (gr.update(),) * (len(model_outputs) - 1)

    def on_load(reference: str, current_scheduler: str, progress: gr.Progress = gr.Progress()) -> tuple:
        try:
            view = load_model(ctx, reference, progress=lambda f, m: progress(f, desc=m))
            return view_updates(view, current_scheduler)
        except Exception as exc:  # noqa: BLE001 - shown as a message, never a traceback
            return load_failed(exc)

    def on_model_change(reference: str, current_scheduler: str, progress: gr.Progress = gr.Progress()) -> tuple:
        text = (reference or "").strip()
        if not text:
            return (gr.update(),) * len(model_outputs)
        if not is_local_model(text, workspace):
            return (f"Selected {text}. Press Load to load it (a Hub model downloads on first use).",) + \
                (gr.update(),) * (len(model_outputs) - 1)
        return on_load(text, current_scheduler, progress)

    def on_download(reference: str, progress: gr.Progress = gr.Progress()) -> str:
        if not isinstance(reference, str) or not reference.strip():  # the API can send anything
            return "Not downloaded: type a model reference (a Hub id such as owner/name) first."
        try:
            return ctx.pipelines.prefetch(reference, progress=lambda f, m: progress(f, desc=m))
        except Exception as exc:  # noqa: BLE001
            message = describe_exception(exc)
            gr.Warning(message)
            return f"Not downloaded: {message}"

    def on_refresh() -> tuple:
        return gr.update(choices=model_choices(workspace)), gr.update(choices=lora_choices(workspace))

    def on_generate(model: str, prompt: str, negative_prompt: str, width: Any, height: Any, steps: Any,
                    guidance: Any, seed: Any, batch_size: Any, batch_count: Any, scheduler: str, lora: str,
                    lora_scale: Any, request: gr.Request) -> Iterator[tuple]:
        skip = gr.skip()
        try:
            cfg = build_config(model, prompt, negative_prompt, width, height, steps, guidance, seed, batch_size,
                               batch_count, scheduler, lora, lora_scale)
        except Exception as exc:  # noqa: BLE001
            message = describe_exception(exc)
            gr.Warning(message)
            yield skip, f"Not started: {message}", skip, skip, skip
            return
        yield None, "Starting…", skip, skip, skip
        session = session_key(request)
        stop = stops.begin(session)
        try:
            yield from _stream_updates(ctx, cfg, stop, skip)
        finally:
            stops.end(session, stop)

    def _stream_updates(ctx: StudioContext, cfg: GenerateConfig, stop: threading.Event, skip: Any) -> Iterator[tuple]:
        for update in stream_generation(ctx, cfg, stop):
            if "error" in update:
                gr.Warning(update["error"])
                yield skip, f"Failed: {update['error']}", skip, skip, skip
                return
            if "result" in update:
                result = update["result"]
                status = "Stopped." if result.stopped else "Done."
                used = result.images[0].seed if result.images else result.seed
                yield skip, status, gallery_items(result.images) if result.images else skip, result.summary, used
                return
            yield (update.get("preview", skip), update["progress"],
                   gallery_items(update["images"]) if "images" in update else skip, skip, skip)

    def on_stop(request: gr.Request) -> str:
        if not stops.stop(session_key(request)):
            return "Nothing of yours is generating."
        return "Stopping after the current step…"

    def on_reuse(path: str | None, current_scheduler: str) -> tuple:
        fields = [model, prompt, negative_prompt, width, height, steps, guidance, seed, scheduler, lora, lora_scale]
        names = ["model", "prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale",
                 "seed", "scheduler", "lora", "lora_scale"]
        if not path:
            return (gr.update(),) * len(fields) + (gr.update(), "")
        manager_loaded = ctx.pipelines.loaded if ctx.engine.ready else None
        try:
            from studio.model_names import NameLookup

            lookup = NameLookup(workspace, (manager_loaded.reference, manager_loaded.png())
                                if manager_loaded is not None else None)
            updates, notes, rows = reuse_parameters(path, lookup)
        except Exception as exc:  # noqa: BLE001
            message = describe_exception(exc)
            gr.Warning(message)
            return (gr.update(),) * len(fields) + (gr.update(value=[], visible=False), f"Not reused: {message}")
        offered = ctx.pipelines.scheduler_names() if manager_loaded is not None else list(SCHEDULER_NAMES)
        if updates.get("scheduler") not in offered:
            notes.append(f"Scheduler {updates.get('scheduler')!r} does not fit the loaded model; kept "
                         f"{current_scheduler}.")
            updates.pop("scheduler", None)
        values = tuple(updates[name] if name in updates else gr.update() for name in names)
        return values + (gr.update(value=rows, visible=True),
                         ("Parameters read from the image (all fields in the table). " + " ".join(notes)).strip())

    load_button.click(on_load, inputs=[model, scheduler], outputs=model_outputs, api_name="load_model", **gpu)
    model.change(on_model_change, inputs=[model, scheduler], outputs=model_outputs, api_name="select_model", **gpu)
    download_button.click(on_download, inputs=model, outputs=model_status, api_name="download_model")
    refresh_button.click(on_refresh, outputs=[model, lora], api_name="refresh_models", queue=False)
    generate_button.click(on_generate, inputs=config_inputs,
                          outputs=[preview, progress_box, gallery, info, used_seed],
                          api_name="generate", **gpu)
    stop_button.click(on_stop, outputs=progress_box, api_name="stop_generate", queue=False)
    reuse_seed.click(lambda value: value, inputs=used_seed, outputs=seed, api_name="reuse_seed", queue=False)
    reuse_file.upload(on_reuse, inputs=[reuse_file, scheduler],
                      outputs=[model, prompt, negative_prompt, width, height, steps, guidance, seed, scheduler,
                               lora, lora_scale, reuse_table, model_status], api_name="reuse_parameters")
    root = gr.context.Context.root_block
    if root is not None:
        root.load(on_refresh, outputs=[model, lora], api_name="refresh_models_on_load", queue=False)
    return {"model": model, "status": model_status, "engine_buttons": [load_button, generate_button]}


__all__ = ["ModelView", "build_config", "load_model", "is_local_model", "reuse_parameters", "gallery_items",
           "stream_generation", "build_generate_tab"]
