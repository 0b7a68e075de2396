"""Time the train stage spends in MLflow calls: the local SQLite store against a tracking server.

    .venv/bin/python benchmarks/tracking_overhead.py --data data/split --labels data/prepared/labels.json \
        --server http://127.0.0.1:5000 [--set prepare.max_rows=600 ...]

Each store gets a fresh process that runs the train stage (``lmpipe.stages.train.run``) with every
``mlflow`` function and ``MlflowClient`` method the pipeline calls wrapped in a timer; it prints the
stage's wall time, the time inside MLflow, and that time as a share of the stage. The goal: the server
adds at most 2% of the stage's wall time over SQLite.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TIMED = ["start_run", "end_run", "log_params", "log_metrics", "log_dict", "log_artifact", "log_artifacts"]
TIMED += ["log_figure", "set_tags", "set_tag", "set_experiment", "get_experiment_by_name", "register_model"]
CLIENT = ["log_metric", "set_tag", "get_run", "search_runs", "search_experiments", "set_terminated"]


def timed_run(args: argparse.Namespace) -> dict:
    """In this process: wrap MLflow, run the train stage, return the figures."""
    import mlflow
    from mlflow.tracking import MlflowClient

    spent = [0.0]

    def timer(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    for name in TIMED:
        setattr(mlflow, name, timer(getattr(mlflow, name)))
    for name in CLIENT:
        setattr(MlflowClient, name, timer(getattr(MlflowClient, name)))
    from lmpipe import tracking
    from lmpipe.params import load_params
    from lmpipe.stages import train

    tracking.check_server = timer(tracking.check_server)
    out = Path(args.one)
    params = load_params(out / "params.yaml")
    paths = train.Paths(
        data=args.data,
        labels=args.labels,
        search=str(out / "best_params.json"),
        out=str(out / "model"),
        adapter=str(out / "adapter"),
        checkpoints=str(out / "checkpoints"),
        metrics=str(out / "metrics.json"),
        report=str(out / "report.json"),
        history=str(out / "history.csv"),
    )
    start = time.perf_counter()
    train.run(params, paths)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "mlflow_s": spent[0]}


def measure(uri: str, args: argparse.Namespace, scratch: Path) -> dict:
    folder = scratch / str(len(list(scratch.iterdir())))
    folder.mkdir()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    from lmpipe.params import write_params

    write_params(folder / "params.yaml", overrides, source=ROOT / "params.yaml")
    (folder / "best_params.json").write_text(json.dumps({"enabled": False, "params": {}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run(
        [sys.executable, __file__, "--one", str(folder), "--data", args.data, "--labels", args.labels],
        cwd=scratch,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="split folder (train/val.parquet)")
    parser.add_argument("--labels", required=True, help="labels.json from prepare")
    parser.add_argument("--server", help="the tracking server's URI, http://host:port")
    parser.add_argument("--set", action="append", default=[], help="params override, dotted.key=value")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement in this process
    args = parser.parse_args()
    args.data, args.labels = str(Path(args.data).resolve()), str(Path(args.labels).resolve())
    if args.one:
        print(json.dumps(timed_run(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"sqlite": f"sqlite:///{Path(tmp) / 'mlflow.db'}"}
        if args.server:
            stores["server"] = args.server
        results = {name: measure(uri, args, Path(tmp)) for name, uri in stores.items()}
    print(f"\n{'store':<8}{'stage wall s':>14}{'in MLflow s':>13}{'share':>8}")
    for name, r in results.items():
        print(f"{name:<8}{r['wall_s']:>14.1f}{r['mlflow_s']:>13.2f}{r['mlflow_s'] / r['wall_s']:>8.1%}")
    if "server" in results:
        extra = results["server"]["mlflow_s"] - results["sqlite"]["mlflow_s"]
        print(
            f"\nthe server adds {extra:+.2f} s in MLflow calls, {extra / results['sqlite']['wall_s']:+.1%} of the stage"
        )


if __name__ == "__main__":
    main()
