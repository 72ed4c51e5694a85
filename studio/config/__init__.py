"""Typed configuration for every task, shared by the UI, the CLI and the tests.

Each task's dataclass lives in its own module (``data``, ``train``, ``generate``,
``finetune``) so the modules stay small; ``base`` holds the JSON round trip and the
validation helpers. None of these modules imports torch or gradio.
"""
