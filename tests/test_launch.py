"""launch.py and the safe launch configuration: bind, auth, served paths."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

import launch
from studio.errors import ConfigError
from studio.settings import LaunchSettings, is_loopback, secure


def test_defaults_bind_loopback_without_login(tmp_path):
    s = launch.parse_args(["--workspace", str(tmp_path)])
    assert s.host == "127.0.0.1" and s.port == 7860 and not s.share
    assert s.auth == [] and not s.is_public


def test_share_without_auth_gets_a_generated_password(tmp_path):
    from tabs import launch_kwargs

    s = launch.parse_args(["--share", "--workspace", str(tmp_path)])
    assert s.generated_password
    kwargs = launch_kwargs(s)
    assert kwargs["share"] is True
    (user, password), = kwargs["auth"]
    assert user == "studio" and len(password) >= 12


def test_public_host_without_auth_gets_a_password(tmp_path):
    s = launch.parse_args(["--host", "0.0.0.0", "--workspace", str(tmp_path)])
    assert s.is_public and s.auth and s.generated_password


def test_given_auth_is_kept(tmp_path):
    s = launch.parse_args(["--share", "--auth", "ann:se:cret", "--workspace", str(tmp_path)])
    assert s.auth == [("ann", "se:cret")] and not s.generated_password


def test_auth_file(tmp_path):
    f = tmp_path / "logins"
    f.write_text("# team\nann:pw1\n\nbob:pw2\n")
    s = launch.parse_args(["--auth-file", str(f), "--workspace", str(tmp_path)])
    assert s.auth == [("ann", "pw1"), ("bob", "pw2")]


@pytest.mark.parametrize("argv", [["--auth", "nopassword"], ["--auth-file", "/no/such/file"], ["--port", "70000"]])
def test_bad_flags_are_clear_errors(argv, tmp_path, capsys):
    assert launch.main(argv + ["--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_colab_defaults_to_share_with_login(monkeypatch, tmp_path):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab")
    s = launch.parse_args(["--workspace", str(tmp_path)])
    assert s.share and s.auth


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_launch_kwargs_serve_only_the_workspace(tmp_path):
    from tabs import launch_kwargs

    s = secure(LaunchSettings(workspace=tmp_path / "ws"))
    kwargs = launch_kwargs(s)
    assert kwargs["allowed_paths"] == [str((tmp_path / "ws").resolve())]
    assert kwargs["auth"] is None and kwargs["server_name"] == "127.0.0.1"
    assert kwargs["max_file_size"] == "1gb"


def test_importing_the_packages_has_no_side_effects():
    import subprocess
    import sys

    code = ("import threading, sys; n = threading.active_count(); import studio, tabs, studio.jobs, "
            "studio.checkpoints, studio.runs; assert threading.active_count() == n, threading.enumerate(); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code, "--share", "--port", "1"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "ok", out.stderr


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.integration
def test_file_routes_serve_only_the_workspace(launched_app, workspace, tmp_path):
    _, url = launched_app
    inside = workspace / "run-a" / "samples" / "ok.png"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"\x89PNG\r\n\x1a\n")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    assert _get(f"{url}gradio_api/file={inside}") == 200
    for path in ["/etc/passwd", str(outside), f"{workspace}/../secret.txt", str(Path(launch.__file__).resolve())]:
        assert _get(f"{url}gradio_api/file={path}") in (403, 404), path
    assert _get(f"{url}gradio_api/file=../../etc/passwd") in (403, 404)


@pytest.mark.integration
def test_app_with_auth_refuses_anonymous_api(settings):
    from conftest import launch_app

    settings.auth = [("ann", "pw")]
    app, url = launch_app(settings)
    try:
        assert _get(f"{url}config") in (401, 403)
        assert _get(f"{url}gradio_api/info") in (401, 403)
    finally:
        app.close()
