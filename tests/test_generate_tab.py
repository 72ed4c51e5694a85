"""The Generate tab: its plain functions, and the launched app driven by gradio_client."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from studio.errors import ConfigError, JobError, ModelError
from studio.schedulers import DEFAULT_SCHEDULER
from tabs.generate import build_config, gallery_items, is_local_model, load_model, reuse_parameters, stream_generation
from tiny_pipelines import tiny_ddpm, tiny_sd  # noqa: F401  (fixtures)

#: Widget values in the order of the tab's config inputs (model first).
def values(model: str, **changes):
    base = dict(model=model, prompt="a cat", negative_prompt="", width=0, height=0, num_inference_steps=2,
                guidance_scale=7.0, seed=11, batch_size=1, batch_count=1, scheduler=DEFAULT_SCHEDULER, lora="",
                lora_scale=1.0)
    base.update(changes)
    return list(base.values())


@pytest.fixture
def ctx(settings):
    from studio.context import StudioContext

    return StudioContext(settings)


def test_build_config_from_widget_values():
    cfg = build_config(*values("a/b", width=64.0, height=32.0, seed=5.0, batch_size=2.0))
    assert (cfg.width, cfg.height, cfg.seed, cfg.batch_size) == (64, 32, 5, 2)
    with pytest.raises(ConfigError, match="multiple of 8"):
        build_config(*values("a/b", width=100))
    with pytest.raises(ConfigError, match="whole number"):
        build_config(*values("a/b", seed=1.5))


def test_load_model_adapts_controls(ctx, tiny_sd, tiny_ddpm):
    sd = load_model(ctx, str(tiny_sd))
    assert sd.prompt and sd.negative and sd.guidance and sd.size and sd.lora and sd.kind == "sd"
    assert "DPM++ 2M Karras" in sd.schedulers and "LCM" not in sd.schedulers
    assert (sd.width, sd.height) == (16, 16) and "Loaded" in sd.status
    ddpm = load_model(ctx, str(tiny_ddpm))
    assert not ddpm.prompt and not ddpm.negative and not ddpm.guidance and not ddpm.lora
    assert ddpm.kind == "unconditional"
    with pytest.raises(ModelError):
        load_model(ctx, "a/b/c")


def test_local_references_load_at_once(workspace, tiny_sd):
    assert is_local_model(str(tiny_sd), workspace)
    (workspace / "run-1").mkdir()
    assert is_local_model("run-1", workspace)
    assert not is_local_model("stabilityai/sdxl-turbo", workspace) and not is_local_model("", workspace)


def test_stream_generation_yields_progress_then_result(ctx, tiny_sd):
    cfg = build_config(*values(str(tiny_sd), num_inference_steps=4, batch_count=2))
    updates = list(stream_generation(ctx, cfg))
    previews = [u["preview"] for u in updates if "preview" in u]
    assert previews and any("progress" in u for u in updates)
    assert max(previews[0].size) >= 128  # the 8x8 latent preview is enlarged for the page
    result = updates[-1]["result"]
    assert result.seeds == [11, 12]
    items = gallery_items(result.images)
    assert items[0][1] == "seed 11" and Path(items[0][0]).is_file()
    bad = list(stream_generation(ctx, build_config(*values("/no/such/model"))))
    assert "Model path not found" in bad[-1]["error"]


def test_closing_the_stream_stops_the_generation(ctx, tiny_sd):
    cfg = build_config(*values(str(tiny_sd), num_inference_steps=100, batch_count=50))
    stop = threading.Event()
    stream = stream_generation(ctx, cfg, stop)
    next(stream)
    stream.close()  # what Gradio does when the page goes away
    assert stop.is_set()
    assert ctx.pipelines.lock.acquire(timeout=30)  # the worker let go of the pipeline
    ctx.pipelines.lock.release()
    # ... and then of the device (released just after the pipeline: the next test's Generate
    # was refused "device in use" when it came in between)
    deadline = time.monotonic() + 30
    while True:
        try:
            with ctx.jobs.use_device(ctx.pipelines.device, "test"):
                break
        except JobError:
            assert time.monotonic() < deadline, "the closed stream kept the device"
            time.sleep(0.05)


def test_reuse_parameters_from_a_saved_png(ctx, tiny_sd):
    cfg = build_config(*values(str(tiny_sd), prompt="fox, snow", scheduler="UniPC", seed=77))
    last = list(stream_generation(ctx, cfg))[-1]
    assert "result" in last, last
    result = last["result"]
    from studio.model_names import NameLookup

    loaded = ctx.pipelines.loaded
    updates, notes, rows = reuse_parameters(result.images[0].path,
                                            NameLookup(ctx.workspace, (loaded.reference, loaded.png())))
    assert updates["prompt"] == "fox, snow" and updates["scheduler"] == "UniPC" and updates["seed"] == 77
    assert updates["model"] == str(tiny_sd) and notes == []  # the loaded model, found by its hash
    assert ["Prompt", "fox, snow"] in rows and ["Schedule type", "Automatic"] in rows


@pytest.mark.integration
def test_generate_tab_through_gradio_client(client, launched_app, tiny_sd, tiny_ddpm, tmp_path):
    app, _ = launched_app
    workspace = app.studio_context.workspace
    # Load: the scheduler list becomes the model's compatible samplers, size the model's own.
    status, scheduler, *_, width, height = client.predict(str(tiny_sd), DEFAULT_SCHEDULER, api_name="/load_model")
    assert status.startswith("Loaded") and (width, height) == (16, 16)
    bad_status = client.predict("a/b/c", DEFAULT_SCHEDULER, api_name="/load_model")[0]
    assert bad_status.startswith("Not loaded") and "exactly one '/'" in bad_status

    preview, progress, gallery, info, used_seed = client.predict(
        *values(str(tiny_sd), scheduler="DPM++ 2M Karras", seed=21, batch_size=2), api_name="/generate")
    assert progress == "Done." and used_seed == 21
    assert "2 images" in info and "DPM++ 2M Karras" in info
    assert [item["caption"] for item in gallery] == ["seed 21", "seed 22"]
    saved = sorted((workspace / "outputs").rglob("*.png"))
    assert [p.name.split("-")[1] for p in saved] == ["21.png", "22.png"]

    # Reuse parameters from the PNG the studio saved.
    from gradio_client import handle_file

    reused = client.predict(handle_file(str(saved[0])), DEFAULT_SCHEDULER, api_name="/reuse_parameters")
    assert reused[1] == "a cat" and reused[7] == 21 and reused[8] == "DPM++ 2M Karras"
    table = reused[-2].get("value", reused[-2])  # the Dataframe update: {"headers", "data"}
    assert ["Sampler", "DPM++ 2M"] in table["data"] and ["Schedule type", "Karras"] in table["data"]
    assert reused[-1].startswith("Parameters read")

    # A bad size is a message, not a traceback; an unconditional model loads from a run folder.
    assert "multiple of 8" in client.predict(*values(str(tiny_sd), width=100), api_name="/generate")[1]
    run = workspace / "ddpm-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "train"}))
    shutil.copytree(tiny_ddpm, run / "model")
    selected = client.predict(str(run), DEFAULT_SCHEDULER, api_name="/select_model")
    assert selected[0].startswith("Loaded run ddpm-run") and "unconditional" in selected[0]
    out = client.predict(*values(str(run), scheduler="DDIM"), api_name="/generate")
    assert out[1] == "Done." and "DDIM" in out[3]
    # Stop: a long request started from one client is stopped by the Stop button's event.
    import time

    job = client.submit(*values(str(tiny_sd), num_inference_steps=150, batch_count=20), api_name="/generate")
    deadline = time.monotonic() + 60
    while not any("step" in str(out[1]) for out in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.predict(api_name="/stop_generate").startswith("Stopping")
    final = job.result(timeout=60)
    assert final[1] == "Stopped." and final[3].startswith("Stopped: kept")
