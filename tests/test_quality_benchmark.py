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
                         "--category", "flags", "--max-rows", "24", "--workspace", str(tmp_path / "ws")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == result
    assert set(result) == {"minutes", "steps", "quality", "noise_level", "data_level"}
    assert result["minutes"] is None and result["steps"] is None
    assert 0 < result["data_level"] < result["noise_level"]
    assert result["quality"] > 0
    assert any("lower is better" in line for line in lines)
    assert (tmp_path / "ws" / "quality-samples.png").is_file()
    assert str(pipe) in "\n".join(lines)
    assert "against emoji (bundled, flags) (first 24)" in "\n".join(lines)
    with pytest.raises(SystemExit):
        bench.model_folder(tmp_path)


def test_training_mode_trains_the_run_and_reads_its_quality_curve(bench, tmp_path):
    """The training path with a tiny model that finishes well inside its budget."""
    from studio.config.data import DataConfig

    tiny = dict(data=DataConfig(source="emoji", max_rows=16), resolution=8, train_batch_size=4, max_train_steps=2,
                learning_rate=1e-3, lr_warmup_steps=0, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                num_samples=4, sample_inference_steps=2, sample_every=1, save_every=0, device="cpu")
    run, steps, elapsed, curve, data = bench.train_for(5.0, tmp_path, **tiny)
    assert steps == 2 and 0 < elapsed < 300
    assert [step for step, _ in curve] == [0, 1, 2] and all(value > 0 for _, value in curve)
    assert data == DataConfig(source="emoji", max_rows=16)  # the reference is the run's own dataset
    result = bench.score_pipeline(run, samples=4, inference_steps=2, cache_root=tmp_path / ".cache", data=data)
    assert result["resolution"] == 8 and result["quality"] > 0


def test_set_turns_field_value_pairs_into_train_config_overrides(bench):
    overrides = bench.parse_overrides(["learning_rate=2e-3", "block_out_channels=[64, 64]",
                                       "prediction_type=epsilon", "use_ema=false"])
    assert overrides == {"learning_rate": 2e-3, "block_out_channels": (64, 64), "prediction_type": "epsilon",
                         "use_ema": False}
    from studio.config.data import DataConfig

    assert bench.parse_overrides(['data={"source": "emoji", "max_rows": 160}']) == {
        "data": DataConfig(source="emoji", max_rows=160)}
    for bad in (["no_such_field=1"], ["learning_rate"]):
        with pytest.raises(SystemExit):
            bench.parse_overrides(bad)
