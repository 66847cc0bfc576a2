"""Generic machinery for typed dataclass configs: dotted overrides, dict round trips, dumping.

Overrides are type-checked against the dataclass annotations, so a typo or a wrong type is an
error that names the key and the valid choices instead of silently turning a feature off.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from configs.errors import ConfigError
from configs.ugs import apply_ablation_row


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (a string from the command line, or a JSON value) to type `tp`."""
    optional, inner = _is_optional(tp)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, inner, key)
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=key + ".")
        raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
    if origin is typing.Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
    if origin in (list, tuple):
        args = get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = [v for v in text.strip("[]()").split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value), 0)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (possibly partial) nested dict; unknown keys are errors."""
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                          f"valid keys in '{prefix.rstrip('.') or 'config'}': {names}")
    default = cls()
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], prefix + name)
        else:
            kwargs[name] = getattr(default, name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: Any, overrides: list[str] | None) -> Any:
    """Return a copy of `cfg` with dotted `key=value` overrides applied (type-checked)."""
    cfg = json_copy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node = cfg
        for depth, part in enumerate(parts):
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"{key}: '{'.'.join(parts[:depth])}' is a value, not a section")
            names = [f.name for f in dataclasses.fields(node)]
            if part not in names:
                where = ".".join(parts[:depth]) or "config"
                raise ConfigError(f"unknown config key '{key}': '{part}' is not in {where}; "
                                  f"valid choices: {names}")
            if depth == len(parts) - 1:
                tp = _field_types(type(node))[part]
                value = coerce(raw, tp, key)
                if key == "ugs.ablation":  # a row sets several fields: configs/ugs.py
                    apply_ablation_row(node, value)
                else:
                    setattr(node, part, value)
            else:
                node = getattr(node, part)
    validate(cfg)
    return cfg


def json_copy(cfg: Any) -> Any:
    return from_dict(type(cfg), json.loads(json.dumps(to_dict(cfg))))


def validate(cfg: Any) -> None:
    """Run `__post_init__`-style checks again after overrides (sections may define `check()`)."""
    if dataclasses.is_dataclass(cfg):
        check = getattr(cfg, "check", None)
        if callable(check):
            check()
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value):
                validate(value)


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as JSON (readable by `load_config(path)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
