"""The scheduler catalogue: every entry generates with every compatible tiny pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from studio.config.generate import GenerateConfig
from studio.errors import ConfigError
from studio.schedulers import (DEFAULT_SCHEDULER, SCHEDULER_NAMES, SCHEDULERS, make_scheduler,
                               scheduler_names_for, set_scheduler)
from tiny_pipelines import tiny_ddpm, tiny_sd  # noqa: F401  (fixtures)

A1111_NAMES = ["Euler", "Euler a", "Heun", "LMS", "LMS Karras", "DPM2", "DPM2 Karras", "DPM2 a", "DPM2 a Karras",
               "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM++ SDE",
               "DPM++ SDE Karras", "DDIM", "PLMS", "UniPC", "DEIS", "DDPM", "LCM"]


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    from studio.models import PipelineManager

    return PipelineManager("cpu", tmp_path_factory.mktemp("ws"), offline=True)


def test_table_has_the_names_people_know_and_real_classes():
    import diffusers

    for name in A1111_NAMES:
        assert name in SCHEDULERS, name
    assert SCHEDULER_NAMES[0] == DEFAULT_SCHEDULER
    for name, entry in SCHEDULERS.items():
        cls = getattr(diffusers, entry.class_name)
        scheduler = cls.from_config({}, **entry.kwargs)
        for key, value in entry.kwargs.items():
            assert scheduler.config[key] == value, (name, key)


@pytest.mark.parametrize("which", ["sd", "ddpm"])
def test_every_compatible_scheduler_generates(which, tiny_sd, tiny_ddpm, manager):
    from studio.generate import generate

    model = str(tiny_sd if which == "sd" else tiny_ddpm)
    manager.load(model)
    names = manager.scheduler_names()
    assert "LCM" not in names and "Flow Match Euler" not in names  # distilled / flow samplers are not offered
    assert {"Euler a", "DPM++ 2M Karras", "DPM++ SDE Karras", "UniPC", "DDIM"} <= set(names)
    unet = manager.loaded.pipe.unet
    outputs = {}
    for name in names:
        result = generate(manager, GenerateConfig(model=model, prompt="a red cat", num_inference_steps=2, seed=3,
                                                  scheduler=name), save=False)
        image = np.asarray(result.images[0].image)
        assert image.shape[2] == 3 and np.isfinite(image).all()
        assert result.scheduler.startswith(name if name != DEFAULT_SCHEDULER else "")
        outputs[name] = image
        assert manager.loaded.pipe.unet is unet  # the model was never reloaded
    # Samplers really differ: not every output is the same picture.
    assert len({o.tobytes() for o in outputs.values()}) > len(outputs) // 2


def test_swaps_start_from_the_models_own_config(tiny_sd, manager):
    pipe = manager.load(str(tiny_sd)).pipe
    set_scheduler(pipe, "DPM++ 2M Karras")
    assert pipe.scheduler.config.use_karras_sigmas is True
    set_scheduler(pipe, "DPM++ 2M")
    assert pipe.scheduler.config.use_karras_sigmas is False  # nothing leaks from the previous choice
    set_scheduler(pipe, "DPM++ 2M SDE")
    assert pipe.scheduler.config.algorithm_type == "sde-dpmsolver++"
    set_scheduler(pipe, DEFAULT_SCHEDULER)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.steps_offset == 1


def test_incompatible_scheduler_is_refused(tiny_sd, manager):
    pipe = manager.load(str(tiny_sd)).pipe
    with pytest.raises(ConfigError, match="does not work with this model"):
        make_scheduler(pipe, "LCM")
    with pytest.raises(ConfigError, match="Unknown scheduler"):
        make_scheduler(pipe, "Euler b")


class _FakePipe:
    def __init__(self, scheduler):
        self.scheduler = scheduler


def test_flow_matching_models_get_their_own_entries():
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    flow = _FakePipe(FlowMatchEulerDiscreteScheduler(shift=3.0))
    names = scheduler_names_for(flow)
    assert "Flow Match Euler" in names and "Flow Match Heun" in names
    assert "Euler" not in names and "DPM++ 2M Karras" not in names
    set_scheduler(flow, "Flow Match Heun")
    assert type(flow.scheduler).__name__ == "FlowMatchHeunDiscreteScheduler"
    assert flow.scheduler.config.shift == 3.0
    lcm = _FakePipe(LCMScheduler())
    assert "LCM" in scheduler_names_for(lcm)


def test_dpm_sde_is_guarded_by_its_dependency(monkeypatch, tiny_sd, manager):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchsde" else real(name, *a))
    pipe = manager.load(str(tiny_sd)).pipe
    assert "DPM++ SDE" not in scheduler_names_for(pipe)
    with pytest.raises(ConfigError, match="torchsde"):
        make_scheduler(pipe, "DPM++ SDE Karras")
