"""Background training jobs: one thread per job, one running job per device.

``JobManager`` is the app-level owner of job threads (created once in
``tabs.build_app`` and passed to the tabs, never a module global). A job wraps a
trainer ``train(cfg, events, stop)``: it runs it in a thread, turns its events into
a ``Snapshot`` under a lock, and keeps that snapshot after the thread ends, so a
page reload re-attaches to the running (or last) job. The UI polls ``snapshot()``;
a slow browser never slows training.

The device rule ("one job per device") holds across processes too: each job holds
the machine-wide ``studio.locks.device_lock`` of its device while it runs, and
``use_device`` lets other device work (a Generate request) take the same rule, so
Generate and training never fill one device together, in one app or across an app
and a CLI run.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from studio.errors import JobError, Stopped, describe_exception
from studio.events import FINAL_KINDS, Event
from studio.locks import ProcessLock, device_key, device_lock

log = logging.getLogger(__name__)

#: The target a job runs: ``target(events, stop)``; usually a trainer bound to its config.
JobTarget = Callable[[Callable[[Event], None], threading.Event], object]

#: Most loss points a snapshot keeps (older points are thinned 2:1 beyond this).
MAX_LOSS_POINTS = 4000
#: Seconds a start (or Generate) waits for a job that has already reported its end (finished, stopped,
#: failed) but whose thread is still closing up (releasing its run folder and device), rather than
#: refusing what the page already shows as ended.
ENDING_JOB_GRACE_S = 10.0


@dataclass
class Snapshot:
    """What the UI shows of a job at one moment (a copy; safe to read anywhere).

    Attributes:
        job_id: Unique id within this app process.
        name: Run name (the run folder's name).
        task: "train", "finetune", ...
        run_dir: The run folder.
        status: "running", "finished", "stopped" or "failed" ("interrupted" for history
            restored from a run folder whose log has no final event).
        phase: Latest status text ("caching latents", "training", ...).
        step / total: Progress in optimisation steps.
        losses: (step, loss, smoothed_loss) points.
        lr, images_per_s, eta_s: From the latest step event.
        samples: (step, image path) for every sample grid so far, oldest first.
        quality: (step, quality figure) of every scored grid, oldest first (lower is better).
        noise_level / data_level: The quality figure's reference levels (pure noise, held-out data).
        quality_message: The latest quality event's text (a text-to-image run's figure per prompt).
        checkpoints: (step, checkpoint path), oldest first.
        warnings: Warning texts, oldest first.
        error: Why the job failed ("" otherwise).
        result_path: Exported model (finished) or checkpoint to resume (stopped).
        version: Increases with every event, so a poller can skip unchanged snapshots.
    """

    job_id: int
    name: str
    task: str
    run_dir: str
    status: str = "running"
    phase: str = "starting"
    step: int = 0
    total: int = 0
    losses: list[tuple[int, float, float]] = field(default_factory=list)
    lr: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    samples: list[tuple[int, str]] = field(default_factory=list)
    quality: list[tuple[int, float]] = field(default_factory=list)
    noise_level: float | None = None
    data_level: float | None = None
    quality_message: str = ""
    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    result_path: str = ""
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    version: int = 0

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def latest_sample(self) -> str | None:
        return self.samples[-1][1] if self.samples else None


def fold_event(s: Snapshot, event: Event) -> None:
    """Fold one event into snapshot ``s`` in place: the one rule for live jobs and restored history.

    A step at or before steps already seen (a run resumed from an earlier checkpoint after
    a crash) replaces the points from there on; a sample grid of a step already shown
    replaces it.
    """
    s.version += 1
    s.updated = event.time
    if event.total:
        s.total = event.total
    if event.step:
        s.step = max(s.step, event.step) if event.kind != "step" else event.step
    if event.kind == "status":
        s.phase = event.message
    elif event.kind == "step":
        s.phase = "training"
        if event.loss is not None:
            if s.losses and s.losses[-1][0] >= event.step:
                s.losses = [p for p in s.losses if p[0] < event.step]
            smoothed = event.smoothed_loss if event.smoothed_loss is not None else event.loss
            s.losses.append((event.step, float(event.loss), float(smoothed)))
            if len(s.losses) > MAX_LOSS_POINTS:
                s.losses = s.losses[: -MAX_LOSS_POINTS // 2 : 2] + s.losses[-MAX_LOSS_POINTS // 2:]
        s.lr, s.images_per_s, s.eta_s = event.lr, event.images_per_s, event.eta_s
    elif event.kind == "samples" and event.path:
        s.samples = [(step, path) for step, path in s.samples if step != event.step]
        s.samples.append((event.step, event.path))
    elif event.kind == "quality" and event.quality is not None:
        s.quality = [(step, q) for step, q in s.quality if step != event.step]
        s.quality.append((event.step, float(event.quality)))
        s.noise_level, s.data_level = event.noise_level, event.data_level
        s.quality_message = event.message
    elif event.kind == "checkpoint" and event.path:
        s.checkpoints.append((event.step, event.path))
    elif event.kind == "warning":
        s.warnings.append(event.message)
    elif event.kind in FINAL_KINDS:
        s.status = event.kind
        s.phase = event.message or event.kind
        s.eta_s = 0.0 if event.kind == "finished" else s.eta_s
        if event.kind == "failed":
            s.error = event.message
        if event.path:
            s.result_path = event.path


def history_snapshot(run_dir: str | Path, job_id: int = 0) -> Snapshot:
    """The whole history of a run folder, replayed from its ``events.jsonl``.

    What a reloaded page or a resumed run shows: every loss point and every sample grid
    since the run began, folded by the same ``fold_event`` as a live job. A log without
    a final event (the process died, or it trains elsewhere) reads as "interrupted".
    """
    from studio.runs import RunDir

    run = RunDir(run_dir)
    config = run.read_config()
    s = Snapshot(job_id=job_id, name=run.name, task=str(config.get("task", "")), run_dir=str(run.root))
    events = run.read_events()
    for event in events:
        fold_event(s, event)
    if s.status == "running":
        s.status, s.phase = "interrupted", "no final event in events.jsonl (the process ended, or trains elsewhere)"
    s.images_per_s = s.eta_s = None
    if events:
        s.started, s.updated = events[0].time, events[-1].time
    return s


def continued_snapshot(history: Snapshot, job_id: int) -> Snapshot:
    """A running job's first snapshot that carries on ``history`` (a resumed run keeps its past)."""
    s = copy.deepcopy(history)
    s.job_id, s.status, s.phase, s.error, s.result_path, s.version = job_id, "running", "starting", "", "", 0
    s.started = s.updated = time.time()
    return s


