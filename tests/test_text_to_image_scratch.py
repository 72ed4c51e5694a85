"""Text-to-image from scratch for real on tiny models: the caption tokenizer, the trainer (stop, exact
resume across both stages), the CLI's config mode, and the prompt-steering figures."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from studio import small_sd
from studio.config.text_to_image import TextToImageConfig
from studio.errors import ConfigError
from studio.prompt_steering import colour_stats, matching_images

CAPTIONS = ["grinning face, smileys & emotion, face-smiling", "red heart, smileys & emotion, heart",
            "flag: japan, flags, country-flag", "flag: france, flags, country-flag",
            "yellow heart, smileys & emotion, heart", "large blue circle, symbols, geometric"] * 3


def tiny_config(workspace: Path, **changes) -> TextToImageConfig:
    """16 px, 8-channel autoencoder, (16, 32) UNet, 16-wide text encoder; 3 + 4 steps on 48 emoji."""
    values = dict(data={"source": "emoji", "max_rows": 48}, workspace=str(workspace), run_name="t2i",
                  resolution=16, vocab_size=700, text_width=16, text_heads=2, text_layers=1, vae_channels=(8, 8),
                  unet_channels=(16, 32), unet_cross_attention=(True, False), unet_head_dim=8, vae_steps=3,
                  max_train_steps=4, train_batch_size=4, sample_every=0, save_every=0, lr_warmup_steps=1,
                  validation_prompts=("red heart",), images_per_prompt=2, sample_inference_steps=2, device="cpu")
    values.update(changes)
    return TextToImageConfig(**values)


class Recorder:
    """Keeps every event; sets ``stop`` once a step event reaches ``stop_at``."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.events, self.stop, self.stop_at = [], threading.Event(), stop_at

    def __call__(self, event) -> None:
        self.events.append(event)
        if self.stop_at is not None and event.kind == "step" and event.step >= self.stop_at:
            self.stop.set()


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: weights, EMA, RNG states, AdamW moments."""
    from safetensors.torch import load_file

    out = {}
    for name in ("trainable", "ema", "rng"):
        out.update({f"{name}.{k}": v for k, v in load_file(str(checkpoint / f"{name}.safetensors")).items()})
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    out.update({f"adam.{i}.{k}": v for i, s in optimizer["state"].items() for k, v in s.items()})
    return out


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_learnt_from_captions_round_trips_in_both_file_formats(tmp_path):
    tok = small_sd.train_tokenizer(CAPTIONS, tmp_path / "tok", vocab_size=600, max_length=16)
    files = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert (tmp_path / "tok" / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    # caption words became single tokens; any text still tokenizes (every byte is in the vocabulary)
    assert tok.convert_ids_to_tokens(tok("red heart").input_ids) == [small_sd.BOS, "red</w>", "heart</w>", small_sd.EOS]
    assert tok.decode(tok("Flag: Japan").input_ids, skip_special_tokens=True) == "flag : japan"
    odd = tok("zebra ünïcode 🙂").input_ids
    assert tok.unk_token_id not in odd[1:-1] and tok.decode(odd, skip_special_tokens=True) == "zebra ünïcode 🙂"
    ids = small_sd.tokenize(tok, CAPTIONS[:2])
    assert ids.shape == (2, 16) and ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
    # transformers 4.x's slow CLIPTokenizer reads vocab.json + merges.txt: without tokenizer.json, same ids
    (tmp_path / "tok" / "tokenizer.json").unlink()
    again = small_sd.load_tokenizer(tmp_path / "tok")
    assert all(again(c).input_ids == tok(c).input_ids for c in CAPTIONS + ["zebra ünïcode 🙂"])
    assert json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8")) == tok.get_vocab()


# ----------------------------------------------------------------------------- trainer
@pytest.mark.slow  # about 15 s alone, 40 s on a loaded 2-core machine: four tiny runs
def test_stop_and_resume_in_both_stages_is_bit_exact_and_the_cli_mode_trains(tmp_path):
    from diffusers import StableDiffusionPipeline

    from studio import cli
    from studio.trainers.text_to_image_scratch import train

    # straight through, from the CLI with the mode in the config
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"task": "train", **tiny_config(tmp_path / "a").to_dict()}), encoding="utf-8")
    assert json.loads(config.read_text())["mode"] == "text-to-image"
    assert cli.main(["train", "--config", str(config), "--quiet"]) == 0
    straight = tmp_path / "a" / "t2i"
    assert (straight / "samples" / "step-000003.png").is_file()  # the autoencoder's reconstructions
    assert (straight / "samples" / "step-000007.png").is_file()  # the validation grid
    events = [json.loads(line) for line in (straight / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events][-1] == "finished"
    assert any(e["kind"] == "quality" and "'red heart'" in e["message"] for e in events)

    # stopped in the autoencoder stage, resumed, stopped in the diffusion stage, resumed to the end
    first = Recorder(stop_at=2)
    train(tiny_config(tmp_path / "b"), first, first.stop)
    assert first.events[-1].kind == "stopped" and first.events[-1].step == 2
    second = Recorder(stop_at=5)
    train(tiny_config(tmp_path / "b", resume="latest"), second, second.stop)
    assert second.events[-1].kind == "stopped" and second.events[-1].step == 5
    third = Recorder()
    train(tiny_config(tmp_path / "b", resume="latest"), third, third.stop)
    assert third.events[-1].kind == "finished"
    resumed = tmp_path / "b" / "t2i"
    a, b = weights(straight / "checkpoints" / "step-00000007"), weights(resumed / "checkpoints" / "step-00000007")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from safetensors import safe_open

    with safe_open(str(straight / "model" / "text_encoder" / "model.safetensors"), framework="pt") as fh:
        assert all(k.startswith("text_model.") for k in fh.keys())  # transformers 4.x finds its weights
    pipe = StableDiffusionPipeline.from_pretrained(straight / "model", local_files_only=True)
    assert pipe.vae.config.scaling_factor != 0.18215 and pipe.tokenizer.model_max_length == 77
    out = pipe("red heart", height=16, width=16, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def test_the_run_writes_logs_processes_json_like_the_other_trainers(tmp_path):
    """logs/processes.json: this process's rank, device, a checksum of its final weights (as in the checkpoint)
    and its first batch, written when the run stops and again when a resumed run finishes."""
    from safetensors.torch import load_file

    from studio.trainers.batches import BatchSampler
    from studio.trainers.reporting import weights_sha256
    from studio.trainers.text_to_image_scratch import train

    def entries_and_checkpoint_sha(run: Path, step: int) -> tuple[list[dict], str]:
        trained = load_file(str(run / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors"))
        entries = json.loads((run / "logs" / "processes.json").read_text(encoding="utf-8"))
        return entries, weights_sha256(v for _, v in sorted(trained.items()))

    run = tmp_path / "t2i"
    first = Recorder(stop_at=1)
    train(tiny_config(tmp_path, vae_steps=1, max_train_steps=1, images_per_prompt=1), first, first.stop)
    assert first.events[-1].kind == "stopped"
    entries, sha = entries_and_checkpoint_sha(run, 1)
    expected_batch = BatchSampler(48, 4, 0, 1, seed=0).next()[0].tolist()
    assert entries == [{"rank": 0, "world_size": 1, "weights_sha256": sha, "device": "cpu",
                        "first_batch": expected_batch}]
    second = Recorder()
    train(tiny_config(tmp_path, vae_steps=1, max_train_steps=1, images_per_prompt=1, resume="latest"), second,
          second.stop)
    assert second.events[-1].kind == "finished"
    entries, sha = entries_and_checkpoint_sha(run, 2)
    assert entries[0]["weights_sha256"] == sha and len(entries[0]["first_batch"]) == 4
    assert entries[0]["first_batch"] != expected_batch  # the batch of step 2, the first this process drew


def test_resume_latest_without_a_name_keeps_to_its_mode(tmp_path):
    """`resume: latest` with no run name resumes the newest run of the config's own mode: a DDPM
    config never picks up a newer text-to-image run of the same workspace, nor the reverse."""
    from test_ddpm_trainer import tiny_config as ddpm_config

    from studio.trainers import ddpm
    from studio.trainers.text_to_image_scratch import train

    ddpm_run = ddpm.train(ddpm_config(tmp_path, max_train_steps=2, run_name="ddpm"), Recorder())
    train(tiny_config(tmp_path, vae_steps=1, max_train_steps=1, images_per_prompt=1), Recorder())  # newer
    resumed = Recorder()
    again = ddpm.train(ddpm_config(tmp_path, max_train_steps=3, resume="latest"), resumed)
    assert again.root == ddpm_run.root and resumed.events[-1].kind == "finished"
    assert [e.step for e in resumed.events if e.kind == "step"] == [3]
    later = Recorder()
    train(tiny_config(tmp_path, vae_steps=1, max_train_steps=2, images_per_prompt=1, resume="latest"), later)
    assert later.events[-1].kind == "finished" and (tmp_path / "t2i" / "checkpoints" / "step-00000003").is_dir()


def test_config_refuses_what_cannot_train(tmp_path):
    with pytest.raises(ConfigError, match="divisible"):
        tiny_config(tmp_path, resolution=18)
    with pytest.raises(ConfigError, match="cross-attention"):
        tiny_config(tmp_path, unet_cross_attention=(False, False))
    from studio import cli

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"task": "train", "mode": "painting"}), encoding="utf-8")
    assert cli.main(["train", "--config", str(path)]) == 2


def test_untagged_dataset_is_refused_with_a_line(tmp_path):
    from PIL import Image

    from studio.errors import DataError
    from studio.trainers.text_to_image_scratch import train

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / f"{i}.png")
    with pytest.raises(DataError, match="no captions"):
        train(tiny_config(tmp_path / "ws", data={"source": "folder", "path": str(folder)}))


# ----------------------------------------------------------------------------- steering figures
def test_matching_images_and_colour_stats():
    assert matching_images(CAPTIONS, "flag", minimum=2) == [i for i, c in enumerate(CAPTIONS) if "flag" in c]
    hearts = matching_images(CAPTIONS, "red heart", minimum=3)
    assert all("red heart" in CAPTIONS[i] for i in hearts)
    assert set(matching_images(CAPTIONS, "heart", minimum=2)) > set(hearts)
    red = np.zeros((2, 8, 8, 3), np.uint8)
    red[..., 0] = 220
    yellow = red.copy()
    yellow[..., 1] = 200
    white = np.full((2, 8, 8, 3), 255, np.uint8)
    assert colour_stats(red)["red"] == 1.0 and colour_stats(yellow)["yellow"] == 1.0
    assert abs(colour_stats(yellow)["hue"] - 54.5) < 1 and colour_stats(white)["white"] == 1.0


# ----------------------------------------------------------------------------- Train tab
@pytest.mark.slow  # about 15 s alone: a run started, stopped and resumed through the tab's functions
def test_train_tab_mode_starts_stops_and_resumes_a_text_to_image_run(workspace):
    import time

    from studio.config.data import DataConfig
    from studio.context import DatasetChoice, StudioContext
    from studio.settings import LaunchSettings
    from tabs import train as tab

    ctx = StudioContext(LaunchSettings(workspace=workspace, device="cpu"))
    ctx.dataset.set(DatasetChoice(DataConfig(source="emoji", max_rows=16), "emoji (first 16)", 16, True))
    values = tab.default_values()
    assert values["mode"] == "unconditional" and isinstance(tab.build_config(values), tab.TrainConfig)
    values.update(mode="text-to-image", run_name="words", resolution=16, train_batch_size=4, max_train_steps=100_000,
                  vae_steps=1, sample_every=0, save_every=0, sample_inference_steps=1, validation_prompts="red heart",
                  lr_warmup_steps=0)
    cfg = tab.build_config(values, ctx)
    assert isinstance(cfg, TextToImageConfig) and cfg.validation_prompts == ("red heart",)
    assert "Text-to-image from scratch" in tab.model_summary(values)
    with pytest.raises(ConfigError, match="epsilon or v_prediction"):
        tab.build_config(dict(values, prediction_type="sample"))
    try:
        message, folder, command = tab.start_training(ctx, values)
        assert message.startswith("Started words: text-to-image")
        job = ctx.jobs.latest("train")
        deadline = time.monotonic() + 120
        while job.snapshot().step < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        tab.stop_training(ctx)
        while job.running and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped = job.snapshot()
        assert stopped.status == "stopped", stopped
        # 2 more diffusion steps: the target counts the whole run (the autoencoder's step included), as Progress does
        message, _, _ = tab.resume_run(ctx, "words", max_train_steps=stopped.step + 2)
        assert message.startswith("Resuming words: text-to-image")
        resumed = ctx.jobs.latest("train")
        while resumed.running and time.monotonic() < deadline:
            time.sleep(0.1)
        final = resumed.snapshot()
        assert final.status == "finished" and final.step == stopped.step + 2, final
        assert (Path(folder) / "model" / "model_index.json").is_file()
        assert json.loads((Path(folder) / "config.json").read_text())["mode"] == "text-to-image"
    finally:
        ctx.jobs.stop_all()



# ----------------------------------------------------------------------------- the bundled emoji SD
def test_bundled_emoji_sd_loads_with_plain_diffusers_and_the_prompt_steers_it():
    import time

    from diffusers import StableDiffusionPipeline

    from studio.bundled import BUNDLED_MODELS, bundled_models

    model = BUNDLED_MODELS["emoji-sd"]
    assert model.available, f"{model.path} must hold the bundled pipeline"
    assert [m.name for m in bundled_models()][:2] == ["emoji-sd", "emoji-ddpm"]  # Generate lists it first
    files = [p for p in model.path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 1024 ** 2 and not [p for p in files if p.suffix == ".bin"]
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in (model.path / "tokenizer").iterdir()}
    from safetensors import safe_open

    with safe_open(str(model.path / "text_encoder" / "model.safetensors"), framework="pt") as fh:
        assert all(k.startswith("text_model.") for k in fh.keys())  # names transformers 4.x also loads
    card = (model.path / "README.md").read_text(encoding="utf-8")
    for line in ("license: cc-by-4.0", "library_name: diffusers", "pipeline_tag: text-to-image"):
        assert line in card.split("---")[1]
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model.path, local_files_only=True)
    assert time.perf_counter() - start < 10  # about 0.3 s alone; generous for a loaded CI machine
    pipe.set_progress_bar_config(disable=True)
    stats = {}
    for prompt in ("red heart", "yellow smiling face"):
        images = pipe([prompt] * 4, height=32, width=32, num_inference_steps=10, guidance_scale=4.0,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
        stats[prompt] = colour_stats(images)
    assert stats["red heart"]["red"] > stats["yellow smiling face"]["red"] + 0.15, stats
    assert stats["yellow smiling face"]["yellow"] > stats["red heart"]["yellow"] + 0.08, stats
    assert stats["yellow smiling face"]["hue"] > stats["red heart"]["hue"] + 5, stats  # towards yellow (60)


@pytest.mark.integration
@pytest.mark.slow  # about 15 s: a launched app trains a tiny text-to-image run through gradio_client
def test_train_tab_text_to_image_mode_through_gradio_client(launched_app, client):
    import time

    from studio.config.data import DataConfig
    from studio.context import DatasetChoice
    from tabs import train as tab

    app, _ = launched_app
    app.studio_context.dataset.set(DatasetChoice(DataConfig(source="emoji", max_rows=16), "emoji (first 16)", 16, True))
    values = tab.default_values()
    values.update(mode="text-to-image", run_name="words", resolution=16, train_batch_size=4, max_train_steps=2,
                  vae_steps=1, sample_every=0, save_every=0, sample_inference_steps=1, validation_prompts="red heart",
                  lr_warmup_steps=0)
    status, folder, command, *_ = client.predict(*[values[n] for n in tab.INPUT_NAMES], api_name="/start_training")
    assert status.startswith("Started words: text-to-image"), status
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, progress, plot, quality, sample, gallery, run_folder, model = client.predict(
            False, "words", api_name="/train_status")
        if "finished" in status:
            break
        time.sleep(0.3)
    assert "words: finished" in status, status
    curves = {row[-1] for row in quality.get("data", [])} if isinstance(quality, dict) else set()
    assert "samples" in curves and Path(sample).is_file() and len(gallery) == 2  # reconstructions, validation row
    assert model.endswith("words/model") and Path(model, "tokenizer", "vocab.json").is_file()
    assert json.loads(Path(folder, "config.json").read_text())["mode"] == "text-to-image"
