"""The generate tab (being built: see its issue)."""

from __future__ import annotations

import gradio as gr

from studio.context import StudioContext


def build_generate_tab(ctx: StudioContext) -> dict:
    gr.Markdown("This tab is being built.")
    return {}
