"""Benchmark: how much of each text the model reads (base.max_length) and for how long it trains, against
the TF-IDF + logistic-regression baseline, on the default data, through the real train and evaluate stages.

The question it answers: does MiniLM beat the baseline on the default split, and what would it cost?
Every BBC article is longer than 128 tokens (median ~450), and the baseline reads all of it. For each
setting it prints the best val macro-F1 (what the pipeline selects on), the test macro-F1 and errors of
the model and the baseline, the gap with its paired bootstrap 95% CI and McNemar's p (from the evaluate
stage), and the Trainer's wall time. The split is the default one (base.seed), the same for every setting.

    python benchmarks/context_length.py                       # 128x2 (the default), 256x1, 256x2: ~25 min
    python benchmarks/context_length.py --settings 128x2 256x2
"""

from __future__ import annotations

import argparse
import json

from scratch import Scratch, add_arguments


def setting(text: str) -> tuple[int, int]:
    length, _, epochs = text.partition("x")
    return int(length), int(epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--settings", nargs="+", type=setting, default=[(128, 2), (256, 1), (256, 2)],
        help="MAX_LENGTHxEPOCHS pairs",
    )  # fmt: skip
    add_arguments(parser)
    args = parser.parse_args()

    scratch = Scratch.from_args(args, "benchmark-context-length")
    rows = []
    for length, epochs in args.settings:
        name = f"{length}x{epochs}"
        print(f"{name}: training ...", flush=True)
        result = scratch.train_and_evaluate(
            name, {"base": {"max_length": length}, "train": {"epochs": epochs}}
        )
        trained, tested = result["train"], result["evaluate"]
        gap, n = tested["model_minus_baseline"], tested["test_rows"]
        rows.append(
            {
                "max_length": length,
                "epochs": epochs,
                "val_macro_f1": trained["best_val_macro_f1"],
                "test_macro_f1": tested["model"]["macro_f1"],
                "test_errors": round(n * (1 - tested["model"]["accuracy"])),
                "baseline_macro_f1": tested["baseline"]["macro_f1"],
                "baseline_errors": round(n * (1 - tested["baseline"]["accuracy"])),
                "gap_pt": 100 * gap["macro_f1"],
                "ci_pt": [100 * gap["macro_f1_ci95_low"], 100 * gap["macro_f1_ci95_high"]],
                "mcnemar_p": gap["mcnemar_p"],
                "train_seconds": trained["train_seconds"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nsplit: {scratch.split_sizes()}")
    print(
        "| max_length x epochs | val macro-F1 | test macro-F1 (errors) | baseline (errors) "
        "| model - baseline, 95% CI | McNemar p | train time (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['max_length']} x {r['epochs']} | {r['val_macro_f1']:.4f} | {r['test_macro_f1']:.4f} "
            f"({r['test_errors']}) | {r['baseline_macro_f1']:.4f} ({r['baseline_errors']}) | "
            f"{r['gap_pt']:+.2f} pt [{r['ci_pt'][0]:+.2f}, {r['ci_pt'][1]:+.2f}] | {r['mcnemar_p']:.3f} "
            f"| {r['train_seconds']:.0f} |"
        )
    scratch.close()


if __name__ == "__main__":
    main()
