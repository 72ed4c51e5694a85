"""A pipeline loading in one thread must not hand empty (meta) weights to a model built in another.

diffusers' from_pretrained (accelerate's init_empty_weights) patches module construction
for the whole process; the studio serialises model construction with MODEL_INIT_LOCK.
"""

from __future__ import annotations

import threading
import time

import torch

import studio.models as models
import studio.trainers.ddpm as ddpm
from test_ddpm_trainer import Recorder, tiny_config
from tiny_pipelines import tiny_ddpm  # noqa: F401 - fixture


def test_training_while_generate_loads_a_model_gets_real_weights(tiny_ddpm, workspace, monkeypatch):  # noqa: F811
    from accelerate import init_empty_weights

    loading = threading.Event()
    real_load = models._load_target

    def slow_load(*args, **kwargs):
        with init_empty_weights():  # what from_pretrained does while it builds the modules
            loading.set()
            time.sleep(0.5)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models, "_load_target", slow_load)
    loader = threading.Thread(target=lambda: models.load_pipeline(str(tiny_ddpm), "cpu"))
    loader.start()
    assert loading.wait(10)
    sink = Recorder()
    run = ddpm.train(tiny_config(workspace, max_train_steps=2), sink, sink.stop)
    loader.join(30)
    assert [e.kind for e in sink.events][-1] == "finished", [e.message for e in sink.kinds("failed")]
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(run.model_dir / "unet")
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in unet.parameters())
