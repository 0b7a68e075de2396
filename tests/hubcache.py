"""A Hugging Face hub cache built on disk, as ``huggingface_hub`` lays it out after a download, from a
local model folder: ``models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/..,
refs/<branch>}``. Tests point ``HF_HOME`` (a subprocess) or ``huggingface_hub.constants.HF_HUB_CACHE`` (this
process) at it and run the real library on it, offline."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # what a hub commit hash looks like: 40 hex digits
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def add_snapshot(
    hub: Path, repo_id: str, files: Path, commit: str, refs: tuple[str, ...] = ("main",)
) -> Path:
    """Add ``files`` (a model folder) as ``repo_id`` at ``commit`` to the cache in ``hub``, with ``refs``
    (branch or tag names) pointing at it. Blobs are hard links where the file system allows. Returns the
    snapshot folder."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            try:
                os.link(path, blob)
            except OSError:
                shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot
