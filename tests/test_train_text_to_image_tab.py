"""The Train tab's text-to-image mode: the settings a person sees when picking it, and a tiny run
through the launched app (start, validation rows per prompt, finished, resume to a higher step target,
a reload's history and settings mode, Open in Generate, a prompt in Generate)."""

from __future__ import annotations

import pytest

from studio.config.data import DataConfig
from studio.config.text_to_image import TextToImageConfig
from studio.context import DatasetChoice
from studio.schedulers import DEFAULT_SCHEDULER
from tabs import train as tab

#: A tiny text-to-image run (the config's model sizes at 8 px): 2 autoencoder + 3 diffusion steps,
#: two prompts of 2 images in 2 PNDM steps, grids and checkpoints at the stage ends only.
TINY = dict(mode="text-to-image", resolution=8, train_batch_size=2, vae_steps=2, max_train_steps=3,
            lr_warmup_steps=0, validation_prompts="red heart\nblue circle", images_per_prompt=2, sample_every=0,
            save_every=0, sample_inference_steps=2)


def tiny_values(**changes):
    values = tab.default_values()
    values.update(TINY)
    values.update(changes)
    return values


def applied(values, changes):
    """The widget values after a mode switch's ``changes``."""
    return {**values, **{name: c["value"] for name, c in changes.items() if "value" in c}}


def test_picking_text_to_image_shows_its_settings_with_its_defaults_and_keeps_typed_values():
    values = dict(tab.default_values(), learning_rate=5e-4, run_name="mine")  # the person typed a learning rate
    changes = tab.mode_changes("text-to-image", dict(values, mode="text-to-image"))
    # the unconditional mode's own settings hide (preset, pretrained DDPM, betas, noise schedule, architecture...)
    assert {n for n, c in changes.items() if c.get("visible") is False} == set(tab.UNCONDITIONAL_FIELDS)
    assert {"preset", "init_from", "num_train_timesteps", "block_out_channels", "num_samples"} <= set(
        tab.UNCONDITIONAL_FIELDS)
    # its own show: the prompts box first of all
    assert {n for n, c in changes.items() if c.get("visible") is True} == set(tab.TEXT_TO_IMAGE_FIELDS)
    assert "validation_prompts" in tab.SECTIONS[0][2]  # in the always-open group, not a closed accordion
    # shared settings: its labels and defaults (no random flip: captions may say left or right), typed ones kept
    t2i = TextToImageConfig()
    assert changes["sample_inference_steps"]["label"] == "Sampling steps (PNDM)"
    assert changes["max_train_steps"]["info"] == TextToImageConfig.help_for("max_train_steps")
    assert changes["random_flip"]["value"] is False
    # both modes default to 3,000 steps, so the box keeps its value: no change is sent
    assert "value" not in changes["max_train_steps"] and values["max_train_steps"] == t2i.max_train_steps
    assert changes["prediction_type"]["choices"] == ["epsilon", "v_prediction"]  # no DDPM 'sample'
    assert "value" not in changes["learning_rate"] and "value" not in changes["run_name"]
    after = applied(dict(values, mode="text-to-image"), changes)
    cfg = tab.build_config(after)
    assert isinstance(cfg, TextToImageConfig) and cfg.learning_rate == 5e-4 and not cfg.random_flip
    assert cfg.validation_prompts == t2i.validation_prompts  # one prompt per line in the box
    assert "Steps 1–600 train the autoencoder" in tab.model_summary(after)
    # and back: the unconditional defaults and labels return, the typed learning rate stays
    back = tab.mode_changes("unconditional", dict(after, mode="unconditional"))
    assert {n for n, c in back.items() if c.get("visible") is False} == set(tab.TEXT_TO_IMAGE_FIELDS)
    assert back["sample_inference_steps"]["label"] == "Sampling steps (DDIM)"
    assert "sample" in back["prediction_type"]["choices"]
    restored = applied(dict(after, mode="unconditional"), back)
    assert {n: restored[n] for n in tab.SHARED_FIELDS} == {**{n: tab.default_values()[n] for n in tab.SHARED_FIELDS},
                                                           "learning_rate": 5e-4, "run_name": "mine"}


def test_grid_captions_name_the_autoencoder_stage_and_each_prompt_row(tmp_path):
    from studio.runs import RunDir

    run = RunDir.create(tmp_path, "train", "t2i")
    run.write_config("train", TextToImageConfig(vae_steps=10, validation_prompts=("red heart", "flag")).to_dict())
    caption = tab.grid_captions(run.root)
    assert caption(10) == "step 10 · autoencoder: images (top), reconstructions (bottom)"
    assert caption(11) == "step 11 · rows: red heart / flag"
    assert tab.grid_captions(tmp_path / "missing")(5) == "step 5"


