"""Hugging Face Hub datasets: a dataset id (or a local dataset folder) -> its chosen split.

``load_hub_split`` gets the rows through ``datasets`` quickly, or fails with one clear line:

- a local path typed as an id is checked at once (it exists, is a folder, is not huge)
  before ``datasets`` would send it to the Hub or list it file by file;
- offline (``HF_HUB_OFFLINE`` / the app's ``--offline``), or with a Hub that does not
  answer within ``HUB_LOOKUP_TIMEOUT``, a dataset in the local cache loads from there and
  one that is not is a ``DataError`` at once (``datasets``' own retries take ~30 s);
- the download runs through ``call_stoppable``: Stop returns at once, and what was
  fetched stays in the cache;
- every failure of the Hub stack (gated, missing, invalid id, unknown split) becomes a
  ``DataError`` that says what to do.

Picking the image and caption columns and reading the rows as images belong to
``studio.data``, as for every other source. datasets and huggingface_hub are imported
inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

from studio.config.data import DataConfig
from studio.errors import DataError, StudioError
from studio.stopping import call_stoppable

__all__ = ["HUB_LOOKUP_TIMEOUT", "MAX_LOCAL_DATASET_FILES", "load_hub_split"]


#: Seconds the first Hub lookup of a dataset id may take before the Hub counts as unreachable.
HUB_LOOKUP_TIMEOUT = 2.0
#: Most files a local dataset folder given as a Hub id may hold (datasets lists them all first).
MAX_LOCAL_DATASET_FILES = 20_000
#: Held while ``datasets`` is switched to its cache only (``_offline_datasets``).
_OFFLINE_SWITCH = threading.Lock()


def load_hub_split(cfg: DataConfig, stop: threading.Event | None = None) -> tuple[Any, list[str], str]:
    """The chosen split of a Hub (or local dataset-folder) id, its split names and the split used.

    The download (inside ``datasets``) runs through ``call_stoppable``: Stop ends the wait
    at once, and what was fetched stays in the cache for the next load.

    Args:
        cfg: The source (``hub_id``, ``split``; "" picks "train" or the first split).
        stop: A job's stop flag.

    Returns:
        (the ``datasets.Dataset`` of the split, the split names for the dropdown, the split used).

    Raises:
        DataError: the id cannot be used (see the module doc).
        Stopped: ``stop`` was set.
    """
    import contextlib

    hub_id = cfg.hub_id.strip()
    _check_local_dataset_folder(hub_id)
    online = _hub_reachable(cfg)  # before importing datasets: offline or unreachable fails fast
    import datasets

    def load() -> tuple[Any, list[str], str]:
        with contextlib.nullcontext() if online else _offline_datasets():
            return _load_split(datasets, cfg, hub_id)

    try:
        ds, splits, split = call_stoppable(load, stop, f"downloading the dataset '{hub_id}'")
    except StudioError:  # DataError, Stopped
        raise
    except Exception as exc:  # every failure of the Hub stack becomes a clear DataError
        raise _hub_error(cfg, exc) from None
    if not splits:
        try:
            with contextlib.nullcontext() if online else _offline_datasets():
                splits = list(datasets.get_dataset_split_names(hub_id))
        except Exception:  # split names are a convenience for the dropdown
            splits = [split]
    return ds, splits, split


def _load_split(datasets: Any, cfg: DataConfig, hub_id: str) -> tuple[Any, list[str], str]:
    """``load_dataset`` of the chosen split (or of all, then 'train' or the first); splits known so far."""
    if cfg.split:
        return datasets.load_dataset(hub_id, split=cfg.split), [], cfg.split
    dd = datasets.load_dataset(hub_id)
    splits = list(dd.keys())
    split = "train" if "train" in dd else splits[0]
    return dd[split], splits, split


def _check_local_dataset_folder(hub_id: str) -> None:
    """Refuse at once a local path that is no dataset folder, before ``datasets`` looks it up.

    Without this a path that does not exist goes to the Hub as an id (minutes of network
    retries when the Hub is unreachable), and a huge folder ("/") is listed file by file.
    """
    looks_local = hub_id.startswith(("/", "~", "./", "../", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", hub_id))
    path = Path(hub_id).expanduser()
    if not looks_local and not path.exists():
        return
    if not path.exists():
        raise DataError(f"There is no folder {hub_id} on this machine.",
                        "For a folder of images choose the source 'Local folder'; for the Hub type an id "
                        "like user/name.")
    if not path.is_dir():
        raise DataError(f"{hub_id} is a file, not a dataset folder or a Hub id.",
                        "Choose the folder that holds the dataset, or the source 'Local folder'.")
    count = 0
    for _dirpath, dirnames, filenames in os.walk(path):
        count += len(filenames)
        if count > MAX_LOCAL_DATASET_FILES:
            raise DataError(f"{hub_id} holds more than {MAX_LOCAL_DATASET_FILES:,} files: it does not look like "
                            "one dataset folder.",
                            "Give the folder that holds the dataset's files (Parquet, or images with "
                            "metadata.jsonl), or use the source 'Local folder'.")
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]


def _hub_reachable(cfg: DataConfig) -> bool:
    """Fail fast before ``datasets`` spends ~30 s retrying an unreachable Hub.

    Offline (``HF_HUB_OFFLINE`` / the app's ``--offline``) or unreachable within
    ``HUB_LOOKUP_TIMEOUT``: a dataset that is not cached is one clear ``DataError`` at once.

    Returns:
        True when the Hub answered (or the id is a local folder); False when it is offline
        or unreachable but the dataset may be in the cache (load it from there).

    Raises:
        DataError: the dataset is not cached and the Hub cannot be used, or it does not exist.
    """
    hub_id = cfg.hub_id.strip()
    if Path(hub_id).expanduser().exists():
        return True
    if _hub_offline():
        if _hub_cached(hub_id):
            return False
        raise _offline_error(hub_id)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(hub_id, timeout=HUB_LOOKUP_TIMEOUT)
        return True
    except GatedRepoError:
        raise DataError(f"The dataset '{hub_id}' is gated: you must accept its terms on the Hub and be logged in.",
                        "Accept the terms on its Hub page, then run `hf auth login` and load again.") from None
    except RepositoryNotFoundError:
        raise DataError(f"Dataset '{hub_id}' was not found on the Hugging Face Hub (or it is private).",
                        "Check the spelling (user/name); for a private dataset run `hf auth login`.") from None
    except HFValidationError:
        raise DataError(f"'{hub_id}' is not a valid dataset id.",
                        "Use the form user/name, e.g. nelorth/oxford-flowers.") from None
    except Exception as exc:  # noqa: BLE001 - any transport failure means "unreachable"
        if _hub_cached(hub_id):
            return False
        raise DataError(f"Could not reach the Hugging Face Hub within {HUB_LOOKUP_TIMEOUT:g} s to get '{hub_id}' "
                        f"({_first_line(exc)}), and it is not in the local cache.",
                        "Check the network connection (or HF_ENDPOINT), or use a local folder or the bundled "
                        "emoji set.") from None


def _hub_cached(hub_id: str) -> bool:
    """Whether ``datasets`` or the Hub cache may hold ``hub_id`` (checked on disk, no network)."""
    from huggingface_hub import constants

    namespace, _, name = hub_id.rpartition("/")
    snake = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)).lower()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    candidates = [datasets_cache / "___".join(p for p in (namespace, n) if p) for n in {name, snake}]
    candidates.append(Path(constants.HF_HUB_CACHE) / ("datasets--" + hub_id.replace("/", "--")))
    return any(path.is_dir() for path in candidates)


def _offline_datasets() -> Any:
    """A context in which ``datasets`` reads only its cache (the Hub was found unreachable)."""
    import contextlib

    import datasets
    from huggingface_hub import constants

    @contextlib.contextmanager
    def switched():
        with _OFFLINE_SWITCH:
            saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
            datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
            try:
                yield
            finally:
                datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved

    return switched()


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("HF_DATASETS_OFFLINE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def _offline_error(hub_id: str) -> DataError:
    return DataError(f"The dataset '{hub_id}' is not in the local cache and the studio is offline "
                     "(HF_HUB_OFFLINE / --offline).",
                     "Start the studio with network access once to download it, or use a local folder.")


def _hub_error(cfg: DataConfig, exc: BaseException) -> DataError:
    """Map datasets / huggingface_hub exceptions to a message a person can act on."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    hub_id = cfg.hub_id.strip()
    text = str(exc)
    offline_like = isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or "OfflineModeIsEnabled" in text
    if isinstance(exc, GatedRepoError) or "gated" in text.lower():
        return DataError(f"The dataset '{hub_id}' is gated: you must accept its terms on the Hub and be logged in.",
                         "Accept the terms on its Hub page, then run `hf auth login` and load again.")
    if offline_like or (isinstance(exc, ConnectionError) and _hub_offline()):
        return _offline_error(hub_id)
    if isinstance(exc, ConnectionError):
        return DataError(f"Could not reach the Hugging Face Hub to get '{hub_id}', and it is not in the local cache.",
                         "Check the network connection, or use a local folder or the bundled emoji set.")
    if isinstance(exc, (DatasetNotFoundError, RepositoryNotFoundError, FileNotFoundError)):
        return DataError(f"Dataset '{hub_id}' was not found on the Hugging Face Hub (or it is private).",
                         "Check the spelling (user/name); for a private dataset run `hf auth login`.")
    if isinstance(exc, HFValidationError):
        return DataError(f"'{hub_id}' is not a valid dataset id.", "Use the form user/name, e.g. nelorth/oxford-flowers.")
    if isinstance(exc, ValueError) and "split" in text.lower():
        return DataError(f"Split '{cfg.split}' does not exist in '{hub_id}'.", "Pick one of the splits in the list.")
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return DataError(f"Could not load the dataset '{hub_id}': {first}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:160] if text else type(exc).__name__)
