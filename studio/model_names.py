"""Names and short hashes other SD tools use for models and LoRAs, both ways.

AUTOMATIC1111 writes ``Model hash`` (the first 10 hex digits of the checkpoint file's
SHA-256), ``Model`` (the checkpoint's file stem) and ``Lora hashes`` (``name: hash``,
the first 12 hex digits of the SHA-256 of a safetensors file's tensor data, kohya's
"addnet" hash, or of the whole file for other formats) into PNG parameters. This module
computes those for whatever the studio loaded (``png_model``, ``png_lora``): a diffusers
folder or Hub pipeline has no single checkpoint file, so its hash is that of its
UNet's (or transformer's) weight file. Names never carry a local path: a Hub id, a run
name, a bundled model's name or a file/folder stem.

The way back (``NameLookup``) turns a name or hash read from a PNG into something the
studio can load, or says why not: the loaded model, a bundled model, a workspace run,
a Hub id, or a well-known A1111 checkpoint name mapped to its Hub id.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: File stems of official checkpoints as A1111 users have them -> the Hub pipeline with those weights.
KNOWN_CHECKPOINTS: dict[str, str] = {
    "v1-5-pruned-emaonly": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "v1-5-pruned": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "v2-1_768-ema-pruned": "stabilityai/stable-diffusion-2-1",
    "v2-1_768-nonema-pruned": "stabilityai/stable-diffusion-2-1",
    "v2-1_512-ema-pruned": "stabilityai/stable-diffusion-2-1-base",
    "sd_xl_base_1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd_xl_base_1.0_0.9vae": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd_xl_refiner_1.0": "stabilityai/stable-diffusion-xl-refiner-1.0",
    "sd_xl_turbo_1.0": "stabilityai/sdxl-turbo",
    "sd_xl_turbo_1.0_fp16": "stabilityai/sdxl-turbo",
    "Counterfeit-V2.5": "gsdf/Counterfeit-V2.5",
    "Counterfeit-V2.5_fp16": "gsdf/Counterfeit-V2.5",
    "Counterfeit-V2.5_pruned": "gsdf/Counterfeit-V2.5",
}

_HASHES: dict[tuple[str, int, int, bool], str] = {}
_HASHES_LOCK = threading.Lock()
_CHUNK = 1 << 20


def sha256_of(path: str | Path, tensor_data_only: bool = False) -> str:
    """SHA-256 hex digest of a file (memoised by path, size and mtime).

    Args:
        path: The file.
        tensor_data_only: For a safetensors file, hash only what follows its JSON header
            (kohya's "addnet" hash, which A1111 uses for LoRAs: metadata edits do not change it).
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, tensor_data_only)
    with _HASHES_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if tensor_data_only:
            header = int.from_bytes(fh.read(8), "little")
            fh.seek(8 + header)
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _HASHES_LOCK:
        _HASHES[key] = value
    return value


def checkpoint_short_hash(path: str | Path) -> str:
    """A1111's ``Model hash`` of a checkpoint file: SHA-256, first 10 hex digits."""
    return sha256_of(path)[:10]


def lora_short_hash(path: str | Path) -> str:
    """A1111's hash of a LoRA in ``Lora hashes``: addnet SHA-256 (safetensors) or file SHA-256, 12 digits."""
    return sha256_of(path, tensor_data_only=str(path).endswith(".safetensors"))[:12]


def pipeline_weights_file(folder: str | Path, variant: str | None = None) -> Path | None:
    """The UNet's (or transformer's) weight file of a diffusers folder: what its ``Model hash`` is of."""
    folder = Path(folder)
    for sub in ("unet", "transformer"):
        part = folder / sub
        if not part.is_dir():
            continue
        stems = [f"diffusion_pytorch_model.{variant}", "diffusion_pytorch_model"] if variant else \
            ["diffusion_pytorch_model"]
        for stem in stems:
            for suffix in (".safetensors", ".bin"):
                if (part / (stem + suffix)).is_file():
                    return part / (stem + suffix)
        found = sorted(part.glob("*.safetensors")) or sorted(part.glob("*.bin"))
        if found:
            return found[0]
    return None


def _run_of(path: Path) -> Path | None:
    """The run folder a ``model/`` or ``lora/`` folder belongs to, if it is one."""
    parent = path.parent
    return parent if (parent / "config.json").is_file() and path.name in ("model", "lora") else None


@dataclass(frozen=True)
class PngModel:
    """What a model is called in PNG parameters: ``Model`` and ``Model hash`` (None when unknown)."""

    name: str
    short_hash: str | None


