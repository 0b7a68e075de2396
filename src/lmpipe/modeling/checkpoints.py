"""Resumable training: where checkpoints live and which one to resume from.

A train run keeps its Trainer checkpoints in ``<root>/<key>/``, outside every DVC output (DVC deletes
a stage's outputs before it runs the stage again, so a checkpoint inside one would not survive). The
key hashes everything that shapes the training: the base and train params and the bytes of the input
files. A re-run with the same inputs resumes from the newest complete checkpoint of its own key, and
never from one written under other params or data. The folder is deleted once the run has succeeded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lmpipe import distributed, io

RUN_FILE = "run.json"  # the MLflow run that wrote these checkpoints
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_key(params: Mapping[str, Any], files: Iterable[str | Path]) -> str:
    """A short hash of the params that shape training and of the input files' contents."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:16]


def is_complete(folder: Path) -> bool:
    """The Trainer writes ``trainer_state.json`` last: a checkpoint without a readable one was cut off."""
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir``; incomplete ones (a kill during a save) are removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    for _, path in found:
        if is_complete(path):
            return path
        shutil.rmtree(path, ignore_errors=True)
    return None


def step_of(checkpoint: Path | None) -> int:
    return int(_CHECKPOINT.match(checkpoint.name).group(1)) if checkpoint is not None else 0


def read_run(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    try:
        return io.read_json(path)
    except (OSError, ValueError):
        return {}


@distributed.main_only
def write_run(run_dir: str | Path, info: Mapping[str, Any]) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    io.write_json(Path(run_dir) / RUN_FILE, dict(info))


def others(root: str | Path, key: str) -> list[Path]:
    """Checkpoint folders of other params or data (kept: switching back resumes them)."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != key) if root.is_dir() else []


def remove(run_dir: str | Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
