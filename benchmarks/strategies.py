"""Benchmark: every fine-tuning strategy on the default data and model, through the real stages.

Runs prepare and split once, then train and evaluate once per strategy, all in a scratch folder against
a scratch MLflow store, and prints a table: test macro-F1 and accuracy, training wall time (the
Trainer's, from reports/train/metrics.json), trainable and total parameters, epochs.

    python benchmarks/strategies.py                          # the default params: ~18 min on a 2-core CPU
    python benchmarks/strategies.py --max-rows 400 --epochs 1  # a reduced run, a few minutes

Every strategy runs with the default params.yaml, except the learning rate of the two strategies that
train few weights: a head alone or low-rank adapters need a higher rate than full fine-tuning
(LR_OVERRIDES below; the table shows the rate used). Gradual unfreezing runs its phases (one epoch
each by default); ``--epochs`` sets the epochs of every phase too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("full", "linear_probe", "lora", "gradual_unfreezing")
LR_OVERRIDES = {"linear_probe": 1.0e-3, "lora": 5.0e-4}


def stage(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed:\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-rows", type=int, default=None, help="prepare.max_rows (default: all rows)")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs and each phase's epochs")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="lmpipe-bench-strategies-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["max_rows"] = args.max_rows
    params["mlflow"]["experiment"] = "benchmark-strategies"
    base_file = scratch / "params.yaml"
    base_file.write_text(yaml.safe_dump(params, sort_keys=False))
    stage(["stages/prepare.py", "--params", str(base_file), "--out", str(scratch / "prepared"),
           "--report", str(scratch / "prepare.json")], env)  # fmt: skip
    stage(["stages/split.py", "--params", str(base_file), "--data", str(scratch / "prepared/data.parquet"),
           "--out", str(scratch / "split"), "--metrics", str(scratch / "split.json")], env)  # fmt: skip
    (scratch / "best_params.json").write_text(json.dumps({"enabled": False, "params": {}}))

    rows = []
    for name in args.strategies:
        train = dict(params["train"], strategy=name)
        if name in LR_OVERRIDES:
            train["learning_rate"] = LR_OVERRIDES[name]
        if args.epochs is not None:
            train["epochs"] = args.epochs
            train["phases"] = [dict(p, epochs=args.epochs) for p in train["phases"]]
        out = scratch / name
        out.mkdir()
        pfile = out / "params.yaml"
        pfile.write_text(yaml.safe_dump({**params, "train": train}, sort_keys=False))
        print(f"{name}: training ...", flush=True)
        stage(["stages/train.py", "--params", str(pfile), "--data", str(scratch / "split"),
               "--labels", str(scratch / "prepared/labels.json"), "--search", str(scratch / "best_params.json"),
               "--out", str(out / "model"), "--adapter", str(out / "adapter"),
               "--checkpoints", str(scratch / "checkpoints"), "--metrics", str(out / "train.json"),
               "--history", str(out / "history.csv")], env)  # fmt: skip
        stage(["stages/evaluate.py", "--params", str(pfile), "--data", str(scratch / "split"),
               "--model", str(out / "model"), "--train-metrics", str(out / "train.json"),
               "--out", str(out / "evaluate")], env)  # fmt: skip
        trained = json.loads((out / "train.json").read_text())
        tested = json.loads((out / "evaluate/metrics.json").read_text())
        rows.append(
            {
                "strategy": name,
                "test_macro_f1": tested["model"]["macro_f1"],
                "test_accuracy": tested["model"]["accuracy"],
                "train_seconds": trained["train_seconds"],
                "trainable_params": trained["trainable_parameters"],
                "params": trained["parameters"],
                "epochs": trained["epochs_run"],
                "lr": "phases" if name == "gradual_unfreezing" else train["learning_rate"],
                "baseline_macro_f1": tested["baseline"]["macro_f1"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    sizes = json.loads((scratch / "split.json").read_text()).get("sizes", {})
    print(f"\nrows: {sizes}; max_rows={args.max_rows}, epochs={args.epochs or 'default'}")
    print(
        "| strategy | test macro-F1 | test accuracy | train time (s) | trainable params | share | epochs | lr |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = r["trainable_params"] / r["params"]
        print(
            f"| {r['strategy']} | {r['test_macro_f1']:.4f} | {r['test_accuracy']:.4f} | {r['train_seconds']:.0f} "
            f"| {r['trainable_params']:,} | {share:.2%} | {r['epochs']} | {r['lr']} |"
        )
    if rows:
        print(
            f"TF-IDF + logistic regression baseline, same split: test macro-F1 {rows[0]['baseline_macro_f1']:.4f}"
        )
    if not args.keep:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"scratch folder: {scratch}")


if __name__ == "__main__":
    main()
