"""Hostile files and paths: nothing written outside the workspace, nothing read outside the chosen folder.

Every test builds its own hostile input: export targets that leave the workspace,
zips that escape, explode or carry HTML/SVG, folders with links to outside files,
named pipes, giant files and ``metadata.jsonl`` rows naming ``../`` paths.
"""

from __future__ import annotations

import io
import os
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import tabs.dataset as tab
from studio.config.data import DataConfig
from studio.data import extract_zip, load_image_dataset, unpack_upload
from studio.errors import ConfigError, DataError
from studio.paths import confine, inside_name, read_confined, refusal

SECRET = "root:x:0:0:the secret outside the folder"


def png(color: str = "red", size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in entries.items():
            zf.writestr(name, payload)
    return path


def every_file(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# --------------------------------------------------------------------------- writes
def test_export_outside_the_workspace_is_refused_and_writes_nothing(tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", ws / "link-out")
    before = every_file(tmp_path)
    cfg = DataConfig(max_rows=2)
    for target in ("../../etc", "../escape", str(tmp_path / "absolute-out"), "/etc/studio-export", "link-out/x",
                   "exports/../../escape2"):
        with pytest.raises(ConfigError, match="outside the workspace"):
            tab.export_dataset(cfg, target, ws)
    assert every_file(tmp_path) == before
    # inside the workspace, absolute or relative, still works
    assert tab.resolve_export_dir("mine", ws, cfg) == (ws / "mine").resolve()
    assert tab.resolve_export_dir(str(ws / "exports" / "b"), ws, cfg) == (ws / "exports" / "b").resolve()


def test_confine_and_inside_name(tmp_path: Path):
    assert confine("a/b", tmp_path) == (tmp_path / "a" / "b").resolve()
    with pytest.raises(ConfigError):
        confine("../x", tmp_path)
    assert inside_name("sub/./a.png").as_posix() == "sub/a.png"
    for bad in ("../a.png", "/etc/passwd", "a/../../b", "C:/x.png", "..\\x.png", ""):
        assert inside_name(bad) is None


def test_a_local_zip_is_unpacked_into_the_workspace_cache_not_beside_it(tmp_path: Path):
    src = tmp_path / "somewhere"
    src.mkdir()
    archive = make_zip(src / "tiles.zip", {"a.png": png(), "a.txt": b"red"})
    ws = tmp_path / "ws"
    view = tab.preview_dataset(DataConfig(source="folder", path=str(archive)), workspace=ws)
    assert view.dataset.names == ["a.png"] and view.dataset.captions == ["red"]
    assert every_file(src) == {"tiles.zip"}  # nothing written beside the zip
    unpacked = list((ws / ".cache" / "unpacked").glob("tiles-*"))
    assert len(unpacked) == 1 and (unpacked[0] / "a.png").is_file()


def test_a_refused_zip_leaves_nothing_on_disk(tmp_path: Path):
    archive = make_zip(tmp_path / "half.zip", {"first.png": png(), "../../escape.png": b"x"})
    with pytest.raises(DataError, match="unsafe path"):
        extract_zip(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    uploads = tmp_path / "ws" / "uploads"
    with pytest.raises(DataError, match="unsafe path"):
        unpack_upload([archive], uploads / "u1")
    assert not (uploads / "u1").exists()
    # a zip bomb whose header lies is stopped while writing: still nothing left
    bomb = make_zip(tmp_path / "bomb.zip", {"a.png": png(), "b.png": b"\0" * 3_000_000})
    real = zipfile.ZipFile.infolist

    def lying(self):
        infos = real(self)
        for info in infos:
            info.file_size = 10
        return infos

    zipfile.ZipFile.infolist = lying
    try:
        with pytest.raises(DataError, match="zip bomb|damaged"):
            extract_zip(bomb, tmp_path / "dest2", max_bytes=1_000_000)
    finally:
        zipfile.ZipFile.infolist = real
    assert not (tmp_path / "dest2").exists()


def test_an_upload_keeps_only_images_and_captions(tmp_path: Path):
    archive = make_zip(tmp_path / "set.zip", {
        "a.png": png(), "a.txt": b"a red square", "metadata.jsonl": b'{"file_name": "a.png", "text": "red"}\n',
        "evil.html": b"<script>fetch('/config')</script>", "evil.svg": b"<svg onload='alert(1)'/>",
        "x.js": b"alert(1)", "page.htm": b"<b>", "run.sh": b"rm -rf /"})
    loose = tmp_path / "loose.html"
    loose.write_text("<script>alert(1)</script>")
    left_out: list[str] = []
    dest = unpack_upload([archive, loose, tmp_path / "set.zip"], tmp_path / "u", left_out=left_out)
    assert every_file(dest) == {"set", "set/a.png", "set/a.txt", "set/metadata.jsonl",
                                "set-2", "set-2/a.png", "set-2/a.txt", "set-2/metadata.jsonl"}
    assert sorted(left_out) == sorted(["set.zip/evil.html", "set.zip/evil.svg", "set.zip/x.js", "set.zip/page.htm",
                                       "set.zip/run.sh", "loose.html"] + ["set.zip/evil.html", "set.zip/evil.svg",
                                                                          "set.zip/x.js", "set.zip/page.htm",
                                                                          "set.zip/run.sh"])


def test_a_small_zip_that_unpacks_to_far_over_the_limit_is_refused_early(tmp_path: Path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("a.png", png())
        with zf.open("big.png", "w", force_zip64=True) as fh:
            block = b"\0" * 2**24
            for _ in range(16):  # 256 MiB of zeros (1 GiB works alike; this keeps the test to seconds)
                fh.write(block)
    assert archive.stat().st_size < 2 * 2**20  # ~1 MB
    ws = tmp_path / "ws"
    started = time.perf_counter()
    from studio.uploads import unpack_limit

    with pytest.raises(DataError, match="expands to"):
        tab.save_upload([str(archive)], ws, unpack_limit("5mb"))
    assert time.perf_counter() - started < 2  # refused from the headers, nothing decompressed
    assert not any((ws / "uploads").iterdir())


# --------------------------------------------------------------------------- reads
@pytest.fixture
def hostile_folder(tmp_path: Path) -> Path:
    """A dataset folder with two good images and every kind of file that must not be read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text(SECRET)
    (outside / "real.png").write_bytes(png("blue"))
    root = tmp_path / "set"
    root.mkdir()
    (root / "a.png").write_bytes(png("red"))
    (root / "b.png").write_bytes(png("green"))
    os.symlink(outside / "passwd", root / "a.txt")  # caption linked to a system file
    os.symlink(outside / "real.png", root / "linked.png")  # an image outside the folder
    os.symlink(outside / "missing.png", root / "dangling.png")  # same words whether or not it exists
    os.symlink("/dev/zero", root / "endless.png")  # an endless device
    os.symlink(root / "a.png", root / "alias.png")  # a link inside the folder is fine
    os.mkfifo(root / "pipe.png")  # a named pipe that would block a read
    with open(root / "huge.png", "wb") as fh:  # a sparse file bigger than the per-file limit
        fh.truncate(300 * 2**20)
    (root / "metadata.jsonl").write_text(
        '{"file_name": "b.png", "text": "green"}\n'
        '{"file_name": "../outside/passwd", "text": "x"}\n'
        '{"file_name": "../outside/nothing-here.png", "text": "x"}\n'
        '{"file_name": "/etc/passwd", "text": "x"}\n')
    return root


def _load_with_timeout(cfg: DataConfig, seconds: float = 20):
    result: dict = {}

    def run() -> None:
        try:
            result["ds"] = load_image_dataset(cfg)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    return worker, result


def test_a_folder_never_reads_outside_itself_nor_special_or_giant_files(hostile_folder: Path):
    root = hostile_folder
    worker, result = _load_with_timeout(DataConfig(source="folder", path=str(root)))
    if worker.is_alive():  # unblock the reader stuck on the pipe before failing
        os.close(os.open(root / "pipe.png", os.O_RDWR))
        pytest.fail("Load blocked on a named pipe")
    assert "error" not in result, result.get("error")
    ds = result["ds"]
    assert ds.names == ["a.png", "alias.png", "b.png"]
    assert SECRET not in " ".join(ds.captions or [])
    assert ds.captions == ["", "", "green"]
    reasons = {s.name: s.reason for s in ds.skipped}
    outside = "is a link that points outside the chosen folder"
    assert reasons["a.txt"] == outside
    assert reasons["linked.png"] == reasons["dangling.png"] == reasons["endless.png"] == outside
    assert reasons["pipe.png"] == "is not a regular file (a named pipe)"
    assert reasons["huge.png"].startswith("is too big (300 MB")
    for name in ("../outside/passwd", "../outside/nothing-here.png", "/etc/passwd"):
        assert reasons[name] == "metadata.jsonl names a path outside its folder"
    assert not any("does not exist" in r for r in reasons.values())


def test_the_tab_shows_refused_files_in_the_skipped_table(hostile_folder: Path, tmp_path: Path):
    os.unlink(hostile_folder / "pipe.png")  # the pipe has its own test above
    view = tab.preview_dataset(DataConfig(source="folder", path=str(hostile_folder)), workspace=tmp_path / "ws")
    rows = {row[0]: row[1] for row in view.skipped}
    assert "points outside the chosen folder" in rows["a.txt"]
    assert SECRET not in repr(view.gallery) and SECRET not in repr(view.skipped)


def test_read_confined_checks_the_open_file(tmp_path: Path):
    (tmp_path / "ok.png").write_bytes(b"12345")
    assert read_confined(tmp_path / "ok.png", tmp_path, 5) == b"12345"
    assert refusal(tmp_path / "ok.png", tmp_path, 4).startswith("is too big")
    assert refusal(tmp_path / "ok.png", tmp_path / "sub", 10) == "is a link that points outside the chosen folder"


def test_a_local_path_typed_as_a_hub_id_is_answered_at_once(tmp_path: Path, monkeypatch):
    import datasets

    calls = []

    def slow_hub(*args, **kwargs):  # what an unreachable Hub does: minutes, then an error
        calls.append(args)
        raise ConnectionError("timed out")

    monkeypatch.setattr(datasets, "load_dataset", slow_hub)
    with pytest.raises(DataError, match="There is no folder /no/such/folder on this machine"):
        load_image_dataset(DataConfig(source="hub", hub_id="/no/such/folder"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="is a file, not a dataset folder"):
        load_image_dataset(DataConfig(source="hub", hub_id=str(tmp_path / "file.txt")))
    monkeypatch.setattr("studio.hub_datasets.MAX_LOCAL_DATASET_FILES", 3)
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    with pytest.raises(DataError, match="holds more than 3 files"):
        load_image_dataset(DataConfig(source="hub", hub_id=str(tmp_path)))
    assert calls == []


# --------------------------------------------------------------------------- serving
def _fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, b""


@pytest.mark.integration
def test_uploaded_html_and_svg_are_never_served_inline(client, launched_app, tmp_path: Path):
    from gradio_client import handle_file

    app, url = launched_app
    ws = app.studio_context.workspace
    archive = make_zip(tmp_path / "xss.zip", {
        "a.png": png(), "evil.html": b"<script>fetch('/config')</script>",
        "evil.svg": b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>"})
    folder, status = client.predict([handle_file(str(archive))], api_name="/upload_files")
    assert "Left out 2 file(s) that are not images or captions: xss.zip/evil.html, xss.zip/evil.svg." in status
    folder = Path(folder)
    planted = ws / "planted"  # a page that reached the workspace some other way
    planted.mkdir()
    (planted / "evil.html").write_text("<script>alert(1)</script>")
    (planted / "evil.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>")
    (planted / "ok.png").write_bytes(png())
    candidates = [folder / "xss" / "evil.html", folder / "xss" / "evil.svg", planted / "evil.html",
                  planted / "evil.svg"]
    for path in candidates:
        code, headers, body = _fetch(f"{url}gradio_api/file={path}")
        kind = headers.get("content-type", "")
        assert not kind.startswith(("text/html", "image/svg+xml")), (path, code, kind)
        if code == 200:
            assert headers.get("content-disposition", "").startswith("attachment")
            assert headers.get("x-content-type-options") == "nosniff"
    assert not (folder / "xss" / "evil.html").exists() and not (folder / "xss" / "evil.svg").exists()
    code, headers, body = _fetch(f"{url}gradio_api/file={planted / 'ok.png'}")
    assert code == 200 and headers["content-type"] == "image/png" and body.startswith(b"\x89PNG")
    assert headers.get("x-content-type-options") == "nosniff"
