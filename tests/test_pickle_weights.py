"""Pickle-era weights (.bin/.ckpt/.pt) load, but only through torch's restricted unpickler.

Each place weights enter the studio (a pipeline component, a single-file checkpoint, a
LoRA file, a Hub repo) is checked twice: the honest pickle loads and gives the same
pixels as its safetensors twin, with every ``torch.load`` asked for ``weights_only=True``;
a pickle whose ``__reduce__`` would write a canary file is refused with a line naming
the file and what it asked for, and the canary never appears.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from studio.errors import ModelError
from tiny_pipelines import make_tiny_lora, tiny_sd  # noqa: F401  (fixture)


class _Payload:
    """Unpickling this with a full unpickler runs ``exec``: it writes the canary file."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return exec, (f"open({str(self.canary)!r}, 'w').write('code ran')",)


@pytest.fixture
def torch_loads(monkeypatch):
    """Every torch.load call's weights_only argument, as the libraries pass it."""
    seen: list[object] = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only", "unset"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return seen


def _to_bin(folder: Path) -> Path:
    """Re-save every component's safetensors weights as the pre-safetensors .bin file."""
    for weights in list(folder.rglob("*.safetensors")):
        name = "pytorch_model.bin" if weights.name == "model.safetensors" else weights.name.replace(
            ".safetensors", ".bin")
        torch.save(load_file(weights), weights.with_name(name))
        weights.unlink()
    return folder


def _poison(path: Path, canary: Path) -> None:
    """Add an object whose unpickling would run code to the torch file at ``path``."""
    state = torch.load(path, weights_only=True)
    state["evil"] = _Payload(canary)
    torch.save(state, path)


def _pixels(pipe, **kwargs) -> np.ndarray:
    out = pipe("a red apple", num_inference_steps=2, guidance_scale=1.0, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)
    return out.images


def _single_file(tiny_sd: Path, tmp_path: Path) -> Path:  # noqa: F811
    """The tiny pipeline as one original-layout SD checkpoint, in the .ckpt layout (``state_dict``)."""
    from studio.models import load_pipeline
    from studio.single_file import save_single_file

    safe = save_single_file(load_pipeline(str(tiny_sd), "cpu", offline=True), tmp_path / "tiny.safetensors",
                            dtype=torch.float32)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(safe), "global_step": 1}, ckpt)
    return ckpt


# ----------------------------------------------------------------------------- honest pickles load
def test_a_bin_pipeline_loads_like_its_safetensors_twin_through_weights_only(tiny_sd, tmp_path,  # noqa: F811
                                                                             torch_loads):
    from studio.models import load_pipeline

    reference = _pixels(load_pipeline(str(tiny_sd), "cpu", offline=True))
    assert torch_loads == []
    binned = _to_bin(Path(shutil.copytree(tiny_sd, tmp_path / "binned")))
    assert not list(binned.rglob("*.safetensors")) and (binned / "text_encoder" / "pytorch_model.bin").is_file()
    pipe = load_pipeline(str(binned), "cpu", offline=True)
    np.testing.assert_allclose(_pixels(pipe), reference, atol=1e-5)  # same weights; memory layout may differ
    assert len(torch_loads) == 3 and all(w is True for w in torch_loads), torch_loads  # unet, vae, text encoder


def test_a_bin_lora_loads_like_its_safetensors_twin(tiny_sd, tmp_path, torch_loads):  # noqa: F811
    from studio.models import load_lora, load_pipeline

    safe = make_tiny_lora(tiny_sd, tmp_path / "lora")
    pickled = tmp_path / "old-lora.bin"
    torch.save(load_file(safe), pickled)
    pipe = load_pipeline(str(tiny_sd), "cpu", offline=True)
    base = _pixels(pipe)
    load_lora(pipe, safe, "safe")
    pipe.set_adapters(["safe"], [1.0])
    with_safe = _pixels(pipe)
    load_lora(pipe, pickled, "pickled")
    pipe.set_adapters(["pickled"], [1.0])
    np.testing.assert_allclose(_pixels(pipe), with_safe, atol=1e-5)
    assert np.abs(with_safe - base).max() > 0
    assert torch_loads == [True]


def test_a_ckpt_single_file_loads_through_weights_only(tiny_sd, tmp_path, local_hub, torch_loads):  # noqa: F811
    from hub_server import files_of

    from studio.models import load_pipeline

    # from_single_file reads the architecture's configs from the Hub (SD 1.x's default repo)
    configs = {k: v for k, v in files_of(tiny_sd).items() if not k.endswith(".safetensors")}
    local_hub.add_repo("stable-diffusion-v1-5/stable-diffusion-v1-5", configs)
    ckpt = _single_file(tiny_sd, tmp_path)
    torch_loads.clear()
    pipe = load_pipeline(str(ckpt), "cpu", offline=False)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    np.testing.assert_allclose(_pixels(pipe), _pixels(load_pipeline(str(tiny_sd), "cpu", offline=True)), atol=1e-5)
    assert torch_loads and all(w is True for w in torch_loads), torch_loads


