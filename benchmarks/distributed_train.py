"""The train stage with 1 process against N processes (DDP, gloo on the CPU) at the same global batch.

    .venv/bin/python benchmarks/distributed_train.py --data data/split --labels data/prepared/labels.json \
        [--processes 2] [--set train.epochs=1 ...]

params.yaml as it is, plus the ``--set`` overrides. The one-process run trains at ``train.batch_size``;
the N-process run at ``train.batch_size / N`` per process, so both take the same optimiser steps with the
same learning-rate schedule. Each model is then scored by the evaluate stage on the test split. Every run
writes to its own scratch folder and MLflow store; prints optimiser steps, val and test macro-F1, the
Trainer's time and the stage's wall time. Each of the N processes gets ``nproc / N`` torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lmpipe.params import load_params, write_params

ROOT = Path(__file__).resolve().parents[1]


def run_stage(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def train_and_evaluate(processes: int, batch_size: int, args: argparse.Namespace, scratch: Path) -> dict:
    folder = scratch / f"processes{processes}"
    folder.mkdir()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    overrides |= {"train.batch_size": batch_size, "train.distributed.processes": processes}
    write_params(folder / "params.yaml", overrides, source=ROOT / "params.yaml")
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    no_search = folder / "best_params.json"
    no_search.write_text(json.dumps({"enabled": False, "params": {}}))
    params = ["--params", str(folder / "params.yaml")]
    wall = run_stage(
        ["stages/train.py", *params, "--data", args.data, "--labels", args.labels, "--search", str(no_search)]
        + ["--out", str(folder / "model"), "--adapter", str(folder / "adapter")]
        + ["--checkpoints", str(folder / "checkpoints"), "--metrics", str(folder / "train_metrics.json")]
        + ["--report", str(folder / "train_report.json"), "--history", str(folder / "history.csv")],
        env,
    )
    run_stage(
        ["stages/evaluate.py", *params, "--data", args.data, "--model", str(folder / "model")]
        + ["--train-report", str(folder / "train_report.json"), "--out", str(folder / "evaluate")],
        env,
    )
    train = json.loads((folder / "train_report.json").read_text())
    evaluated = json.loads((folder / "evaluate/report.json").read_text())
    return {
        "processes": processes,
        "batch_size": batch_size,
        "global_batch_size": train["global_batch_size"],
        "steps": train["global_steps"],
        "val_macro_f1": train["best_val_macro_f1"],
        "test_macro_f1": evaluated["model"]["macro_f1"],
        "trainer_s": train["train_seconds"],
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="split folder (train/val/test.parquet)")
    parser.add_argument("--labels", required=True, help="labels.json from prepare")
    parser.add_argument(
        "--processes", type=int, default=2, help="the processes of the second run (default 2)"
    )
    parser.add_argument("--set", action="append", default=[], help="params override, dotted.key=value")
    args = parser.parse_args()
    args.data, args.labels = str(Path(args.data).resolve()), str(Path(args.labels).resolve())
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        write_params(Path(tmp) / "params.yaml", overrides, source=ROOT / "params.yaml")
        global_batch = load_params(Path(tmp) / "params.yaml").train.batch_size
    if global_batch % args.processes:
        parser.error(f"train.batch_size {global_batch} is not a multiple of --processes {args.processes}")
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            train_and_evaluate(1, global_batch, args, Path(tmp)),
            train_and_evaluate(args.processes, global_batch // args.processes, args, Path(tmp)),
        ]
    print(
        f"\n{'processes':>9}{'batch':>7}{'global':>8}{'steps':>7}{'val F1':>9}{'test F1':>9}{'Trainer s':>11}{'wall s':>8}"
    )
    for r in results:
        print(
            f"{r['processes']:>9}{r['batch_size']:>7}{r['global_batch_size']:>8}{r['steps']:>7}"
            f"{r['val_macro_f1']:>9.4f}{r['test_macro_f1']:>9.4f}{r['trainer_s']:>11.0f}{r['wall_s']:>8.0f}"
        )


if __name__ == "__main__":
    main()
