"""Benchmark: every fine-tuning strategy on the default data and model, through the real stages.

Runs prepare and split once, then train and evaluate once per strategy, all in a scratch folder against
a scratch MLflow store, and prints a table: test macro-F1 and accuracy, training wall time (the
Trainer's, from reports/train/report.json), trainable and total parameters, epochs.

    python benchmarks/strategies.py                          # the default params: ~18 min on a 2-core CPU
    python benchmarks/strategies.py --max-rows 400 --epochs 1  # a reduced run, a few minutes

Every strategy runs with the default params.yaml, except the learning rate of the two strategies that
train few weights: a head alone or low-rank adapters need a higher rate than full fine-tuning
(LR_OVERRIDES below; the table shows the rate used). Prompt tuning runs at its own
``train.prompt_tuning.learning_rate``. Gradual unfreezing runs its phases (one epoch each by default);
``--epochs`` sets the epochs of every phase too. ``--strategies prompt_tuning`` runs one strategy only.
"""

from __future__ import annotations

import argparse
import json

from scratch import Scratch, add_arguments

STRATEGIES = ("full", "linear_probe", "lora", "gradual_unfreezing", "prompt_tuning")
LR_OVERRIDES = {"linear_probe": 1.0e-3, "lora": 5.0e-4}


def peak_rate(defaults, train: dict) -> float:
    """The peak rate the run used: prompt tuning's own, else the (overridden) train.learning_rate."""
    if train["strategy"] == "prompt_tuning":
        return defaults.prompt_tuning.learning_rate
    return train["learning_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs and each phase's epochs")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    add_arguments(parser)
    args = parser.parse_args()

    scratch = Scratch.from_args(args, "benchmark-strategies")
    defaults = scratch.params.train

    rows = []
    for name in args.strategies:
        train = {"strategy": name, "learning_rate": LR_OVERRIDES.get(name, defaults.learning_rate)}
        if args.epochs is not None:
            train["epochs"] = args.epochs
            train.update({f"phases[{i}].epochs": args.epochs for i in range(len(defaults.phases))})
        print(f"{name}: training ...", flush=True)
        result = scratch.train_and_evaluate(name, {"train": train})
        trained, tested = result["train"], result["evaluate"]
        rows.append(
            {
                "strategy": name,
                "test_macro_f1": tested["model"]["macro_f1"],
                "test_accuracy": tested["model"]["accuracy"],
                "train_seconds": trained["train_seconds"],
                "trainable_params": trained["trainable_parameters"],
                "params": trained["parameters"],
                "epochs": trained["epochs_run"],
                "lr": "phases" if name == "gradual_unfreezing" else peak_rate(defaults, train),
                "baseline_macro_f1": tested["baseline"]["macro_f1"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    sizes = scratch.split_sizes()
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
    scratch.close()


if __name__ == "__main__":
    main()
