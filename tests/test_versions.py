"""`python launch.py --version` / `--check`: the installed stack, the device, the tested table."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

import launch
from studio import versions
from studio.versions import TESTED, format_report, release_series, stack_rows

ROOT = Path(__file__).resolve().parent.parent


def test_release_series_ignores_build_labels_and_patches():
    assert release_series("2.13.0+cu128") == "2.13"
    assert release_series("2.13.1") == "2.13"
    assert release_series("0.42.0.dev0") == "0.42"
    assert release_series("6") == "6"


def test_a_cuda_build_of_the_tested_torch_counts_as_tested():
    installed = {name: f"{series}.0" for name, series in TESTED.items()}
    installed["torch"] = TESTED["torch"] + ".0+cu128"
    assert all(row.is_tested for row in stack_rows(installed))


def test_report_names_what_differs_and_what_is_missing():
    installed = {name: f"{series}.0" for name, series in TESTED.items()}
    installed["torch"] = "2.99.1+cu130"
    installed["gradio"] = None
    text = format_report(stack_rows(installed), "cuda (Tesla T4, 14.7 GiB, CUDA 12.8)")
    assert re.search(r"^torch\s+2\.99\.1\+cu130\s+no \(we test " + re.escape(TESTED["torch"]) + r"\.x\)$", text, re.M)
    assert re.search(r"^gradio\s+MISSING\s+no", text, re.M)
    assert re.search(r"^diffusers\s+\S+\s+yes$", text, re.M)
    assert "device        cuda (Tesla T4, 14.7 GiB, CUDA 12.8)" in text
    assert "Not the tested stack (torch, gradio differ)" in text


def test_launch_version_prints_this_environment_and_exits_0(capsys):
    with pytest.raises(SystemExit) as stop:
        launch.parse_args(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for name in ("torch", "diffusers", "transformers", "gradio"):
        assert re.search(rf"^{name}\s+{re.escape(metadata.version(name))}\s", out, re.M), out
    assert re.search(r"^device\s+cpu \(\d+ cores", out, re.M), out  # CI has no GPU


@pytest.mark.parametrize("torch_version, code", [(TESTED["torch"] + ".0+cpu", 0), ("2.99.0", 1)])
def test_launch_check_exit_status_follows_the_tested_table(monkeypatch, capsys, torch_version, code):
    installed = {name: f"{series}.3" for name, series in TESTED.items()}
    installed["torch"] = torch_version
    monkeypatch.setattr(versions, "installed_versions", lambda: dict(installed))
    with pytest.raises(SystemExit) as stop:
        launch.main(["--check"])
    assert stop.value.code == code
    assert f"torch         {torch_version}" in capsys.readouterr().out


def test_readme_states_the_tested_table():
    readme = (ROOT / "README.md").read_text()
    for name, series in TESTED.items():
        assert re.search(rf"^\| {name} \| {re.escape(series)}(\.x)? \|", readme, re.M), f"README lacks {name} {series}"


def test_requirements_admit_every_tested_release():
    from packaging.requirements import Requirement

    reqs = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            reqs[req.name] = req.specifier
    for name, series in TESTED.items():
        if name in reqs:
            assert reqs[name].contains(f"{series}.0", prereleases=True), f"requirements.txt excludes {name} {series}"
    # torch: a lower bound only, so an installed newer torch (Colab, CUDA boxes) is kept.
    assert all(spec.operator == ">=" for spec in reqs["torch"]), reqs["torch"]
