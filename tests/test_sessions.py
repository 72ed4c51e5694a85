"""Several people sharing one studio: per-session Generate stop, and one device rule
for Generate and training (in one app and across processes)."""

from __future__ import annotations

import tempfile
import threading
import time

import pytest

from tiny_pipelines import tiny_sd  # noqa: F401  (fixture)
from test_generate_tab import values


def _wait_for_step(job, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any("step" in str(out[1]) for out in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("step" in str(out[1]) for out in job.outputs()), job.outputs()


@pytest.mark.integration
def test_stop_in_one_session_does_not_stop_another(launched_app, tiny_sd):
    from gradio_client import Client

    _, url = launched_app
    alice = Client(url, verbose=False, download_files=tempfile.mkdtemp())
    bob = Client(url, verbose=False, download_files=tempfile.mkdtemp())
    assert alice.session_hash != bob.session_hash
    job = alice.submit(*values(str(tiny_sd), num_inference_steps=12, batch_count=3), api_name="/generate")
    _wait_for_step(job)
    # Bob presses Stop in his own tab: Alice's images are not his to stop.
    assert bob.predict(api_name="/stop_generate") == "Nothing of yours is generating."
    final = job.result(timeout=120)
    assert final[1] == "Done." and "3 images" in final[3], final
    # Alice's own Stop still stops her request.
    job = alice.submit(*values(str(tiny_sd), num_inference_steps=150, batch_count=20), api_name="/generate")
    _wait_for_step(job)
    assert alice.predict(api_name="/stop_generate").startswith("Stopping")
    final = job.result(timeout=60)
    assert final[1] == "Stopped." and final[3].startswith("Stopped: kept")


@pytest.mark.integration
def test_generate_is_refused_while_training_holds_the_device(launched_app, client, tiny_sd):
    app, _ = launched_app
    release = threading.Event()
    job = app.studio_context.jobs.start("busy-run", "train", app.studio_context.workspace / "busy-run",
                                        lambda events, stop: release.wait(60), device="cpu")
    try:
        out = client.predict(*values(str(tiny_sd)), api_name="/generate")
        assert out[1].startswith("Failed: The cpu device is busy with the train job 'busy-run'"), out
    finally:
        release.set()
        job.wait(30)
    assert client.predict(*values(str(tiny_sd)), api_name="/generate")[1] == "Done."


def test_device_rule_holds_across_processes(tmp_path):
    """A job in another process (a CLI run) holds the device: this app refuses, naming its PID."""
    import subprocess
    import sys

    from studio.errors import JobError
    from studio.jobs import JobManager

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from studio.locks import device_lock; "
         "device_lock('cpu', \"train 'cli-run'\").acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        jobs = JobManager()
        with pytest.raises(JobError, match=rf"held by process {holder.pid}: train 'cli-run'"):
            jobs.start("app-run", "train", tmp_path, lambda ev, st: None, device="cpu")
        with pytest.raises(JobError, match=rf"held by process {holder.pid}"):
            with jobs.use_device("cpu", "Generate"):
                pass
    finally:
        holder.kill()  # kill -9: the kernel frees the lock, the file stays behind with a dead PID
        holder.wait()
    job = JobManager().start("app-run", "train", tmp_path, lambda ev, st: None, device="cpu")
    assert job.wait(10) and job.snapshot().status == "finished"
