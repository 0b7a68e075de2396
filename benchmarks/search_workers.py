"""The search stage with 1 worker and with 2 workers on one PostgreSQL study, each worker at 1 thread.

    .venv/bin/python benchmarks/search_workers.py --server postgresql://user@host:port --data data/split \
        --labels data/prepared/labels.json [--set search.n_trials=8 ...]

params.yaml's search section as it is, with ``search.enabled: true`` (and the ``--set`` overrides). Each
run gets a new database on the server and its own MLflow store in a scratch folder; prints wall time, CPU
time of the stage and its workers, best value and the number of trials in the storage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

from lmpipe.params import write_params

ROOT = Path(__file__).resolve().parents[1]


def create_database(server: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{server.replace('+psycopg', '')}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


def run_search(workers: int, args: argparse.Namespace, scratch: Path) -> dict:
    folder = scratch / f"workers{workers}"
    folder.mkdir()
    storage = create_database(args.server, f"bench_{int(time.time())}_{workers}")
    overrides = {"search.enabled": True, "search.workers": workers, "search.storage": storage}
    overrides.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    write_params(folder / "params.yaml", overrides, source=ROOT / "params.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(
        [sys.executable, "stages/search.py", "--params", str(folder / "params.yaml")]
        + [
            "--data",
            args.data,
            "--labels",
            args.labels,
            "--out",
            str(folder / "out"),
            "--db",
            str(folder / "db"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    best = json.loads((folder / "out" / "best_params.json").read_text())
    study = optuna.load_study(study_name=best["study_name"], storage=storage)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return {
        "workers": workers,
        "wall_s": round(wall, 1),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
        "best": best["value"],
        "trials": len(states),
        "states": {s: states.count(s) for s in sorted(set(states))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="postgresql://user@host:port (databases are created)")
    parser.add_argument("--data", required=True, help="split folder (train/val.parquet)")
    parser.add_argument("--labels", required=True, help="labels.json from prepare")
    parser.add_argument("--set", action="append", default=[], help="params override, dotted.key=value")
    args = parser.parse_args()
    args.data, args.labels = str(Path(args.data).resolve()), str(Path(args.labels).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_search(n, args, Path(tmp)) for n in (1, 2)]
    print(f"\n{'workers':>8}{'wall s':>9}{'CPU s':>9}{'best val F1':>13}{'trials':>8}  states")
    for r in results:
        print(
            f"{r['workers']:>8}{r['wall_s']:>9.0f}{r['cpu_s']:>9.0f}{r['best']:>13.4f}{r['trials']:>8}  {r['states']}"
        )


if __name__ == "__main__":
    main()
