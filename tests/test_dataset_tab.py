"""The Dataset tab: its pure functions with plain values, then the launched app via gradio_client."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from studio.config.data import DataConfig
from studio.context import DatasetChoice
from studio.data import SkippedFile
from studio.errors import ConfigError, DataError
from tabs import dataset as tab


def _folder(root: Path, captions: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (16 + 16 * i, 16), color).save(root / f"{color}.png")
        if captions:
            (root / f"{color}.txt").write_text(f"a {color} tile")
    return root


# --------------------------------------------------------------------------- pure functions


def test_build_config_per_source():
    assert tab.build_config("emoji") == DataConfig()
    cfg = tab.build_config("folder", folder=" /data/cats ", hub_id="ignored", max_rows=5.0, require_captions=True)
    assert (cfg.source, cfg.path, cfg.hub_id, cfg.max_rows, cfg.require_captions) == ("folder", "/data/cats", "", 5, True)
    cfg = tab.build_config("hub", hub_id="user/set", split="test", image_column="img", caption_column="text")
    assert (cfg.hub_id, cfg.split, cfg.image_column, cfg.caption_column) == ("user/set", "test", "img", "text")
    assert tab.build_config("upload", upload_dir="/ws/uploads/1").path == "/ws/uploads/1"
    with pytest.raises(ConfigError, match="path is empty"):
        tab.build_config("folder", folder="")
    with pytest.raises(ConfigError, match="Row limit"):
        tab.build_config("emoji", max_rows=-1)


def test_build_config_keeps_the_emoji_category_for_the_emoji_set_only():
    assert tab.build_config("emoji", category="flags") == DataConfig(category="flags")
    # the dropdown keeps its value while another source is picked; that source does not get it
    assert tab.build_config("folder", folder="/data", category="flags").category == ""
    assert tab.build_config("hub", hub_id="user/set", category="flags").category == ""
    with pytest.raises(ConfigError, match="Emoji category must be one of"):
        tab.build_config("emoji", category="Flags")
    # the dropdown: the whole set first, then every category with its size, all of them valid
    assert tab.CATEGORY_CHOICES[:2] == [("All 1,911 emoji", ""), ("smileys & emotion (169)", "smileys & emotion")]
    assert len(tab.CATEGORY_CHOICES) == 11 and ("flags (270)", "flags") in tab.CATEGORY_CHOICES
    assert all(tab.build_config("emoji", category=value).category == value for _, value in tab.CATEGORY_CHOICES)


@pytest.mark.parametrize("cfg", [
    DataConfig(),
    DataConfig(category="smileys & emotion", max_rows=20),
    DataConfig(source="folder", path="/data/cats", caption_column="caption", max_rows=10, require_captions=True),
    DataConfig(source="upload", path="/ws/uploads/x"),
    DataConfig(source="hub", hub_id="user/set", split="test", image_column="img", caption_column="text"),
])
def test_input_values_round_trip(cfg):
    assert tab.build_config(*tab.input_values(cfg)) == cfg
    # the hidden category of another source is the starting one: back on the emoji set, the smileys
    assert tab.input_values(cfg)[-1] == (cfg.category if cfg.source == "emoji" else "smileys & emotion")


def test_source_visibility():
    # (folder, upload, hub, emoji category)
    assert tab.source_visibility("emoji") == (False, False, False, True)
    assert tab.source_visibility("folder") == (True, False, False, False)
    assert tab.source_visibility("upload") == (False, True, False, False)
    assert tab.source_visibility("hub") == (False, False, True, False)


def test_size_report_numbers_and_histogram():
    text = tab.size_report([(64, 64), (100, 50), (600, 800)])
    assert "| width | 64 / 100 / 600 px |" in text
    assert "| height | 50 / 64 / 800 px |" in text
    assert "| < 64 px | 1 |" in text and "| 64-127 px | 1 |" in text and "| 512-1023 px | 1 |" in text
    assert "256-511" not in text  # empty buckets are left out
    assert tab.size_report([]) == "No images."


def test_skipped_table():
    assert tab.skipped_table([SkippedFile("a.png", "empty file (0 bytes)")]) == [["a.png", "empty file (0 bytes)"]]


def test_preview_emoji():
    view = tab.preview_dataset(DataConfig(), preview_count=6)
    assert len(view.gallery) == 6
    image, caption = view.gallery[0]
    assert image.size == (64, 64) and caption == "grinning face, smileys & emotion, face-smiling"
    assert view.counts.startswith("**1911** images · **1911** with captions")
    assert "Twemoji" in view.counts and "CC-BY 4.0" in view.counts  # the licence asks for attribution
    assert "| width | 64 / 64 / 64 px |" in view.sizes
    assert view.skipped == []
    assert "now the training dataset" in view.status
    assert isinstance(view.choice, DatasetChoice)
    assert view.choice.count == 1911 and view.choice.has_captions and view.choice.config == DataConfig()


def test_the_studio_starts_on_the_smileys_as_a_load_of_them_would_show():
    from studio.context import DatasetSelection

    start = DatasetSelection().get()
    assert start.config == DataConfig(category="smileys & emotion") and start.count == 169
    assert tab.preview_dataset(start.config, preview_count=0).choice == start  # same summary, count, captions


def test_preview_folder_with_bad_files(tmp_path: Path):
    root = _folder(tmp_path / "imgs", captions=False)
    (root / "broken.png").write_bytes(b"not a png")
    view = tab.preview_dataset(tab.build_config("folder", folder=str(root)))
    assert len(view.gallery) == 3
    assert view.gallery[0][1] == "blue.png"  # no captions: the file name is shown
    assert view.skipped == [["broken.png", "not an image (the content is not a known image format)"]]
    assert "**0** with captions" in view.counts and "**1** skipped" in view.counts
    assert not view.choice.has_captions


def test_preview_sends_thumbnails_of_big_images(tmp_path: Path):
    root = tmp_path / "big"
    root.mkdir()
    Image.new("RGB", (1200, 600), "purple").save(root / "wide.png")
    view = tab.preview_dataset(tab.build_config("folder", folder=str(root)))
    assert view.gallery[0][0].size == (tab.PREVIEW_SIDE, tab.PREVIEW_SIDE // 2)
    assert "| width | 1200 / 1200 / 1200 px |" in view.sizes  # the real size is reported


def test_preview_bad_folder_raises_clear_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        tab.preview_dataset(tab.build_config("folder", folder=str(tmp_path / "empty")))


def test_preview_hub_fills_the_dropdown_choices(tmp_path: Path):
    from datasets import Dataset, Features, Image as ImageFeature, Value

    root = tmp_path / "hubset"
    root.mkdir()
    feats = Features({"img": ImageFeature(), "caption": Value("string"), "note": Value("string")})
    rows = [{"img": {"bytes": _png(c), "path": None}, "caption": f"a {c} tile", "note": c} for c in ["red", "blue"]]
    Dataset.from_list(rows, features=feats).to_parquet(str(root / "train.parquet"))
    Dataset.from_list(rows[:1], features=feats).to_parquet(str(root / "validation.parquet"))
    view = tab.preview_dataset(tab.build_config("hub", hub_id=str(root)))
    assert sorted(view.splits) == ["train", "validation"]
    assert view.image_columns == ["img"] and view.caption_columns == ["caption", "note"]
    assert [c for _, c in view.gallery] == ["a red tile", "a blue tile"]
    view = tab.preview_dataset(tab.build_config("hub", hub_id=str(root), split="validation", caption_column="note"))
    assert [c for _, c in view.gallery] == ["red"] and view.dataset.names == ["validation/0"]


def _png(color: str) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_save_upload_unpacks_zip_into_workspace(tmp_path: Path):
    src = _folder(tmp_path / "src")
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.iterdir()):
            zf.write(p, f"set/{p.name}")
        zf.writestr("__MACOSX/set/._red.png", b"junk")
    folder = Path(tab.save_upload([str(archive), {"path": str(src / "red.png")}], tmp_path / "ws"))
    assert folder.parent == tmp_path / "ws" / "uploads"
    view = tab.preview_dataset(tab.build_config("upload", upload_dir=str(folder)))
    assert view.dataset.names == ["red.png", "set/set/blue.png", "set/set/green.png", "set/set/red.png"]
    with pytest.raises(DataError, match="No files were uploaded"):
        tab.save_upload([], tmp_path / "ws")


def test_export_dataset_default_and_relative_targets(tmp_path: Path):
    ws = tmp_path / "ws"
    cfg = DataConfig(max_rows=3)
    calls = []
    status = tab.export_dataset(cfg, "", ws, progress=lambda f, m: calls.append(f))
    out = Path(status.split(" to ")[1].split(" with ")[0])
    assert out.parent == ws / "exports" and out.name.startswith("emoji-")
    assert sorted(p.name for p in out.glob("*.png")) == ["train_0.png", "train_1.png", "train_2.png"]
    assert json.loads((out / "metadata.jsonl").read_text().splitlines()[0])["text"].startswith("grinning")
    assert calls and calls[-1] == pytest.approx(1.0) and calls == sorted(calls)
    assert tab.resolve_export_dir("mine", ws, cfg) == (ws / "mine").resolve()
    assert tab.resolve_export_dir(str(ws / "abs"), ws, cfg) == (ws / "abs").resolve()
    with pytest.raises(ConfigError, match="outside the workspace"):  # tests/test_hostile_files.py has more
        tab.resolve_export_dir(str(tmp_path / "abs"), ws, cfg)
    tab.export_dataset(cfg, "mine", ws)
    with pytest.raises(DataError, match="not empty"):
        tab.export_dataset(cfg, "mine", ws)


# --------------------------------------------------------------------------- launched app


@pytest.mark.integration
def test_app_loads_emoji_and_reports_a_broken_folder(client, launched_app, tmp_path: Path):
    app, _ = launched_app
    ctx = app.studio_context
    gallery, counts, sizes, skipped, status, *_ = client.predict(  # "" = all 1,911 (the studio starts on a category)
        "emoji", "", "", "", "", "", "", 0, False, "", api_name="/load_dataset")
    assert len(gallery) == tab.PREVIEW_COUNT
    first = gallery[0]
    assert first["caption"] == "grinning face, smileys & emotion, face-smiling"
    with Image.open(first["image"]["path"] if isinstance(first["image"], dict) else first["image"]) as im:
        assert im.size == (64, 64)
    assert counts.startswith("**1911** images")
    assert "64 / 64 / 64" in sizes
    assert "now the training dataset" in status
    assert ctx.dataset.get().count == 1911

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    (broken / "b.jpg").write_text("not an image")
    gallery, counts, sizes, skipped, status, *_ = client.predict(
        "folder", str(broken), "", "", "", "", "", 0, False, api_name="/load_dataset")
    assert gallery == [] and counts == ""
    assert status.startswith("Not loaded: folder")
    assert "holds no usable images" in status and "a.png: empty file (0 bytes)" in status
    assert "Traceback" not in status
    assert "The training dataset is still: 1911 images from emoji" in status
    assert ctx.dataset.get().config.source == "emoji"

    *_, status, _, _, _ = client.predict(
        "hub", "", "", "nobody-here/no-such-dataset", "", "", "", 0, False, api_name="/load_dataset")
    assert "not in the local cache and the studio is offline" in status


@pytest.mark.integration
def test_app_starts_on_the_smileys_and_a_picked_category_stays(client, launched_app):
    app, _ = launched_app
    ctx = app.studio_context
    category_at = 17  # the outputs: 8 views (the State is not sent), then the 10 inputs, the category last
    # a fresh studio: the page previews the smileys and the dropdown shows their category
    outputs = client.predict(api_name="/preview_current_dataset")
    assert outputs[1].startswith("**169** images") and "emoji (bundled, smileys & emotion)" in outputs[1]
    assert outputs[8] == "emoji" and outputs[category_at] == "smileys & emotion"
    assert ctx.dataset.get().count == 169 and ctx.dataset.get().config.category == "smileys & emotion"

    gallery, counts, _, _, status, *_ = client.predict(
        "emoji", "", "", "", "", "", "", 0, False, "flags", api_name="/load_dataset")
    assert counts.startswith("**270** images") and "Loaded 270 images from emoji (bundled, flags)" in status
    assert all(", flags, " in g["caption"] for g in gallery)
    assert ctx.dataset.get().config == DataConfig(category="flags") and ctx.dataset.get().count == 270
    # a page opened later shows the flags with the category picked
    outputs = client.predict(api_name="/preview_current_dataset")
    assert outputs[1].startswith("**270** images") and outputs[category_at] == "flags"


@pytest.mark.integration
def test_app_upload_load_and_export(client, launched_app, tmp_path: Path):
    from gradio_client import handle_file

    app, _ = launched_app
    ctx = app.studio_context
    src = _folder(tmp_path / "src")
    archive = tmp_path / "tiles.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.iterdir()):
            zf.write(p, p.name)
    folder, status = client.predict([handle_file(str(archive))], api_name="/upload_files")
    assert Path(folder).is_relative_to(ctx.workspace / "uploads") and "Press Load" in status
    gallery, counts, *_ = client.predict("upload", "", folder, "", "", "", "", 0, True, api_name="/load_dataset")
    assert len(gallery) == 3 and sorted(g["caption"] for g in gallery) == ["a blue tile", "a green tile", "a red tile"]
    choice = ctx.dataset.get()
    assert choice.config.source == "upload" and choice.count == 3 and choice.has_captions
    export_status = client.predict("", api_name="/export_dataset")
    assert export_status.startswith("Exported 3 images to " + str(ctx.workspace / "exports"))

    # A page opened later shows the current training dataset with the inputs that made it.
    outputs = client.predict(api_name="/preview_current_dataset")
    gallery, counts, status = outputs[0], outputs[1], outputs[4]
    assert len(gallery) == 3 and counts.startswith("**3** images") and "Loaded 3 images" in status
    assert outputs[8:11] == ("upload", "", folder) and outputs[17] == "smileys & emotion"
