"""Model references: what a person types or picks as the model, resolved and checked.

A *model reference* is what a person types or picks in the Generate tab:

    owner/name[@revision][:variant]   a Hugging Face Hub id (e.g. stabilityai/sdxl-turbo)
    /path/to/folder                   a diffusers pipeline folder (has model_index.json)
    /path/to/model.safetensors        a single-file checkpoint (SD 1.x/2.x/XL/3, FLUX); also
                                      .ckpt/.pt/.bin, read through torch's restricted unpickler
    /path/to/<run> or a run name      a run of this workspace: ``model/`` (Train, full
                                      fine-tune) or ``lora/`` + the base model in config.json
    bundled:<name> (or <name>)        a model shipped in assets/models (``studio.bundled``)

This module is responsible for turning that text into a ``ModelRef`` (or a ``ModelError``
that says what to do) without loading anything: ``resolve_reference`` (Hub id parsing and
cheap Hub/cache checks, local folders and files, workspace runs), ``resolve_lora`` and
``find_lora_file`` for LoRA weights, offline detection (``is_offline``: ``--offline`` or
``HF_HUB_OFFLINE``; offline only the Hugging Face cache is looked at), and the dropdown
choices (bundled models first, then workspace runs, cached Hub pipelines and
``CURATED_MODELS``). Loading the
resolved reference lives in ``studio.models``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from studio.bundled import PREFIX as BUNDLED_PREFIX
from studio.bundled import bundled_models, find_bundled
from studio.errors import ModelError
from studio.runs import list_runs
from studio.torch_weights import PLAIN_PICKLE_SUFFIXES, TORCH_SUFFIXES

#: Well-known Hub pipelines offered in the dropdown (id, short description).
CURATED_MODELS: tuple[tuple[str, str], ...] = (
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "SD 1.5"),
    ("stabilityai/stable-diffusion-2-1", "SD 2.1"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "SDXL"),
    ("stabilityai/sdxl-turbo", "SDXL Turbo"),
    ("gsdf/Counterfeit-V2.5", "anime, SD 1.x"),
    ("google/ddpm-cifar10-32", "unconditional 32 px"),
    ("google/ddpm-celebahq-256", "unconditional faces 256 px"),
)

#: Pickle weight files: torch's (read only through the restricted unpickler) and plain pickles (refused).
PICKLE_SUFFIXES = TORCH_SUFFIXES + PLAIN_PICKLE_SUFFIXES
#: Single-file checkpoints and LoRA files the studio reads.
WEIGHT_FILE_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)

#: Keys a Fine-tune run's config.json may use for its base model (first found wins).
BASE_MODEL_KEYS = ("pretrained_model_name_or_path", "base_model", "model", "model_id")

_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
    r"(?:@(?P<revision>[A-Za-z0-9._/-]+?))?(?::(?P<variant>[A-Za-z0-9_-]+))?$"
)

_LOGIN_HINT = "Log in with `hf auth login` (or set the HF_TOKEN environment variable) and try again."


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference.

    Attributes:
        text: The reference as given (what metadata and the UI show).
        kind: "hub", "folder", "file" or "lora-run".
        location: Hub repo id, or the folder/file to load.
        revision: Hub revision (branch, tag or commit), if any.
        variant: Weight variant such as "fp16", if any.
        base: For "lora-run": the base model the LoRA was trained on.
        lora: For "lora-run": the LoRA weights file.
        label: Short name for the UI and the PNG "Model" field.
    """

    text: str
    kind: str
    location: str
    revision: str | None = None
    variant: str | None = None
    base: "ModelRef | None" = None
    lora: Path | None = None
    label: str = ""


def is_offline(offline: bool = False) -> bool:
    """True when the Hub must not be contacted (flag, or HF_HUB_OFFLINE in the environment)."""
    if offline:
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- resolve


