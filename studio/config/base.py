"""Base class for config dataclasses: validation helpers and the JSON round trip.

A config is built from named values (widget values, CLI JSON, test kwargs), checks
itself in ``__post_init__`` and raises ``ConfigError`` with a message that names the
field in the words the UI uses. Field help lives in ``field(metadata={"help": ...})``
so the UI, the CLI and the docs read the same text.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from studio.errors import ConfigError

C = TypeVar("C", bound="ConfigBase")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (shown as the widget's info and in --help).

    Args:
        default: Default value (lists and dicts are copied per instance).
        help: One sentence for the person setting it.
        **kwargs: Passed through to ``dataclasses.field``.
    """
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def require_choice(value: Any, choices: typing.Iterable[Any], label: str) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``, listing them."""
    choices = list(choices)
    if value not in choices:
        listed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{label} must be one of: {listed} (got {value!r}).")


@dataclasses.dataclass
class ConfigBase:
    """JSON round trip and help text for every config dataclass."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (nested configs become dicts, tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise; write to ``path`` too when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a dict, rejecting unknown keys by name and nesting sub-configs.

        Raises:
            ConfigError: on an unknown key or a value that fails validation.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}.")
        known = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"Unknown setting(s) for {cls.__name__}: {', '.join(unknown)}. "
                f"Known: {', '.join(sorted(known))}."
            )
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for name, value in data.items():
            hint = hints.get(name)
            sub = _config_class(hint)
            if sub is not None and isinstance(value, dict):
                value = sub.from_dict(value)
            elif _is_tuple_hint(hint) and isinstance(value, list):
                value = tuple(value)
            values[name] = value
        try:
            return cls(**values)
        except TypeError as exc:  # wrong value types that __post_init__ did not catch
            raise ConfigError(f"Invalid {cls.__name__}: {exc}") from None

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        """Load from a JSON file with a clear error for a missing or malformed file."""
        return cls.from_dict(read_json_object(path))

    @classmethod
    def help_for(cls, name: str) -> str:
        """The help text of field ``name`` ("" when it has none)."""
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.metadata.get("help", "")
        raise KeyError(name)

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """Read a JSON file of settings: a missing file, bad JSON or a non-object is a ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}).", "Save it as UTF-8 JSON.") from None
    except (OSError, RecursionError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON ({type(exc).__name__}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of settings.")
    return data


def _config_class(hint: Any) -> type[ConfigBase] | None:
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        return hint
    for arg in typing.get_args(hint):
        if isinstance(arg, type) and issubclass(arg, ConfigBase):
            return arg
    return None


def _is_tuple_hint(hint: Any) -> bool:
    return hint is tuple or typing.get_origin(hint) is tuple
