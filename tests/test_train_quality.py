"""The sample-quality figure in a training run: events, events.jsonl, TensorBoard, the job
snapshot and the Train tab's plot frame."""

from __future__ import annotations

import json

import pytest

import studio.trainers.ddpm as ddpm
from studio.events import Event
from studio.jobs import Job, Snapshot
from tabs import train as tab
from test_ddpm_trainer import Recorder, tiny_config


def test_every_grid_is_scored_and_written_to_events_and_tensorboard(workspace):
    rec = Recorder()
    run = ddpm.train(tiny_config(workspace, max_train_steps=4, sample_every=2, run_name="scored"), rec, rec.stop)
    scored = rec.kinds("quality")
    assert [e.step for e in scored] == [0, 2, 4] == [e.step for e in rec.kinds("samples")]
    assert all(e.quality > 0 for e in scored)
    levels = {(e.noise_level, e.data_level) for e in scored}
    assert len(levels) == 1                                  # built once, the same reference all run
    noise, data = levels.pop()
    assert 0 < data < noise
    kinds = [e.kind for e in rec.events]
    assert all(kinds[i - 1] == "samples" for i, k in enumerate(kinds) if k == "quality")  # right after its grid
    assert "lower is better" in scored[0].message

    lines = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    on_disk = [line for line in lines if line["kind"] == "quality"]
    assert [(d["step"], d["quality"], d["noise_level"], d["data_level"]) for d in on_disk] == [
        (e.step, e.quality, e.noise_level, e.data_level) for e in scored]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run.logs_dir))
    board.Reload()
    assert [(s.step, pytest.approx(s.value, rel=1e-6)) for s in board.Scalars("quality/quality")] == [
        (e.step, e.quality) for e in scored]
    assert {round(s.value, 3) for s in board.Scalars("quality/noise_level")} == {round(noise, 3)}
    assert {round(s.value, 3) for s in board.Scalars("quality/data_level")} == {round(data, 3)}

    # the events alone (as a reload reads them back) rebuild the curve in a job snapshot
    job = Job(1, run.name, "train", run.root, "cpu", target=lambda events, stop: None)
    for event in run.read_events():
        job.handle(event)
    snap = job.snapshot()
    assert snap.quality == [(e.step, e.quality) for e in scored]
    assert (snap.noise_level, snap.data_level) == (noise, data)


def test_a_resumed_run_scores_against_the_same_reference(workspace):
    first = Recorder(stop_at=2)
    cfg = tiny_config(workspace, max_train_steps=4, sample_every=2, run_name="again")
    ddpm.train(cfg, first, first.stop)
    second = Recorder()
    ddpm.train(cfg.replace(resume="latest"), second, second.stop)
    a, b = first.kinds("quality")[0], second.kinds("quality")[-1]
    assert (a.noise_level, a.data_level) == (b.noise_level, b.data_level)
    assert second.kinds("quality")[-1].step == 4


def test_quality_frame_draws_the_curve_between_both_reference_lines():
    assert tab.quality_frame([], 1300.0, 95.0) is None       # no points yet: no frame (keeps the plot's types)
    frame = tab.quality_frame([(0, 1250.0), (100, 800.0), (200, 400.0)], 1300.0, 95.0)
    assert list(frame.columns) == ["step", "quality", "curve"]
    by_curve = {name: list(zip(group["step"], group["quality"])) for name, group in frame.groupby("curve")}
    assert by_curve["samples"] == [(0, 1250.0), (100, 800.0), (200, 400.0)]
    assert by_curve["noise level"] == [(0, 1300.0), (200, 1300.0)]     # flat lines over the same steps
    assert by_curve["data level"] == [(0, 95.0), (200, 95.0)]
    no_data = tab.quality_frame([(0, 10.0)], 20.0, None)       # a one-image dataset has no data level
    assert set(no_data["curve"]) == {"samples", "noise level"}


def test_render_carries_the_quality_curve_and_headline():
    snap = Snapshot(job_id=1, name="r", task="train", run_dir="/nowhere", step=200, total=1000,
                    losses=[(200, 0.1, 0.12)], quality=[(0, 1250.0), (200, 412.4)], noise_level=1300.0,
                    data_level=95.0)
    view = tab.render(snap)
    assert view.quality == [(0, 1250.0), (200, 412.4)] and (view.noise_level, view.data_level) == (1300.0, 95.0)
    assert "sample quality 412 (lower is better)" in view.progress
    assert "lower is better" in tab.QUALITY_HELP and "noise" in tab.QUALITY_HELP and "data" in tab.QUALITY_HELP
    job = Job(2, "r", "train", "/nowhere", "cpu", target=lambda events, stop: None)
    job.handle(Event("quality", step=5, quality=7.0, noise_level=9.0, data_level=1.0))
    assert job.snapshot().quality == [(5, 7.0)]
