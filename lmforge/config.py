"""Typed configs: dataclasses are the schema, YAML gives values, `a.b=c` overrides them, all validated at load."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from lmforge.errors import LmforgeError

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from an optional YAML file plus `key.sub=value` overrides, then validate it."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"config file {path} does not exist; pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise LmforgeError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise LmforgeError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        values = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise LmforgeError(f"override {item!r} is not of the form key.sub=value")
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LmforgeError(f"override {item!r}: {part} is a value, not a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return from_dict(cls, values)


def from_dict(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Recursively build a dataclass from plain values, naming the key of the first thing that is wrong."""
    if not isinstance(values, dict):
        raise LmforgeError(f"{where or 'config'} must be a mapping, got {values!r}")
    expand = getattr(cls, "expand", None)
    if expand is not None:
        values = expand(values, where)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{where}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise LmforgeError(f"unknown config key {name}{hint}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = _merge(_factory_changes(fields[key], hints[key]), value)
        kwargs[key] = _coerce(hints[key], value, name)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def _factory_changes(field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """What a field's default factory sets differently from its class's own defaults (SpeedrunConfig's run.name), so
    that overriding one key of the section keeps the rest of the factory's values."""
    if field.default_factory is dataclasses.MISSING:
        return {}
    made, plain = to_dict(field.default_factory()), to_dict(hint())
    return {k: v for k, v in made.items() if v != plain[k]}


def _merge(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in values.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, f"{name}.")
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise LmforgeError(f"{name}={value!r} is not a valid choice; choose one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, name)
            except LmforgeError:
                continue
        raise LmforgeError(f"{name}={value!r} has the wrong type; expected {_type_name(hint)}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            value = [value]
        (item,) = get_args(hint)[:1] or (Any,)
        items = [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise LmforgeError(f"{name}={value!r} has the wrong type; expected {_type_name(hint)}")
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-ready values of a config dataclass."""
    return dataclasses.asdict(cfg)


def check(condition: bool, message: str) -> None:
    """Raise the user-facing config error `message` unless `condition` holds (for validate() methods)."""
    if not condition:
        raise LmforgeError(message)
