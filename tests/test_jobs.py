"""JobManager: threads, snapshots, one job per device, failures reported, not raised."""

from __future__ import annotations

import threading
import time

import pytest

from studio.errors import DataError, JobError
from studio.events import Event
from studio.jobs import JobManager


def _steps(n: int, gate: threading.Event | None = None):
    def target(events, stop):
        events(Event("status", message="warming up", total=n))
        for step in range(1, n + 1):
            if gate is not None:
                gate.wait(5)
            if stop.is_set():
                events(Event("stopped", step=step, path="ckpt", message="stopped at your request"))
                return
            events(Event("step", step=step, total=n, loss=1.0 / step, smoothed_loss=1.0 / step, lr=1e-4))
        events(Event("samples", step=n, path="grid.png"))
        events(Event("finished", step=n, path="model", message="done"))
    return target


def test_snapshot_follows_events(tmp_path):
    jobs = JobManager()
    job = jobs.start("run-a", "train", tmp_path, _steps(5))
    assert job.wait(10)
    s = job.snapshot()
    assert s.status == "finished" and s.step == 5 and s.total == 5
    assert [p[0] for p in s.losses] == [1, 2, 3, 4, 5]
    assert s.latest_sample == "grid.png" and s.result_path == "model"
    assert s.version == 8  # status + 5 steps + samples + finished
    assert job.version == s.version  # the cheap read pollers use


def test_second_job_on_same_device_is_refused_naming_the_first(tmp_path):
    jobs = JobManager()
    gate = threading.Event()
    first = jobs.start("first-run", "train", tmp_path, _steps(3, gate), device="cpu")
    with pytest.raises(JobError, match="first-run"):
        jobs.start("second-run", "finetune", tmp_path, _steps(1), device="cpu")
    other = jobs.start("other-device", "train", tmp_path, _steps(1), device="cuda:1")
    gate.set()
    assert first.wait(10) and other.wait(10)
    third = jobs.start("third", "train", tmp_path, _steps(1), device="cpu")  # free again
    assert third.wait(10)


def test_a_job_that_reported_its_end_is_waited_for_not_refused(tmp_path):
    """Resume right after a Stop: the snapshot already says "stopped" while the trainer's thread still
    closes up; a new start on that device waits for it instead of refusing it as running."""
    jobs = JobManager()
    closing = threading.Event()

    def stops_then_closes(events, stop):
        events(Event("stopped", step=1, path="ckpt", message="stopped at your request"))
        closing.set()
        time.sleep(0.5)  # releasing the run folder, writing the progress GIF...

    first = jobs.start("first", "train", tmp_path, stops_then_closes, device="cpu")
    assert closing.wait(10) and first.snapshot().status == "stopped" and first.running
    second = jobs.start("second", "train", tmp_path, _steps(1), device="cpu")  # not refused
    assert not first.running and second.wait(10) and second.snapshot().status == "finished"
    # a job that has not reported its end is still refused at once
    gate = threading.Event()
    third = jobs.start("third", "train", tmp_path, _steps(3, gate), device="cpu")
    with pytest.raises(JobError, match="third"):
        jobs.start("fourth", "train", tmp_path, _steps(1), device="cpu")
    gate.set()
    assert third.wait(10)


def test_stop_reaches_the_target(tmp_path):
    jobs = JobManager()
    gate = threading.Event()
    job = jobs.start("r", "train", tmp_path, _steps(100, gate))
    job.stop()
    gate.set()
    assert job.wait(10)
    s = job.snapshot()
    assert s.status == "stopped" and s.step == 1 and s.result_path == "ckpt"


def test_studio_error_becomes_the_snapshot_error(tmp_path):
    def target(events, stop):
        raise DataError("The folder /x holds no images.")

    job = JobManager().start("r", "train", tmp_path, target)
    assert job.wait(10)
    s = job.snapshot()
    assert s.status == "failed" and s.error == "The folder /x holds no images."


def test_bug_is_reported_without_traceback_and_logged(tmp_path):
    def target(events, stop):
        raise KeyError("boom")

    job = JobManager().start("r", "train", tmp_path, target)
    assert job.wait(10)
    s = job.snapshot()
    assert s.status == "failed" and "KeyError" in s.error and "Traceback" not in s.error
    assert "Traceback" in (tmp_path / "logs" / "error.txt").read_text()


def test_latest_reattaches_by_task(tmp_path):
    jobs = JobManager()
    a = jobs.start("a", "train", tmp_path, _steps(1))
    a.wait(10)
    b = jobs.start("b", "finetune", tmp_path, _steps(1))
    b.wait(10)
    assert jobs.latest("train") is a and jobs.latest("finetune") is b and jobs.latest() is b
    assert jobs.get(a.id) is a and jobs.running() is None


def test_observer_errors_do_not_kill_the_job(tmp_path):
    def bad_observer(event):
        raise RuntimeError("observer broke")

    job = JobManager().start("r", "train", tmp_path, _steps(3), on_event=bad_observer)
    assert job.wait(10) and job.snapshot().status == "finished"


def test_loss_history_is_bounded(tmp_path, monkeypatch):
    import studio.jobs as jobs_mod

    monkeypatch.setattr(jobs_mod, "MAX_LOSS_POINTS", 100)
    job = JobManager().start("r", "train", tmp_path, _steps(1000))
    assert job.wait(20)
    losses = job.snapshot().losses
    assert len(losses) <= 101 and losses[-1][0] == 1000 and losses[0][0] == 1
