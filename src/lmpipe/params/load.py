"""The one loader of ``params.yaml``: every key present (the file is the single place where defaults are
written), unknown keys rejected by name, each value coerced to its declared type, then checked."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml

from lmpipe.errors import ParamsError
from lmpipe.params.schema import Params


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read, type-check and range-check ``params.yaml``.

    ``overrides`` maps section names to dicts laid over that section before checking (the search
    stage's best params are applied this way), so that what is checked is what gets used.
    """
    path = Path(path)
    raw = _read(path)
    for section, values in (overrides or {}).items():
        raw[section] = {**(raw.get(section) or {}), **values}
    return _build(Params, raw, "", str(path))


def search_overrides(search_file: str | Path) -> dict[str, Any]:
    """What the search stage hands train: its best values, laid over the ``train`` section by
    ``load_params(..., overrides=...)``, so that what is checked and logged is what is used. Read here,
    with the loader, so that the train stage checks its params before it imports torch."""
    return {"train": json.loads(Path(search_file).read_text(encoding="utf-8")).get("params", {})}


def _read(path: Path) -> dict[str, Any]:
    """The parsed params file; a one-line ``ParamsError`` if it is missing, not YAML or not a mapping."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError("(file)", "not found", source=str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise ParamsError(
            where, f"not valid YAML: {getattr(err, 'problem', err)}", source=str(path)
        ) from None
    if not isinstance(raw, dict):
        raise ParamsError("(file)", "must be a mapping of sections", source=str(path))
    return raw


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "(top level)"
    if not isinstance(data, dict):
        raise ParamsError(where, f"must be a mapping, got {type(data).__name__}", source)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    optional = {f.name for f in fields(cls) if f.default is not dataclasses.MISSING}
    for key in data:
        if key not in names:
            raise ParamsError(f"{prefix}{key}", f"unknown key (known: {', '.join(names)})", source)
    values = {}
    for name in names:
        key = f"{prefix}{name}"
        if name not in data:
            if name in optional:
                continue
            raise ParamsError(key, "missing", source)
        values[name] = _coerce(hints[name], data[name], key, source)
    obj = cls(**values)
    for name, message in obj.problems():
        raise ParamsError(f"{prefix}{name}", message, source)
    return obj


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(key, f"must be one of {', '.join(map(str, choices))}; got {value!r}", source)
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.", source)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(key, f"must be a mapping, got {value!r}", source)
        inner = typing.get_args(tp)[1]
        return {str(k): _coerce(inner, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ParamsError(key, f"must be a list, got {value!r}", source)
        inner = typing.get_args(tp)
        if not inner:
            return list(value)
        if dataclasses.is_dataclass(inner[0]):  # e.g. train.phases[1].epochs
            return [_build(inner[0], v, f"{key}[{i}].", source) for i, v in enumerate(value)]
        return [_coerce(inner[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(key, f"must be true or false, got {value!r}", source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(key, f"must be an integer, got {value!r}", source)
        return value
    if tp is float:
        # YAML reads 1e-4 (no dot) as a string: accept numeric strings, reject everything else.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ParamsError(key, f"must be a number, got {value!r}", source) from None
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ParamsError(key, f"must be a number, got {value!r}", source)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(key, f"must be a string, got {value!r}", source)
        return value
    if tp is Any:  # checked by the section's own problems()
        return value
    raise TypeError(f"params loader: unsupported type {tp} for {key}")  # a bug here, not in params.yaml
