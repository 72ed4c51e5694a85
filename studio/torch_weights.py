"""Pickle-era weight files (``.bin``, ``.ckpt``, ``.pt``, ``.pth``), read without running code.

Many Hub repos and checkpoints predate safetensors. PyTorch's restricted unpickler
(``torch.load(weights_only=True)``) rebuilds tensors, containers and numbers and refuses
every other Python object, so a file whose pickle would call ``exec`` or ``os.system``
is refused before anything runs. diffusers and transformers load ``.bin`` that way by
default; the studio reads the files it names itself (a single-file checkpoint, a LoRA)
through ``load_torch_weights`` here, and ``pickle_refusal`` turns a refusal raised deep
inside a library into one line naming the file and the object it refused.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from studio.errors import ModelError

#: Weight files torch writes with pickle; loaded only through the restricted unpickler.
TORCH_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
#: Plain pickles of arbitrary Python objects: not weight files the studio reads.
PLAIN_PICKLE_SUFFIXES = (".pkl", ".pickle")

_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand \d+|"
                     r"Trying to (?:call reduce|load unsupported object)[^\n.]*")
_FILE = re.compile(r"[^\s'\"`]+(?:" + "|".join(re.escape(s) for s in TORCH_SUFFIXES) + r")\b")


def is_torch_file(path: str | Path) -> bool:
    """True for a ``.bin``/``.ckpt``/``.pt``/``.pth`` file name."""
    return str(path).lower().endswith(TORCH_SUFFIXES)


def load_torch_weights(path: str | Path) -> dict[str, Any]:
    """Read a torch weight file through the restricted unpickler (memory-mapped when it can be).

    A checkpoint that nests its weights under ``state_dict`` (the original SD ``.ckpt``
    layout) is returned as saved; callers that want the tensors look inside.

    Raises:
        ModelError: when the pickle holds anything but tensors, containers and numbers
            (nothing of it ran), or the file is not a torch file at all.
    """
    import torch

    path = Path(path)
    try:
        mmap = zipfile.is_zipfile(path)  # only the zip format (torch >= 1.6) can be memory-mapped
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise refusal(path.name, exc) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise ModelError(f"{path.name} cannot be read as a PyTorch weight file ({type(exc).__name__}).",
                         "The file may be incomplete, damaged or of another format: download it again.") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} holds a {type(data).__name__}, not named weights.",
                         "Give a checkpoint or LoRA saved as a state dict.")
    return data


def refusal(name: str, exc: BaseException) -> ModelError:
    """The ModelError for a pickle the restricted unpickler refused (``exc`` says what it stopped at)."""
    text = str(exc)
    found = _GLOBAL.search(text)
    if found and found.group(1):
        what = (f"its pickle asks for {found.group(1)}, which is not a tensor, number or container and could "
                "run code")
    else:
        reason = found.group(0) if found else (text.strip().splitlines() or [type(exc).__name__])[-1][:120]
        what = f"it is not a weights-only PyTorch file (the restricted unpickler stopped at: {reason})"
    return ModelError(f"Refused to load {name}: {what}. Nothing in it was run; the studio reads .bin/.ckpt/.pt "
                      "weights only through PyTorch's restricted unpickler (weights_only=True).",
                      "Use a .safetensors copy of the model, or a file from a source you trust that holds only "
                      "weights.")


def pickle_refusal(exc: BaseException, folder: str | Path | None = None) -> ModelError | None:
    """If ``exc`` (or what caused it) is a restricted-unpickler refusal, the ModelError saying so.

    The refused file is named from the library's messages, else found by re-reading the
    torch files under ``folder`` the same restricted way. Returns None for other errors.
    """
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    refused = next((e for e in chain if isinstance(e, pickle.UnpicklingError)), None)
    if refused is None:
        return None
    deepest = next((e for e in reversed(chain) if isinstance(e, pickle.UnpicklingError)), refused)
    name = None
    for e in chain:
        match = _FILE.search(str(e))
        if match:
            name = _display_name(match.group(0), folder)
            break
    if name is None and folder is not None:
        name = _find_refused(Path(folder))
    return refusal(name or "a weight file", deepest)


def _display_name(text: str, folder: str | Path | None) -> str:
    path = Path(text)
    if folder is not None:
        try:
            return str(path.resolve().relative_to(Path(folder).resolve()))
        except (ValueError, OSError):
            pass
    return "/".join(path.parts[-2:])


def _find_refused(folder: Path) -> str | None:
    """The first torch file under ``folder`` the restricted unpickler refuses (relative path)."""
    if not folder.is_dir():
        return None
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and is_torch_file(p)):
        try:
            load_torch_weights(path)
        except ModelError as exc:
            if "Refused" in exc.user_message:
                return str(path.relative_to(folder))
    return None
