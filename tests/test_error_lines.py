"""Predictable failures get a specific line, never "Unexpected error" or a traceback (issue 9).

Found by driving the CLI and the loaders with wrong values, a real allocation failure
and a download cut on every try: config values of the wrong type (a Python comparison
error or a raw AttributeError), seeds beyond 32 bits (a numpy overflow deep in a run),
running out of RAM or GPU memory, and a Hub download interrupted while a model loads.
"""

from __future__ import annotations

import json

import pytest

from studio import cli
from studio.errors import ConfigError, describe_exception
from test_cli import write_config


def one_line(text: str) -> None:
    assert text.strip() and "\n" not in text.strip(), text
    for bad in ("Unexpected error", "Traceback", "not supported between", "object has no attribute",
                "Invalid FinetuneConfig", "Invalid TrainConfig", "Invalid GenerateConfig"):
        assert bad not in text, text


# ----------------------------------------------------------------------------- config values
FINETUNE = {"pretrained_model_name_or_path": "acme/base", "workspace": "WS"}


@pytest.mark.parametrize("command, base, change, words", [
    ("finetune", FINETUNE, {"max_train_steps": "abc"}, "max_train_steps must be a whole number (got 'abc')"),
    ("finetune", FINETUNE, {"max_train_steps": None}, "max_train_steps must be a whole number (got None)"),
    ("finetune", FINETUNE, {"max_train_steps": 2.5}, "max_train_steps must be a whole number (got 2.5)"),
    ("finetune", FINETUNE, {"learning_rate": "fast"}, "learning_rate must be a finite number (got 'fast')"),
    ("finetune", FINETUNE, {"caption_dropout": [0.1]}, "caption_dropout must be a finite number"),
    ("finetune", FINETUNE, {"validation_prompts": "a cat"}, "validation_prompts must be a list of texts"),
    ("finetune", FINETUNE, {"seed": 2**40}, "Seed must be a whole number from 0 to 4294967295"),
    ("train", {}, {"seed": 2**70}, "Seed must be a whole number from 0 to 4294967295"),
    ("train", {}, {"block_out_channels": "8,16"}, "block_out_channels must be a list of whole numbers (got '8,16')"),
    ("train", {}, {"resume": 5}, "resume must be text (got 5)"),
    ("generate", {"workspace": "WS"}, {"model": 5}, "model must be text (got 5)"),
    ("generate", {"workspace": "WS"}, {"lora": None}, "lora must be text (got None)"),
])
def test_wrong_config_values_are_one_line_naming_the_setting_with_exit_2(tmp_path, workspace, capsys, command, base,
                                                                        change, words):
    path = tmp_path / "c.json"
    if command == "train":
        write_config(path, workspace, **change)
    else:
        values = {k: (str(workspace) if v == "WS" else v) for k, v in base.items()}
        values.update(change)
        path.write_text(json.dumps(values), encoding="utf-8")
    assert cli.main([command, "--config", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err, err
    one_line(err)


def test_the_field_help_follows_a_type_problem():
    from studio.config.finetune import FinetuneConfig

    with pytest.raises(ConfigError) as caught:
        FinetuneConfig.from_dict({"pretrained_model_name_or_path": "a/b", "checkpoint_every": "often"})
    assert str(caught.value) == ("checkpoint_every must be a whole number (got 'often'). "
                                 "Save a resumable checkpoint every N steps (0 = only at stop and end).")


# ----------------------------------------------------------------------------- out of memory
def _cpu_allocation_failure() -> RuntimeError:
    import torch

    try:
        torch.empty(2**46, dtype=torch.uint8)  # 64 TiB: the CPU allocator refuses at once, nothing is touched
    except RuntimeError as exc:
        return exc
    pytest.skip("this machine allocated 64 TiB")


def test_running_out_of_memory_is_named_with_what_to_do():
    import torch

    cpu = describe_exception(_cpu_allocation_failure())
    assert cpu.startswith("Out of memory (RAM: it asked for 65536.0 GiB more).") and "batch size" in cpu
    gpu = describe_exception(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a "
                                                    "total capacity of 7.6 GiB of which 1.1 GiB is free."))
    assert gpu.startswith("Out of memory (GPU: it asked for 2.50 GiB more).")
    for text in (cpu, gpu, describe_exception(MemoryError())):
        one_line(text)


def test_cli_run_that_runs_out_of_memory_exits_2_with_one_line(tmp_path, workspace, capsys, monkeypatch):
    import sys

    module = sys.modules[__name__]
    monkeypatch.setitem(cli.COMMANDS, "train", (cli.COMMANDS["train"][0], f"{__name__}:_runner_that_allocates"))
    monkeypatch.setattr(module, "_runner_that_allocates", lambda cfg, events, stop: _raise(_cpu_allocation_failure()),
                        raising=False)
    path = write_config(tmp_path / "c.json", workspace)
    assert cli.main(["train", "--config", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Out of memory (RAM"), err
    one_line(err)


def _raise(exc: BaseException):
    raise exc


# ----------------------------------------------------------------------------- interrupted download
def test_a_model_download_cut_on_every_try_is_one_line_when_loading(local_hub, workspace, tiny_ddpm):  # noqa: F811
    from hub_server import files_of
    from studio.errors import ModelError
    from studio.models import PipelineManager

    local_hub.add_repo("acme/cut-off", files_of(tiny_ddpm))
    local_hub.take_cut = lambda path: 100 if path.endswith(".safetensors") else None  # every weights GET cut
    with pytest.raises(ModelError) as caught:
        PipelineManager("cpu", workspace, offline=False).load("acme/cut-off")
    text = describe_exception(caught.value)
    one_line(text)
    assert text.startswith("Downloading acme/cut-off failed") and "load it again" in text
    assert "partial file resumes" in text


# ----------------------------------------------------------------------------- damaged model files
@pytest.mark.parametrize("index, words", [
    ([], "The model_index.json of bent is damaged (no pipeline class name)."),
    ({"_class_name": "DDPMPipeline", "unet": ["UNet2DModel"]}, "The model_index.json of bent is damaged (component 'unet')."),
    ({"_class_name": "NoSuchPipeline", "unet": ["diffusers", "UNet2DModel"]}, "bent is a NoSuchPipeline, which diffusers"),
])
def test_a_damaged_or_too_new_model_index_is_one_line(tmp_path, workspace, tiny_ddpm, index, words):  # noqa: F811
    import shutil

    from studio.errors import ModelError
    from studio.models import PipelineManager

    folder = tmp_path / "bent"
    shutil.copytree(tiny_ddpm, folder)
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(ModelError) as caught:
        PipelineManager("cpu", workspace, offline=True).load(str(folder))
    text = describe_exception(caught.value)
    one_line(text)
    assert words in text, text


from tiny_pipelines import tiny_ddpm  # noqa: E402,F401  (fixture)
