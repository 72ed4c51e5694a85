"""Model loading: load, switch and prefetch diffusers pipelines.

``load_pipeline`` loads a model reference (safetensors, or ``.bin``/``.ckpt`` weights through
torch's restricted unpickler only — ``studio.torch_weights``; never remote code; fp32 on
CPU, fp16 on GPU; a pipeline whose tokenizer loaded empty is refused; a LoRA run gets its
LoRA applied); ``pipeline_kind``/``pipeline_capabilities``/``native_size`` say what the
loaded pipeline is and which Generate controls it takes; ``PipelineManager`` holds at most
one loaded pipeline and frees the previous one on a switch.

Resolving the reference text (Hub ids, folders, .safetensors files, workspace runs,
offline mode) and the dropdown choices live in ``studio.model_refs``; the names other code
imports from here are re-exported below.
"""

from __future__ import annotations

import gc
import hashlib
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.devices import MODEL_INIT_LOCK
from studio.errors import ConfigError, ModelError
from studio.model_refs import (_LOGIN_HINT, BASE_MODEL_KEYS, CURATED_MODELS, PICKLE_SUFFIXES, ModelRef,
                               available_summary, cached_model_ids, find_lora_file, is_offline, lora_choices,
                               model_choices, resolve_lora, resolve_reference)

# Loading and the manager live here; the reference names (ModelRef, resolve_reference, is_offline,
# the choices, ...) are re-exported from studio.model_refs so `from studio.models import ...` keeps working.
__all__ = [
    "BASE_MODEL_KEYS",
    "CURATED_MODELS",
    "PICKLE_SUFFIXES",
    "LoadedModel",
    "ModelRef",
    "PipelineManager",
    "ProgressFn",
    "available_summary",
    "cached_model_ids",
    "find_lora_file",
    "free_memory",
    "is_offline",
    "load_lora",
    "load_pipeline",
    "lora_adapter_name",
    "lora_choices",
    "model_choices",
    "native_size",
    "pipeline_capabilities",
    "pipeline_kind",
    "resolve_lora",
    "resolve_reference",
]

#: progress(fraction 0..1, message) while resolving, downloading and loading.
ProgressFn = Callable[[float, str], None]

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

    from studio.torch_weights import is_torch_file, load_torch_weights

    class _Shape:
        def __init__(self, shape: Any) -> None:
            self.shape = tuple(shape)

    if is_torch_file(path):  # the restricted unpickler refuses a code-running pickle here, before diffusers
        state = load_torch_weights(path)
        state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
        keys = {k: _Shape(getattr(v, "shape", ())) for k, v in state.items() if isinstance(k, str)}
        del state
    else:
        from safetensors import safe_open

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
                  progress: ProgressFn | None = None, workspace: str | Path | None = None,
                  stop: threading.Event | None = None) -> Any:
    """Load a model reference into a diffusers pipeline on ``device``.

    Safetensors preferred; ``.bin``/``.ckpt`` weights only through torch's restricted
    unpickler (a pickle that would run code is refused, unrun); never remote code; fp32 on CPU, fp16 on CUDA/MPS unless ``dtype``
    says otherwise. A LoRA run loads its base model with the LoRA applied (adapter "run").

    Args:
        reference: Model reference text (see ``studio.model_refs``) or a resolved ``ModelRef``.
        device: torch device string ("cpu", "cuda", "cuda:1", "mps").
        dtype: torch dtype; None picks by device.
        offline: Never contact the Hub.
        progress: Called with (fraction, message) as loading proceeds.
        workspace: Workspace whose run names are accepted.
        stop: A job's stop flag: set while a Hub model's files download, nothing is loaded
            (the download, left to finish in a helper thread by ``call_stoppable``, ends in the cache).

    Raises:
        ModelError: for any reference that cannot be loaded, with what to do.
        Stopped: ``stop`` was set by the time the files were fetched.
    """
    from studio.devices import inference_dtype

    report = progress or (lambda fraction, message: None)
    ref = reference if isinstance(reference, ModelRef) else resolve_reference(reference, workspace, offline)
    dtype = dtype if dtype is not None else inference_dtype(device)
    target = ref.base if ref.kind == "lora-run" else ref
    report(0.05, f"Loading {target.label}…")
    offline = is_offline(offline)
    fetched = _fetch_target(target, offline, report, stop)  # outside the lock: other models load meanwhile
    with MODEL_INIT_LOCK:  # from_pretrained patches module construction process-wide
        pipe = _load_target(target, dtype, offline, report, cached=fetched)
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


