"""dvc.yaml's deps are honest: every stage depends on each lmpipe module its script imports, directly or
through other lmpipe modules. A missing one means editing that module would not re-run the stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "lmpipe"


def module_file(name: str) -> Path | None:
    """``stages.train`` -> src/lmpipe/stages/train.py (or the package's ``__init__.py``); None if neither."""
    base = PACKAGE.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def lmpipe_imports(path: Path) -> set[str]:
    """Dotted names (below ``lmpipe``) of the lmpipe modules ``path`` imports, at any depth of its code
    (lazy imports included). ``from lmpipe.stages import train`` names ``stages.train``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lmpipe" or node.module.startswith("lmpipe."):
                parent = node.module.removeprefix("lmpipe").lstrip(".")
                found.add(parent)
                found.update(f"{parent}.{a.name}".lstrip(".") for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("lmpipe.") for a in node.names if a.name.startswith("lmpipe."))
    return {name for name in found if name and module_file(name) is not None}


def closure(script: Path) -> set[str]:
    """Repo-relative paths of every lmpipe module ``script`` imports, directly or through others (a
    subpackage's ``__init__.py`` too, since importing a module runs its package's)."""
    seen: set[str] = set()
    todo = lmpipe_imports(script)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo |= lmpipe_imports(module_file(name))
        if "." in name:
            todo.add(name.rsplit(".", 1)[0])
    return {module_file(name).relative_to(ROOT).as_posix() for name in seen}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_module_it_imports(stage):
    deps = set(STAGES[stage]["deps"])
    script = f"stages/{stage}.py"
    assert script in deps
    missing = sorted(m for m in closure(ROOT / script) if m not in deps)
    assert not missing, f"{stage}: dvc.yaml deps lack {missing}"


def test_the_check_sees_lazy_imports():
    # the stages import lmpipe inside main(): the walk must find those, or the test above proves nothing
    found = closure(ROOT / "stages/evaluate.py")
    assert {f"src/lmpipe/{m}.py" for m in ("stages/evaluate", "evaluation", "compare", "tracking")} <= found


@pytest.mark.parametrize(
    "stage, unused",
    [
        # scoring a model needs neither the training loop nor the compare report's wording
        ("evaluate", {"training", "strategies", "checkpoints", "compare_report", "cli"}),
        ("compress", {"compare_report", "cli", "search"}),
        ("export", {"training", "strategies", "checkpoints", "compare_report", "cli", "evaluation"}),
        ("prepare", {"training", "tracking", "cli"}),
    ],
)
def test_stages_do_not_depend_on_what_they_do_not_use(stage, unused):
    found = closure(ROOT / f"stages/{stage}.py")
    assert not {f"src/lmpipe/{m}.py" for m in unused} & found
    deps = set(STAGES[stage]["deps"])
    assert not {f"src/lmpipe/{m}.py" for m in unused} & deps, f"{stage}: needless deps in dvc.yaml"


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
