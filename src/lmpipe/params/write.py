"""``write_params``: a changed copy of a params file (for tests and benchmarks), keys checked, comments
not kept."""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

from lmpipe.errors import ParamsError
from lmpipe.params.load import _read


def write_params(
    dest: str | Path,
    overrides: Mapping[str, Any],
    source: str | Path | None = None,
    *,
    allow_new: bool = False,
    replace: Collection[str] = (),
    remove: Collection[str] = (),
) -> Path:
    """Write ``source`` (default: ``dest`` itself) with ``overrides`` laid over it to ``dest``; return ``dest``.

    ``overrides`` is nested like the file, ``{"train": {"epochs": 1, "lora": {"rank": 4}}}``, and its
    keys may be dotted paths spelled as the loader's errors spell them: ``{"train.lora.rank": 4}``,
    ``{"train.phases[1].epochs": 0}``. A mapping is merged key by key into the mapping it overrides;
    any other value (a list included) replaces what is there, and so does a mapping whose dotted path
    is in ``replace`` (``replace={"search.space"}`` swaps the whole search space). ``remove`` lists
    dotted paths to delete once the overrides are in.

    Every key must already be in ``source``: one that is not (a typo) raises ``ParamsError`` naming its
    dotted path, unless ``allow_new``. Values are not checked, so that a bad value can be written on
    purpose: ``load_params`` checks them. Key order is kept (new keys go last), comments are not. The
    write is atomic; ``source`` is left as it is unless it is ``dest``.
    """
    from lmpipe.io import atomic_path  # imported here: lmpipe.io brings pandas, the loader needs none

    dest = Path(dest)
    source = dest if source is None else Path(source)
    if dest.is_dir():
        raise ValueError(f"write_params: {dest} is a folder; pass the file, e.g. {dest / 'params.yaml'}")
    data = _read(source)
    replace, replaced = set(replace), set()
    _merge(data, overrides, "", str(source), allow_new, replace, replaced)
    if replace - replaced:
        raise ValueError(f"write_params: nothing in overrides sets {', '.join(sorted(replace - replaced))}")
    for dotted in remove:
        *parents, last = _steps(dotted)
        parent, where = _walk(data, parents, "", str(source), create=False)
        _child(parent, last, _join(where, last), str(source), create=False)  # must be there
        del parent[last]
    with atomic_path(dest) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
        shutil.copymode(dest if dest.exists() else source, tmp)  # not the temporary file's 0600
    return dest


_KEY_PATH = re.compile(r"[^.\[\]]+(\[\d+\])*(\.[^.\[\]]+(\[\d+\])*)*")


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _steps(dotted: str) -> list[str | int]:
    """``"train.phases[1].epochs"`` -> ``["train", "phases", 1, "epochs"]``."""
    if not _KEY_PATH.fullmatch(dotted):
        raise ValueError(f"write_params: {dotted!r} is not a key path such as 'train.phases[1].epochs'")
    return [int(index) if index else name for name, index in _STEP.findall(dotted)]


def _join(prefix: str, step: str | int) -> str:
    if isinstance(step, int):
        return f"{prefix}[{step}]"
    return f"{prefix}.{step}" if prefix else step


def _child(node: Any, step: str | int, where: str, source: str, *, create: bool) -> Any:
    """``node[step]``, or a ``ParamsError`` naming ``where`` (the dotted path of the step) if there is none;
    with ``create``, a missing key of a mapping becomes an empty mapping."""
    if isinstance(step, int):
        if not isinstance(node, list) or step >= len(node):
            size = f"a list of {len(node)} items" if isinstance(node, list) else "not a list"
            raise ParamsError(where, f"not in the source file (its parent is {size})", source)
        return node[step]
    if not isinstance(node, dict):
        raise ParamsError(where, "not in the source file (its parent is not a mapping)", source)
    if step not in node:
        if not create:
            known = ", ".join(map(str, node)) or "none"
            raise ParamsError(
                where, f"not in the source file (known here: {known}); allow_new=True adds keys", source
            )
        node[step] = {}
    return node[step]


def _walk(node: Any, steps: list[str | int], prefix: str, source: str, *, create: bool) -> tuple[Any, str]:
    """The node at ``steps`` below ``node`` (whose dotted path is ``prefix``), and its dotted path."""
    for step in steps:
        prefix = _join(prefix, step)
        node = _child(node, step, prefix, source, create=create)
    return node, prefix


def _merge(
    node: dict,
    overrides: Mapping[str, Any],
    prefix: str,
    source: str,
    allow_new: bool,
    replace: set[str],
    replaced: set[str],
) -> None:
    """Lay ``overrides`` over ``node`` (whose dotted path is ``prefix``) in place; see ``write_params``."""
    for key, value in overrides.items():
        *parents, last = _steps(str(key))
        parent, at = _walk(node, parents, prefix, source, create=allow_new)
        where = _join(at, last)
        if allow_new and isinstance(last, str) and isinstance(parent, dict) and last not in parent:
            parent[last] = {} if isinstance(value, Mapping) else None
        current = _child(parent, last, where, source, create=False)
        if where in replace:
            replaced.add(where)
        elif isinstance(value, Mapping) and isinstance(current, dict):
            _merge(current, value, where, source, allow_new, replace, replaced)
            continue
        parent[last] = _plain(value)


def _plain(value: Any) -> Any:
    """A deep copy made of dicts and lists, so that YAML writes neither tags nor anchors."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return copy.deepcopy(value)
