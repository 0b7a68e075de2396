"""Run the compress stage on a trained model and report its table against the targets of issue 4.

    .venv/bin/python benchmarks/compress.py --data data/split --model models/model --out /tmp/compress-bench \
        [--set compress.distill.epochs=1 ...]

The stage script runs unchanged, from a scratch folder (its params.yaml: this repo's, with the ``--set``
overrides; its own MLflow store), so nothing is written into the repo. Targets: int8 >= 1.5x faster at
batch 1 and <= 1 pt macro-F1 lost; the 3-layer student >= 1.8x and <= 2 pt; 50% sparsity <= 1 pt lost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lmpipe.params import load_params, write_params

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {  # variant: (minimum batch-1 speed-up or None, largest macro-F1 loss in points)
    "int8": (1.5, 1.0),
    "student": (1.8, 2.0),
    "pruned": (None, 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="split folder (train/val/test.parquet)")
    parser.add_argument("--model", required=True, type=Path, help="trained model folder")
    parser.add_argument("--out", required=True, type=Path, help="scratch folder for every output")
    parser.add_argument("--set", action="append", default=[], help="params override, dotted.key=value")
    parser.add_argument(
        "--train-rows",
        type=int,
        default=None,
        help="a seeded, stratified sample of the train split for the distillation/recovery fine-tunes "
        "(val and test stay whole): a cheaper run on a busy machine",
    )
    args = parser.parse_args()

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)  # as params.yaml would read it: 1 -> int, null -> None
    write_params(args.out / "params.yaml", overrides, ROOT / "params.yaml")
    params = load_params(args.out / "params.yaml")  # checked before the stage starts
    data_dir = args.data.resolve()
    if args.train_rows:
        import pandas as pd

        from lmpipe.data import stratified_sample

        data_dir = args.out / "split"
        data_dir.mkdir(exist_ok=True)
        train = pd.read_parquet(args.data / "train.parquet")
        stratified_sample(train, args.train_rows, params.base.seed).to_parquet(data_dir / "train.parquet")
        for name in ("val", "test"):
            (data_dir / f"{name}.parquet").write_bytes((args.data / f"{name}.parquet").read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{args.out / 'mlflow.db'}"}
    cmd = [
        sys.executable,
        str(ROOT / "stages/compress.py"),
        "--data",
        str(data_dir),
        "--model",
        str(args.model.resolve()),
        "--out",
        "models",
        "--metrics",
        "metrics.json",
        "--report",
        "report.json",
        "--plot",
        "pareto.csv",
        "--prune-curve",
        "prune_curve.csv",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=args.out, env=env, check=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((args.out / "report.json").read_text())
    rows = metrics["variants"]
    bs = params.compress.latency.batch_size
    print(
        f"\ncompress stage: {seconds:.0f} s; latency setup {metrics['latency_setup']}; overrides {args.set}; train rows {args.train_rows or 'all'}\n"
    )
    print(
        f"| variant | val loss (pt) | within budget | test macro-F1 | Δ F1 (pt) | accuracy | size MB | params "
        f"| non-zero | b1 p50/p95 ms | b{bs} p50/p95 ms | b{bs} ex/s | speed-up b1 | target | met |"
    )
    print("|---" * 15 + "|")
    for name, row in rows.items():
        delta = 100 * row["delta_macro_f1"]
        target, met = "", ""
        if name in TARGETS:
            speed, loss = TARGETS[name]
            ok = delta >= -loss and (speed is None or row["speedup_b1"] >= speed)
            target = (f">= {speed}x, " if speed else "") + f"<= {loss} pt lost"
            met = "yes" if ok else "**no**"
        flag = {True: "yes", False: "**no**"}.get(row.get("within_budget"), "")
        print(
            f"| {name} | {100 * row['val_f1_loss']:+.2f} | {flag} | {row['macro_f1']:.4f} | {delta:+.2f} | {row['accuracy']:.4f} | {row['size_mb']:.1f} "
            f"| {row['parameters'] / 1e6:.2f} M | {row['nonzero_parameters'] / 1e6:.2f} M "
            f"| {row['latency_b1_p50_ms']:.1f} / {row['latency_b1_p95_ms']:.1f} "
            f"| {row[f'latency_b{bs}_p50_ms']:.0f} / {row[f'latency_b{bs}_p95_ms']:.0f} "
            f"| {row[f'throughput_b{bs}_per_s']:.0f} | {row['speedup_b1']:.2f}x | {target} | {met} |"
        )
    print(f"\nbudget: compress.max_loss {metrics['max_loss']} of val macro-F1")
    if "pruned" in rows:
        pruned = rows["pruned"]
        print(
            f"pruned: sparsity {pruned['sparsity']} ({pruned['chosen_by']}); measured "
            f"{pruned['measured_sparsity']:.4f} of the encoder's Linear weights; recovery epochs run "
            f"{pruned['recovery_epochs_run']}"
        )
        print(
            "| sparsity | recovered | val macro-F1 | val loss (pt) | within budget |\n|---|---|---|---|---|"
        )
        for point in metrics["prune_curve"]:
            print(
                f"| {point['sparsity']} | {point['recovered']} | {point['val_macro_f1']:.4f} "
                f"| {100 * point['val_f1_loss']:+.2f} | {point['within_budget']} |"
            )
    if "int8" in rows:
        print(
            f"int8: fp32 layers kept {rows['int8']['fp32_layers'] or 'none'}; trials {rows['int8']['fp32_trials']}"
        )
    for warning in metrics["budget_warnings"]:
        print(f"WARNING: {warning}")
    print(f"Pareto front (macro-F1 vs batch-1 latency): {', '.join(metrics['pareto'])}")


if __name__ == "__main__":
    main()
