"""YAML values into frozen dataclasses, strictly: unknown keys refused, each value checked against its
field's type, every error naming the file and the key (`models.tiny.n_ctx`)."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

from glimp_cli.errors import ConfigError


def build_dataclass(cls, raw: dict, path: Path, where: str, nested_where: dict | None = None):
    """Build dataclass `cls` from `raw`, refusing unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"{path}: {where}: unknown key {sorted(unknown)[0]!r}")
    values = {}
    for key, value in raw.items():
        key_where = (nested_where or {}).get(key, f"{where}.{key}")
        values[key] = _convert(value, hints[key], path, key_where)
    missing = [
        name for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{path}: {where}: missing key {missing[0]!r}")
    return cls(**values)


def field_value(cls, key: str, value: Any, source: str) -> Any:
    """`value` for field `key` of dataclass `cls`, checked as in models.yaml; an error names `source` and `key`."""
    return _convert(value, typing.get_type_hints(cls)[key], source, key)


def _convert(value: Any, hint: Any, path: Path | str, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, path, where)
    if origin is tuple and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {where}: expected a list of mappings")
        return tuple(build_dataclass(args[0], expect_mapping(item, path, f"{where}[{i}]"), path,
                                     f"{where}[{i}]") for i, item in enumerate(value))
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{path}: {where}: expected a list of strings")
        return tuple(expect_type(item, str, path, where) for item in items)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, expect_mapping(value, path, where), path, where)
    return expect_type(value, hint, path, where)


def expect_type(value: Any, kind: type, path: Path, where: str) -> Any:
    """`value` as a `kind` (an int or an inf spelled as text is a float), or a ConfigError naming `where`."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):  # YAML's .nan: no setting of glimp means anything at NaN
            raise ConfigError(f"{path}: {where}: expected a number, got NaN")
        return float(value)
    if kind is float and isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "-inf", ".inf", "-.inf"):
        return float(value.strip().lower().replace(".", ""))
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    raise ConfigError(f"{path}: {where}: expected {names.get(kind, kind.__name__)}, got {value!r}")


def expect_mapping(value: Any, path: Path, key: str) -> dict:
    """`value` if it is a mapping (an absent one is empty), or a ConfigError naming `key`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {key}: expected a mapping, got {type(value).__name__}")
    return value
