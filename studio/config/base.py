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
from typing import Any, Callable, TypeVar

from studio.errors import ConfigError

C = TypeVar("C", bound="ConfigBase")

#: The largest seed any task takes (numpy's and the Generate tab's 32-bit limit).
MAX_SEED = 2**32 - 1


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

        Every value is also checked against its field's type ("max_train_steps must be a
        whole number (got 'abc')"), so a JSON file or an API call with a wrong type gets a
        line naming the setting, never a Python error about the comparison it broke.

        Raises:
            ConfigError: on an unknown key, a value of the wrong type or one that fails validation.
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
            elif _is_tuple_hint(hint) and isinstance(value, str):  # "8,16" would become a tuple of characters
                raise type_problem(cls, {name: value}, hints) or ConfigError(f"{name} must be a list.")
            values[name] = value
        try:
            config = cls(**values)
        except ConfigError:  # the class's own words for the problem
            raise
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # a wrong type broke a check
            raise type_problem(cls, values, hints) or ConfigError(f"Invalid {cls.__name__}: {exc}") from None
        problem = type_problem(cls, values, hints)  # e.g. 1.5 steps or true as a count pass the range checks
        if problem is not None:
            raise problem
        return config

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


def _expected(hint: Any) -> tuple[str, Callable[[Any], bool]] | None:
    """(words, test) for a field type hint, or None when it is not a plain JSON type."""
    import math

    args = typing.get_args(hint)
    if type(None) in args:  # "X | None": None is allowed, else X
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            return None
        base = _expected(inner[0])
        return None if base is None else (base[0] + " or empty", lambda v, t=base[1]: v is None or t(v))
    if hint is bool:
        return "true or false", lambda v: isinstance(v, bool)
    if hint is int:
        return "a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return "a finite number", lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v))
    if hint is str:
        return "text", lambda v: isinstance(v, str)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _expected(args[0])
        if item is None:
            return None
        return f"a list of {item[0].removeprefix('a ')}s", lambda v, t=item[1]: (
            isinstance(v, (list, tuple)) and all(t(x) for x in v))
    return None


def type_problem(cls: type, values: dict[str, Any], hints: dict[str, Any] | None = None) -> ConfigError | None:
    """The first value in ``values`` that does not fit its field's type, as a ``ConfigError`` (else None)."""
    hints = hints if hints is not None else typing.get_type_hints(cls)
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
    for name, value in values.items():
        expected = _expected(hints.get(name))
        if expected is not None and not expected[1](value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            return ConfigError(f"{name} must be {expected[0]} (got {shown}).", helps.get(name, ""))
    return None


def _config_class(hint: Any) -> type[ConfigBase] | None:
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        return hint
    for arg in typing.get_args(hint):
        if isinstance(arg, type) and issubclass(arg, ConfigBase):
            return arg
    return None


def _is_tuple_hint(hint: Any) -> bool:
    return hint is tuple or typing.get_origin(hint) is tuple
