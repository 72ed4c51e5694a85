"""Base models a fine-tune can start from: the Fine-tune tab's list, its default, a model's native size.

A fine-tune needs a Stable Diffusion pipeline (SD 1.x/2.x or SDXL: a
``UNet2DConditionModel``, a VAE, a text encoder). ``finetune_base_choices`` lists the
ones the studio can see without loading anything, in this order:

    bundled models       text-to-image pipelines shipped in assets/models (``studio.bundled``)
    workspace runs       Train/Fine-tune runs whose exported ``model/`` is an SD pipeline
    cached Hub pipelines SD pipelines in the Hugging Face cache (works offline)
    curated Hub ids      well-known SD bases (download on first use; online only)

and the dropdown still takes any other reference (a folder, a ``.safetensors`` file, a Hub
id). ``default_base_model`` is the first bundled text-to-image model (the bundled emoji SD),
so Start works offline from the first click. ``finetune_defaults`` gives the learning rate and
steps that suit a base (one table, ``FINETUNE_DEFAULTS``). ``native_resolution`` reads a local pipeline's
configs (UNet sample size x VAE scale), so the tab can train at the size the model knows.

Torch-free and offline: only JSON files and the cache index are read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from studio.bundled import PREFIX as BUNDLED_PREFIX
from studio.bundled import bundled_models, find_bundled
from studio.model_refs import CURATED_MODELS
from studio.runs import list_runs

#: Pipeline classes the fine-tune trainer takes (``model_index.json``'s ``_class_name``).
FINETUNE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")

#: Native resolution of the curated Hub ids that are fine-tunable SD bases (the others are not offered).
CURATED_RESOLUTIONS: dict[str, int] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": 512,
    "stabilityai/stable-diffusion-2-1": 768,
    "stabilityai/stable-diffusion-xl-base-1.0": 1024,
    "gsdf/Counterfeit-V2.5": 512,
}


#: Fine-tune settings that suit a base model better than ``FinetuneConfig``'s defaults (which are
#: chosen for SD-1.5-sized bases), by base reference and method. A base or method not listed keeps the
#: config's defaults. The bundled emoji SD is tiny: with LoRA at the usual 1e-4 its images barely
#: move in 200 steps, at 1e-3 they get 62 % of the way to the person's images; a full fine-tune at
#: 1e-4 gets 71 % of the way in 200 steps, so 500 is more than it needs (``benchmarks/finetune_defaults.py``,
#: benchmarks/README.md). DreamBooth trains the same weights as its method and takes its values.
FINETUNE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "bundled:emoji-sd": {
        "lora": {"learning_rate": 1e-3, "max_train_steps": 200},
        "dreambooth-lora": {"learning_rate": 1e-3, "max_train_steps": 200},
        "full": {"learning_rate": 1e-4, "max_train_steps": 200},
        "dreambooth-full": {"learning_rate": 1e-4, "max_train_steps": 200},
    },
}
#: The fields ``FINETUNE_DEFAULTS`` may set.
FINETUNE_DEFAULT_FIELDS = ("learning_rate", "max_train_steps")


def finetune_defaults(reference: str, method: str) -> dict[str, Any]:
    """The learning rate and steps a fine-tune of base ``reference`` with ``method`` starts from:
    ``FINETUNE_DEFAULTS``' entry (a bundled model named by path or bare name counts as itself),
    else ``FinetuneConfig``'s defaults."""
    from studio.config.finetune import FinetuneConfig

    fields = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name in FINETUNE_DEFAULT_FIELDS}
    return {**fields, **tuned_finetune_defaults(reference, method)}


def tuned_finetune_defaults(reference: str, method: str) -> dict[str, Any]:
    """``FINETUNE_DEFAULTS``' entry for base ``reference`` and ``method`` ({} when the config's defaults apply)."""
    return dict(FINETUNE_DEFAULTS.get(_table_key(reference), {}).get(method, {}))


def _table_key(reference: str) -> str:
    """``bundled:<name>`` for a bundled model named any way (reference, bare name, its folder), else the text."""
    text = reference.strip() if isinstance(reference, str) else ""
    if not text:
        return ""
    bundled = find_bundled(text)
    if bundled is not None and (text.startswith(BUNDLED_PREFIX) or not Path(text).exists()):
        return bundled.reference
    try:
        folder = Path(text).expanduser().resolve()
    except (OSError, ValueError):
        return text
    return next((m.reference for m in bundled_models() if m.path.resolve() == folder), text)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pipeline_class(folder: str | Path) -> str:
    """The ``_class_name`` in ``folder/model_index.json`` ("" when there is none or it is unreadable)."""
    data = _read_json(Path(folder) / "model_index.json")
    name = data.get("_class_name") if data else None
    return name if isinstance(name, str) else ""


