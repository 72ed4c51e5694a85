"""``benchmarks/quality.py`` runs end to end on a tiny pipeline (so the script cannot rot)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tiny_pipelines import make_tiny_ddpm

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_mode_prints_the_figure_and_both_levels_as_json(bench, tmp_path, capsys):
    pipe = make_tiny_ddpm(tmp_path / "run" / "model")       # a run folder holding model/ is accepted too
    result = bench.main(["--model", str(tmp_path / "run"), "--samples", "4", "--inference-steps", "2",
                         "--max-rows", "24", "--workspace", str(tmp_path / "ws")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == result
    assert set(result) == {"minutes", "steps", "quality", "noise_level", "data_level"}
    assert result["minutes"] is None and result["steps"] is None
    assert 0 < result["data_level"] < result["noise_level"]
    assert result["quality"] > 0
    assert any("lower is better" in line for line in lines)
    assert (tmp_path / "ws" / "quality-samples.png").is_file()
    assert str(pipe) in "\n".join(lines)
    with pytest.raises(SystemExit):
        bench.model_folder(tmp_path)
