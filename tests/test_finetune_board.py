"""A fine-tune's TensorBoard log carries its validation images, not only the loss.

``tensorboard --logdir runs`` shows, for a Fine-tune run, the same fixed-seed validation
grids as ``samples/step-N.png`` (tag ``samples``, at step 0 for the base model and at every
validation step after), beside the loss and learning-rate curves.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from test_finetune import make_cfg, run_train
from tiny_pipelines import tiny_sd  # noqa: F401  (fixture)


def test_finetune_tensorboard_has_the_validation_images(tiny_sd, workspace):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, events = run_train(make_cfg(tiny_sd, workspace, max_train_steps=4, validation_every=2))
    assert events[-1].kind == "finished"
    board = EventAccumulator(str(run.logs_dir), size_guidance={"images": 0})
    board.Reload()
    images = board.Images("samples")
    assert [e.step for e in images] == [0, 2, 4]
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4]
    for entry in images:  # the very grid saved as samples/step-N.png
        logged = np.asarray(Image.open(io.BytesIO(entry.encoded_image_string)).convert("RGB"))
        saved = np.asarray(Image.open(run.sample_path(entry.step)).convert("RGB"))
        assert logged.shape == saved.shape and (logged == saved).all()