# ----------------------------------------------------------------------------- hostile pickles refused
@pytest.mark.parametrize("where", ["unet", "text_encoder", "single file", "lora"])
def test_a_pickle_that_would_run_code_is_refused_unrun(tiny_sd, tmp_path, where):  # noqa: F811
    from studio.models import load_lora, load_pipeline

    canary = tmp_path / "canary.txt"
    if where in ("unet", "text_encoder"):
        folder = _to_bin(Path(shutil.copytree(tiny_sd, tmp_path / "binned")))
        name = "unet/diffusion_pytorch_model.bin" if where == "unet" else "text_encoder/pytorch_model.bin"
        _poison(folder / name, canary)
        attempt = lambda: load_pipeline(str(folder), "cpu", offline=True)  # noqa: E731
    elif where == "single file":
        ckpt = tmp_path / "model.ckpt"
        torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "evil": _Payload(canary)}, ckpt)
        name = "model.ckpt"
        attempt = lambda: load_pipeline(str(ckpt), "cpu", offline=True)  # noqa: E731
    else:
        lora = tmp_path / "lora.bin"
        torch.save({**load_file(make_tiny_lora(tiny_sd, tmp_path / "lora")), "evil": _Payload(canary)}, lora)
        name = "lora.bin"
        pipe = load_pipeline(str(tiny_sd), "cpu", offline=True)
        attempt = lambda: load_lora(pipe, lora, "evil")  # noqa: E731
    with pytest.raises(ModelError) as refused:
        attempt()
    text = refused.value.user_message
    assert f"Refused to load {name}" in text and "exec" in text and "Nothing in it was run" in text, text
    assert "online" not in text
    assert not canary.exists(), "the pickle's code ran"


def test_a_hub_repo_with_only_bin_weights_loads_and_a_poisoned_one_is_refused(tiny_sd, tmp_path,  # noqa: F811
                                                                              local_hub):
    from hub_server import files_of

    from studio.hub import pipeline_download_size
    from studio.models import load_pipeline

    from studio.hub import download_pipeline

    files = files_of(_to_bin(Path(shutil.copytree(tiny_sd, tmp_path / "binned"))))
    # the layout of many older repos: a root single-file checkpoint beside the .bin diffusers folders
    local_hub.add_repo("acme/pickle-era", {**files, "tiny-pruned.ckpt": b"\0" * 300_000})
    expected = sum(len(v) for v in files.values())
    assert pipeline_download_size({**{k: len(v) for k, v in files.items()}, "tiny-pruned.ckpt": 300_000}) == expected
    reports = []
    download_pipeline("acme/pickle-era", on_progress=reports.append)
    assert reports[-1].finished and reports[-1].total_bytes == expected
    assert not any("tiny-pruned.ckpt" in path for _, path, _ in local_hub.requests), "the root checkpoint was fetched"
    pipe = load_pipeline("acme/pickle-era", "cpu", offline=False)
    np.testing.assert_allclose(_pixels(pipe), _pixels(load_pipeline(str(tiny_sd), "cpu", offline=True)), atol=1e-5)

    canary = tmp_path / "canary.txt"
    poisoned = tmp_path / "vae.bin"
    poisoned.write_bytes(files["vae/diffusion_pytorch_model.bin"])
    _poison(poisoned, canary)
    local_hub.add_repo("acme/poisoned", {**files, "vae/diffusion_pytorch_model.bin": poisoned.read_bytes()})
    with pytest.raises(ModelError, match=r"Refused to load vae/diffusion_pytorch_model\.bin.*exec"):
        load_pipeline("acme/poisoned", "cpu", offline=False)
    assert not canary.exists()


def test_the_canary_payload_runs_when_unpickled_without_restriction(tmp_path):
    canary = tmp_path / "canary.txt"
    torch.save({"evil": _Payload(canary)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # what the studio never does
    assert canary.read_text() == "code ran"


def test_plain_python_pickles_are_never_read(tmp_path, tiny_sd):  # noqa: F811
    from studio.models import resolve_lora, resolve_reference

    for name in ("model.pkl", "lora.pickle"):
        (tmp_path / name).write_bytes(b"\x80\x04N.")
    with pytest.raises(ModelError, match="plain Python pickle"):
        resolve_reference(str(tmp_path / "model.pkl"), offline=True)
    with pytest.raises(ModelError, match="not a LoRA weights file"):
        resolve_lora(str(tmp_path / "lora.pickle"))