class Job:
    """One background run. Created by ``JobManager.start``; read through ``snapshot()``."""

    def __init__(self, job_id: int, name: str, task: str, run_dir: str | Path, device: str,
                 target: JobTarget, on_event: Callable[[Event], None] | None = None,
                 history: Snapshot | None = None) -> None:
        self.id = job_id
        self.device = device
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._snapshot = (continued_snapshot(history, job_id) if history is not None
                          else Snapshot(job_id=job_id, name=name, task=task, run_dir=str(run_dir)))
        self._snapshot.name, self._snapshot.task, self._snapshot.run_dir = name, task, str(run_dir)
        self._target = target
        self._on_event = on_event
        self._done = threading.Event()
        self.device_lock: ProcessLock | None = None  # released when the thread ends
        self.thread = threading.Thread(target=self._run, name=f"job-{job_id}-{name}", daemon=True)

    # -- reading -----------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """A deep copy of the current state."""
        with self._lock:
            return copy.deepcopy(self._snapshot)

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    @property
    def name(self) -> str:
        """The run name (without copying the snapshot)."""
        with self._lock:
            return self._snapshot.name

    @property
    def version(self) -> int:
        """The snapshot's version, without copying it (pollers compare it to skip unchanged states)."""
        with self._lock:
            return self._snapshot.version

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends; True if it did within ``timeout``."""
        return self._done.wait(timeout)

    # -- commands ----------------------------------------------------------------
    def stop(self) -> None:
        """Ask the trainer to stop after its current step (it saves a checkpoint)."""
        self.stop_event.set()

    # -- the thread --------------------------------------------------------------
    def handle(self, event: Event) -> None:
        """Fold one event into the snapshot (called from the trainer's thread)."""
        with self._lock:
            fold_event(self._snapshot, event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken observer must not kill training
                log.exception("event observer failed")

    def _run(self) -> None:
        try:
            self._target(self.handle, self.stop_event)
            with self._lock:
                ended = self._snapshot.status != "running"
            if not ended:  # trainer returned without a final event
                self.handle(Event("stopped" if self.stop_event.is_set() else "finished",
                                  message="stopped" if self.stop_event.is_set() else "finished"))
        except Stopped as exc:  # a phase before the loop saw the stop flag: nothing failed
            self.handle(Event("stopped", message=exc.message))
        except BaseException as exc:  # noqa: BLE001 - the job reports every failure
            log.error("job %s failed:\n%s", self.id, traceback.format_exc())
            self._write_error_log(exc)
            self.handle(Event("failed", message=describe_exception(exc)))
        finally:
            if self.device_lock is not None:
                self.device_lock.release()
            self._done.set()

    def _write_error_log(self, exc: BaseException) -> None:
        try:
            run_dir = Path(self._snapshot.run_dir)
            if not run_dir.is_dir():  # a failed start removed its folder: nothing to write into
                return
            logs = run_dir / "logs"
            logs.mkdir(exist_ok=True)
            (logs / "error.txt").write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
        except OSError:
            pass


class JobManager:
    """Starts jobs, refuses a second one on a busy device, and remembers the last one.

    Thread-safe; one instance per app.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._device_users: dict[str, str] = {}  # device key -> what holds it outside a job (Generate)

    def start(self, name: str, task: str, run_dir: str | Path, target: JobTarget,
              device: str = "default", on_event: Callable[[Event], None] | None = None,
              history: Snapshot | None = None) -> Job:
        """Start ``target`` in a new thread.

        Args:
            name: Run name shown to the person.
            task: "train", "finetune", ...
            run_dir: The run folder (for the snapshot and the error log).
            target: ``target(events, stop)``.
            device: Jobs on the same device exclude each other.
            on_event: Extra observer called after each event is folded in.
            history: The run's past (``history_snapshot``) when it is resumed: the job's
                snapshot starts from it, so the whole loss curve and every grid stay.

        Raises:
            JobError: when a job (or Generate) already uses ``device`` in this process or
                another studio process on this machine, naming it.
        """
        self._let_ending_job_close(device)
        with self._lock:
            busy = self.running(device)
            if busy is not None:
                s = busy.snapshot()
                progress = f"step {s.step}/{s.total}" if s.total else s.phase
                raise JobError(
                    f"A {s.task} job is already running on {device}: '{s.name}' ({progress}).",
                    "Stop it first, or wait for it to finish.",
                )
            key = device_key(device)
            if key in self._device_users:
                raise JobError(f"{self._device_users[key]} is running on {key}.",
                               "Start again when it has finished (or press its Stop).")
            lock = device_lock(device, f"{task} '{name}'").acquire()
            job = Job(next(self._ids), name, task, run_dir, device, target, on_event, history)
            job.device_lock = lock
            self._jobs[job.id] = job
        try:
            job.thread.start()
        except BaseException:
            lock.release()
            raise
        return job

    def _let_ending_job_close(self, device: str) -> None:
        """Wait (``ENDING_JOB_GRACE_S`` at most) for a job on ``device`` whose snapshot already says it ended:
        its thread still releases the run folder and the device, and Resume right after Stop must not be
        refused for that."""
        ending = self.running(device)
        if ending is not None and ending.snapshot().status in FINAL_KINDS:
            ending.wait(ENDING_JOB_GRACE_S)

    def running(self, device: str | None = None) -> Job | None:
        """The running job on ``device`` (any device when None), or None."""
        key = None if device is None else device_key(device)
        for job in reversed(list(self._jobs.values())):
            if job.running and (key is None or device_key(job.device) == key):
                return job
        return None

    @contextlib.contextmanager
    def use_device(self, device: str, what: str) -> Iterator[None]:
        """Hold ``device`` for work that is not a job (a Generate request) under the job rule.

        Raises:
            JobError: when a training job runs on the device (here or in another studio
                process), naming it, so Generate and training never fill one device together.
        """
        key = device_key(device)
        self._let_ending_job_close(device)
        with self._lock:
            busy = self.running(device)
            if busy is not None:
                s = busy.snapshot()
                progress = f"step {s.step}/{s.total}" if s.total else s.phase
                raise JobError(f"The {key} device is busy with the {s.task} job '{s.name}' ({progress}).",
                               f"{what} can run when it finishes, or after you stop it.")
            lock = device_lock(device, what).acquire()
            self._device_users[key] = what
        try:
            yield
        finally:
            with self._lock:
                self._device_users.pop(key, None)
            lock.release()

    def get(self, job_id: int) -> Job | None:
        """The job with this id, running or ended."""
        return self._jobs.get(job_id)

    def latest(self, task: str | None = None) -> Job | None:
        """The most recent job (of ``task`` when given): what a reloaded page re-attaches to."""
        for job in reversed(list(self._jobs.values())):
            if task is None or job.snapshot().task == task:
                return job
        return None

    def stop_all(self, timeout: float = 30.0) -> None:
        """Ask every running job to stop and wait for them (app shutdown, tests)."""
        jobs = [j for j in self._jobs.values() if j.running]
        for job in jobs:
            job.stop()
        for job in jobs:
            job.wait(timeout)