def png_model(ref: Any) -> PngModel:
    """``Model``/``Model hash`` for a resolved ``studio.model_refs.ModelRef`` (a LoRA run: its base)."""
    from studio.bundled import bundled_models

    if ref.kind == "lora-run":
        return png_model(ref.base)
    if ref.kind == "file":
        return PngModel(Path(ref.location).stem, checkpoint_short_hash(ref.location))
    if ref.kind == "hub":
        return PngModel(ref.text, _short(_hub_weights(ref)))
    location = Path(ref.location)
    bundled = next((m for m in bundled_models() if Path(m.path).resolve() == location.resolve()), None)
    run = _run_of(location)
    name = bundled.name if bundled is not None else (run.name if run is not None else location.name)
    return PngModel(name, _short(pipeline_weights_file(location)))


def _short(path: Path | None) -> str | None:
    return checkpoint_short_hash(path) if path is not None else None


def _hub_weights(ref: Any) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(ref.location, "model_index.json", revision=ref.revision)
    return pipeline_weights_file(Path(hit).parent, ref.variant) if isinstance(hit, str) else None


def png_lora(path: str | Path) -> tuple[str, Path]:
    """(name for ``<lora:name:scale>``, file whose hash goes into ``Lora hashes``) of a LoRA file.

    A Fine-tune run's LoRA is named for the kohya file A1111 loads (``<run>-kohya``).
    """
    path = Path(path)
    run = _run_of(path.parent)
    if run is not None:
        kohya = path.parent / f"{run.name}-kohya.safetensors"
        return (kohya.stem, kohya) if kohya.is_file() else (run.name, path)
    return path.stem, path


# --------------------------------------------------------------------------- names read back
_LORA_TAG = re.compile(r"<(lora|lyco):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)
_OTHER_TAG = re.compile(r"<(hypernet|embedding|ti):[^>]*>", re.IGNORECASE)


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]], list[str]]:
    """Take A1111's ``<lora:name:scale>`` tags out of a prompt.

    Returns:
        (prompt without the tags, [(name, scale)], other extra-network tags that were removed).
    """
    loras: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        try:
            scale = float(match[3]) if match[3] not in (None, "") else 1.0
        except ValueError:
            scale = 1.0
        loras.append((match[2].strip(), scale))
        return ""

    text = _LORA_TAG.sub(take, prompt)
    others = [m.group(0) for m in _OTHER_TAG.finditer(text)]
    text = _OTHER_TAG.sub("", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"\s+([,.])", r"\1", text).strip(" ,\n")
    return text, loras, others


class NameLookup:
    """Finds what a PNG's ``Model``/``Model hash`` and LoRA names refer to, here.

    Args:
        workspace: The workspace whose runs (models and LoRAs) are known.
        loaded: The loaded model's ``(reference, PngModel)``, if any.
    """

    def __init__(self, workspace: str | Path | None, loaded: tuple[str, PngModel] | None = None) -> None:
        self.workspace = Path(workspace) if workspace is not None else None
        self.loaded = loaded

    def _runs(self) -> list[Any]:
        from studio.runs import list_runs

        return list_runs(self.workspace) if self.workspace is not None else []

    def model(self, name: str, short_hash: str = "") -> tuple[str | None, str]:
        """(reference to put in the model box or None, a note for the person; "" when nothing to say)."""
        from studio.bundled import find_bundled
        from studio.model_refs import _HUB_ID

        name, short_hash = name.strip(), short_hash.strip().lower()
        if self.loaded is not None:
            reference, current = self.loaded
            if (short_hash and current.short_hash == short_hash) or (name and name == current.name):
                return reference, ""
        if not name:
            return None, ""
        if Path(name).is_absolute() and Path(name).exists():  # what the studio wrote before it used names
            return name, ""
        bundled = find_bundled(name)
        if bundled is not None:
            return bundled.reference, ""
        for run in self._runs():
            if run.name == name and (run.has_model or run.has_lora):
                return str(run.path), ""
        if _HUB_ID.match(name):
            return name, ""
        stem = Path(name).stem if name.endswith((".safetensors", ".ckpt")) else name
        if stem in KNOWN_CHECKPOINTS:
            hub = KNOWN_CHECKPOINTS[stem]
            return hub, f"Model {name!r} is an A1111 checkpoint name; using its Hub id {hub}."
        return None, (f"Model {name!r} is a checkpoint name, not a Hub id, and no model here matches it "
                      "(nor its hash); kept the current model.")

    def lora(self, name: str, short_hash: str = "") -> str | None:
        """The workspace run (or file) a LoRA name or hash from a PNG refers to, or None."""
        from studio.model_refs import find_lora_file
        from studio.errors import ModelError

        runs = [run for run in self._runs() if run.has_lora]
        for run in runs:
            if name in (run.name, f"{run.name}-kohya"):
                return str(run.path)
        if short_hash:
            for run in runs:
                try:
                    files = [find_lora_file(run.path), *sorted((run.path / "lora").glob("*-kohya.safetensors"))]
                except ModelError:
                    continue
                if any(lora_short_hash(f) == short_hash.lower() for f in files):
                    return str(run.path)
        return None
