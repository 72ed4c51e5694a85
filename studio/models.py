"""Model references: resolve, list, load, switch and prefetch diffusers pipelines.

A *model reference* is what a person types or picks in the Generate tab:

    owner/name[@revision][:variant]   a Hugging Face Hub id (e.g. stabilityai/sdxl-turbo)
    /path/to/folder                   a diffusers pipeline folder (has model_index.json)
    /path/to/model.safetensors        a single-file checkpoint (SD 1.x/2.x/XL/3, FLUX)
    /path/to/<run> or a run name      a run of this workspace: ``model/`` (Train, full
                                      fine-tune) or ``lora/`` + the base model in config.json

``resolve_reference`` turns the text into a ``ModelRef`` or a ``ModelError`` that says
what to do; ``load_pipeline`` loads it (safetensors only, never remote code, fp32 on CPU,
fp16 on GPU); ``PipelineManager`` holds at most one loaded pipeline and frees the
previous one on a switch. Offline mode (``--offline`` or ``HF_HUB_OFFLINE``) only looks
at the Hugging Face cache and names what is available there.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.devices import MODEL_INIT_LOCK
from studio.errors import ConfigError, ModelError
from studio.runs import list_runs

#: progress(fraction 0..1, message) while resolving, downloading and loading.
ProgressFn = Callable[[float, str], None]

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

#: Weight files that can run code when loaded; refused.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

#: Keys a Fine-tune run's config.json may use for its base model (first found wins).
BASE_MODEL_KEYS = ("pretrained_model_name_or_path", "base_model", "model", "model_id")

_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
    r"(?:@(?P<revision>[A-Za-z0-9._/-]+?))?(?::(?P<variant>[A-Za-z0-9_-]+))?$"
)

#: Single-file checkpoint type (diffusers' inference) -> pipeline class that loads it.
_SINGLE_FILE_PIPELINES = {
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
    "xl_base": "StableDiffusionXLPipeline",
    "playground-v2-5": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd35_large": "StableDiffusion3Pipeline",
    "sd35_medium": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}

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
        if suffix in PICKLE_SUFFIXES:
            raise ModelError(f"{path.name} is a pickle checkpoint ({suffix}); the studio loads only .safetensors "
                             "because pickle files can run arbitrary code when loaded.",
                             "Use a .safetensors version of the model (most model pages offer one).")
        if suffix != ".safetensors":
            raise ModelError(f"{path.name} is not a model file the studio can load.",
                             "Give a diffusers folder (with model_index.json) or a .safetensors checkpoint.")
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
        _refuse_pickle_only_folder(path)
        return ModelRef(text=text, kind="folder", location=str(path), label=path.name)
    if path.is_dir():
        files = [p.name for p in path.iterdir()]
        if any(n.lower().endswith(PICKLE_SUFFIXES) for n in files) and not any(n.endswith(".safetensors") for n in files):
            raise ModelError(f"{path} holds only pickle weights and no model_index.json; the studio loads only "
                             "safetensors diffusers pipelines (pickle files can run code when loaded).",
                             "Convert it to safetensors, or use a safetensors version of the model.")
        raise ModelError(f"{path} is not a diffusers pipeline: it has no model_index.json.",
                         "Pick the folder that contains model_index.json, a .safetensors file, or a run folder.")
    raise ModelError(f"{path} is neither a file nor a folder.")


def _refuse_pickle_only_folder(path: Path) -> None:
    """Refuse a diffusers folder whose weights exist only as pickle files."""
    weights = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)]
    if weights and not any(p.suffix == ".safetensors" for p in weights):
        raise ModelError(f"{path} has only pickle weights (.bin/.ckpt); the studio loads only safetensors "
                         "because pickle files can run arbitrary code when loaded.",
                         "Re-save it with save_pretrained(..., safe_serialization=True) or use a safetensors copy.")


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
    """The LoRA weights file of a folder (diffusers' name first), or of a run folder.

    Raises:
        ModelError: when there is no .safetensors file, or only pickle weights.
    """
    folder = Path(folder)
    if (folder / "lora").is_dir():
        folder = folder / "lora"
    preferred = folder / "pytorch_lora_weights.safetensors"
    if preferred.is_file():
        return preferred
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files[0]
    if any(folder.glob("*.bin")):
        raise ModelError(f"{folder} has only pickle LoRA weights (.bin); the studio loads only .safetensors.")
    raise ModelError(f"No LoRA weights (.safetensors) found in {folder}.")


def resolve_lora(reference: str, workspace: str | Path | None = None) -> Path:
    """A LoRA reference (a .safetensors file, a folder or a Fine-tune run) -> weights file.

    Raises:
        ModelError: for a missing path, a pickle file or a folder without LoRA weights.
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
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"{path.name} is not a .safetensors LoRA file; pickle weights are refused because "
                             "they can run code when loaded.")
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

    try:
        info = model_info(ref.location, revision=ref.revision)
    except GatedRepoError:
        raise ModelError(f"{ref.location} is gated: you must accept its licence on "
                         f"https://huggingface.co/{ref.location} and be logged in.", _LOGIN_HINT) from None
    except RevisionNotFoundError:
        raise ModelError(f"{ref.location} has no revision {ref.revision!r}.",
                         "Check the branch, tag or commit after '@'.") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{ref.location} was not found on the Hugging Face Hub (or it is private).",
                         "Check the spelling; for a private model: " + _LOGIN_HINT) from None
    except Exception as exc:  # network down, proxy, timeouts: say so and name the alternatives
        raise ModelError(f"Could not reach the Hugging Face Hub to look up {ref.location} "
                         f"({type(exc).__name__}).", available_summary(workspace)) from None
    names = [s.rfilename for s in (info.siblings or [])]
    if names and "model_index.json" not in names:
        single = [n for n in names if n.endswith(".safetensors") and "/" not in n]
        hint = (f"It looks like a single-file checkpoint repo: download {single[0]} and load that file."
                if single else "Pick a repo that contains model_index.json (a diffusers pipeline).")
        raise ModelError(f"{ref.location} is not a diffusers pipeline (no model_index.json).", hint)
    if names and not any(n.endswith(".safetensors") for n in names) and any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise ModelError(f"{ref.location} has only pickle weights (.bin/.ckpt); the studio loads only safetensors "
                         "because pickle files can run arbitrary code when loaded.",
                         "Look for a safetensors version of this model (or a 'refs/pr/N' revision that adds one).")


