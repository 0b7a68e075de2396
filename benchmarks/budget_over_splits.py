"""Benchmark: does the compression budget hold on unseen data? Over several seeded splits (`lmpipe splits`'s
recipe: runs differing only in `base.seed`), runs `dvc repro compress` under the point rule
(`compress.confidence: null`), the bound on the loss (`compress.bound: confidence`) and the bound on what
a new split as large as test will show (`compress.bound: prediction`, the default), at
`compress.confidence` (default 0.9), and counts, for each rule, the variants marked within budget whose
test loss is over the budget.

    python benchmarks/budget_over_splits.py [--seeds 1 2 3] [--confidence 0.9] [--rules point confidence prediction] [--set prepare.source=data/builtin/bbc_titles.yaml ...]

Run it in a clone of the project (it edits `params.yaml` and restores it at the end; DVC's run cache makes
the second rule re-run only compress). Each seed costs a train and two compress runs: about 25 minutes
per seed for the default data on a 2-core CPU, about 8 for BBC titles. Prints one row per variant and
seed, then the counts (issue 35; docs/figures.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from lmpipe.params import write_params


def parse(value: str):
    """A --set value as YAML would read it: null, numbers, booleans, else the string."""
    import yaml

    return yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--confidence", type=float, default=0.9, help="the bound rule's level")
    parser.add_argument("--set", action="append", default=[], help="key=value params for every run")
    parser.add_argument(
        "--rules",
        nargs="+",
        choices=["point", "confidence", "prediction"],
        default=["point", "prediction"],
        help="the rules to run",
    )
    args = parser.parse_args()
    base = {k: parse(v) for k, v in (s.split("=", 1) for s in args.set)}
    backup = Path("params.yaml.budget-backup")
    shutil.copy("params.yaml", backup)
    rows = []
    try:
        for seed in args.seeds:
            for rule in args.rules:
                confidence = None if rule == "point" else args.confidence
                bound = "prediction" if rule == "point" else rule
                overrides = {
                    **base,
                    "base.seed": seed,
                    "compress.confidence": confidence,
                    "compress.bound": bound,
                }
                write_params(Path("params.yaml"), overrides, backup)
                subprocess.run(["dvc", "repro", "compress"], check=True)
                report = json.loads(Path("reports/compress/report.json").read_text())
                for name, v in report["variants"].items():
                    if name == "original":
                        continue
                    over = v["test_f1_loss"] > v["max_loss"] + 1e-9
                    rows.append((seed, rule, name, v, over))
    finally:
        shutil.move(backup, "params.yaml")
    print(
        "\n| seed | rule | variant | val loss (pt) | bound (pt) | within | test loss (pt) [95% CI] | over on test |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for seed, rule, name, v, over in rows:
        bound = v.get("val_f1_loss_bound")
        ci = v["test_f1_loss_ci95"]
        print(
            f"| {seed} | {rule} | {name}{' ' + str(v['sparsity']) if name == 'pruned' else ''} "
            f"| {100 * v['val_f1_loss']:+.2f} | {'' if bound is None else f'{100 * bound:+.2f}'} "
            f"| {'yes' if v['within_budget'] else 'no'} | {100 * v['test_f1_loss']:+.2f} "
            f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] | {'**yes**' if over else 'no'} |"
        )
    print()
    for rule in args.rules:
        marked = [r for r in rows if r[1] == rule and r[3]["within_budget"]]
        over = [r for r in marked if r[4]]
        refused = [r for r in rows if r[1] == rule and not r[3]["within_budget"]]
        print(
            f"{rule} rule: {len(marked)} variants marked within budget, {len(over)} of them over it on test; "
            f"{len(refused)} marked over, {sum(not r[4] for r in refused)} of them within it on test"
        )


if __name__ == "__main__":
    main()
