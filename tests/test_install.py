"""What ``pip`` plans for the project's requirement files, in throw-away clean venvs.

Each test asks pip for a dry run with a JSON report (``pip install --dry-run --report``)
and reads the plan. The venvs are made ``--without-pip`` and driven by this pip
(``pip --python VENV``), so no download and no pip bootstrap happen. Offline and fast:
the candidates are metadata-only wheels copied from this environment's installed
distributions (their real ``Requires-Dist``, no code), so every real dependency's own
torch bounds take part in the resolution.

- A venv that already has a newer torch (a stub ``torch 2.99.0``) keeps it under
  ``requirements.txt`` (Colab, a GPU box): no torch in the plan.
- A fresh venv under ``requirements-cpu.txt`` (the README's set-up file) takes the
  pinned torch even when a newer one is offered, and on this machine that pin
  resolves to the small CPU wheel from the machine's own pip sources, with no
  ``nvidia-*`` package in the plan.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUB_TORCH = "2.99.0"


def _wheel_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name)


def write_metadata_wheel(folder: Path, name: str, version: str, metadata_text: str) -> Path:
    """A wheel holding only ``METADATA``/``WHEEL``/``RECORD``: enough for pip to resolve it."""
    dist = f"{_wheel_name(name)}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", metadata_text)
        zf.writestr(f"{dist}.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: studio-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def stub_metadata(name: str, version: str) -> str:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> Path:
    """A find-links folder: every distribution installed here, as a metadata-only wheel."""
    folder = tmp_path_factory.mktemp("candidates")
    seen = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or _wheel_name(name).lower() in seen:
            continue
        seen.add(_wheel_name(name).lower())
        write_metadata_wheel(folder, name, dist.version, dist.read_text("METADATA") or stub_metadata(name, dist.version))
    return folder


def clean_venv(path: Path, torch_version: str | None = None) -> Path:
    """A venv with nothing in it (no pip, no system site-packages); optionally a stub torch."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    if torch_version:
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        info = site / f"torch-{torch_version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(stub_metadata("torch", torch_version))
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    return python


def isolated_env() -> dict[str, str]:
    """This process's environment without any pip configuration (files or PIP_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def pip_plan(python: Path, args: list[str], report: Path, env: dict[str, str]) -> dict[str, dict]:
    """Run ``pip install --dry-run --report`` for ``python``; {normalised name: report item}."""
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
           "--report", str(report), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"pip failed:\n{proc.stdout}\n{proc.stderr}"
    plan = json.loads(report.read_text())
    return {item["metadata"]["name"].lower().replace("_", "-"): item for item in plan["install"]}


def plan_lines(plan: dict[str, dict]) -> str:
    return " ".join(f"{name}=={item['metadata']['version']}" for name, item in sorted(plan.items()))


def test_requirements_keep_a_newer_installed_torch(tmp_path, candidates):
    offered = tmp_path / "offered"
    offered.mkdir()
    # A newer torch on offer too: the installed one must still win, not an "upgrade".
    write_metadata_wheel(offered, "torch", "3.0.0", stub_metadata("torch", "3.0.0"))
    python = clean_venv(tmp_path / "venv", torch_version=STUB_TORCH)
    plan = pip_plan(python, ["--no-index", "--find-links", str(candidates), "--find-links", str(offered),
                             "-r", "requirements.txt"], tmp_path / "report.json", isolated_env())
    assert "torch" not in plan, f"pip would change the installed torch {STUB_TORCH}: {plan_lines(plan)}"
    assert {"diffusers", "transformers", "gradio", "accelerate", "peft"} <= set(plan)
    assert not [n for n in plan if n.startswith("nvidia-")]


def test_fresh_machine_file_takes_the_pinned_torch(tmp_path, candidates):
    offered = tmp_path / "offered"
    offered.mkdir()
    write_metadata_wheel(offered, "torch", STUB_TORCH, stub_metadata("torch", STUB_TORCH))
    pin = re.search(r"^torch==(\S+)", (ROOT / "requirements-cpu.txt").read_text(), re.M).group(1)
    python = clean_venv(tmp_path / "venv")
    # --no-deps: only the files' own lines decide this (the dependencies' torch bounds
    # are the first test's business), which keeps it to a second.
    args = ["--no-index", "--no-deps", "--find-links", str(candidates), "--find-links", str(offered)]
    plan = pip_plan(python, [*args, "-r", "requirements-cpu.txt"], tmp_path / "report.json", isolated_env())
    assert plan["torch"]["metadata"]["version"].split("+")[0] == pin
    # The same fresh venv under requirements.txt would take the newest torch offered: the
    # pin is what keeps the fresh-machine path on the tested release.
    plan = pip_plan(python, [*args, "-r", "requirements.txt"], tmp_path / "report2.json", isolated_env())
    assert plan["torch"]["metadata"]["version"] == STUB_TORCH


def test_fresh_machine_torch_is_the_cpu_wheel_on_this_machine(tmp_path, candidates):
    """The pin, resolved from this machine's own pip sources (its configuration, as the
    README's command sees it), is the CPU build: a local ``+cpu`` wheel, no nvidia-*."""
    python = clean_venv(tmp_path / "venv")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    # Offline and fast: --no-index leaves only the machine's configured find-links (where
    # its torch wheels lie on disk) to offer torch; --no-deps because torch's own
    # requirements are read from its metadata below (an nvidia-* there is a CUDA build).
    torch_pin = re.search(r"^torch\S*", (ROOT / "requirements-cpu.txt").read_text(), re.M).group(0)
    plan = pip_plan(python, ["--no-index", "--no-deps", torch_pin], tmp_path / "report.json", env)
    torch_item = plan["torch"]
    print("torch planned:", torch_item["metadata"]["version"], torch_item["download_info"]["url"])
    assert torch_item["metadata"]["version"].endswith("+cpu"), torch_item["download_info"]["url"]
    assert not any(r.startswith("nvidia") for r in torch_item["metadata"].get("requires_dist", []))
    assert not [n for n in plan if n.startswith("nvidia-")], plan_lines(plan)