# --------------------------------------------------------------------------- loading


def pipeline_kind(pipe: Any) -> str:
    """What sort of pipeline this is: "sd", "sdxl", "sd3", "flux", "unconditional" or "other"."""
    name = type(pipe).__name__
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion") or name.startswith("LatentConsistencyModel"):
        return "sd"
    if not pipeline_capabilities(pipe)["prompt"]:
        return "unconditional"
    return "other"


def pipeline_capabilities(pipe: Any) -> dict[str, bool]:
    """Which Generate controls this pipeline takes, read from its ``__call__`` signature.

    Returns:
        {"prompt", "negative_prompt", "guidance_scale", "size", "lora", "callback", "batch_size"} -> bool.
    """
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    return {
        "prompt": "prompt" in params,
        "negative_prompt": "negative_prompt" in params,
        "guidance_scale": "guidance_scale" in params,
        "size": "height" in params and "width" in params,
        "lora": hasattr(pipe, "load_lora_weights") and "prompt" in params,
        "callback": "callback_on_step_end" in params,
        "batch_size": "batch_size" in params,
    }


def native_size(pipe: Any) -> tuple[int, int]:
    """(width, height) the model was trained at, from its config."""
    autoencoder = getattr(pipe, "vae", None) or getattr(pipe, "vqvae", None)
    scale = int(getattr(pipe, "vae_scale_factor", 0) or 0)
    if not scale:
        channels = getattr(getattr(autoencoder, "config", None), "block_out_channels", None)
        scale = 2 ** (len(channels) - 1) if channels else 1
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        size = unet.config.sample_size
        if autoencoder is None:
            scale = 1
    elif getattr(pipe, "default_sample_size", None):
        size = pipe.default_sample_size
    else:
        transformer = getattr(pipe, "transformer", None)
        size = getattr(getattr(transformer, "config", None), "sample_size", 64) or 64
    if isinstance(size, (list, tuple)):
        height, width = int(size[0]) * scale, int(size[1]) * scale
    else:
        height = width = int(size) * scale
    return width, height


