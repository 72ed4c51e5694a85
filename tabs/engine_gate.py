"""Buttons that need the engine: "loading the engine…" and disabled until it is ready.

A tab makes such a button with ``engine_button(label, ...)`` and returns it in its
handles under "engine_buttons"; ``tabs.build_app`` wires them all to one gate: a page
load shows their current state at once, and while the engine loads a ``gr.Timer``
polls ``ctx.engine`` and, once it is ready, gives every button its label back and
stops itself. If loading failed, the buttons stay disabled and say why.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.engine import FAILED, EngineLoader

LOADING_LABEL = "loading the engine…"
FAILED_LABEL = "engine failed to load (see the terminal)"
POLL_SECONDS = 0.5


def engine_button(label: str, **kwargs: Any) -> gr.Button:
    """A ``gr.Button`` that starts disabled, saying "loading the engine…"; its label comes back when ready."""
    button = gr.Button(LOADING_LABEL, interactive=False, **kwargs)
    button.ready_label = label
    return button


def button_updates(engine: EngineLoader, buttons: list[gr.Button]) -> list[dict[str, Any]]:
    """The update for each button in the engine's current state."""
    if engine.ready:
        return [gr.update(value=b.ready_label, interactive=True) for b in buttons]
    label = FAILED_LABEL if engine.state == FAILED else LOADING_LABEL
    return [gr.update(value=label, interactive=False) for _ in buttons]


def wire_engine_gate(engine: EngineLoader, buttons: list[gr.Button]) -> gr.Timer:
    """Keep ``buttons`` in step with ``engine`` on every page (call inside the Blocks)."""
    timer = gr.Timer(POLL_SECONDS, active=not engine.ready)

    def refresh() -> tuple:
        settled = engine.ready or engine.state == FAILED
        return (gr.Timer(active=not settled), *button_updates(engine, buttons))

    outputs = [timer, *buttons]
    timer.tick(refresh, outputs=outputs, api_name=False, queue=False, show_progress="hidden")
    root = gr.context.Context.root_block
    if root is not None:
        root.load(refresh, outputs=outputs, api_name=False, queue=False, show_progress="hidden")
    return timer


__all__ = ["LOADING_LABEL", "FAILED_LABEL", "engine_button", "button_updates", "wire_engine_gate"]
