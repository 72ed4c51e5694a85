"""Hub downloads a person can watch: sizes looked up with a timeout, byte progress, resume.

``download_pipeline`` fetches a diffusers pipeline into the Hugging Face cache the way
``DiffusionPipeline.from_pretrained`` would (diffusers' own ``download``: the same
files, variants and safetensors preference, and huggingface_hub's resume of
``.incomplete`` blobs), while a watcher reports bytes on disk, speed and time left
from the repo's file sizes. Lookups carry ``LOOKUP_TIMEOUT_S`` so an unreachable Hub
answers within seconds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

#: Seconds a Hub lookup (repo info) may take before the studio says the Hub is unreachable.
#: huggingface_hub's own default for these calls is no timeout at all (a stalled Hub hangs).
LOOKUP_TIMEOUT_S = 5.0
#: Weight formats a safetensors-only download leaves out when a .safetensors file is there.
_OTHER_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb", ".gguf")
#: Weight-file variants diffusers knows by name ("unet/diffusion_pytorch_model.fp16.safetensors").
_VARIANTS = ("fp16", "bf16", "fp32", "ema", "non_ema", "no_ema")


@dataclass(frozen=True)
class DownloadProgress:
    """Bytes fetched so far of about ``total_bytes``, at ``speed_bps``."""

    done_bytes: int
    total_bytes: int
    speed_bps: float
    finished: bool = False

    @property
    def fraction(self) -> float:
        if self.finished:
            return 1.0
        return min(0.99, self.done_bytes / self.total_bytes) if self.total_bytes > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.finished or self.speed_bps <= 0 or self.total_bytes <= 0:
            return None
        return max(0.0, (self.total_bytes - self.done_bytes) / self.speed_bps)

    def message(self, name: str) -> str:
        """E.g. ``Downloading acme/model: 12.3 MB of 45.6 MB · 5.1 MB/s · about 7 s left``."""
        if self.finished:
            return f"Downloaded {name}: {human_bytes(self.done_bytes)}."
        text = f"Downloading {name}: {human_bytes(self.done_bytes)} of {human_bytes(self.total_bytes)}"
        if self.speed_bps > 0:
            text += f" · {human_bytes(self.speed_bps)}/s"
        eta = self.eta_s
        if eta is not None:
            text += f" · about {human_seconds(eta)} left"
        return text


def human_bytes(n: float) -> str:
    """1536 -> '1.5 kB' (decimal units, as the Hub shows sizes)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"  # pragma: no cover


def human_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def unreachable_reason(exc: BaseException, timeout: float = LOOKUP_TIMEOUT_S) -> str:
    """Why a Hub call failed in transport, in a few words: "no answer within 5 s", "connection refused"..."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    if "timeout" in name.lower() or "timed out" in text.lower():
        return f"no answer within {timeout:g} s"
    if "refused" in text.lower():
        return "connection refused"
    return f"{name}: {text}" if text else name


def repo_file_sizes(repo_id: str, revision: str | None = None, timeout: float = LOOKUP_TIMEOUT_S) -> dict[str, int]:
    """``{path: bytes}`` of every file of a model repo at ``revision`` (one lookup, with a timeout)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=timeout)
    return {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}


def pipeline_download_size(files: dict[str, int], variant: str | None = None) -> int:
    """Bytes a pipeline download fetches: configs and one weight file per component.

    Mirrors diffusers' choice for ``from_pretrained(use_safetensors=None)``: when every
    component folder with weights has a ``.safetensors`` file, those (no pickle/ONNX/Flax
    weights); otherwise (a pickle-era repo) the ``.bin`` files and no ``.safetensors``.
    With a variant, its files where they exist (else the plain ones); without one, only
    the plain files. A single-file checkpoint beside the folders is not fetched.
    """
    def split(path: str, suffix: str) -> tuple[str, str | None]:
        stem = path[:-len(suffix)]
        head, _, last = stem.rpartition(".")
        if head and "/" not in last and last in _VARIANTS:
            return head, last
        return stem, None

    with_weights = {p.split("/")[0] for p in files if "/" in p and p.endswith((".safetensors", ".bin"))}
    with_safetensors = {p.split("/")[0] for p in files if "/" in p and p.endswith(".safetensors")}
    suffix = ".safetensors" if with_weights <= with_safetensors else ".bin"
    weights = {split(p, suffix) for p in files if p.endswith(suffix)}
    total = 0
    for path, size in files.items():
        if path.endswith(suffix):
            if "/" not in path:
                continue  # a single-file checkpoint beside the pipeline's folders is not fetched
            stem, has = split(path, suffix)
            if has is not None and has != variant:
                continue
            if has is None and variant and (stem, variant) in weights:
                continue
        elif path.endswith((".safetensors", *_OTHER_WEIGHTS)):
            continue
        total += size
    return total


def blobs_bytes(repo_id: str, repo_type: str = "model") -> int:
    """Bytes in the repo's cache blobs (finished and ``.incomplete``) right now."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "blobs"
    total = 0
    try:
        for entry in blobs.iterdir():
            try:
                total += entry.stat().st_size
            except OSError:  # renamed from .incomplete meanwhile
                continue
    except OSError:
        return 0
    return total


def download_pipeline(repo_id: str, *, revision: str | None = None, variant: str | None = None,
                      on_progress: Callable[[DownloadProgress], None] | None = None,
                      poll_s: float = 0.25) -> str:
    """Download a diffusers pipeline into the cache, reporting bytes; returns the cached folder.

    The download itself is diffusers' ``DiffusionPipeline.download`` (same files as a
    later ``from_pretrained``, resuming ``.incomplete`` blobs); this thread watches the
    cache grow and calls ``on_progress`` every ``poll_s`` seconds and once at the end.

    Raises:
        Exception: whatever the Hub stack raised (the caller turns it into a ModelError).
    """
    report = on_progress or (lambda p: None)
    total = pipeline_download_size(repo_file_sizes(repo_id, revision), variant)
    start_bytes = blobs_bytes(repo_id)
    outcome: dict[str, Any] = {}

    def fetch() -> None:
        import diffusers

        try:
            outcome["folder"] = diffusers.DiffusionPipeline.download(
                repo_id, revision=revision, variant=variant, use_safetensors=None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=fetch, name=f"download-{repo_id}", daemon=True)
    began = time.monotonic()
    worker.start()
    while worker.is_alive():
        worker.join(poll_s)
        done = max(0, blobs_bytes(repo_id) - start_bytes)
        elapsed = max(time.monotonic() - began, 1e-6)
        report(DownloadProgress(done, max(total, done), done / elapsed))
    if "error" in outcome:
        raise outcome["error"]
    done = max(0, blobs_bytes(repo_id) - start_bytes)
    report(DownloadProgress(done, max(total, done), done / max(time.monotonic() - began, 1e-6), finished=True))
    return str(outcome["folder"])
