"""A stalled Hub (it accepts the connection, then says nothing) gives one clear line within seconds.

huggingface_hub's lookups default to no timeout at all, so without the studio's own
``timeout=`` a Generate load, a "Download for offline use" or a Fine-tune by Hub id
would hang forever. Against the loopback Hub with ``stall_s`` set (tests/hub_server.py).
"""

from __future__ import annotations

import time

import pytest

from tiny_pipelines import tiny_ddpm  # noqa: F401  (fixture)


def one_line(text: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text and "Unexpected error" not in text, text


def test_model_lookup_on_a_stalled_hub_is_one_line_within_seconds(local_hub, workspace):
    from studio.errors import ModelError
    from studio.hub import LOOKUP_TIMEOUT_S
    from studio.models import PipelineManager, resolve_reference

    local_hub.add_repo("acme/slow", {"model_index.json": b"{}"})
    local_hub.stall_s = 120
    try:
        began = time.monotonic()
        with pytest.raises(ModelError) as caught:
            resolve_reference("acme/slow", workspace, offline=False)
        took = time.monotonic() - began
        text = str(caught.value)
        one_line(text)
        assert took < LOOKUP_TIMEOUT_S + 3, f"the lookup took {took:.1f} s"
        assert f"no answer within {LOOKUP_TIMEOUT_S:g} s" in text and "acme/slow" in text
        assert "not in the local cache" not in text and "Available offline" in text
        # "Download for offline use" goes through the same lookup
        began = time.monotonic()
        with pytest.raises(ModelError, match="no answer within"):
            PipelineManager("cpu", workspace, offline=False).prefetch("acme/slow")
        assert time.monotonic() - began < LOOKUP_TIMEOUT_S + 3
    finally:
        local_hub.release_stalls()


def test_a_cached_model_on_a_stalled_hub_points_at_offline(local_hub, workspace, tiny_ddpm):  # noqa: F811
    import huggingface_hub as hf

    from hub_server import files_of
    from studio.errors import ModelError
    from studio.models import resolve_reference

    local_hub.add_repo("acme/cached", files_of(tiny_ddpm))
    hf.snapshot_download("acme/cached")
    local_hub.stall_s = 120
    try:
        with pytest.raises(ModelError) as caught:
            resolve_reference("acme/cached", workspace, offline=False)
    finally:
        local_hub.release_stalls()
    one_line(str(caught.value))
    assert "is in the local cache" in str(caught.value) and "--offline" in str(caught.value)


def test_dataset_lookup_on_a_stalled_hub_is_one_line_within_seconds(local_hub):
    from studio.config.data import DataConfig
    from studio.data import load_image_dataset
    from studio.hub_datasets import HUB_LOOKUP_TIMEOUT
    from studio.errors import DataError

    local_hub.stall_s = 120
    try:
        began = time.monotonic()
        with pytest.raises(DataError) as caught:
            load_image_dataset(DataConfig(source="hub", hub_id="acme/stalled-set"))
        took = time.monotonic() - began
    finally:
        local_hub.release_stalls()
    one_line(str(caught.value))
    assert took < HUB_LOOKUP_TIMEOUT + 3, f"the lookup took {took:.1f} s"
    assert "Could not reach the Hugging Face Hub" in str(caught.value)


def test_push_to_a_stalled_hub_gives_up_within_seconds_and_keeps_the_result(local_hub, tmp_path, monkeypatch):
    from studio.hub import LOOKUP_TIMEOUT_S
    from studio.trainers.export import push_to_hub

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "README.md").write_text("# a result\n")
    local_hub.stall_s = 120
    try:
        began = time.monotonic()
        message = push_to_hub(folder, "acme/my-lora")
        took = time.monotonic() - began
    finally:
        local_hub.release_stalls()
    one_line(message)
    assert took < LOOKUP_TIMEOUT_S + 3, f"the push waited {took:.1f} s"
    assert message.startswith("Not pushed to the Hub (the Hugging Face Hub could not be reached: no answer within")
    assert str(folder) in message and (folder / "README.md").is_file()
