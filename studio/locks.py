"""Locks between processes: one writer per run folder, one job per device on a machine.

A ``ProcessLock`` is a small file holding its owner's PID and what it is doing,
locked with ``fcntl.flock`` for as long as the owner holds it. The kernel drops the
lock when the owner dies (even by ``kill -9``), so a lock file left behind by a dead
process never blocks anyone: its PID is only read to name a living holder in the
refusal ("... held by process 4242: train 'emoji-run' since 21:40"). Where ``flock``
does not exist, the PID in the file decides: a holder whose PID is gone is stale.

Two kinds of lock use it:

* ``run_lock(run_root)``: ``<run>/.lock``, taken by a trainer for the whole run, so two
  processes never train into the same run folder.
* ``device_lock(device)``: ``<lock dir>/device-<device>.lock``, taken by the app's
  ``JobManager`` for each job, by Generate for each request and by the CLI for its run,
  so "one job per device" holds across every studio process on the machine. The lock
  folder is ``$STUDIO_LOCK_DIR`` or ``<temp>/diffusion-studio-locks-<uid>`` (tests give
  each session its own).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

from studio.errors import JobError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: PID files only
    fcntl = None  # type: ignore[assignment]

#: The environment variable naming the folder of device locks.
LOCK_DIR_ENV = "STUDIO_LOCK_DIR"


def lock_dir() -> Path:
    """The folder holding the machine's device locks (created on demand)."""
    folder = os.environ.get(LOCK_DIR_ENV) or os.path.join(
        tempfile.gettempdir(), f"diffusion-studio-locks-{getattr(os, 'getuid', lambda: 0)()}")
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


def device_key(device: str) -> str:
    """The name one device is locked under: 'auto' resolved, 'cuda' = 'cuda:0', lower case."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        from studio.devices import resolve_device

        name = resolve_device("auto")
    return "cuda:0" if name == "cuda" else name


def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class ProcessLock:
    """An exclusive lock on ``path`` held by this process (see the module docstring).

    Args:
        path: The lock file.
        what: What the holder is doing, shown to whoever is refused ("train 'run-1'").
        busy_message: How a refusal starts ("Run folder X is in use"); the holder is appended.
    """

    def __init__(self, path: str | Path, what: str, busy_message: str) -> None:
        self.path = Path(path)
        self.what = what
        self.busy_message = busy_message
        self._fd: int | None = None
        self._guard = threading.Lock()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "ProcessLock":
        """Take the lock or raise ``JobError`` naming the holder's PID and task."""
        with self._guard:
            if self._fd is not None:
                return self
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fcntl is not None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    raise self._busy_error() from None
            else:  # pragma: no cover - no flock: a PID file, stale when its PID is gone
                holder = read_holder(self.path)
                if holder and pid_alive(int(holder.get("pid", 0))):
                    raise self._busy_error()
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            info = json.dumps({"pid": os.getpid(), "what": self.what, "since": time.time()})
            os.ftruncate(fd, 0)
            os.write(fd, info.encode("utf-8"))
            self._fd = fd
            return self

    def release(self) -> None:
        """Let go (the file stays; an unlocked file is free whatever PID it names)."""
        with self._guard:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _busy_error(self) -> JobError:
        holder = read_holder(self.path)
        if holder:
            since = time.strftime("%H:%M:%S", time.localtime(float(holder.get("since", 0))))
            who = f"process {holder.get('pid', '?')}: {holder.get('what', 'a job')} since {since}"
        else:
            who = "another process"
        return JobError(f"{self.busy_message}, held by {who}.",
                        "Wait for it to finish or stop it; a lock left by a process that died is freed by itself.")

    def __enter__(self) -> "ProcessLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(path: str | Path) -> dict:
    """The {"pid", "what", "since"} a lock file names ({} when empty or unreadable)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_lock(run_root: str | Path, what: str) -> ProcessLock:
    """The lock of one run folder (``<run>/.lock``), not yet taken."""
    root = Path(run_root)
    return ProcessLock(root / ".lock", what, f"Run folder {root.name} is in use")


def device_lock(device: str, what: str) -> ProcessLock:
    """The machine-wide lock of ``device`` (not yet taken)."""
    key = device_key(device)
    safe = "".join(c if c.isalnum() else "-" for c in key)
    return ProcessLock(lock_dir() / f"device-{safe}.lock", what, f"The device {key} is in use")
