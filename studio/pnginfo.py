"""The "parameters" PNG text chunk: write it the way other SD tools do, and read it back.

The format (AUTOMATIC1111's, also read by ComfyUI importers, Civitai and others)::

    a watercolor fox
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 42, Size: 512x512, Model: owner/name

The last line holds ``key: value`` pairs separated by commas; a value containing a comma
or a quote is written as a JSON string. ``parse_parameters`` reads this (and A1111's own
files, including its separate "Schedule type: Karras" field) and ``config_updates`` turns
it into ``GenerateConfig`` field values for "Reuse parameters".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from studio.errors import ConfigError

#: One "key: value" pair of the last line (A1111's own pattern).
_PARAM = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)\s*x\s*(\d+)$")


def quote(value: Any) -> str:
    """A parameter value as written: JSON-quoted when it holds a comma, colon, quote or newline."""
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """Undo ``quote``."""
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text[1:-1]
    return text


def format_parameters(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """Build the "parameters" text.

    Args:
        prompt: The prompt (may be empty for unconditional models).
        negative_prompt: The negative prompt (the line is left out when empty).
        params: Ordered key -> value for the last line (values are quoted as needed).
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """Read a "parameters" text into a dict.

    Returns:
        {"prompt": ..., "negative_prompt": ..., plus every key of the last line
        ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", ...)} as strings.

    Raises:
        ConfigError: when the text has no parameter line (not an SD tool's image).
    """
    lines = (text or "").strip("\n").split("\n")
    last = lines[-1] if lines else ""
    pairs = _PARAM.findall(last)
    if not any(key.strip() == "Steps" for key, _ in pairs):
        raise ConfigError("This image has no generation parameters the studio can read.",
                          "Upload a PNG saved by the studio or another Stable Diffusion tool.")
    body = lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result = {"prompt": "\n".join(prompt_lines).strip(), "negative_prompt": "\n".join(negative_lines).strip()}
    for key, value in pairs:
        result[key.strip()] = unquote(value)
    return result


def read_png_parameters(path: str | Path) -> str:
    """The "parameters" text of an image file.

    Raises:
        ConfigError: when the file is not an image or carries no parameters.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = image.info.get("parameters") or getattr(image, "text", {}).get("parameters")
    except (UnidentifiedImageError, OSError):
        raise ConfigError(f"{Path(path).name} is not an image the studio can read.") from None
    if not text:
        raise ConfigError(f"{Path(path).name} carries no generation parameters.",
                          "Only PNGs saved by the studio (or A1111-style tools) hold them; many sites strip them.")
    return str(text)


def config_updates(parsed: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Map parsed parameters to ``GenerateConfig`` field values.

    Returns:
        (updates, notes): field name -> value for what could be read, and one note per
        value that could not be used (e.g. a sampler the studio does not know).
    """
    from studio.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

    updates: dict[str, Any] = {"prompt": parsed.get("prompt", ""), "negative_prompt": parsed.get("negative_prompt", "")}
    notes: list[str] = []

    def number(key: str, field: str, cast: type) -> None:
        if key in parsed:
            try:
                updates[field] = cast(float(parsed[key])) if cast is int else cast(parsed[key])
            except ValueError:
                notes.append(f"{key} {parsed[key]!r} is not a number; kept the current value.")

    number("Steps", "num_inference_steps", int)
    number("CFG scale", "guidance_scale", float)
    number("Seed", "seed", int)
    if "Size" in parsed:
        match = _SIZE.match(parsed["Size"].strip())
        if match:
            updates["width"], updates["height"] = int(match[1]), int(match[2])
        else:
            notes.append(f"Size {parsed['Size']!r} is not WIDTHxHEIGHT; kept the current size.")
    sampler = parsed.get("Sampler", "").strip()
    schedule = parsed.get("Schedule type", "").strip()
    if schedule and schedule.lower() not in ("automatic", "uniform") and f"{sampler} {schedule}" in SCHEDULERS:
        sampler = f"{sampler} {schedule}"
    if sampler in SCHEDULERS:
        updates["scheduler"] = sampler
    elif sampler:
        updates["scheduler"] = DEFAULT_SCHEDULER
        if not sampler.endswith("(default)"):
            notes.append(f"Sampler {sampler!r} is not in the studio's list; using the model's own.")
    if parsed.get("Model"):
        updates["model"] = parsed["Model"]
    if parsed.get("Lora"):
        updates["lora"] = parsed["Lora"]
        number("Lora scale", "lora_scale", float)
    else:
        updates["lora"] = ""
    return updates, notes