@pytest.mark.integration
def test_a_tiny_text_to_image_run_through_the_launched_app_opens_in_generate(launched_app, client):
    app, _ = launched_app
    ctx = app.studio_context
    ctx.dataset.set(DatasetChoice(DataConfig(source="emoji", max_rows=8), "emoji (first 8)", 8, True))
    values = tiny_values(run_name="t2i-app")
    status, folder, command, picked, target = client.predict(*[values[n] for n in tab.INPUT_NAMES],
                                                             api_name="/start_training")
    assert status.startswith("Started t2i-app: text-to-image, 8 px") and picked["value"] == "t2i-app"
    assert target == 5  # the step target counts the autoencoder's 2 steps, as the progress line does
    job = ctx.jobs.latest("train")
    assert job.wait(300), job.snapshot()
    status, progress, plot, quality, sample, gallery, run_folder, model = client.predict(
        False, "t2i-app", api_name="/train_status")
    assert "t2i-app: finished" in status and progress.startswith("step 5/5")
    assert "Grid rows, top to bottom: red heart / blue circle. Quality per prompt at step 5: 'red heart'" in progress
    assert [g["caption"] for g in gallery] == ["step 5 · rows: red heart / blue circle",
                                               "step 2 · autoencoder: images (top), reconstructions (bottom)"]
    assert model.endswith("t2i-app/model")
    # the summary's parameter count is the trained model's (with the vocabulary it learnt)
    from diffusers import StableDiffusionPipeline

    from studio import small_sd

    pipe = StableDiffusionPipeline.from_pretrained(model)
    cfg = tab.build_config(values)
    spec = small_sd.SmallSDSpec(resolution=8, vocab_size=len(pipe.tokenizer.get_vocab()), text_width=cfg.text_width,
                                text_layers=cfg.text_layers, text_heads=cfg.text_heads, vae_channels=cfg.vae_channels,
                                unet_channels=cfg.unet_channels, unet_cross_attention=cfg.unet_cross_attention,
                                unet_head_dim=cfg.unet_head_dim)
    trained = {name: sum(p.numel() for p in part.parameters())
               for name, part in (("autoencoder", pipe.vae), ("text encoder", pipe.text_encoder), ("UNet", pipe.unet))}
    assert small_sd.parameter_counts(spec) == trained
    assert "parameters** (autoencoder" in tab.model_summary(values)

    # Resume to step 7: two more diffusion steps (the box holds the whole run's step target)
    status, *_, target = client.predict("t2i-app", 7, api_name="/resume_training")
    assert status.startswith("Resuming t2i-app") and target == 7
    assert job is not ctx.jobs.latest("train") and ctx.jobs.latest("train").wait(300)
    ctx.jobs._jobs.clear()  # a restarted app: the history comes from the run folder
    status, progress, plot, *_ = client.predict(False, "t2i-app", api_name="/train_status")
    assert "t2i-app: finished" in status and progress.startswith("step 7/7")
    assert sorted({row[0] for row in plot["data"]}) == list(range(1, 8))
    # a reload (the page comes back in the unconditional mode): the settings column follows the run on screen
    page = tab.default_values()
    loaded = client.predict(*[page[n] for n in tab.INPUT_NAMES], api_name="/train_on_load")
    widgets = dict(zip(tab.INPUT_NAMES, loaded[-len(tab.INPUT_NAMES):]))  # (the sections are not API outputs)
    assert widgets["mode"]["value"] == "text-to-image", widgets["mode"]
    assert widgets["validation_prompts"]["visible"] is True and widgets["beta_schedule"]["visible"] is False
    assert widgets["random_flip"]["value"] is False  # this mode's defaults (its 3,000 steps are the DDPM's too)
    assert "value" not in widgets["max_train_steps"] and page["max_train_steps"] == TextToImageConfig().max_train_steps
    assert tab.run_mode(ctx, "t2i-app") == "text-to-image" and tab.run_mode(ctx, None) == "unconditional"
    again = client.predict(*[tiny_values()[n] for n in tab.INPUT_NAMES], api_name="/train_on_load")
    assert all("value" not in u and "visible" not in u for u in again[-len(tab.INPUT_NAMES):]), again  # as is

    # Open in Generate: the model folder goes to Generate's model box; it loads and follows a prompt
    opened = client.predict(model, api_name="/train_open_in_generate")  # the model box's update (the tab switch
    path = opened["value"]                                                 # is not an API output)
    assert path == model, opened
    loaded = client.predict(path, DEFAULT_SCHEDULER, api_name="/load_model")[0]
    assert loaded.startswith("Loaded") and "StableDiffusionPipeline" in loaded, loaded
    request = dict(model=path, prompt="red heart", negative_prompt="", width=0, height=0, num_inference_steps=2,
                   guidance_scale=4.0, seed=3, batch_size=1, batch_count=1, scheduler=DEFAULT_SCHEDULER, lora="",
                   lora_scale=1.0)
    preview, progress, images, info, seed = client.predict(*request.values(), api_name="/generate")
    assert progress == "Done." and len(images) == 1 and seed == 3 and "PNDM" in info
    from PIL import Image

    with Image.open(images[0]["image"]) as image:
        assert image.size == (8, 8)  # the run's own resolution


def test_the_step_target_is_never_read_from_a_half_written_config(tmp_path):
    """The tab reads a run's config.json (its step target) just as the job it started rewrites it:
    the Resume-until-step box came back empty now and then before config.json was written atomically."""
    import threading

    from studio.runs import RunDir

    run = RunDir.create(tmp_path, "train", "racing")
    config = dict(TextToImageConfig(vae_steps=2, max_train_steps=3).to_dict(), padding="x" * 200_000)
    run.write_config("train", config)
    done = threading.Event()

    def rewrite():
        while not done.is_set():
            run.write_config("train", config)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        reads = [run.read_config().get("max_train_steps") for _ in range(300)]
    finally:
        done.set()
        writer.join()
    assert reads == [3] * 300
