"""The studio against a Hub speaking the real protocol (tests/hub_server.py), no mocks.

huggingface_hub, diffusers and datasets run their own download code against a
loopback server; the studio's Hub paths (load by id, revisions, variants, gated and
missing repos, interrupted downloads, offline after download, Hub datasets) are
checked for what a person sees.
"""

from __future__ import annotations

import os

import pytest

from tiny_pipelines import make_tiny_sd, tiny_ddpm  # noqa: F401  (fixture)


@pytest.fixture
def settings(workspace, local_hub):
    """The launched app of this module is online, talking to the loopback Hub."""
    from conftest import free_port
    from studio.settings import LaunchSettings

    return LaunchSettings(host="127.0.0.1", port=free_port(), workspace=workspace, device="cpu", offline=False)


def _files(folder) -> dict[str, bytes]:
    from hub_server import files_of

    return files_of(folder)


def test_repo_info_tree_and_snapshot_follow_the_hub_protocol(local_hub, tiny_ddpm):  # noqa: F811
    import huggingface_hub as hf

    commit = local_hub.add_repo("acme/ddpm-snapshot", _files(tiny_ddpm))
    info = hf.model_info("acme/ddpm-snapshot")
    assert info.sha == commit.sha
    assert "model_index.json" in [s.rfilename for s in info.siblings]
    tree = {f.path for f in hf.list_repo_tree("acme/ddpm-snapshot", recursive=True)}
    assert "unet/diffusion_pytorch_model.safetensors" in tree and "unet" in tree
    folder = hf.snapshot_download("acme/ddpm-snapshot")
    assert (open(os.path.join(folder, "model_index.json"), "rb").read()
            == commit.files["model_index.json"])
    # weights went through the CDN redirect, metadata read from the redirect like on the Hub
    assert any(m == "HEAD" and status == 302 for m, _, status in local_hub.requests)
    assert any(path.startswith("/cdn/") and status == 200 for _, path, status in local_hub.requests)


def test_load_pipeline_by_hub_id_then_offline_from_cache(local_hub, tiny_ddpm, monkeypatch):  # noqa: F811
    from huggingface_hub import constants

    from studio.models import load_pipeline

    local_hub.add_repo("acme/ddpm-load", _files(tiny_ddpm))
    pipe = load_pipeline("acme/ddpm-load", device="cpu", offline=False)
    assert type(pipe).__name__ == "DDPMPipeline"
    served = len(local_hub.requests)
    # offline now: the cached copy loads and the server sees nothing
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = load_pipeline("acme/ddpm-load", device="cpu", offline=True)
    assert type(pipe).__name__ == "DDPMPipeline"
    assert len(local_hub.requests) == served


def test_revision_and_variant(local_hub, tmp_path):
    from studio.models import load_pipeline

    main = make_tiny_sd(tmp_path / "main", seed=0)
    other = make_tiny_sd(tmp_path / "other", seed=1)
    local_hub.add_repo("acme/tiny-sd", _files(main))
    v2 = local_hub.add_repo("acme/tiny-sd", _files(other), revision="v2")
    a = load_pipeline("acme/tiny-sd", device="cpu", offline=False)
    b = load_pipeline("acme/tiny-sd@v2", device="cpu", offline=False)
    wa = next(iter(a.unet.state_dict().values()))
    wb = next(iter(b.unet.state_dict().values()))
    assert not (wa == wb).all(), "the revision must load the other weights"
    assert any(f"/resolve/{v2.sha}/" in path or "/resolve/v2/" in path for _, path, _ in local_hub.requests)

    # an fp16 variant: only the variant files are served for the UNet
    files = _files(main)
    variant = {k.replace("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"): v
               for k, v in files.items()}
    local_hub.add_repo("acme/tiny-sd-fp16", variant)
    pipe = load_pipeline("acme/tiny-sd-fp16:fp16", device="cpu", offline=False)
    assert type(pipe).__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize("repo,expected", [("acme/gated", "gated"), ("acme/nothing-here", "not found")])
def test_gated_and_missing_repos_give_the_right_message(local_hub, tiny_ddpm, repo, expected):  # noqa: F811
    from studio.errors import ModelError
    from studio.models import load_pipeline

    local_hub.add_repo("acme/gated", _files(tiny_ddpm), gated=True)
    with pytest.raises(ModelError) as caught:
        load_pipeline(repo, device="cpu", offline=False)
    text = str(caught.value).lower()
    assert expected in text
    assert "traceback" not in text and "go online" not in text


