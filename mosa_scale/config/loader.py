"""Dataclass configs from YAML plus dotted ``key=value`` overrides, every problem reported at once."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from mosa_scale.config.errors import ConfigError, Problems


def parse_overrides(items: Sequence[str], problems: Problems) -> dict[str, Any]:
    """``["train.steps=10", "adapter.share=up"]`` -> a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.add(item, "overrides are written key=value, e.g. train.steps=100")
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.add(key, "conflicts with another override")
                break
        else:
            node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return out


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits annotation ``tp``; returns (ok, value coerced to tp)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        elem = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if elem is None and len(args) != len(value):
            return False, value
        items = [_type_ok(v, elem if elem is not None else a) for v, a in zip(value, args if elem is None else value)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin in (dict, Mapping) or tp in (dict, Mapping) or origin is typing.get_origin(Mapping[str, Any]):
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else value
    if origin is list:
        return isinstance(value, (list, tuple)), list(value) if isinstance(value, (list, tuple)) else value
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def build_dataclass(cls: type, data: Mapping[str, Any] | None, prefix: str, problems: Problems) -> Any:
    """Builds ``cls`` from ``data``, recording unknown keys, wrong types and the class's own
    validation errors in ``problems`` (returns None when anything was wrong)."""
    data = dict(data or {})
    select = getattr(cls, "select_class", None)  # a section whose fields depend on one of its values
    if select is not None:
        cls, data = select(data, prefix, problems)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            problems.unknown(name, fields)
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                problems.add(name, f"expected a mapping of {tp.__name__} fields, got {value!r}")
                continue
            kwargs[key] = build_dataclass(tp, value, name, problems)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            problems.add(name, f"got {value!r} ({type(value).__name__}); expected {_describe(tp)}")
            continue
        kwargs[key] = coerced
    # fields with problems fall back to their defaults so that cross-field checks still run;
    # the problems recorded above make the load fail anyway
    for key in fields:  # nested sections left out of the YAML take their defaults
        if key not in kwargs and dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build_dataclass(hints[key], {}, f"{prefix}.{key}" if prefix else key, problems)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        problems.items.extend(e.problems)
        # the section's own checks failed: build it again with those fields at their defaults, so
        # that the cross-section checks still run (the problems recorded make the load fail)
        bad = {_field_of(item, prefix) for item in e.problems}
        try:
            return cls(**{k: v for k, v in kwargs.items() if k not in bad})
        except (ValueError, TypeError):
            return None
    except (ValueError, TypeError) as e:
        problems.add(prefix or cls.__name__, str(e))
    return None


def _field_of(problem: str, prefix: str) -> str:
    """The field a ``prefix.field[.more]: message`` problem is about."""
    key = problem.split(": ", 1)[0]
    key = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key
    return key.split(".", 1)[0]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Raises:
    ConfigError: when the file is missing or is not a YAML mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"--config: file {str(path)!r} does not exist"])
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError([f"--config: {str(path)!r} must hold a mapping at the top level"])
    return data


def to_plain(obj: Any) -> Any:
    """A dataclass config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
