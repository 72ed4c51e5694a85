"""docs/colab.ipynb: a valid notebook whose offline cells run here, in a real Jupyter kernel.

The cell tagged ``network`` (clone and pip install) is checked by reading it, not run.
Every other cell runs with nbclient in a folder that mirrors the repository (as the
clone cell's ``%cd studio`` would leave it): the stack check, the GPU check, the
headless training run on the bundled emoji set and its sample grid, and the launch
cell with ``--share`` replaced by a non-loopback bind (no tunnel here) so that the
studio generates and prints a login as it does for ``--share``; the test then logs in
with the user and password read from the cell's output, and stops the cell with a
kernel interrupt (the notebook's stop button).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nbclient
import nbformat
import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "colab.ipynb"
COLAB = "https://colab.research.google.com/github/"


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def tagged(cell, tag: str) -> bool:
    return tag in cell.metadata.get("tags", [])


def text_of(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def test_notebook_is_valid_and_keeps_colabs_torch():
    nb = read_notebook()
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3" and nb.metadata.accelerator == "GPU"
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it without outputs"
    network = [cell for cell in nb.cells if tagged(cell, "network")]
    assert len(network) == 1
    setup = network[0].source
    repo = re.search(r'^REPO = "https://github.com/([^"]+)"', setup, re.M).group(1)
    assert f"!git clone --depth 1 {{REPO}} studio" in setup and "%cd studio" in setup
    # requirements.txt (torch>=2.4 only), never the CPU pin or a torch of its own.
    install = [line for line in setup.splitlines() if "pip install" in line]
    assert install == ["!pip install -q -r requirements.txt"]
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    assert code[-1].rstrip().endswith("!python launch.py --share")
    assert any("!python -m studio train --config" in src and '"source": "emoji"' in src for src in code)
    # The README's badge opens this notebook from the same repository the notebook clones.
    readme = (ROOT / "README.md").read_text()
    badge = re.search(r"\]\((https://colab\.research\.google\.com/github/[^)]+)\)", readme).group(1)
    assert badge == f"{COLAB}{repo}/blob/main/docs/colab.ipynb"


def _server_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _login(port: int, user: str, password: str) -> dict:
    data = urllib.parse.urlencode({"username": user, "password": password}).encode()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", data=data, timeout=10) as response:
            return {"status": response.status, "body": response.read().decode()}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode()}


async def _run_notebook(client, nb, port: int) -> dict:
    found = {}
    async with client.async_setup_kernel():
        *cells, launch_cell = list(enumerate(nb.cells))
        for index, cell in cells:
            await client.async_execute_cell(cell, index)  # raises CellExecutionError on an error
        index, cell = launch_cell
        launch = asyncio.create_task(client.async_execute_cell(cell, index))
        for _ in range(600):  # the app starts in seconds on a quiet machine; minutes under load
            if await asyncio.to_thread(_server_answers, port):
                break
            assert not launch.done(), f"launch cell ended early:\n{text_of(cell)}"
            await asyncio.sleep(0.5)
        else:
            pytest.fail(f"the studio never answered on port {port}:\n{text_of(cell)}")
        printed = text_of(cell)
        login = re.search(r"user: (\S+)\s+password: (\S+)", printed)
        assert login, printed
        found["good"] = await asyncio.to_thread(_login, port, login.group(1), login.group(2))
        found["bad"] = await asyncio.to_thread(_login, port, login.group(1), "not-" + login.group(2))
        await client.km.interrupt_kernel()  # the notebook's stop button
        await asyncio.wait_for(launch, 120)
        found["stopped"] = not await asyncio.to_thread(_server_answers, port)
    return found


@pytest.mark.slow
@pytest.mark.integration
def test_offline_cells_run_and_the_launch_cell_prints_a_working_login(tmp_path):
    # The folder the clone cell's "%cd studio" leaves: the repository's code and assets.
    for name in ("launch.py", "studio", "tabs", "assets"):
        (tmp_path / name).symlink_to(ROOT / name)
    nb = read_notebook()
    nb.cells = [cell for cell in nb.cells if not tagged(cell, "network")]
    port = free_port()
    launch_cell = nb.cells[-1]
    assert "--share" in launch_cell.source
    launch_cell.source = launch_cell.source.replace("--share", f"--no-share --host 0.0.0.0 --port {port}")
    # Generous timeouts: on a loaded 2-core machine the kernel alone can take a minute to start.
    client = nbclient.NotebookClient(nb, timeout=900, startup_timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    # Its own thread and event loop: earlier tests in the session (Playwright's sync API) may
    # leave an event loop running in this thread, where asyncio.run() refuses to start.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        found = pool.submit(asyncio.run, _run_notebook(client, nb, port)).result()

    outputs = {i: text_of(cell) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"}
    check, gpu, train, grid, launch = (outputs[i] for i in sorted(outputs))
    assert re.search(r"^torch\s+\S+\s+(yes|no)", check, re.M) and re.search(r"^device\s+cpu", check, re.M), check
    assert "No GPU" in gpu, gpu
    assert "Memory plan" in gpu and "T4 16 GB" in gpu, gpu  # the SD 1.5 LoRA plan for this device
    assert (tmp_path / "runs" / "colab-emoji" / "model" / "model_index.json").is_file(), train
    assert "sample grids; the last:" in grid
    assert any(out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
               for out in nb.cells[sorted(outputs)[3]].outputs)
    assert "This studio is reachable from other machines, so it needs a login." in launch
    assert found["good"]["status"] == 200 and '"success":true' in found["good"]["body"].replace(" ", "")
    assert found["bad"]["status"] == 400, found["bad"]
    assert found["stopped"], "the studio still answers after the interrupt"
