"""Benchmark: what a stage costs before it does any work, and how soon a params typo is answered.

For each stage it prints
* import: the seconds to import the stage's library module (``lmpipe.stages.<name>``: torch, transformers,
  mlflow... as that stage needs them), in a fresh process;
* typo: the seconds from starting the stage script to its one-line error for an unknown key in
  params.yaml (exit 2), in a fresh process;
and then the wall time of ``dvc repro`` to the same one-line error in a throwaway git + DVC copy of the repo
(DVC's own start-up included).

    python benchmarks/stage_startup.py [--repeats 3]

Medians of ``--repeats`` runs. About a minute on a 2-core CPU. Run it from the repo root, with the venv's
python (``.venv/bin/python``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "split", "search", "train", "evaluate", "analyze", "compress", "export")
# a misspelt key in a section DVC tracks whole (`train`): DVC passes it on, and the first stage to load
# params.yaml (prepare: every stage checks the whole file) answers it
TYPO = ("  learning_rate: 1.0e-4", "  learning_rte: 1.0e-4")
# the arguments a stage reads before its params: the rest are never opened
REAL = {"--source": "model=models/model", "--search": "reports/search/best_params.json"}


def timed(cmd: list[str], cwd: Path, expect: int) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != expect:
        raise SystemExit(
            f"{' '.join(cmd)} exited {result.returncode}, not {expect}:\n{result.stderr[-2000:]}"
        )
    if expect == 2 and "unknown key" not in result.stderr:
        raise SystemExit(f"{' '.join(cmd)}: no one-line error for the typo:\n{result.stderr[-2000:]}")
    return elapsed


def median_of(repeats: int, fn) -> float:
    return statistics.median(fn() for _ in range(repeats))


def stage_args(name: str) -> list[str]:
    """Every path argument the stage parser asks for, as dummies: the stage stops at params first."""
    import re

    text = (ROOT / "stages" / f"{name}.py").read_text()
    args: list[str] = []
    for flag in re.findall(r'add_argument\(\s*"(--[a-z-]+)"[^)]*required=True', text, flags=re.S):
        args += [flag, REAL.get(flag, "unused")]
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    py = sys.executable

    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "params.yaml"
        text = (ROOT / "params.yaml").read_text()
        assert TYPO[0] in text, f"params.yaml has no '{TYPO[0]}' line to misspell"
        bad.write_text(text.replace(TYPO[0], TYPO[1], 1))

        print(f"{'stage':<10} {'import (s)':>10} {'typo (s)':>9}")
        for name in STAGES:
            imp = median_of(
                args.repeats, lambda n=name: timed([py, "-c", f"import lmpipe.stages.{n}"], ROOT, 0)
            )
            cmd = [py, f"stages/{name}.py", "--params", str(bad), *stage_args(name)]
            typo = median_of(args.repeats, lambda c=cmd: timed(c, ROOT, 2))
            print(f"{name:<10} {imp:>10.2f} {typo:>9.2f}")

        repo = Path(tmp) / "repo"
        files = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split("\0")
        for rel in filter(None, files):
            if (ROOT / rel).is_file():
                (repo / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, repo / rel)
        shutil.copy2(bad, repo / "params.yaml")
        (repo / "dvc.lock").unlink(missing_ok=True)
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        dvc = str(Path(py).parent / "dvc")
        env_path = f"{Path(py).parent}:{__import__('os').environ['PATH']}"

        def repro() -> float:
            start = time.perf_counter()
            result = subprocess.run(
                [dvc, "repro", "prepare"], cwd=repo, capture_output=True, text=True, env={"PATH": env_path}
            )
            elapsed = time.perf_counter() - start
            if result.returncode == 0 or "unknown key" not in result.stdout + result.stderr:
                raise SystemExit(
                    f"dvc repro did not stop at the typo:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
                )
            return elapsed

        print(
            f"dvc repro to the one-line error (DVC's start-up included): {median_of(args.repeats, repro):.2f} s"
        )


if __name__ == "__main__":
    main()