def is_finetunable(folder: str | Path) -> bool:
    """True when ``folder`` holds a pipeline the fine-tune trainer takes (SD 1.x/2.x or SDXL)."""
    return pipeline_class(folder) in FINETUNE_PIPELINES


def bundled_text_to_image() -> list:
    """The bundled models (present on disk) that are Stable Diffusion pipelines, in table order."""
    return [m for m in bundled_models() if is_finetunable(m.path)]


def default_base_model() -> str:
    """The Fine-tune tab's default base model: the first bundled text-to-image model, or "" when none ships."""
    found = bundled_text_to_image()
    return found[0].reference if found else ""


def default_generate_model() -> str | None:
    """The Generate tab's default model: a bundled text-to-image model first, else the first bundled one."""
    found = bundled_text_to_image() or bundled_models()
    return found[0].reference if found else None


def cached_pipelines() -> dict[str, Path]:
    """Repo id -> snapshot folder of every diffusers pipeline in the Hugging Face cache (newest revision)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache folder yet, or one we cannot read: nothing is cached
        return {}
    found: dict[str, Path] = {}
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            if any(f.file_name == "model_index.json" and f.file_path.parent == revision.snapshot_path
                   for f in revision.files):
                found[repo.repo_id] = revision.snapshot_path
                break
    return dict(sorted(found.items()))


def finetune_base_choices(workspace: str | Path | None) -> list[tuple[str, str]]:
    """(label, value) pairs for the Fine-tune base-model dropdown (see the module docstring for the order)."""
    choices = [(f"{m.name} ({m.description})", m.reference) for m in bundled_text_to_image()]
    if workspace is not None:
        for run in list_runs(workspace):
            if run.has_model and is_finetunable(run.path / "model"):
                choices.append((f"run: {run.name}", str(run.path)))
    seen = {value for _, value in choices}
    for repo, folder in cached_pipelines().items():
        if repo not in seen and is_finetunable(folder):
            choices.append((f"{repo} (cached)", repo))
            seen.add(repo)
    for repo, note in CURATED_MODELS:
        if repo in CURATED_RESOLUTIONS and repo not in seen:
            choices.append((f"{repo} ({note}, downloads)", repo))
            seen.add(repo)
    return choices


def local_pipeline_folder(reference: str, workspace: str | Path | None = None) -> Path | None:
    """The diffusers folder a reference names on this machine, without loading or downloading anything.

    A bundled model, a pipeline folder, a run (its ``model/``), a run name of ``workspace``,
    or a Hub id that is cached. None for anything else (a file, an uncached id, a LoRA run).
    """
    text = reference.strip() if isinstance(reference, str) else ""
    if not text:
        return None
    try:
        return _find_folder(text, workspace)
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte...: not a folder here
        return None


def _find_folder(text: str, workspace: str | Path | None) -> Path | None:
    bundled = find_bundled(text)
    if bundled is not None and (text.startswith(BUNDLED_PREFIX) or not Path(text).exists()):
        return bundled.path
    candidates = [Path(text).expanduser()]
    if workspace is not None and not candidates[0].is_absolute():
        candidates.append(Path(workspace) / text)
    for path in candidates:
        for folder in (path, path / "model"):
            if (folder / "model_index.json").is_file():
                return folder
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return cached_pipelines().get(text.split("@")[0].split(":")[0])
    return None


def native_resolution(reference: str, workspace: str | Path | None = None) -> int | None:
    """The image size (pixels) a base model was trained at, when its configs can be read; else None.

    UNet ``sample_size`` times the VAE's downsampling (2 ** (levels - 1)); a curated Hub id
    that is not cached answers from ``CURATED_RESOLUTIONS``.
    """
    folder = local_pipeline_folder(reference, workspace)
    if folder is None:
        return CURATED_RESOLUTIONS.get(reference.strip()) if isinstance(reference, str) else None
    unet = _read_json(folder / "unet" / "config.json") or {}
    vae = _read_json(folder / "vae" / "config.json") or {}
    size = unet.get("sample_size")
    levels = vae.get("block_out_channels")
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    if not isinstance(size, int) or not isinstance(levels, list) or not levels:
        return None
    return size * 2 ** (len(levels) - 1)
