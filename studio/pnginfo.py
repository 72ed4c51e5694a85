"""The "parameters" PNG text chunk: write it the way AUTOMATIC1111 does, and read it back.

The format (AUTOMATIC1111's, also read by ComfyUI importers, Civitai and others)::

    a watercolor fox <lora:fox-style-kohya:0.8>
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 512x512,
    Model hash: 6ce0161689, Model: owner/name, Lora hashes: "fox-style-kohya: 0123456789ab"

(the last line is one line). It holds ``key: value`` pairs separated by commas; a value
containing a comma, colon or quote is written as a JSON string. Sampler names are A1111's
(``studio.schedulers.A1111_NAMES``), with the schedule as its own field as A1111 >= 1.9
writes it; a studio sampler A1111 lacks (or the model's own) also goes under ``Studio
sampler``. Model and LoRA names and hashes come from ``studio.model_names``.

``parse_parameters`` reads this (old combined "DPM++ 2M Karras" names too), and
``config_updates`` turns it into ``GenerateConfig`` field values for "Reuse
parameters", saying in notes what it could not use.
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


def lora_hashes(text: str) -> dict[str, str]:
    """A1111's ``Lora hashes`` value ("a: 0123, b: 4567") -> {name: hash}."""
    out = {}
    for part in (text or "").split(","):
        name, _, value = part.partition(":")
        if name.strip() and value.strip():
            out[name.strip()] = value.strip()
    return out


def config_updates(parsed: dict[str, str], lookup: Any = None) -> tuple[dict[str, Any], list[str]]:
    """Map parsed parameters to ``GenerateConfig`` field values.

    Args:
        parsed: What ``parse_parameters`` returned.
        lookup: A ``studio.model_names.NameLookup`` that finds models and LoRAs by the
            names and hashes in the PNG (None: Hub ids and bundled names only).

    Returns:
        (updates, notes): field name -> value for what could be read, and one note per
        value that could not be used (e.g. a sampler the studio does not know).
    """
    from studio.model_names import NameLookup, split_lora_tags
    from studio.schedulers import DEFAULT_SCHEDULER, SCHEDULER_NAMES, from_a1111

    lookup = lookup if lookup is not None else NameLookup(None)
    prompt, tags, others = split_lora_tags(parsed.get("prompt", ""))
    updates: dict[str, Any] = {"prompt": prompt, "negative_prompt": parsed.get("negative_prompt", "")}
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
    updates.update(_scheduler(parsed, notes, DEFAULT_SCHEDULER, SCHEDULER_NAMES, from_a1111))
    name, short_hash = parsed.get("Model", ""), parsed.get("Model hash", "")
    if name or short_hash:
        reference, note = lookup.model(name, short_hash)
        if reference:
            updates["model"] = reference
        if note:
            notes.append(note)
    hashes = lora_hashes(parsed.get("Lora hashes", ""))
    updates["lora"] = ""
    if tags:
        lora_name, scale = tags[0]
        found = lookup.lora(lora_name, hashes.get(lora_name, ""))
        if found:
            updates["lora"], updates["lora_scale"] = found, scale
        else:
            notes.append(f"LoRA {lora_name!r} is not a Fine-tune run of this workspace; the LoRA is left empty.")
        notes.extend(f"The studio applies one LoRA at a time; {extra!r} was left out." for extra, _ in tags[1:])
    elif parsed.get("Lora"):  # what the studio wrote before it used A1111's <lora:...> tags
        updates["lora"] = parsed["Lora"]
        number("Lora scale", "lora_scale", float)
    notes.extend(f"{tag} is not something the studio applies; it was taken out of the prompt." for tag in others)
    return updates, notes


def _scheduler(parsed: dict[str, str], notes: list[str], default: str, names: tuple[str, ...],
               from_a1111: Any) -> dict[str, str]:
    studio = parsed.get("Studio sampler", "").strip()
    if studio in names:
        return {"scheduler": studio}
    sampler, schedule = parsed.get("Sampler", "").strip(), parsed.get("Schedule type", "").strip()
    if not sampler:
        return {}
    entry = from_a1111(sampler, schedule)
    if entry is None and schedule:
        entry = from_a1111(sampler, "Uniform")
        if entry is not None:
            notes.append(f"Schedule type {schedule!r} is not in the studio; using {entry} with its usual spacing.")
    if entry is not None:
        return {"scheduler": entry}
    if not sampler.endswith("(default)"):
        notes.append(f"Sampler {sampler!r} is not in the studio's list; using the model's own.")
    return {"scheduler": default}


def parameter_rows(parsed: dict[str, str]) -> list[list[str]]:
    """Every field read from a PNG as [field, value] rows, prompt first (what "Reuse" shows)."""
    rows = [["Prompt", parsed.get("prompt", "")]]
    if parsed.get("negative_prompt"):
        rows.append(["Negative prompt", parsed["negative_prompt"]])
    rows += [[key, value] for key, value in parsed.items() if key not in ("prompt", "negative_prompt")]
    return rows