def _fetch_target(ref: ModelRef, offline: bool, report: ProgressFn, stop: threading.Event | None) -> bool:
    """A Hub pipeline's files into the cache before it loads (``DiffusionPipeline.download``, which
    ``from_pretrained`` would call itself): the download does not hold ``MODEL_INIT_LOCK``, and a
    download a Stop left running ends there, loading nothing. True when the files were fetched."""
    if ref.kind != "hub" or offline:
        return False
    import diffusers

    from studio.stopping import raise_if_stopped

    report(0.1, f"Downloading {ref.location} (only files not cached yet)…")
    try:
        diffusers.DiffusionPipeline.download(ref.location, revision=ref.revision, variant=ref.variant,
                                             use_safetensors=None, trust_remote_code=False)
    except Exception as exc:
        raise _load_failure(ref, exc, offline) from None
    raise_if_stopped(stop, f"loading {ref.label}")
    return True


def _load_target(ref: ModelRef, dtype: Any, offline: bool, report: ProgressFn, cached: bool = False) -> Any:
    """The pipeline of ``ref`` from its files (``cached``: a Hub model's, fetched by ``_fetch_target``)."""
    import diffusers

    common = {"dtype": dtype}
    try:
        if ref.kind == "file":
            cls = getattr(diffusers, _single_file_pipeline_class(Path(ref.location)))
            return cls.from_single_file(ref.location, local_files_only=offline, **common)
        source = ref.location
        # use_safetensors=None: safetensors wherever the model has them, else its .bin files, which
        # diffusers and transformers read with torch.load(weights_only=True) (checked by the canary tests)
        kwargs: dict[str, Any] = dict(common, use_safetensors=None, trust_remote_code=False)
        if ref.kind == "hub":
            kwargs.update(revision=ref.revision, variant=ref.variant, local_files_only=offline or cached)
        return diffusers.DiffusionPipeline.from_pretrained(source, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise _load_failure(ref, exc, offline) from None


def _load_failure(ref: ModelRef, exc: Exception, offline: bool) -> BaseException:
    """What a failed fetch or load of ``ref`` tells the person: a ``ModelError`` saying why and what to do,
    or ``exc`` itself when it is not one we know (a bug)."""
    from studio.torch_weights import pickle_refusal

    refused = pickle_refusal(exc, _local_folder(ref))
    if refused is not None:
        return refused
    if ref.kind == "hub" and _is_download_error(exc):  # cut mid-file, HTTP 5xx after the retries
        return _download_error(ref.location, exc, again="load it again")
    damaged = _model_index_problem(_local_folder(ref), ref.label)
    if damaged is not None:  # diffusers fails on it with a TypeError/AttributeError of its own
        return damaged
    if not isinstance(exc, (ValueError, OSError)):
        return exc
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    if isinstance(exc, ValueError):
        return ModelError(f"{ref.label} could not be loaded: {first}")
    if ref.kind == "hub":
        hint = ("It needs files that are not cached; go online once (or use \"Download for offline use\")."
                if offline else "Check the model files (or your connection) and try again.")
    else:  # a local folder or file: nothing online would help
        hint = "A file of this model is missing or damaged on disk; copy or re-save the model."
    if "401" in first or "403" in first or "gated" in first.lower() or "private" in first.lower():
        hint = _LOGIN_HINT
    return ModelError(f"{ref.label} could not be loaded: {first}", hint)


def _model_index_problem(folder: str | None, label: str) -> ModelError | None:
    """What is wrong with a pipeline folder's ``model_index.json`` (damaged, or a pipeline this diffusers lacks)."""
    import json

    import diffusers

    if folder is None or not (Path(folder) / "model_index.json").is_file():
        return None
    fix = "Download the model again, or re-save it with save_pretrained."
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ModelError(f"The model_index.json of {label} is not readable JSON.", fix)
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        return ModelError(f"The model_index.json of {label} is damaged (no pipeline class name).", fix)
    for name, entry in index.items():
        if not name.startswith("_") and isinstance(entry, list) and len(entry) != 2:  # [library, class]
            return ModelError(f"The model_index.json of {label} is damaged (component {name!r}).", fix)
    if not hasattr(diffusers, index["_class_name"]):
        return ModelError(f"{label} is a {index['_class_name']}, which diffusers {diffusers.__version__} does not have.",
                          "Update diffusers (pip install -U diffusers), or pick another model.")
    return None


def _local_folder(ref: ModelRef) -> str | None:
    """Where a reference's files are on disk (a Hub id: its cached snapshot), to name a refused file."""
    if ref.kind == "folder":
        return ref.location
    if ref.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(ref.location, "model_index.json", revision=ref.revision)
        return str(Path(hit).parent) if isinstance(hit, str) else None
    return None


def load_lora(pipe: Any, lora: str | Path, adapter_name: str) -> None:
    """Load LoRA weights (diffusers or kohya; .safetensors, or .bin/.pt read by the restricted unpickler).

    Raises:
        ModelError: when the pipeline takes no LoRA, the weights do not fit it, or a pickle LoRA
            holds anything but tensors (refused unrun).
    """
    from studio.torch_weights import is_torch_file, load_torch_weights

    lora = Path(lora)
    if not hasattr(pipe, "load_lora_weights"):
        raise ModelError(f"{type(pipe).__name__} does not take LoRA weights.",
                         "LoRA works with Stable Diffusion-type (text-to-image) models.")
    # a pickle LoRA is read here, restricted, and handed to diffusers as tensors: never unpickled twice
    weights: Any = load_torch_weights(lora) if is_torch_file(lora) else str(lora.parent)
    extra = {} if is_torch_file(lora) else {"weight_name": lora.name}
    try:
        with warnings.catch_warnings():  # a second adapter is intended here, not a mistake
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            with MODEL_INIT_LOCK:
                pipe.load_lora_weights(weights, adapter_name=adapter_name, **extra)
    except Exception as exc:
        raise ModelError(f"The LoRA {lora.name} does not fit this model ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}).",
                         "Use a LoRA trained for the same base model family.") from None


def lora_adapter_name(path: str | Path) -> str:
    """A stable adapter name for a LoRA file (diffusers needs one per loaded LoRA)."""
    return "lora_" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]


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
    _png: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.ref.label

    def png(self) -> Any:
        """Its ``Model``/``Model hash`` in PNG parameters (``studio.model_names.PngModel``), hashed once."""
        if self._png is None:
            from studio.model_names import png_model

            self._png = png_model(self.ref)
        return self._png


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
        """Drop the loaded pipeline and give its memory back (CUDA cache; gc when a cycle holds it).

        A pipeline normally goes the moment its last reference does; a full ``gc.collect``
        (0.2-1 s in a process holding torch, diffusers and Gradio) runs only when one of its
        models is still alive afterwards, so switching between small models stays fast.
        """
        with self.lock:
            if self._loaded is None:
                return
            models = _module_refs(self._loaded.pipe)
            self._loaded = None
            free_memory(collect=any(ref() is not None for ref in models))

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
        from studio.hub import download_pipeline

        report(0.02, f"Looking up {ref.location}…")
        sizes: list[str] = []

        def on_bytes(p: Any) -> None:
            sizes[:] = [p.message(ref.location)]
            report(p.fraction, sizes[0])

        try:
            folder = download_pipeline(ref.location, revision=ref.revision, variant=ref.variant, on_progress=on_bytes)
        except Exception as exc:
            raise _download_error(ref.location, exc) from None
        done = sizes[0] if sizes else f"Downloaded {ref.location}."
        return f"{done} It now loads offline (cached in {Path(folder).name})."


