"""Trainers: plain functions ``train(cfg, events, stop, run=None) -> RunDir``.

``ddpm`` trains an unconditional DDPM from scratch. Trainers report through an
``EventSink`` and listen to a ``threading.Event``; they never import gradio.
Importing this package imports nothing heavy: import the trainer module you need.
"""
