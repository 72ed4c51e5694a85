"""The run folder: one folder per training run under the workspace.

Layout (the same for the UI, the CLI and the tests)::

    <workspace>/<run name>/
        config.json     the task config the run was started with (+ "task")
        events.jsonl    one JSON event per line (loss history, samples, checkpoints)
        samples/        step-000000.png ... fixed-seed grids or validation images
        checkpoints/    step-00000100/ ... resumable training state (see checkpoints.py)
        model/          the exported diffusers pipeline (Train, full fine-tune)
        lora/           LoRA weights, diffusers format + one kohya .safetensors
        logs/           TensorBoard event files, error.txt

The Generate tab lists every run with a ``model/`` or ``lora/`` as a model.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import ConfigError
from studio.events import Event

if TYPE_CHECKING:
    from studio.locks import ProcessLock

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_run_name(name: str) -> str:
    """Return ``name`` if it is a safe folder name, else raise ``ConfigError``."""
    if not _NAME_OK.match(name) or ".." in name:
        raise ConfigError(
            f"Run name {name!r} is not allowed: use letters, digits, '.', '_' or '-' (at most 100), "
            "starting with a letter or digit."
        )
    return name


class RunDir:
    """Paths and writers of one run folder.

    Args:
        root: The run folder (created by ``create``; may exist when resuming).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, workspace: str | Path, task: str, name: str = "") -> "RunDir":
        """Make a new run folder ``<workspace>/<name>``; a default name is ``<task>-<time>``.

        A run folder of that name that never got a checkpoint, a model or LoRA weights
        (the run died or failed before its first checkpoint) is restarted in place: it
        is emptied and reused, so the name is never lost to a dead run.

        Raises:
            ConfigError: if ``name`` is unsafe or a run with that name already exists
                (with something in it worth resuming).
            JobError: if another process is training into that folder right now.
        """
        from studio.settings import check_workspace

        workspace = check_workspace(workspace)  # a file, or a folder that cannot be made: ConfigError
        if name:
            root = workspace / check_run_name(name)
            if root.exists():
                if not cls(root).restartable():
                    raise ConfigError(f"A run named {name!r} already exists in {workspace}. "
                                      "Pick another name, or resume it instead.")
                cls(root).reset_for_restart()
                return cls(root)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            root, n = workspace / f"{task}-{stamp}", 1
            while root.exists():
                n += 1
                root = workspace / f"{task}-{stamp}-{n}"
        root.mkdir(parents=True)
        run = cls(root)
        for sub in (run.samples_dir, run.checkpoints_dir, run.logs_dir):
            sub.mkdir(exist_ok=True)
        return run

    def lock(self, what: str) -> "ProcessLock":
        """This folder's lock (``.lock``), not yet taken: one trainer per run folder, across processes."""
        from studio.locks import run_lock

        return run_lock(self.root, what)

    def restartable(self) -> bool:
        """True for a folder that holds nothing worth resuming: no intact checkpoint, no model/, no LoRA."""
        from studio.checkpoints import find_latest_valid

        if not self.root.is_dir() or (self.model_dir / "model_index.json").is_file():
            return False
        if self.lora_dir.is_dir() and any(self.lora_dir.glob("*.safetensors")):
            return False
        return find_latest_valid(self.checkpoints_dir) is None

    def reset_for_restart(self) -> None:
        """Empty a ``restartable`` folder for a fresh start under the same name.

        The last error log is kept as ``logs/previous-error.txt``.

        Raises:
            JobError: when another process holds the folder's lock (it is training now).
        """
        import shutil

        with self.lock("restart"):  # refuses while another process trains here
            error = self.logs_dir / "error.txt"
            previous = error.read_bytes() if error.is_file() else None
            for child in self.root.iterdir():
                if child.name == ".lock":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            for sub in (self.samples_dir, self.checkpoints_dir, self.logs_dir):
                sub.mkdir(exist_ok=True)
            if previous is not None:
                (self.logs_dir / "previous-error.txt").write_bytes(previous)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def lora_dir(self) -> Path:
        return self.root / "lora"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def write_config(self, task: str, config: dict[str, Any]) -> None:
        """Write ``config.json`` as ``{"task": task, **config}``, atomically: the tab reads it (the run's
        step target) while the trainer that just started rewrites it."""
        from studio.atomic import write_atomic

        text = json.dumps({"task": task, **config}, indent=2) + "\n"
        write_atomic(self.config_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def read_config(self) -> dict[str, Any]:
        """The dict written by ``write_config`` ({} when there is none)."""
        if not self.config_path.is_file():
            return {}
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def append_event(self, event: Event) -> None:
        """Append one event to ``events.jsonl`` (thread-safe, flushed)."""
        line = json.dumps(event.to_dict())
        with self._lock, open(self.events_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def read_events(self) -> list[Event]:
        """All events recorded so far; a torn last line (crash mid-write) is skipped."""
        if not self.events_path.is_file():
            return []
        events = []
        for line in self.events_path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(Event.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError):
                continue
        return events

    def sample_path(self, step: int, suffix: str = "") -> Path:
        """``samples/step-000123<suffix>.png``."""
        return self.samples_dir / f"step-{step:06d}{suffix}.png"


@dataclass
class RunInfo:
    """A run as the Generate tab and the Train tab list it."""

    name: str
    path: Path
    task: str
    has_model: bool
    has_lora: bool
    modified: float


def list_runs(workspace: str | Path) -> list[RunInfo]:
    """Every run folder under ``workspace``, newest first."""
    workspace = Path(workspace)
    if not workspace.is_dir():
        return []
    runs = []
    for child in workspace.iterdir():
        if not child.is_dir() or not (child / "config.json").is_file():
            continue
        try:
            task = json.loads((child / "config.json").read_text(encoding="utf-8")).get("task", "")
        except (json.JSONDecodeError, OSError):
            task = ""
        runs.append(RunInfo(
            name=child.name, path=child, task=task,
            has_model=(child / "model" / "model_index.json").is_file(),
            has_lora=(child / "lora").is_dir() and any((child / "lora").glob("*.safetensors")),
            modified=child.stat().st_mtime,
        ))
    return sorted(runs, key=lambda r: r.modified, reverse=True)


# --------------------------------------------------------------------------- status of a run on disk
@dataclass
class RunStatus:
    """Where a run stands, read from the tail of its ``events.jsonl``.

    Attributes:
        state: "finished", "stopped", "failed" (its last final event), "running" when the
            log has no final event yet (training now, or interrupted by a crash), or ""
            when the run has no events at all.
        step: The last step the log mentions.
        total: The planned number of steps (0 when unknown).
        trained: True when at least one optimisation step was logged.
    """

    state: str = ""
    step: int = 0
    total: int = 0
    trained: bool = False


#: Bytes read from the end of ``events.jsonl`` to find a run's status (a few dozen events).
_TAIL_BYTES = 16384


def run_status(root: str | Path) -> RunStatus:
    """The status of the run folder ``root`` from the last events of its log (cheap for huge logs)."""
    path = Path(root) / "events.jsonl"
    if not path.is_file():
        return RunStatus()
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - _TAIL_BYTES))
        tail = fh.read().decode("utf-8", errors="replace").splitlines()
    if size > _TAIL_BYTES:
        tail = tail[1:]  # the first line is cut
    status = RunStatus()
    for line in tail:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = data.get("kind", "")
        status.step = max(status.step, int(data.get("step") or 0))
        status.total = int(data.get("total") or status.total)
        if kind == "step":
            status.trained = True
            status.state = "running"
        elif kind in ("finished", "stopped", "failed"):
            status.state = kind
        elif not status.state:
            status.state = "running"
    status.trained = status.trained or status.step > 0
    return status


def resumable_runs(workspace: str | Path, task: str) -> list[RunInfo]:
    """Runs of ``task`` with a complete checkpoint, newest first: what Resume can continue.

    A run whose start failed before training has no checkpoint and is never listed.
    Checkpoint files are checked for presence and size here; resume verifies hashes.
    """
    from studio.checkpoints import list_checkpoints

    return [info for info in list_runs(workspace)
            if info.task == task and any(c.valid for c in list_checkpoints(info.path / "checkpoints"))]


def discard_if_never_trained(run: RunDir) -> bool:
    """Delete ``run``'s folder when it holds no trained state (no checkpoint, no logged step).

    Called when a new run's start fails before training, so the workspace keeps no
    half-made run that Resume or Generate could offer. Returns True when it was removed.
    """
    import shutil

    from studio.checkpoints import list_checkpoints

    if not run.root.is_dir() or list_checkpoints(run.checkpoints_dir) or run.model_dir.exists() \
            or run.lora_dir.exists():
        return False
    if any(event.kind == "step" for event in run.read_events()):
        return False
    shutil.rmtree(run.root, ignore_errors=True)
    return not run.root.exists()