def resolve_reference(reference: str, workspace: str | Path | None = None, offline: bool = False) -> ModelRef:
    """Turn a model reference into a ``ModelRef``, checking what can be checked cheaply.

    Args:
        reference: Hub id, folder, ``.safetensors`` file, run folder or run name.
        workspace: Workspace whose run names are accepted as references.
        offline: Never contact the Hub (also when ``HF_HUB_OFFLINE`` is set).

    Raises:
        ModelError: with a message saying what is wrong and what to do.
    """
    text = (reference or "").strip()
    if not text:
        raise ModelError("No model chosen.",
                         "Pick one from the list, or type a Hub id such as "
                         "stable-diffusion-v1-5/stable-diffusion-v1-5 or a folder path.")
    path = Path(text).expanduser()
    if workspace is not None and not path.is_absolute() and not path.exists() and (Path(workspace) / text).exists():
        path = Path(workspace) / text
    bundled = find_bundled(text)
    if bundled is not None and (text.startswith(BUNDLED_PREFIX) or not path.exists()):
        return ModelRef(text=text, kind="folder", location=str(bundled.path), label=f"{bundled.name} (bundled)")
    if text.startswith(BUNDLED_PREFIX):
        raise ModelError(f"No bundled model named {text[len(BUNDLED_PREFIX):]!r}.",
                         "Bundled models: " + (", ".join(m.reference for m in bundled_models()) or "none") + ".")
    if path.exists():
        return _resolve_local(text, path, workspace, offline)
    if _looks_like_path(text):
        raise ModelError(f"Model path not found: {text}", "Check the path (it must exist on the machine running the studio).")
    match = _HUB_ID.match(text)
    if not match:
        if text.count("/") >= 2:
            raise ModelError(f"{text!r} is not a valid model reference: a Hub id has exactly one '/', "
                             "like owner/name (optionally owner/name@revision).",
                             "For a folder, give its full path.")
        raise ModelError(f"{text!r} is neither an existing path, a run of this workspace, nor a Hub id.",
                         "A Hub id looks like owner/name, e.g. stabilityai/sdxl-turbo.")
    ref = ModelRef(text=text, kind="hub", location=match["repo"], revision=match["revision"],
                   variant=match["variant"], label=match["repo"])
    _check_hub(ref, workspace, offline)
    return ref


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", "\\")) or "\\" in text or re.match(r"^[A-Za-z]:", text) is not None
            or text.lower().endswith((".safetensors", *PICKLE_SUFFIXES)))


def _resolve_local(text: str, path: Path, workspace: str | Path | None, offline: bool) -> ModelRef:
    path = path.resolve()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PLAIN_PICKLE_SUFFIXES:
            raise ModelError(f"{path.name} is a plain Python pickle ({suffix}), not a weight file the studio reads: "
                             "loading it would run whatever code it holds.",
                             "Give a .safetensors, .ckpt or .pt checkpoint, or a diffusers folder.")
        if suffix not in WEIGHT_FILE_SUFFIXES:
            raise ModelError(f"{path.name} is not a model file the studio can load.",
                             "Give a diffusers folder (with model_index.json) or a .safetensors/.ckpt checkpoint.")
        return ModelRef(text=text, kind="file", location=str(path), label=path.stem)
    # A run folder of the workspace (Train / Fine-tune output).
    if (path / "config.json").is_file() and any((path / sub).is_dir()
                                                for sub in ("model", "lora", "checkpoints", "samples")):
        if (path / "model" / "model_index.json").is_file():
            return ModelRef(text=text, kind="folder", location=str(path / "model"), label=f"run {path.name}")
        if (path / "lora").is_dir() and any((path / "lora").glob("*.safetensors")):
            lora = find_lora_file(path / "lora")
            base_text = _run_base_model(path)
            base = resolve_reference(base_text, workspace, offline)
            if base.kind == "lora-run":
                raise ModelError(f"Run {path.name} names another LoRA run as its base model ({base_text}).",
                                 "Fine-tune a LoRA on a full model instead.")
            return ModelRef(text=text, kind="lora-run", location=str(path), base=base, lora=lora,
                            label=f"run {path.name} (LoRA on {base.label})")
        raise ModelError(f"Run {path.name} has no exported model yet (no model/model_index.json).",
                         "Wait for the run to finish, or resume it so it can export the model.")
    if (path / "model_index.json").is_file():
        return ModelRef(text=text, kind="folder", location=str(path), label=path.name)
    if path.is_dir():
        raise ModelError(f"{path} is not a diffusers pipeline: it has no model_index.json.",
                         "Pick the folder that contains model_index.json, a .safetensors file, or a run folder.")
    raise ModelError(f"{path} is neither a file nor a folder.")