def test_interrupted_download_resumes_with_a_range_request(local_hub, tmp_path):
    import huggingface_hub as hf

    # bigger than one download chunk (10 MB), cut after the first chunk arrived
    payload = os.urandom(12 * 1024 * 1024)
    local_hub.add_repo("acme/big", {"weights.safetensors": payload, "config.json": b"{}"})
    local_hub.cut_after("weights.safetensors", 11 * 1024 * 1024)
    path = hf.hf_hub_download("acme/big", "weights.safetensors", cache_dir=tmp_path / "cache")
    assert open(path, "rb").read() == payload
    statuses = [status for _, p, status in local_hub.requests if p.startswith("/cdn/")]
    assert statuses[-1] == 206, f"the retry must ask for the rest of the file, got {statuses}"


def test_hub_dataset_by_id(local_hub):
    pytest.importorskip("pyarrow")
    from hub_server import image_parquet
    from PIL import Image

    from studio.config.data import DataConfig
    from studio.data import load_image_dataset

    shard = image_parquet([Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]],
                          [f"colour {i}" for i in range(3)])
    local_hub.add_repo("acme/colours", {"data/train-00000-of-00001.parquet": shard,
                                        "README.md": b"# colours\n"}, repo_type="dataset")
    ds = load_image_dataset(DataConfig(source="hub", hub_id="acme/colours"))
    assert len(ds) == 3
    assert ds.captions == ["colour 0", "colour 1", "colour 2"]
    assert ds.image(1).getpixel((3, 3)) == (0, 255, 0)


def test_download_for_offline_use_reports_bytes_speed_and_time_left(local_hub, tiny_ddpm, workspace,  # noqa: F811
                                                                     monkeypatch):
    from huggingface_hub import constants

    from studio.hub import pipeline_download_size, repo_file_sizes
    from studio.models import PipelineManager, load_pipeline

    files = _files(tiny_ddpm)
    files["unet/diffusion_pytorch_model.bin"] = b"x" * 1000  # pickle weights a safetensors download skips
    local_hub.add_repo("acme/ddpm-download", files)
    local_hub.throttle_bps = 400_000
    expected = pipeline_download_size(repo_file_sizes("acme/ddpm-download"))
    assert expected == sum(len(v) for k, v in files.items() if not k.endswith(".bin"))
    reports: list[tuple[float, str]] = []
    manager = PipelineManager(device="cpu", workspace=workspace, offline=False)
    text = manager.prefetch("acme/ddpm-download", progress=lambda f, m: reports.append((f, m)))
    byte_reports = [(f, m) for f, m in reports if " of " in m]
    assert byte_reports, reports
    assert any("/s" in m and "left" in m for _, m in byte_reports), byte_reports
    fractions = [f for f, _ in byte_reports]
    assert fractions == sorted(fractions) and 0 < fractions[-1] <= 1
    assert "kB" in text and "loads offline" in text
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert type(load_pipeline("acme/ddpm-download", device="cpu", offline=True)).__name__ == "DDPMPipeline"


def test_download_button_through_the_app_then_offline(local_hub, tiny_ddpm, client):  # noqa: F811
    """What a person sees: "Download for offline use" ends with the size and "loads offline"."""
    local_hub.add_repo("acme/ddpm-button", _files(tiny_ddpm))
    text = client.predict("acme/ddpm-button", api_name="/download_model")
    assert text.startswith("Downloaded acme/ddpm-button:") and "kB" in text and "loads offline" in text, text
    local_hub.stop()  # the Hub is gone: the cached copy still answers a lookup-free offline load
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # restored by the fixture's monkeypatch
    from studio.models import load_pipeline

    assert type(load_pipeline("acme/ddpm-button", device="cpu", offline=True)).__name__ == "DDPMPipeline"


def test_unreachable_hub_is_one_clear_line(local_hub, workspace):
    from studio.errors import ModelError
    from studio.models import PipelineManager

    local_hub.stop()
    with pytest.raises(ModelError) as caught:
        PipelineManager("cpu", workspace, offline=False).prefetch("acme/anything")
    text = str(caught.value)
    assert "\n" not in text.strip() or "Traceback" not in text
    assert "reach" in text.lower() or "failed" in text.lower()
