"""The Gradio app: one tab per file, assembled by ``build_app``.

Importing this package does nothing; ``build_app(settings)`` builds the Blocks
(tests call it without launching) and ``launch_kwargs(settings)`` says how to
launch it safely. Tabs receive the app-level ``StudioContext`` and return the
handful of components other tabs link to (e.g. "Open in Generate"), and under
"engine_buttons" the buttons that wait for the engine (``tabs.engine_gate``).
No tab imports torch while it is built: ``launch.py`` serves the page first and
then starts ``ctx.engine`` (torch, diffusers) in a background thread.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import gradio as gr

from studio.context import StudioContext
from studio.settings import LaunchSettings
from tabs.server import server_app_kwargs
from tabs.engine_gate import wire_engine_gate

ASSETS = Path(__file__).resolve().parent.parent / "assets"

#: (tab id, label, module, builder). The order is the order of the tabs.
TABS = (
    ("dataset", "Dataset", "tabs.dataset", "build_dataset_tab"),
    ("train", "Train", "tabs.train", "build_train_tab"),
    ("finetune", "Fine-tune", "tabs.finetune", "build_finetune_tab"),
    ("generate", "Generate", "tabs.generate", "build_generate_tab"),
)

#: Every GPU-bound event shares this concurrency id (one at a time on the device).
GPU = "gpu"


def build_app(settings: LaunchSettings, ctx: StudioContext | None = None) -> gr.Blocks:
    """Build the studio's Blocks (not launched).

    Args:
        settings: Launch settings (workspace, device, offline, queue size...).
        ctx: Shared state; a new one is made when None. Reachable afterwards as
            ``app.studio_context``.
    """
    ctx = ctx or StudioContext(settings)
    settings.workspace.mkdir(parents=True, exist_ok=True)
    with gr.Blocks(title="Diffusion Studio") as app:
        gr.Markdown("# Diffusion Studio\nPrepare a dataset, train or fine-tune a diffusion model, "
                    "and generate images — on this machine.", elem_id="studio-header")
        handles: dict[str, dict[str, Any]] = {}
        with gr.Tabs(elem_id="studio-tabs") as tabs:
            for tab_id, label, module, builder in TABS:
                with gr.Tab(label, id=tab_id, elem_id=f"tab-{tab_id}"):
                    handles[tab_id] = getattr(importlib.import_module(module), builder)(ctx) or {}
        _link_tabs(tabs, handles)
        wire_engine_gate(ctx.engine, [b for h in handles.values() for b in h.get("engine_buttons", ())])
    app.queue(max_size=settings.queue_size, default_concurrency_limit=4)
    app.studio_context = ctx
    return app


def _link_tabs(tabs: gr.Tabs, handles: dict[str, dict[str, Any]]) -> None:
    """Wire cross-tab buttons: a training tab's "Open in Generate" selects its run there."""
    model_box = handles.get("generate", {}).get("model")
    if model_box is None:
        return
    for source in ("train", "finetune"):
        button = handles.get(source, {}).get("open_in_generate")
        run_path = handles.get(source, {}).get("run_path")
        if button is None or run_path is None:
            continue
        button.click(lambda path: (gr.Tabs(selected="generate"), gr.update(value=path)),
                     inputs=run_path, outputs=[tabs, model_box], api_name=f"{source}_open_in_generate")


def launch_kwargs(settings: LaunchSettings) -> dict[str, Any]:
    """The keyword arguments for ``app.launch``: bind, auth, served paths, limits, theme.

    Only the workspace is added to Gradio's allowed paths (Gradio itself serves its
    own cache of files it created); nothing else on disk is reachable. Files are
    served inline only as raster images, anything else as a download with
    ``nosniff`` (``tabs.file_headers``): nothing served runs script in the page.
    """
    from starlette.middleware import Middleware

    from tabs.file_headers import SafeFileHeaders

    css_path = ASSETS / "theme.css"
    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "share": settings.share,
        "auth": list(settings.auth) or None,
        "auth_message": "Diffusion Studio: log in with the user and password printed at launch.",
        "allowed_paths": [str(settings.workspace)],
        "max_file_size": settings.max_file_size,
        "show_error": False,
        "theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="violet"),
        "css": css_path.read_text(encoding="utf-8") if css_path.is_file() else None,
        "footer_links": ["settings"],
        # nosniff/attachment headers for served files (tabs/file_headers.py); login rate limit,
        # 404 for unknown endpoints, no public route map (tabs/server.py)
        "app_kwargs": server_app_kwargs(extra_middleware=[Middleware(SafeFileHeaders)]),
    }