def _is_download_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the Hub transport failing (a connection cut mid-file, an HTTP error after retries)."""
    from huggingface_hub.errors import HfHubHTTPError

    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, HfHubHTTPError) or module in ("httpx", "httpx2", "httpcore", "h11", "requests", "urllib3")


def _download_error(repo_id: str, exc: BaseException, again: str = "press Download again") -> ModelError:
    """The one-line reason a download failed: gated, missing, no such revision, or no connection."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, GatedRepoError):
        return ModelError(f"{repo_id} is gated: accept its licence on its Hub page and log in.", _LOGIN_HINT)
    if isinstance(exc, RevisionNotFoundError):
        return ModelError(f"{repo_id} has no such revision.", "Check the branch, tag or commit after '@'.")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelError(f"{repo_id} was not found on the Hugging Face Hub (or it is private).",
                          "Check the spelling; for a private model: " + _LOGIN_HINT)
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return ModelError(f"Downloading {repo_id} failed: {first}",
                      f"Check your connection and {again}: finished files are kept and a "
                      "partial file resumes where it stopped.")


def _module_refs(pipe: Any) -> list[weakref.ref]:
    """Weak references to the torch modules of a pipeline (UNet, VAE, text encoders...)."""
    components = getattr(pipe, "components", None) or {}
    return [weakref.ref(part) for part in components.values() if hasattr(part, "parameters")]


def free_memory(collect: bool = True) -> None:
    """Collect garbage (unless ``collect`` is False) and give cached CUDA memory back to the driver."""
    if collect:
        gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a hard requirement
        pass
