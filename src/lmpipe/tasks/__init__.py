"""The tasks: what a row is, how it is scored, and everything else that differs between them.

Each task name (and alias) is written here once. ``get(name)`` returns the task object every stage
calls (``lmpipe.tasks.base.Task``); the module of a task is imported only when it is asked for, so that
loading params stays fast. Files on disk record their task by this name (a report's ``task``, a model
config's ``lmpipe_task``, ``classifier.json``'s ``task``), never by a set of columns to sniff.

Adding a task: docs/development.md, "Adding a task".
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmpipe.tasks.base import Task

CLASSIFICATION = "classification"  # a label per text
TOKEN_CLASSIFICATION = "token_classification"  # a BIO tag per word (NER)
GENERATION = "generation"  # a prompt in, a text out (a causal LM)

# name -> the module (lmpipe.tasks.<name>) whose ``TASK`` implements it; params.yaml's base.task
SUPPORTED: dict[str, str] = {
    CLASSIFICATION: f"lmpipe.tasks.{CLASSIFICATION}",
    TOKEN_CLASSIFICATION: f"lmpipe.tasks.{TOKEN_CLASSIFICATION}",
    GENERATION: f"lmpipe.tasks.{GENERATION}",
}
# other names people use for a task; params.yaml takes the canonical name (dvc.yaml's deps are
# templated on it: src/lmpipe/tasks/${base.task}.py), and its error names the one to write
ALIASES: dict[str, str] = {
    "text_classification": CLASSIFICATION,
    "sequence_classification": CLASSIFICATION,
    "ner": TOKEN_CLASSIFICATION,
    "tagging": TOKEN_CLASSIFICATION,
    "text_generation": GENERATION,
    "causal_lm": GENERATION,
}


def canonical(name: str) -> str:
    """The registry name of ``name`` (itself or an alias's target); KeyError for an unknown task."""
    name = ALIASES.get(name, name)
    if name not in SUPPORTED:
        raise KeyError(name)
    return name


# the task parts (modules of a task's package) the running stage declared (``for_stage``); None = any
_STAGE_PARTS: tuple[str, tuple[str, ...]] | None = None


def get(name: str) -> Task:
    """The task object for ``name`` (a registry name or an alias)."""
    return importlib.import_module(SUPPORTED[canonical(name)]).TASK


def for_stage(name: str, stage: str, parts: tuple[str, ...]) -> Task:
    """The task object for a stage that declared the task ``parts`` it uses (its ``TASK_PARTS``, which
    dvc.yaml lists as deps: ``src/lmpipe/tasks/${base.task}/<part>.py``). A part it did not declare then
    fails when loaded, so that a stage cannot use task code its deps do not name."""
    global _STAGE_PARTS
    _STAGE_PARTS = (stage, tuple(parts))
    return get(name)


def end_stage() -> None:
    """Lift ``for_stage``'s check when the stage is over (``runner.run_stage``): the process may go on."""
    global _STAGE_PARTS
    _STAGE_PARTS = None


def stage_parts() -> tuple[str, tuple[str, ...]] | None:
    """The running stage and the task parts it declared, or None outside a stage."""
    return _STAGE_PARTS