def _run_base_model(run: Path) -> str:
    try:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"Run {run.name}: config.json cannot be read ({exc}).") from None
    for key in BASE_MODEL_KEYS:
        value = config.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise ModelError(f"Run {run.name} has LoRA weights but its config.json names no base model "
                     f"(looked for {', '.join(BASE_MODEL_KEYS)}).",
                     "Load the base model yourself and pick this run as the LoRA.")


def find_lora_file(folder: str | Path) -> Path:
    """The LoRA weights file of a folder (diffusers' names first, safetensors before .bin), or of a run folder.

    Raises:
        ModelError: when the folder holds no LoRA weights file.
    """
    folder = Path(folder)
    if (folder / "lora").is_dir():
        folder = folder / "lora"
    for name in ("pytorch_lora_weights.safetensors", "*.safetensors", "pytorch_lora_weights.bin",
                 *(f"*{suffix}" for suffix in TORCH_SUFFIXES)):
        files = sorted(p for p in folder.glob(name) if p.is_file())
        if files:
            return files[0]
    raise ModelError(f"No LoRA weights (.safetensors, .bin or .pt) found in {folder}.")


def resolve_lora(reference: str, workspace: str | Path | None = None) -> Path:
    """A LoRA reference (a weights file, a folder or a Fine-tune run) -> weights file.

    Raises:
        ModelError: for a missing path, a file that is not LoRA weights or a folder without them.
    """
    text = (reference or "").strip()
    if not text:
        raise ModelError("No LoRA chosen.")
    path = Path(text).expanduser()
    if workspace is not None and not path.is_absolute() and not path.exists():
        path = Path(workspace) / text
    if not path.exists():
        raise ModelError(f"LoRA not found: {text}", "Give a .safetensors file or a Fine-tune run folder.")
    if path.is_file():
        if path.suffix.lower() not in WEIGHT_FILE_SUFFIXES:
            raise ModelError(f"{path.name} is not a LoRA weights file (.safetensors, .bin or .pt).",
                             "Plain Python pickles are never loaded: they can run code.")
        return path.resolve()
    return find_lora_file(path).resolve()


# --------------------------------------------------------------------------- Hub checks


def cached_model_ids() -> list[str]:
    """Diffusers pipelines (repos with model_index.json) in the Hugging Face cache."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache folder yet, or one we cannot read: nothing is cached
        return []
    ids = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        if any(f.file_name == "model_index.json" for rev in repo.revisions for f in rev.files):
            ids.append(repo.repo_id)
    return sorted(ids)


def available_summary(workspace: str | Path | None) -> str:
    """One sentence naming the cached Hub models and the workspace runs that can be loaded."""
    cached = cached_model_ids()
    runs = [r.name for r in list_runs(workspace) if r.has_model or r.has_lora] if workspace is not None else []
    parts = ["cached: " + (", ".join(cached) if cached else "none"),
             "workspace runs: " + (", ".join(runs) if runs else "none")]
    return "Available offline — " + "; ".join(parts) + "."


def _unreachable_hint(ref: ModelRef, workspace: str | Path | None) -> str:
    """What to do when the Hub cannot be reached: the cached copy if there is one, else what is available."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(ref.location, "model_index.json", revision=ref.revision), str)
    except Exception:  # an unreadable cache: nothing cached
        cached = False
    if cached:
        return (f"{ref.location} is in the local cache: start the studio with --offline (or HF_HUB_OFFLINE=1) "
                "to load that copy, or check the network (HF_ENDPOINT) and try again.")
    return "Check the network (or HF_ENDPOINT) and try again. " + available_summary(workspace)


def _check_hub(ref: ModelRef, workspace: str | Path | None, offline: bool) -> None:
    """Cheap checks before loading a Hub id: cached when offline; exists, diffusers, safetensors online."""
    if is_offline(offline):
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(ref.location, "model_index.json", revision=ref.revision)
        if not isinstance(hit, str):
            raise ModelError(f"{ref.location} is not in the Hugging Face cache and the studio is offline.",
                             available_summary(workspace) + " Start without --offline (and HF_HUB_OFFLINE unset) "
                             "and use \"Download for offline use\" to fetch it.")
        return
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from studio.hub import LOOKUP_TIMEOUT_S, unreachable_reason

    try:
        info = model_info(ref.location, revision=ref.revision, timeout=LOOKUP_TIMEOUT_S)
    except GatedRepoError:
        raise ModelError(f"{ref.location} is gated: you must accept its licence on "
                         f"https://huggingface.co/{ref.location} and be logged in.", _LOGIN_HINT) from None
    except RevisionNotFoundError:
        raise ModelError(f"{ref.location} has no revision {ref.revision!r}.",
                         "Check the branch, tag or commit after '@'.") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{ref.location} was not found on the Hugging Face Hub (or it is private).",
                         "Check the spelling; for a private model: " + _LOGIN_HINT) from None
    except Exception as exc:  # network down, proxy, a stalled Hub: say so and name the alternatives
        raise ModelError(f"Could not reach the Hugging Face Hub to look up {ref.location} "
                         f"({unreachable_reason(exc, LOOKUP_TIMEOUT_S)}).", _unreachable_hint(ref, workspace)) from None
    names = [s.rfilename for s in (info.siblings or [])]
    if names and "model_index.json" not in names:
        single = [n for n in names if n.endswith(WEIGHT_FILE_SUFFIXES) and "/" not in n]
        hint = (f"It looks like a single-file checkpoint repo: download {single[0]} and load that file."
                if single else "Pick a repo that contains model_index.json (a diffusers pipeline).")
        raise ModelError(f"{ref.location} is not a diffusers pipeline (no model_index.json).", hint)


# --------------------------------------------------------------------------- choices


def model_choices(workspace: str | Path | None) -> list[tuple[str, str]]:
    """(label, value) pairs for the model dropdown: bundled models, workspace runs, cached ids, curated ids."""
    choices: list[tuple[str, str]] = [(f"{m.name} ({m.description})", m.reference) for m in bundled_models()]
    seen: set[str] = {value for _, value in choices}
    if workspace is not None:
        for run in list_runs(workspace):
            if run.has_model:
                choices.append((f"run: {run.name}", str(run.path)))
            elif run.has_lora:
                choices.append((f"run: {run.name} (LoRA)", str(run.path)))
            seen.add(str(run.path))
    for repo in cached_model_ids():
        if repo not in seen:
            choices.append((f"{repo} (cached)", repo))
            seen.add(repo)
    for repo, note in CURATED_MODELS:
        if repo not in seen:
            choices.append((f"{repo} ({note})", repo))
            seen.add(repo)
    return choices


def lora_choices(workspace: str | Path | None) -> list[tuple[str, str]]:
    """(label, value) pairs for the LoRA dropdown: Fine-tune runs with LoRA weights."""
    if workspace is None:
        return []
    return [(f"run: {run.name}", str(run.path)) for run in list_runs(workspace) if run.has_lora]
