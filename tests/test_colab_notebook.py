"""docs/colab.ipynb: a valid notebook that installs without touching Colab's torch."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "colab.ipynb"
COLAB = "https://colab.research.google.com/github/"


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def tagged(cell, tag: str) -> bool:
    return tag in cell.metadata.get("tags", [])


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
