"""dvc.yaml's deps are honest: every stage depends on each lmpipe module its script imports, directly or
through other lmpipe modules, and on the module of the task it runs (``src/lmpipe/tasks/${base.task}.py``,
which DVC resolves from params.yaml), with that module's own imports. A missing one means editing that
module would not re-run the stage; a task module named outright would re-run another task's pipeline."""

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


TASKS = sorted(p.parent.name for p in (PACKAGE / "tasks").glob("*/__init__.py"))
TASK_DIR = "src/lmpipe/tasks/${base.task}"  # the package of the task a stage runs, resolved by DVC


def task_parts(stage: str) -> tuple[str, ...]:
    """The task parts ``lmpipe/stages/<stage>.py`` declares it uses (``TASK_PARTS``), read from its source."""
    tree = ast.parse((PACKAGE / "stages" / f"{stage}.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "TASK_PARTS":
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"lmpipe/stages/{stage}.py declares no TASK_PARTS")


def deps_for(stage: str, task: str) -> set[str]:
    """The stage's deps as DVC resolves them when params.yaml says ``base.task: <task>``."""
    return {d.split("  #")[0].replace("${base.task}", task) for d in STAGES[stage]["deps"]}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_module_it_imports(stage, task):
    deps = deps_for(stage, task)
    script = f"stages/{stage}.py"
    assert script in deps
    package = PACKAGE / "tasks" / task
    declared = [f"{TASK_DIR}/__init__.py"] + [f"{TASK_DIR}/{p}.py" for p in task_parts(stage)]
    assert not set(declared) - set(STAGES[stage]["deps"]), (
        f"{stage}: dvc.yaml deps lack {sorted(set(declared) - set(STAGES[stage]['deps']))}"
    )
    needed = closure(ROOT / script) | closure(package / "__init__.py")
    for part in task_parts(stage):
        needed |= closure(package / f"{part}.py") | {(package / f"{part}.py").relative_to(ROOT).as_posix()}
    missing = sorted(m for m in needed if m not in deps)
    assert not missing, f"{stage} (base.task {task}): dvc.yaml deps lack {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_depends_on_a_task_it_does_not_run(stage):
    """Editing the tagger's code re-runs nothing of a text-classification pipeline, and the reverse."""
    for task in TASKS:
        others = {
            d
            for d in deps_for(stage, task)
            for t in TASKS
            if t != task and d.startswith(f"src/lmpipe/tasks/{t}/")
        }
        assert not others, f"{stage} (base.task {task}) depends on {sorted(others)}"


def test_every_task_has_every_part_and_the_registry_names_it():
    from lmpipe import tasks
    from lmpipe.tasks.base import Task

    assert sorted(tasks.SUPPORTED) == TASKS
    for name in TASKS:
        assert tasks.get(name).name == name
        for part in Task.PARTS:  # dvc.yaml names tasks/${base.task}/<part>.py: it must exist for each
            assert (PACKAGE / "tasks" / name / f"{part}.py").is_file(), (name, part)
    for stage in STAGES:
        assert set(task_parts(stage)) <= set(Task.PARTS), stage


def test_the_check_sees_lazy_imports():
    # the stages import lmpipe inside main(): the walk must find those, or the test above proves nothing
    found = closure(ROOT / "stages/evaluate.py") | closure(PACKAGE / "tasks/classification/evaluation.py")
    modules = ("stages/evaluate", "evaluation", "experiments/compare", "tracking")
    assert {f"src/lmpipe/{m}.py" for m in modules} <= found


@pytest.mark.parametrize(
    "stage, unused",
    [
        # scoring a model needs neither the training loop nor the compare report's wording
        (
            "evaluate",
            {"modeling/training", "modeling/strategies", "modeling/checkpoints", "experiments/report", "cli"},
        ),
        ("compress", {"experiments/report", "cli", "tuning/optuna_study"}),
        (
            "export",
            {"modeling/training", "modeling/strategies", "modeling/checkpoints", "experiments/report", "cli"},
        ),
        ("prepare", {"modeling/training", "tracking", "cli"}),
    ],
)
def test_stages_do_not_depend_on_what_they_do_not_use(stage, unused):
    found = closure(ROOT / f"stages/{stage}.py")
    for task in TASKS:
        found |= closure(PACKAGE / "tasks" / task / "__init__.py")
        for part in task_parts(stage):
            found |= closure(PACKAGE / "tasks" / task / f"{part}.py")
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
