"""Print the shape of the package: lines per module, the longest functions, and the task-coupling counts.

    python benchmarks/code_shape.py [--top 10]

The figures the task-interface refactor was judged by (docs/development.md, "Adding a task"): modules and
functions that grow past a screen, task names defined more than once, `_entities` twins, and core modules
that import a task module.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lmpipe"
# Modules that may know about tasks: the tasks themselves and what wires them to stages.
CORE = ("training", "encoding", "inference", "compare", "slices")


def modules() -> list[Path]:
    return sorted(
        p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "stages").glob("*.py")] if "__pycache__" not in p.parts
    )


def functions(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.name}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    files = modules()
    sizes = sorted(((len(p.read_text(encoding="utf-8").splitlines()), p) for p in files), reverse=True)
    print(f"{len(files)} modules, {sum(s for s, _ in sizes)} lines")
    print(f"\nlongest modules (top {args.top}):")
    for n, p in sizes[: args.top]:
        print(f"  {n:5d}  {p.relative_to(ROOT)}")
    funcs = sorted((f for p in files for f in functions(p)), reverse=True)
    print(f"\nlongest functions (top {args.top}); {sum(n > 80 for n, _ in funcs)} are over 80 lines:")
    for n, name in funcs[: args.top]:
        print(f"  {n:5d}  {name}")
    text = {p: p.read_text(encoding="utf-8") for p in files}
    twins = [f for p in files for _, f in functions(p) if f.endswith("_entities")]
    print(f"\n`_entities` functions: {len(twins)} {twins if twins else ''}")
    for name in ("classification", "token_classification"):
        defs = [
            str(p.relative_to(ROOT))
            for p, t in text.items()
            if re.search(rf'^\s*\w+\s*(:\s*[\w\[\]]+)?\s*=\s*"{name}"', t, re.M)
        ]
        print(f'definitions of "{name}" (NAME = "{name}"): {len(defs)} {defs}')
        inline = sum(t.count(f'"{name}"') for t in text.values())
        print(f'  the literal "{name}" anywhere: {inline}')
    task_import = re.compile(
        r"^\s*(from lmpipe(\.tasks)? import .*\b(ner|token_classification|classification|data)\b|from lmpipe\.(tasks\.)?(ner|token_classification|classification)\b|import lmpipe\.(ner|tasks\.\w+))",
        re.M,
    )
    for p, t in text.items():
        if p.stem in CORE and task_import.search(t):
            print(f"core module imports a task module: {p.relative_to(ROOT)}")
    core = [p for p in text if p.stem in CORE and task_import.search(text[p])]
    print(f"core modules ({', '.join(CORE)}) importing a task module: {len(core)}")


if __name__ == "__main__":
    main()
