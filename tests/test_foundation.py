"""Config base, events, run folders, errors and the dataset hand-off."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from studio.config.base import ConfigBase, option, require
from studio.config.data import DataConfig
from studio.context import DatasetChoice, StudioContext
from studio.errors import ConfigError, DataError, describe_exception
from studio.events import Event
from studio.runs import RunDir, check_run_name, list_runs
from studio.settings import LaunchSettings


@dataclass
class _Inner(ConfigBase):
    size: tuple = option((8, 16), "channels")


@dataclass
class _Outer(ConfigBase):
    name: str = option("x", "a name")
    inner: _Inner = option(None, "nested")
    tags: list = option(["a"], "tags")

    def __post_init__(self):
        require(self.name != "", "Name must not be empty.")


def test_config_json_round_trip_with_nested_and_tuples(tmp_path):
    cfg = _Outer(name="y", inner=_Inner(size=(4, 8)))
    path = tmp_path / "c.json"
    cfg.to_json(path)
    back = _Outer.from_json(path)
    assert back == cfg and isinstance(back.inner, _Inner) and back.inner.size == (4, 8)
    assert _Outer().tags is not _Outer().tags  # mutable defaults are per instance
    assert _Outer.help_for("name") == "a name"


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="Unknown setting.*colour"):
        _Outer.from_dict({"colour": "red"})
    with pytest.raises(ConfigError, match="Name must not be empty"):
        _Outer.from_dict({"name": ""})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        _Outer.from_json(bad)
    with pytest.raises(ConfigError, match="not found"):
        _Outer.from_json(tmp_path / "missing.json")


def test_data_config_validation():
    assert DataConfig().label == "emoji (bundled)"
    with pytest.raises(ConfigError, match="Dataset source"):
        DataConfig(source="ftp")
    with pytest.raises(ConfigError, match="path is empty"):
        DataConfig(source="folder")
    with pytest.raises(ConfigError, match="dataset id"):
        DataConfig(source="hub")
    assert DataConfig(source="hub", hub_id="a/b", split="test").label == "hub a/b [test]"


def test_run_dir_layout_and_events(tmp_path):
    run = RunDir.create(tmp_path, "train")
    assert run.samples_dir.is_dir() and run.checkpoints_dir.is_dir() and run.logs_dir.is_dir()
    run.write_config("train", {"lr": 1e-4})
    run.append_event(Event("step", step=1, loss=0.5))
    with open(run.events_path, "a") as fh:
        fh.write('{"kind": "step", "ste')  # a torn line from a crash
    events = run.read_events()
    assert [e.kind for e in events] == ["step"] and events[0].loss == 0.5
    (run.model_dir).mkdir()
    (run.model_dir / "model_index.json").write_text("{}")
    [info] = list_runs(tmp_path)
    assert info.task == "train" and info.has_model and not info.has_lora
    second = RunDir.create(tmp_path, "train")
    assert second.root != run.root
    with pytest.raises(ConfigError, match="already exists"):
        RunDir.create(tmp_path, "train", name=run.name)


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 101])
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(ConfigError):
        check_run_name(name)


def test_event_round_trip_and_unknown_kind():
    e = Event("checkpoint", step=3, path="/x")
    assert Event.from_dict(json.loads(json.dumps(e.to_dict()))) == e
    with pytest.raises(ValueError):
        Event("exploded")


def test_describe_exception_never_shows_a_traceback():
    assert describe_exception(DataError("No images.", "Pick another folder.")) == "No images. Pick another folder."
    text = describe_exception(ZeroDivisionError("division by zero"))
    assert "ZeroDivisionError" in text and "Traceback" not in text


def test_dataset_hand_off_is_app_state(tmp_path):
    ctx = StudioContext(LaunchSettings(workspace=tmp_path))
    assert ctx.dataset.get().config.source == "emoji"
    choice = DatasetChoice(DataConfig(source="folder", path=str(tmp_path)), "folder x", 3, False)
    ctx.dataset.set(choice)
    assert ctx.dataset.get() is choice and ctx.dataset.version == 1
    other = StudioContext(LaunchSettings(workspace=tmp_path))
    assert other.dataset.get().config.source == "emoji"  # not a module global
