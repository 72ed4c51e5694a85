"""A Train tab that keeps its history: restore from the run folder, resume the run on screen,
its own step target, and no resumable folder after a start that failed before training."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from studio.config.data import DataConfig
from studio.context import DatasetChoice
from studio.errors import CheckpointError
from studio.events import Event
from studio.jobs import Job, history_snapshot
from studio.runs import RunDir, discard_if_never_trained, resumable_runs, run_status
from tabs import jobtab
from tabs import train as tab

#: A tiny run: (8, 16) UNet, 8 px, a grid of 4 in 2 DDIM steps every 2 steps, a checkpoint every 2 steps.
TINY = dict(resolution=8, train_batch_size=4, learning_rate=1e-3, lr_warmup_steps=0, block_out_channels="8, 16",
            layers_per_block=1, attention_levels="", sample_every=2, num_samples=4, sample_inference_steps=2,
            save_every=2)


def tiny_values(**changes):
    values = tab.default_values()
    values.update(TINY)
    values.update(changes)
    return values


@pytest.fixture
def ctx(train_ctx):
    return train_ctx


def finish(ctx, timeout=600.0):
    job = ctx.jobs.latest("train")
    assert job.wait(timeout), job.snapshot()
    return job.snapshot()


def write_run(root: Path, events: list[Event]) -> RunDir:
    run = RunDir.create(root.parent, "train", root.name)
    run.write_config("train", {"max_train_steps": 40})
    for event in events:
        if event.kind == "samples":
            Path(event.path).write_bytes(b"png")
        run.append_event(event)
    return run


# ----------------------------------------------------------------------------- the restore, as a pure function
def test_history_snapshot_replays_every_loss_point_and_grid(workspace):
    root = workspace / "old"
    grid = lambda step: str(root / "samples" / f"step-{step:06d}.png")  # noqa: E731
    events = [Event("status", message="loading"), Event("samples", 0, 10, path=grid(0))]
    events += [Event("step", s, 10, loss=1.0 / s, smoothed_loss=0.5) for s in range(1, 6)]
    events += [Event("samples", 4, 10, path=grid(4)), Event("checkpoint", 5, 10, path=str(root / "checkpoints/x")),
               Event("stopped", 5, 10, path=str(root / "checkpoints/x"), message="stopped at step 5")]
    # resumed after a crash from the checkpoint at step 3: steps 4-5 and the grid at 4 come again
    events += [Event("step", s, 10, loss=2.0, smoothed_loss=2.0) for s in range(4, 9)]
    events += [Event("samples", 4, 10, path=grid(4)), Event("samples", 8, 10, path=grid(8)),
               Event("finished", 8, 10, path=str(root / "model"), message="finished")]
    write_run(root, events)
    snap = history_snapshot(root)
    assert [p[0] for p in snap.losses] == list(range(1, 9))  # no step twice: the resumed points replace
    assert snap.losses[2] == (3, pytest.approx(1 / 3), 0.5) and snap.losses[-1][1] == 2.0
    assert [step for step, _ in snap.samples] == [0, 4, 8]
    assert (snap.status, snap.step, snap.total, snap.name, snap.task) == ("finished", 8, 10, "old", "train")
    view = tab.render(snap)
    assert [label for _, label in view.gallery] == ["step 8", "step 4", "step 0"]
    assert len(view.losses) == 16 and view.latest_sample == grid(8)


def test_a_log_without_a_final_event_reads_as_interrupted(workspace):
    write_run(workspace / "crashed", [Event("step", 1, 10, loss=0.5, smoothed_loss=0.5)])
    snap = history_snapshot(workspace / "crashed")
    assert snap.status == "interrupted" and "Press Resume" in tab.render(snap).status
    assert run_status(workspace / "crashed") == run_status(workspace / "crashed").__class__("running", 1, 10, True)


def test_a_resumed_job_starts_from_the_runs_history(workspace):
    root = workspace / "again"
    write_run(root, [Event("step", s, 10, loss=0.1, smoothed_loss=0.1) for s in range(1, 4)]
              + [Event("stopped", 3, 10, message="stopped")])
    job = Job(7, "again", "train", root, "cpu", lambda events, stop: None, history=history_snapshot(root))
    first = job.snapshot()
    assert (first.status, first.job_id, first.error, len(first.losses)) == ("running", 7, "", 3)
    job.handle(Event("step", 4, 10, loss=0.05, smoothed_loss=0.09))
    assert [p[0] for p in job.snapshot().losses] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- through the tab's functions
def test_resume_continues_the_run_on_screen_with_its_own_step_target(ctx):
    tab.start_training(ctx, tiny_values(run_name="older", max_train_steps=4))
    first = finish(ctx)
    assert first.status == "finished" and [p[0] for p in first.losses] == [1, 2, 3, 4]
    tab.start_training(ctx, tiny_values(run_name="newer", max_train_steps=2))
    finish(ctx)
    # the picker lists both, newest first; the newer one is shown after a reload
    assert [name for _, name in jobtab.run_choices(ctx, "train")] == ["newer", "older"]
    assert [r.name for r in resumable_runs(ctx.workspace, "train")] == ["newer", "older"]
    assert jobtab.shown_run(ctx, "train") == "newer"
    # the older run, shown from disk, has its whole curve and grids
    older = tab.render(jobtab.run_snapshot(ctx, "train", "older"))
    assert [label for _, label in older.gallery] == ["step 4", "step 2", "step 0"]
    assert tab.run_target(ctx, "older") == 4
    # "Resume" with the older one on screen and its own target in the box: the older one, to its own 4 steps
    with_own_target = tab.resume_run(ctx, "older", tab.run_target(ctx, "older"))
    assert with_own_target[0].startswith("Resuming older") and "4 steps" in with_own_target[0]
    again = finish(ctx)
    assert again.name == "older" and again.total == 4 and again.step == 4
    # raising the target trains further; the job's snapshot keeps the whole curve and every grid
    tab.resume_run(ctx, "older", 8)
    longer = finish(ctx)
    assert (longer.name, longer.status, longer.step, longer.total) == ("older", "finished", 8, 8)
    assert [p[0] for p in longer.losses] == list(range(1, 9))
    assert [step for step, _ in longer.samples] == [0, 2, 4, 6, 8]
    assert tab.run_target(ctx, "older") == 8  # the run's config now holds its new target
    # what a reload shows for it from disk is the same history
    restored = history_snapshot(ctx.workspace / "older")
    assert restored.losses == longer.losses and restored.samples == longer.samples
    with pytest.raises(CheckpointError, match="'nothing' has no checkpoint"):
        tab.resume_run(ctx, "nothing")


def test_a_start_that_fails_before_training_leaves_no_run_folder(ctx, tmp_path):
    ctx.dataset.set(DatasetChoice(DataConfig(source="folder", path=str(tmp_path / "gone")), "gone", 0, False))
    message, folder, _ = tab.start_training(ctx, tiny_values(run_name="broken", max_train_steps=4))
    assert message.startswith("Started broken")
    snap = finish(ctx)
    assert snap.status == "failed" and not Path(folder).exists()
    assert "no run folder was kept" in tab.render(snap).status
    assert tab.render(snap).model_path == ""  # nothing for "Open in Generate"
    assert jobtab.run_choices(ctx, "train") == [] and resumable_runs(ctx.workspace, "train") == []


def test_discard_keeps_a_run_that_trained(workspace):
    run = write_run(workspace / "kept", [Event("step", 1, 4, loss=0.3)])
    assert not discard_if_never_trained(run) and run.root.is_dir()
    empty = write_run(workspace / "empty", [Event("status", message="loading")])
    assert discard_if_never_trained(empty) and not empty.root.exists()


def test_a_fine_tune_that_fails_before_training_leaves_no_run_folder(ctx, tmp_path):
    from tabs import finetune

    broken = tmp_path / "not-a-pipeline"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}", encoding="utf-8")  # a folder that loads as nothing
    values = finetune.default_values()
    values.update(pretrained_model_name_or_path=str(broken), run_name="ft-broken", resolution=16, max_train_steps=2)
    try:
        message, folder, _ = finetune.start_finetune(ctx, values)
    except Exception as exc:  # refused before any folder: fine as well
        assert not (ctx.workspace / "ft-broken").exists(), exc
        pytest.fail(f"expected the start to fail in the job, not before it: {exc}")
    job = ctx.jobs.latest("finetune")
    assert job.wait(600), job.snapshot()
    snap = job.snapshot()
    assert snap.status == "failed" and not Path(folder).exists()
    view = finetune.render(snap)
    assert "no run folder was kept" in view.status and view.run_path == ""  # nothing to open in Generate


# ----------------------------------------------------------------------------- the launched app
def plot_values(plot: dict, column: str) -> list:
    """The distinct values of ``column`` in a LinePlot value as gradio_client returns it."""
    index = plot["columns"].index(column)
    return sorted({row[index] for row in plot["data"]})


@pytest.mark.integration
def test_resume_and_reload_bring_back_the_whole_history_through_gradio_client(launched_app, client):
    app, _ = launched_app
    ctx = app.studio_context
    ctx.dataset.set(DatasetChoice(DataConfig(source="emoji", max_rows=8), "emoji (first 8)", 8, True))
    values = tiny_values(run_name="client-history", max_train_steps=4)
    status, folder, _, picked, target = client.predict(*[values[n] for n in tab.INPUT_NAMES],
                                                       api_name="/start_training")
    assert status.startswith("Started client-history") and picked["value"] == "client-history"
    finish(ctx)
    # a second, newer run: the page must still be able to show and resume the first one
    newer = tiny_values(run_name="client-newer", max_train_steps=2)
    client.predict(*[newer[n] for n in tab.INPUT_NAMES], api_name="/start_training")
    finish(ctx)
    # pick the older run: its whole curve and grids come from disk, and its own target fills the box
    *view, target = client.predict("client-history", False, api_name="/train_show_run")
    status, progress, plot, quality, sample, gallery, run_folder, model = view
    assert "client-history: finished" in status and target == 4
    steps = plot_values(plot, "step")
    assert steps == [1, 2, 3, 4] and len(gallery) == 3 and run_folder.endswith("client-history")
    status, folder, _, picked, target = client.predict("client-history", 6, api_name="/resume_training")
    assert status.startswith("Resuming client-history") and picked["value"] == "client-history" and target == 6
    finish(ctx)
    # what the page shows after the resume (and after a reload) is the whole run, steps 1-6, four grids
    status, progress, plot, quality, sample, gallery, *_ = client.predict(False, "client-history",
                                                                          api_name="/train_status")
    assert "client-history: finished" in status and progress.startswith("step 6/6")
    assert plot_values(plot, "step") == [1, 2, 3, 4, 5, 6]
    assert plot_values(plot, "curve") == [tab.RAW, tab.SMOOTHED]
    assert [g["caption"] for g in gallery] == ["step 6", "step 4", "step 2", "step 0"]
    # a restarted app (no job in memory) shows the same from the run folder, quality curve included
    ctx.jobs._jobs.clear()
    _, _, plot, restored_quality, sample, gallery, _, _ = client.predict(False, "client-history",
                                                                         api_name="/train_status")
    assert plot_values(plot, "step") == [1, 2, 3, 4, 5, 6] and len(gallery) == 4
    assert restored_quality == quality

    # (issue 8.6) the Dataset tab shows a load's progress on its status box only, not on every output
    status_id = next(b._id for b in app.blocks.values() if getattr(b, "elem_id", None) == "dataset-status")
    loads = [d for d in app.config["dependencies"] if d.get("api_name") in ("load_dataset", "preview_current_dataset")]
    assert len(loads) == 2 and all(d["show_progress_on"] == [status_id] for d in loads), loads
