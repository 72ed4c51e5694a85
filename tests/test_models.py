"""Model references, loading, switching and the messages for bad references."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from studio.errors import ModelError
from studio.models import (PipelineManager, load_pipeline, lora_choices, model_choices, pipeline_kind,
                           resolve_reference)
from tiny_pipelines import TINY_VOCAB_SIZE, make_tiny_lora, tiny_ddpm, tiny_sd  # noqa: F401  (fixtures)


@pytest.fixture
def manager(workspace):
    return PipelineManager("cpu", workspace, offline=True)


def make_run(workspace: Path, name: str, config: dict) -> Path:
    run = workspace / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_tiny_pipelines_load_by_path_with_a_full_tokenizer(tiny_sd, tiny_ddpm):
    sd = load_pipeline(str(tiny_sd), "cpu", offline=True)
    assert len(sd.tokenizer) == TINY_VOCAB_SIZE
    assert pipeline_kind(sd) == "sd"
    assert sd.unet.dtype.is_floating_point and str(sd.unet.dtype) == "torch.float32"  # fp32 on CPU
    ddpm = load_pipeline(str(tiny_ddpm), "cpu", offline=True)
    assert pipeline_kind(ddpm) == "unconditional"


def test_an_empty_tokenizer_is_refused(tiny_sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    (broken / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer .*without a vocabulary"):
        load_pipeline(str(broken), "cpu", offline=True)


@pytest.mark.parametrize("reference, message", [
    ("", "No model chosen"),
    ("   ", "No model chosen"),
    ("a/b/c", "exactly one '/'"),
    ("/no/such/folder", "Model path not found"),
    ("./missing.safetensors", "Model path not found"),
    ("just-a-word", "neither an existing path"),
])
def test_bad_references_get_clear_messages(reference, message, workspace):
    with pytest.raises(ModelError, match=message):
        resolve_reference(reference, workspace, offline=True)


def test_a_local_folder_missing_a_weight_file_names_it_and_never_says_go_online(tiny_sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError) as err:
        load_pipeline(str(broken), "cpu", offline=True)
    text = err.value.user_message
    assert "diffusion_pytorch_model" in text and "missing or damaged on disk" in text, text
    assert "online" not in text.lower(), text


def test_folder_without_model_index(tiny_sd):
    with pytest.raises(ModelError, match="no model_index.json"):
        resolve_reference(str(tiny_sd / "unet"), offline=True)


def test_pickle_era_files_resolve_and_plain_pickles_are_refused(tmp_path, tiny_ddpm):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    assert resolve_reference(str(ckpt), offline=True).kind == "file"  # read later, restricted
    with pytest.raises(ModelError, match="Refused to load model.ckpt: it is not a weights-only PyTorch file"):
        load_pipeline(str(ckpt), "cpu", offline=True)
    (tmp_path / "model.pkl").write_bytes(b"x")
    with pytest.raises(ModelError, match="plain Python pickle"):
        resolve_reference(str(tmp_path / "model.pkl"), offline=True)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_ddpm, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    assert resolve_reference(str(pickled), offline=True).kind == "folder"


def test_unknown_single_file_is_explained(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"some.tensor": torch.zeros(2)}, str(path))
    with pytest.raises(ModelError, match="not a single-file checkpoint the studio recognises"):
        load_pipeline(str(path), "cpu", offline=True)


def test_offline_uncached_id_lists_what_is_available(workspace, tiny_ddpm):
    run = make_run(workspace, "my-ddpm", {"task": "train"})
    shutil.copytree(tiny_ddpm, run / "model")
    with pytest.raises(ModelError) as info:
        resolve_reference("someone/not-cached", workspace, offline=True)
    text = info.value.user_message
    assert "not in the Hugging Face cache" in text and "offline" in text
    assert "my-ddpm" in text and "Download for offline use" in text


def test_hub_errors_online_say_how_to_log_in(monkeypatch, workspace):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def raiser(cls):
        def fake(*args, **kwargs):
            err = cls.__new__(cls)
            Exception.__init__(err, "401 Client Error")
            raise err
        return fake

    monkeypatch.setattr(huggingface_hub, "model_info", raiser(GatedRepoError))
    with pytest.raises(ModelError, match="gated.*hf auth login.*HF_TOKEN"):
        resolve_reference("org/gated-model", workspace, offline=False)
    monkeypatch.setattr(huggingface_hub, "model_info", raiser(RepositoryNotFoundError))
    with pytest.raises(ModelError, match="not found.*private.*hf auth login"):
        resolve_reference("org/private-model", workspace, offline=False)

    class Sibling:
        def __init__(self, name):
            self.rfilename = name

    class Info:
        def __init__(self, names):
            self.siblings = [Sibling(n) for n in names]

    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: Info(["README.md", "model.safetensors"]))
    with pytest.raises(ModelError, match="not a diffusers pipeline.*single-file"):
        resolve_reference("org/single-file", workspace, offline=False)
    monkeypatch.setattr(huggingface_hub, "model_info",
                        lambda *a, **k: Info(["model_index.json", "unet/diffusion_pytorch_model.bin"]))
    assert resolve_reference("org/pickles", workspace, offline=False).kind == "hub"  # loaded restricted
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: Info(["model_index.json",
                                                                             "unet/x.safetensors"]))
    ref = resolve_reference("org/fine@v1.0:fp16", workspace, offline=False)
    assert (ref.kind, ref.location, ref.revision, ref.variant) == ("hub", "org/fine", "v1.0", "fp16")


def test_hub_id_loads_from_the_cache_offline(tiny_ddpm, workspace):
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / "models--studio-test--tiny-ddpm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    try:
        shutil.copytree(tiny_ddpm, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        (repo / "blobs").mkdir()
        manager = PipelineManager("cpu", workspace, offline=True)
        loaded = manager.load("studio-test/tiny-ddpm")
        assert loaded.kind == "unconditional" and loaded.ref.kind == "hub"
        assert ("studio-test/tiny-ddpm (cached)", "studio-test/tiny-ddpm") in model_choices(workspace)
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def test_workspace_runs_are_models(workspace, tiny_ddpm, tiny_sd, manager):
    train = make_run(workspace, "ddpm-run", {"task": "train"})
    shutil.copytree(tiny_ddpm, train / "model")
    lora_run = make_run(workspace, "lora-run", {"task": "finetune", "pretrained_model_name_or_path": str(tiny_sd)})
    make_tiny_lora(tiny_sd, lora_run / "lora")
    values = [value for _, value in model_choices(workspace)]
    assert str(train) in values and str(lora_run) in values
    assert lora_choices(workspace) == [("run: lora-run", str(lora_run))]
    assert manager.load(str(train)).kind == "unconditional"
    assert manager.load("ddpm-run").ref.location == str(train / "model")  # a run name works too
    loaded = manager.load(str(lora_run))
    assert loaded.ref.kind == "lora-run" and loaded.kind == "sd" and "LoRA on" in loaded.label
    assert loaded.adapters == {"run": 1.0}


def test_lora_run_without_base_model_is_explained(workspace, tiny_sd):
    run = make_run(workspace, "orphan", {"task": "finetune"})
    make_tiny_lora(tiny_sd, run / "lora")
    with pytest.raises(ModelError, match="names no base model"):
        resolve_reference(str(run), workspace, offline=True)


@pytest.mark.parametrize("folder", ["model", "samples", "lora"])
def test_unfinished_run_is_explained(workspace, folder):
    run = make_run(workspace, "half", {"task": "train"})
    (run / folder).mkdir()
    with pytest.raises(ModelError, match="Run half has no exported model yet"):
        resolve_reference(str(run), workspace, offline=True)


def test_bad_reference_keeps_the_loaded_model(manager, tiny_ddpm):
    manager.load(str(tiny_ddpm))
    with pytest.raises(ModelError):
        manager.load("a/b/c")
    assert manager.loaded is not None and manager.loaded.reference == str(tiny_ddpm)


def test_prefetch_offline_and_local(manager, tiny_ddpm):
    assert "nothing to download" in manager.prefetch(str(tiny_ddpm))
    with pytest.raises(ModelError, match="offline"):
        manager.prefetch("someone/uncached")


def test_twenty_switches_keep_memory_flat(manager, tiny_sd, tiny_ddpm):
    import gc

    import diffusers
    import psutil

    def live_pipelines() -> int:
        gc.collect()
        return sum(isinstance(o, diffusers.DiffusionPipeline) for o in gc.get_objects())

    process = psutil.Process()
    for reference in (tiny_sd, tiny_ddpm) * 2:  # warm up allocator and caches
        manager.load(str(reference))
    before, live_before = process.memory_info().rss, live_pipelines()
    kinds = []
    for i in range(20):
        loaded = manager.load(str(tiny_sd if i % 2 == 0 else tiny_ddpm))
        kinds.append(type(loaded.pipe).__name__)
    growth_mb = (process.memory_info().rss - before) / 2**20
    assert kinds[:2] == ["StableDiffusionPipeline", "DDPMPipeline"]
    # The tiny SD pipeline weighs ~5.6 MB; keeping every loaded copy would add ~56 MB.
    assert growth_mb < 40, growth_mb
    assert live_pipelines() <= live_before  # each switch released the previous pipeline


def test_loaded_lora_run_changes_the_output(workspace, tiny_sd, manager):
    from studio.config.generate import GenerateConfig
    from studio.generate import generate

    run = make_run(workspace, "style", {"task": "finetune", "pretrained_model_name_or_path": str(tiny_sd)})
    make_tiny_lora(tiny_sd, run / "lora")
    cfg = dict(prompt="a cat", num_inference_steps=2, seed=4)
    base = np.asarray(generate(manager, GenerateConfig(model=str(tiny_sd), **cfg), save=False).images[0].image)
    tuned = np.asarray(generate(manager, GenerateConfig(model=str(run), **cfg), save=False).images[0].image)
    assert np.abs(base.astype(int) - tuned.astype(int)).max() > 0


def test_hf_hub_offline_environment_is_respected(workspace):
    # conftest sets HF_HUB_OFFLINE=1: a manager not told "offline" must still not go online.
    manager = PipelineManager("cpu", workspace, offline=False)
    with pytest.raises(ModelError, match="not in the Hugging Face cache and the studio is offline"):
        manager.load("someone/uncached")
    with pytest.raises(ModelError, match="offline, so nothing can be downloaded"):
        manager.prefetch("someone/uncached")


@pytest.mark.parametrize("keys, pipeline_class", [
    (["model.diffusion_model.input_blocks.0.0.weight"], "StableDiffusionPipeline"),
    (["model.diffusion_model.input_blocks.0.0.weight",
      "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"], "StableDiffusionXLPipeline"),
])
def test_single_file_checkpoints_go_to_the_right_pipeline(monkeypatch, tmp_path, tiny_sd, keys, pipeline_class):
    import diffusers
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "checkpoint.safetensors"
    save_file({key: torch.zeros(2, 4, 1, 1) for key in keys}, str(path))
    calls = []
    tiny = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd), use_safetensors=True)

    def fake_from_single_file(cls, location, **kwargs):
        calls.append((cls.__name__, location, kwargs))
        return tiny

    monkeypatch.setattr(getattr(diffusers, pipeline_class), "from_single_file", classmethod(fake_from_single_file))
    pipe = load_pipeline(str(path), "cpu", offline=True)
    assert pipe is tiny
    (name, location, kwargs), = calls
    assert name == pipeline_class and location == str(path.resolve())
    assert kwargs == {"local_files_only": True, "dtype": torch.float32}
