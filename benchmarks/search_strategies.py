"""Benchmark: TPE with a pruner against grid search, on the default data and the same space.

Runs the real search stage twice (in a scratch folder, against a scratch MLflow store) and prints, for
each strategy, the best val macro-F1, the number of trials by state, and the total CPU time (user+sys of
the stage process). Needs `dvc repro split` to have produced data/split and data/prepared. The goal: TPE
with a pruner within 0.5 pt of grid's best at no more than half of grid's CPU time.

    python benchmarks/search_strategies.py [--tpe-trials 24] [--pruner percentile]

Takes roughly 25 minutes on a 2-core CPU with the space below (grid alone ~16).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from lmpipe.params import write_params

ROOT = Path(__file__).resolve().parents[1]
# Categorical/stepped so that grid search can enumerate it: 3 x 2 x 2 x 2 x 2 = 48 points.
SPACE = {
    "learning_rate": {"type": "categorical", "choices": [5.0e-5, 1.5e-4, 4.5e-4]},
    "batch_size": {"type": "categorical", "choices": [16, 32]},
    "weight_decay": {"type": "categorical", "choices": [0.0, 0.05]},
    "warmup_ratio": {"type": "categorical", "choices": [0.0, 0.1]},
    "epochs": {"type": "int", "low": 1, "high": 2},
}


def run_search(strategy: str, pruner: str, n_trials: int, scratch: Path) -> dict:
    search = dict(
        enabled=True, strategy=strategy, pruner=pruner, n_trials=n_trials, timeout=None, storage=None
    )
    folder = scratch / f"{strategy}-{pruner}"
    folder.mkdir()
    write_params(
        folder / "params.yaml",
        {"search": {**search, "space": SPACE}, "mlflow": {"experiment": "benchmark-search"}},
        ROOT / "params.yaml",
        replace=["search.space"],  # this space, not merged with params.yaml's
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}"}
    subprocess.run(
        [
            sys.executable,
            "stages/search.py",
            "--params",
            str(folder / "params.yaml"),
            "--data",
            "data/split",
            "--labels",
            "data/prepared/labels.json",
            "--out",
            str(folder / "out"),
            "--db",
            str(folder / "db"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    metrics = json.loads((folder / "out" / "report.json").read_text())
    best = json.loads((folder / "out" / "best_params.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "strategy": f"{strategy}+{pruner}",
        "best_val_macro_f1": best["value"],
        "best_params": best["params"],
        "trials": metrics["trials"],
        "complete": metrics["complete"],
        "pruned": metrics["pruned"],
        "failed": metrics["failed"],
        "wall_s": metrics["seconds"],
        "cpu_s": round(cpu, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # half of the grid's 48 points: duplicates proposed again cost nothing and do not count
    parser.add_argument("--tpe-trials", type=int, default=24)
    parser.add_argument(
        "--pruner", default="percentile", choices=["median", "percentile", "successive_halving", "hyperband"]
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run_search("tpe", args.pruner, args.tpe_trials, Path(tmp)),
            run_search("grid", "none", 1, Path(tmp)),
        ]  # grid runs every point whatever n_trials says
    grid = results[1]
    print(f"\n{'strategy':<14}{'best val F1':>12}{'trials':>8}{'pruned':>8}{'CPU s':>9}{'wall s':>8}")
    for r in results:
        print(
            f"{r['strategy']:<14}{r['best_val_macro_f1']:>12.4f}{r['trials']:>8}{r['pruned']:>8}"
            f"{r['cpu_s']:>9.0f}{r['wall_s']:>8.0f}"
        )
    tpe = results[0]
    gap = (grid["best_val_macro_f1"] - tpe["best_val_macro_f1"]) * 100
    share = tpe["cpu_s"] / grid["cpu_s"]
    print(
        f"\nTPE+{args.pruner} is {gap:+.2f} pt below grid's best at {share:.0%} of its CPU time "
        f"(goal: within 0.5 pt at <= 50%)"
    )
    for r in results:
        print(f"{r['strategy']}: best params {r['best_params']}")


if __name__ == "__main__":
    main()
