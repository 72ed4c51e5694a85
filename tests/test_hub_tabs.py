"""The Dataset and Fine-tune tabs by Hub id, through the launched app, against the loopback Hub.

A person types a Hub dataset id in the Dataset tab and a Hub model id as the Fine-tune
base; huggingface_hub, datasets and diffusers fetch from ``tests/hub_server.py`` (no
mocks), and what comes back is what the page shows: counts, a finished run, the base
now offered as cached, and a model card naming the Hub base.
"""

from __future__ import annotations

import time

import pytest

from tabs.finetune import INPUT_NAMES, default_values
from tiny_pipelines import make_tiny_sd

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(workspace, local_hub):
    """The launched app of this module is online, talking to the loopback Hub."""
    from conftest import free_port
    from studio.settings import LaunchSettings

    return LaunchSettings(host="127.0.0.1", port=free_port(), workspace=workspace, device="cpu", offline=False)


def _squares(count: int) -> bytes:
    from hub_server import image_parquet
    from PIL import Image

    return image_parquet([Image.new("RGB", (16, 16), (40 * i % 256, 200, 90)) for i in range(count)],
                         [f"a green square {i}" for i in range(count)])


def test_dataset_and_finetune_by_hub_id_through_the_app(launched_app, client, local_hub, tmp_path):
    pytest.importorskip("pyarrow")
    from hub_server import files_of

    app, _ = launched_app
    ctx = app.studio_context
    local_hub.add_repo("acme/squares", {"data/train-00000-of-00001.parquet": _squares(4),
                                        "README.md": b"---\nlicense: mit\n---\n# squares\n"}, repo_type="dataset")
    local_hub.add_repo("acme/tiny-sd", {**files_of(make_tiny_sd(tmp_path / "base")),
                                        "README.md": b"---\nlicense: creativeml-openrail-m\n---\n# tiny\n"})

    # Dataset tab: a Hub id, as typed; the columns are detected and the set goes to the other tabs
    gallery, counts, _, _, status, *_ = client.predict("hub", "", "", "acme/squares", "", "", "", 0, False,
                                                       api_name="/load_dataset")
    assert len(gallery) == 4 and "4" in counts, (counts, status)
    choice = ctx.dataset.get()
    assert (choice.config.source, choice.config.hub_id, choice.count) == ("hub", "acme/squares", 4)

    # Fine-tune tab: the base by Hub id, downloaded on start
    values = default_values()
    values.update(pretrained_model_name_or_path="acme/tiny-sd", resolution=16, max_train_steps=2,
                  validation_every=0, num_inference_steps=2, checkpoint_every=0, validation_prompts="a green square",
                  run_name="hub-lora")
    status, run_path, _ = client.predict(*[values[n] for n in INPUT_NAMES], api_name="/start_finetune")
    assert status.startswith("Started hub-lora"), status
    deadline = time.time() + 240
    while time.time() < deadline:
        status, *_ = client.predict(api_name="/finetune_status")
        if "finished" in status.splitlines()[0] or "failed" in status:
            break
        time.sleep(0.5)
    assert "hub-lora: finished" in status, status
    assert any(path.startswith("/datasets/acme/squares") or "/api/datasets/acme/squares" in path
               for _, path, _ in local_hub.requests)
    card = (ctx.workspace / "hub-lora" / "lora" / "README.md").read_text()
    assert "base_model: acme/tiny-sd" in card and "license: creativeml-openrail-m" in card
    assert "hub squares" in card or "acme/squares" in card  # the data, by its Hub id

    # the base is now offered as cached in the Fine-tune dropdown (and needs no download to start again)
    choices = client.predict(api_name="/finetune_base_models")
    offered = [c[1] if isinstance(c, (list, tuple)) else c for c in choices.get("choices", [])] \
        if isinstance(choices, dict) else []
    assert "acme/tiny-sd" in offered, choices