def _check_tokenizers(pipe: Any, label: str) -> None:
    """Refuse a pipeline whose tokenizer loaded empty (transformers 5 does that silently)."""
    for attr in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, attr, None)
        if tok is not None and len(tok) <= 2:
            raise ModelError(f"The {attr} of {label} loaded without a vocabulary ({len(tok)} tokens): its files "
                             "are missing or were not downloaded.",
                             f"Check that {attr}/tokenizer.json (or vocab.json + merges.txt) exists in the model.")


def _single_file_pipeline_class(path: Path) -> str:
    """Which pipeline class loads this single-file checkpoint, from its tensor names and shapes."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import safe_open

    class _Shape:
        def __init__(self, shape: list[int]) -> None:
            self.shape = tuple(shape)

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = {k: _Shape(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:
        raise ModelError(f"{path.name} cannot be read as a safetensors file ({type(exc).__name__}).",
                         "The file may be incomplete or damaged: download it again.") from None
    sd_like = any(k.startswith(("model.diffusion_model.", "transformer.", "double_blocks.", "joint_blocks."))
                  for k in keys)
    try:
        model_type = infer_diffusers_model_type(keys) if sd_like else ""
    except Exception:
        model_type = ""
    if model_type not in _SINGLE_FILE_PIPELINES:
        raise ModelError(f"{path.name} is not a single-file checkpoint the studio recognises "
                         f"({model_type or 'unknown layout'}).",
                         "Supported: Stable Diffusion 1.x/2.x/XL/3 and FLUX checkpoints; for anything else use a "
                         "diffusers folder. A LoRA file goes in the LoRA field, not the model field.")
    return _SINGLE_FILE_PIPELINES[model_type]


def load_pipeline(reference: str | ModelRef, device: str = "cpu", dtype: Any = None, offline: bool = False,
                  progress: ProgressFn | None = None, workspace: str | Path | None = None) -> Any:
    """Load a model reference into a diffusers pipeline on ``device``.

    Safetensors only, never remote code; fp32 on CPU, fp16 on CUDA/MPS unless ``dtype``
    says otherwise. A LoRA run loads its base model with the LoRA applied (adapter "run").

    Args:
        reference: Model reference text (see the module docstring) or a resolved ``ModelRef``.
        device: torch device string ("cpu", "cuda", "cuda:1", "mps").
        dtype: torch dtype; None picks by device.
        offline: Never contact the Hub.
        progress: Called with (fraction, message) as loading proceeds.
        workspace: Workspace whose run names are accepted.

    Raises:
        ModelError: for any reference that cannot be loaded, with what to do.
    """
    from studio.devices import inference_dtype

    report = progress or (lambda fraction, message: None)
    ref = reference if isinstance(reference, ModelRef) else resolve_reference(reference, workspace, offline)
    dtype = dtype if dtype is not None else inference_dtype(device)
    target = ref.base if ref.kind == "lora-run" else ref
    report(0.05, f"Loading {target.label}…")
    with MODEL_INIT_LOCK:  # from_pretrained patches module construction process-wide
        pipe = _load_target(target, dtype, is_offline(offline), report)
    _check_tokenizers(pipe, target.label)
    report(0.85, f"Moving {target.label} to {device}…")
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    from studio.schedulers import remember_default

    remember_default(pipe)
    if ref.kind == "lora-run":
        report(0.9, f"Applying LoRA from {Path(ref.location).name}…")
        load_lora(pipe, ref.lora, adapter_name="run")
        pipe.set_adapters(["run"], [1.0])
    report(1.0, f"Loaded {ref.label}.")
    return pipe


def _load_target(ref: ModelRef, dtype: Any, offline: bool, report: ProgressFn) -> Any:
    import diffusers

    common = {"dtype": dtype}
    try:
        if ref.kind == "file":
            cls = getattr(diffusers, _single_file_pipeline_class(Path(ref.location)))
            return cls.from_single_file(ref.location, local_files_only=offline, **common)
        source = ref.location
        kwargs: dict[str, Any] = dict(common, use_safetensors=True, trust_remote_code=False)
        if ref.kind == "hub":
            kwargs.update(revision=ref.revision, variant=ref.variant, local_files_only=offline)
            if not offline:
                report(0.1, f"Downloading {ref.location} (only files not cached yet)…")
        return diffusers.DiffusionPipeline.from_pretrained(source, **kwargs)
    except ModelError:
        raise
    except ValueError as exc:
        text = str(exc)
        if "safetensors" in text.lower():
            raise ModelError(f"{ref.label} has no safetensors weights for some component; the studio refuses "
                             "pickle weights because they can run arbitrary code.",
                             "Use a safetensors version of the model.") from None
        raise ModelError(f"{ref.label} could not be loaded: {text.splitlines()[0][:300]}") from None
    except OSError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        hint = ("It needs files that are not cached; go online once (or use \"Download for offline use\")."
                if offline else "Check the model files (or your connection) and try again.")
        if "401" in first or "403" in first or "gated" in first.lower() or "private" in first.lower():
            hint = _LOGIN_HINT
        raise ModelError(f"{ref.label} could not be loaded: {first}", hint) from None


def load_lora(pipe: Any, lora: str | Path, adapter_name: str) -> None:
    """Load LoRA weights (diffusers or kohya .safetensors) into ``pipe`` as ``adapter_name``.

    Raises:
        ModelError: when the pipeline takes no LoRA or the weights do not fit it.
    """
    lora = Path(lora)
    if not hasattr(pipe, "load_lora_weights"):
        raise ModelError(f"{type(pipe).__name__} does not take LoRA weights.",
                         "LoRA works with Stable Diffusion-type (text-to-image) models.")
    try:
        with warnings.catch_warnings():  # a second adapter is intended here, not a mistake
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            with MODEL_INIT_LOCK:
                pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name=adapter_name)
    except Exception as exc:
        raise ModelError(f"The LoRA {lora.name} does not fit this model ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}).",
                         "Use a LoRA trained for the same base model family.") from None


def lora_adapter_name(path: str | Path) -> str:
    """A stable adapter name for a LoRA file (diffusers needs one per loaded LoRA)."""
    return "lora_" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- choices


def model_choices(workspace: str | Path | None) -> list[tuple[str, str]]:
    """(label, value) pairs for the model dropdown: workspace runs, cached ids, curated ids."""
    choices: list[tuple[str, str]] = []
    seen: set[str] = set()
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


# --------------------------------------------------------------------------- manager


@dataclass
class LoadedModel:
    """The pipeline the manager holds, and what the UI needs to know about it."""

    reference: str
    ref: ModelRef
    pipe: Any
    kind: str
    capabilities: dict[str, bool]
    size: tuple[int, int]
    load_seconds: float
    adapters: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.ref.label


class PipelineManager:
    """Holds at most one loaded pipeline for the Generate tab (and the CLI).

    Args:
        device: auto, cpu, cuda[:N] or mps (resolved with ``studio.devices.resolve_device``).
        workspace: Workspace whose runs are listed and loadable.
        offline: Never contact the Hub.
    """

    def __init__(self, device: str = "auto", workspace: str | Path = "runs", offline: bool = False) -> None:
        from studio.devices import resolve_device

        self.device = resolve_device(device)
        self.workspace = Path(workspace)
        self.offline = offline
        self.lock = threading.RLock()
        self.stop_event = threading.Event()
        self._loaded: LoadedModel | None = None

    @property
    def loaded(self) -> LoadedModel | None:
        """The loaded model, or None."""
        return self._loaded

    def require_loaded(self) -> LoadedModel:
        """The loaded model, or a ModelError asking to load one."""
        if self._loaded is None:
            raise ModelError("No model is loaded.", "Pick a model and press Load first.")
        return self._loaded

    def load(self, reference: str, progress: ProgressFn | None = None) -> LoadedModel:
        """Load ``reference``, freeing the previous pipeline first; a no-op if already loaded.

        Raises:
            ModelError: when the reference cannot be resolved or loaded (the previous
                model stays loaded when the reference is bad).
        """
        report = progress or (lambda fraction, message: None)
        text = (reference or "").strip()
        with self.lock:
            if self._loaded is not None and self._loaded.reference == text:
                report(1.0, f"{self._loaded.label} is already loaded.")
                return self._loaded
            ref = resolve_reference(text, self.workspace, self.offline)
            self.unload()
            started = time.perf_counter()
            pipe = load_pipeline(ref, self.device, offline=self.offline, progress=report, workspace=self.workspace)
            adapters = {"run": 1.0} if ref.kind == "lora-run" else {}
            self._loaded = LoadedModel(
                reference=text, ref=ref, pipe=pipe, kind=pipeline_kind(pipe),
                capabilities=pipeline_capabilities(pipe), size=native_size(pipe),
                load_seconds=time.perf_counter() - started, adapters=adapters)
            return self._loaded

    def unload(self) -> None:
        """Drop the loaded pipeline and give its memory back (gc + CUDA cache)."""
        with self.lock:
            if self._loaded is None:
                return
            self._loaded = None
            free_memory()

    def set_scheduler(self, name: str) -> str:
        """Swap the loaded pipeline's scheduler (never reloads the model)."""
        from studio.schedulers import set_scheduler

        with self.lock:
            return set_scheduler(self.require_loaded().pipe, name)

    def scheduler_names(self) -> list[str]:
        """Scheduler names compatible with the loaded model ([] when none is loaded)."""
        from studio.schedulers import scheduler_names_for

        return scheduler_names_for(self._loaded.pipe) if self._loaded is not None else []

    def sync_lora(self, lora: str, scale: float) -> dict[str, float]:
        """Make the loaded pipeline use exactly ``lora`` at ``scale`` (plus a LoRA run's own).

        Scale 0 (or no LoRA) switches the extra LoRA off, so the output is the base
        model's again. Returns the adapters now active -> weight.
        """
        with self.lock:
            loaded = self.require_loaded()
            pipe = loaded.pipe
            wanted: dict[str, float] = {}
            if loaded.ref.kind == "lora-run":
                wanted["run"] = 1.0
            if lora:
                if not loaded.capabilities["lora"]:
                    raise ConfigError(f"{loaded.label} is a {loaded.kind} model, which takes no LoRA.",
                                      "Clear the LoRA field.")
                path = resolve_lora(lora, self.workspace)
                name = lora_adapter_name(path)
                if name not in loaded.adapters:
                    load_lora(pipe, path, name)
                    loaded.adapters[name] = 0.0
                wanted[name] = float(scale)
            active = {name: weight for name, weight in wanted.items() if weight != 0.0}
            for name in [n for n in loaded.adapters if n not in wanted]:  # a LoRA no longer chosen: free it
                pipe.delete_adapters([name])
                del loaded.adapters[name]
            if not loaded.adapters:
                return active
            if active:
                pipe.enable_lora()
                pipe.set_adapters(list(active), list(active.values()))
            else:
                pipe.disable_lora()
            for name in loaded.adapters:
                loaded.adapters[name] = active.get(name, 0.0)
            return active

    def prefetch(self, reference: str, progress: ProgressFn | None = None) -> str:
        """Download a Hub model into the cache for offline use ("Download for offline use").

        Returns:
            A sentence saying what was done.

        Raises:
            ModelError: offline, or a reference that cannot be downloaded.
        """
        report = progress or (lambda fraction, message: None)
        text = (reference or "").strip()
        if is_offline(self.offline):
            ref = None
            try:
                ref = resolve_reference(text, self.workspace, offline=True)
            except ModelError:
                pass
            if ref is not None and ref.kind != "hub":
                return f"{ref.label} is on this machine already; nothing to download."
            if ref is not None:
                return f"{ref.location} is in the cache already; it works offline."
            raise ModelError("The studio is offline, so nothing can be downloaded.",
                             "Restart without --offline (and with HF_HUB_OFFLINE unset) to download models.")
        ref = resolve_reference(text, self.workspace, offline=False)
        if ref.kind != "hub":
            return f"{ref.label} is on this machine already; nothing to download."
        import diffusers

        report(0.1, f"Downloading {ref.location}…")
        try:
            folder = diffusers.DiffusionPipeline.download(ref.location, revision=ref.revision, variant=ref.variant,
                                                          use_safetensors=True)
        except Exception as exc:
            raise ModelError(f"Downloading {ref.location} failed ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}).",
                             "Check your connection; for gated/private models: " + _LOGIN_HINT) from None
        report(1.0, "Downloaded.")
        return f"{ref.location} is downloaded ({folder}); it now loads offline."


def free_memory() -> None:
    """Collect garbage and give cached CUDA memory back to the driver."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a hard requirement
        pass
