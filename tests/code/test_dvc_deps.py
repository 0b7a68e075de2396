"""dvc.yaml's deps are honest: every stage depends on each lmpipe module its script imports, directly or
through other lmpipe modules. A missing one means editing that module would not re-run the stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "lmpipe"


# lmpipe.cli is both the stages' runner (module level) and the `lmpipe` command, whose subcommands
# (predict, compare, queue-check) import their modules lazily; stages never run those
TOP_LEVEL_ONLY = {"cli"}


def lmpipe_imports(path: Path) -> set[str]:
    """Names of the lmpipe modules ``path`` imports: at any depth of its code (lazy imports included),
    or only at module level for ``TOP_LEVEL_ONLY`` modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if path.stem in TOP_LEVEL_ONLY and path.parent == PACKAGE else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lmpipe":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("lmpipe."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lmpipe."))
    return {name for name in found if (PACKAGE / f"{name}.py").is_file()}


def closure(script: Path) -> set[str]:
    seen: set[str] = set()
    todo = lmpipe_imports(script)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo |= lmpipe_imports(PACKAGE / f"{name}.py")
    return seen


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_module_it_imports(stage):
    deps = set(STAGES[stage]["deps"])
    script = f"stages/{stage}.py"
    assert script in deps
    missing = sorted(f"src/lmpipe/{m}.py" for m in closure(ROOT / script) if f"src/lmpipe/{m}.py" not in deps)
    assert not missing, f"{stage}: dvc.yaml deps lack {missing}"


def test_the_check_sees_lazy_imports():
    # the stages import lmpipe inside main(): the walk must find those, or the test above proves nothing
    assert {"evaluation", "compare", "training", "tracking"} <= closure(ROOT / "stages/evaluate.py")


def _declared(stage: dict) -> set[str]:
    """Every path a stage declares: deps, params files other than params.yaml, outs, metrics, plots."""
    paths = set(stage.get("deps", []))
    for section in ("params", "outs", "metrics", "plots"):
        for entry in stage.get(section, []):
            if isinstance(entry, dict):  # {path: options}, or {params file: keys}
                paths.update(entry)
            elif section != "params":  # a bare params entry is a key of params.yaml, not a path
                paths.add(entry)
    return paths


# kept out of DVC on purpose: DVC deletes a stage's outputs before re-running it, and the checkpoints
# must survive an interrupted run for the re-run to resume (README, "Resume after interruption")
UNDECLARED = {"train": {"checkpoints/train"}}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_path_in_the_command_is_declared(stage):
    """A path the script is given but DVC is not told of would be read (or written) behind its back."""
    declared = _declared(STAGES[stage]) | UNDECLARED.get(stage, set())
    given = [t.partition("=")[2] or t for t in STAGES[stage]["cmd"].split() if "/" in t]
    undeclared = [
        path
        for path in given
        if not any(d == path or d.startswith(f"{path}/") or path.startswith(f"{d}/") for d in declared)
    ]
    assert not undeclared, f"{stage}: dvc.yaml does not declare {undeclared}"
