"""Benchmark: how often does a compress budget rule keep its promise on rows it never saw? Re-deals a
trained model's val and test rows into fresh val/test halves many times and applies each rule to each deal.

    python benchmarks/budget_resplits.py STORE [STORE ...] [--resplits 200] [--val-rows N] [--test-rows N]

A STORE is a folder holding ``params.yaml``, ``split/{train,val,test}.parquet``, ``models/model`` (the
trained model) and optionally ``models/student`` (compress's distilled student): what one seeded
``dvc repro compress`` leaves in ``data/split``, ``models/model`` and ``models/compress/student``. The
candidates' predictions on every val and test row (int8 of every Linear layer, each ``compress.prune.grid``
sparsity without recovery, the student) are computed once and cached in ``STORE/predictions.json``.

Then, ``--resplits`` times, a val of ``--val-rows`` (default: the val split's size) and a test of
``--test-rows`` (default: the test split's size) are drawn, independently and with replacement, from the
pooled val+test rows (the pool stands for the population: its own loss is each candidate's truth, and val
and test are two independent samples of it, as a user's val split and new data are), and each rule judges
every candidate on that val exactly as compress does (pruning: up the grid, stopping after two misses in
a row, the largest sparsity within the budget). A variant marked within budget whose loss on that test is
over the budget counts against the rule (and, apart, one whose loss on the whole pool is). Rules
(``--rules``):

* ``point``: the val loss (compress.confidence: null);
* ``bound@C``: the val loss's one-sided upper bound at C (paired bootstrap; compress.confidence: C);
* ``predict@C``: the upper bound at C of the loss a held-out set of the test's size will show: the val
  bootstrap's spread and that set's own (the same spread scaled by sqrt(val rows / test rows)),
  ``compression.paired_loss(..., future_rows=)``.

What it leaves out: compress's second chances (int8 keeping its most sensitive layers fp32, a recovery
fine-tune one step up the grid) and the student's best-epoch choice on the original val split: the
candidates are fixed models, only the rows are re-dealt (issue 35; docs/figures.md).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np


def candidates_predictions(store: Path) -> dict:
    """Every candidate's prediction on every val and test row (cached in ``store/predictions.json``)."""
    cache = store / "predictions.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from lmpipe import data
    from lmpipe.compress import compression
    from lmpipe.compress.variants import Inputs
    from lmpipe.modeling import models
    from lmpipe.params import load_params

    params = load_params(store / "params.yaml")
    model_dir = store / "models" / "model"
    config = compression.load_config(model_dir)
    inputs = Inputs(
        params,
        model_dir,
        *(data.read_split(store / "split", s) for s in ("train", "val", "test")),
        tokenizer=models.load_tokenizer(model_dir),
        label2id=dict(config.label2id),
        source={},
    )
    out = {"val_rows": len(inputs.val), "test_rows": len(inputs.test), "task": params.base.task}

    def both(name, model):
        out[name] = [p for split in ("val", "test") for p in inputs.outputs(model, split, name).predicted]

    out["truth"] = [t for split in ("val", "test") for t in inputs.reference_outputs(split).truth]
    out["original"] = [p for split in ("val", "test") for p in inputs.reference_outputs(split).predicted]
    fp32 = models.load_model(model_dir).cpu().eval()
    both("int8", compression.quantize_dynamic_int8(fp32))
    model = models.load_model(model_dir).to(models.device())
    for sparsity in sorted(params.compress.prune.grid):
        pruned = copy.deepcopy(model)
        compression.magnitude_prune(pruned, sparsity)
        both(f"pruned {sparsity:g}", pruned)
    if (store / "models" / "student").exists():
        both("student", models.load_model(store / "models" / "student").to(models.device()).eval())
    cache.write_text(json.dumps(out))
    return out


class Deal:
    """One shuffle of the pooled rows into a val and a test part, and each candidate's losses there."""

    def __init__(self, preds: dict, task, val_idx, test_idx, resamples: int, seed: int):
        from lmpipe.compress import compression

        self.val_rows, self.test_rows = len(val_idx), len(test_idx)
        names = [k for k in preds if k.startswith(("int8", "pruned", "student"))]
        classes = sorted({c for k in ("truth", "original", *names) for c in preds[k]})
        code = {c: i for i, c in enumerate(classes)}
        enc = {k: np.array([code[c] for c in preds[k]]) for k in ("truth", "original", *names)}
        self.val, self.test = {}, {}
        for name in names:
            for part, idx, store in (("val", val_idx, self.val), ("test", test_idx, self.test)):
                truth = enc["truth"][idx]
                score, _ = task.bootstrap_scorer(
                    [truth, truth], [enc["original"][idx], enc[name][idx]], classes, ["macro_f1"]
                )
                ones = np.ones((1, len(idx)))
                point = float(score(0, ones)["macro_f1"][0] - score(1, ones)["macro_f1"][0])
                if part == "test":
                    store[name] = point
                    continue
                draws = compression.bootstrap_draws(
                    lambda w, s=score: s(0, w)["macro_f1"] - s(1, w)["macro_f1"], len(idx), resamples, seed
                )
                store[name] = (point, draws)

    def upper(self, name: str, rule: str) -> float:
        from lmpipe.compress import compression

        point, draws = self.val[name]
        if rule == "point":
            return point
        kind, level = rule.split("@")
        future = self.test_rows if kind == "predict" else None
        return compression.upper_bound(draws, point, float(level), self.val_rows, future)


def decide(deal: Deal, rule: str, budget: float) -> dict[str, str]:
    """compress's choices under ``rule`` on this deal's val: {variant: candidate chosen} for those marked
    within budget, and the refused ones as {variant: "refused:" + candidate}."""
    from lmpipe.compress import compression

    out: dict[str, str] = {}
    for name in ("int8", "student"):
        if name in deal.val:
            ok = compression.fits(deal.upper(name, rule), budget)
            out[name] = name if ok else f"refused:{name}"
    grid = sorted(float(k.split()[1]) for k in deal.val if k.startswith("pruned"))
    curve = []
    for sparsity in grid:  # up the grid, stopping after two misses in a row (plan_pruning)
        ok = compression.fits(deal.upper(f"pruned {sparsity:g}", rule), budget)
        curve.append({"sparsity": sparsity, "within_budget": ok})
        if len(curve) >= 2 and not (curve[-1]["within_budget"] or curve[-2]["within_budget"]):
            break
    if grid:
        best = compression.largest_fitting(curve)
        out["pruned"] = f"pruned {best['sparsity']:g}" if best else f"refused:pruned {grid[0]:g}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--resplits", type=int, default=200)
    parser.add_argument("--val-rows", type=int, default=None, help="default: the val split's size")
    parser.add_argument("--test-rows", type=int, default=None, help="default: the test split's size")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument(
        "--rules", nargs="+", default=["point", "bound@0.9", "bound@0.95", "predict@0.9", "predict@0.8"]
    )
    args = parser.parse_args()
    from lmpipe import tasks

    totals = {rule: np.zeros(5, dtype=int) for rule in args.rules}
    print(
        "| store | rule | marked within | over on test | refused | refused, within on test "
        "| marked within, over on the pool | chosen (most often) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for store in args.stores:
        preds = candidates_predictions(store)
        task = tasks.get(preds["task"])
        pooled = len(preds["truth"])
        n_val = args.val_rows or preds["val_rows"]
        n_test = args.test_rows or preds["test_rows"]
        whole = Deal(preds, task, np.arange(pooled), np.arange(pooled), 100, 0)  # the pool's own losses
        losses = ", ".join(f"{name} {100 * loss:+.2f}" for name, loss in whole.test.items())
        print(
            f"| {store.name}: the pool's losses (pt), what the draws scatter around: {losses} | | | | | | |"
        )
        counts = {rule: np.zeros(5, dtype=int) for rule in args.rules}
        chosen: dict[str, dict[str, int]] = {rule: {} for rule in args.rules}
        for r in range(args.resplits):
            rng = np.random.default_rng(r)  # val and test: independent draws from the pool (the population)
            deal = Deal(
                preds,
                task,
                rng.integers(0, pooled, n_val),
                rng.integers(0, pooled, n_test),
                args.resamples,
                r,
            )
            for rule in args.rules:
                for pick in decide(deal, rule, args.budget).values():
                    name = pick.removeprefix("refused:")
                    over = deal.test[name] > args.budget + 1e-9
                    truly = whole.test[name] > args.budget + 1e-9  # over on the whole pool
                    refused = pick.startswith("refused:")
                    counts[rule] += [0, 0, 1, not over, 0] if refused else [1, over, 0, 0, truly]
                    chosen[rule][pick] = chosen[rule].get(pick, 0) + 1
        for rule in args.rules:
            c = counts[rule]
            totals[rule] += c
            top = ", ".join(f"{k} {v}" for k, v in sorted(chosen[rule].items(), key=lambda kv: -kv[1])[:4])
            print(f"| {store.name} ({n_val}/{n_test} rows) | {rule} | {share(c)} | {top} |")
    for rule in args.rules:
        print(f"| all | {rule} | {share(totals[rule])} | |")


def share(c) -> str:
    """The middle columns of a counts row: marked, over on test, refused, refused but fine, over on pool."""
    return (
        f"{c[0]} | {c[1]} ({c[1] / max(c[0], 1):.0%}) | {c[2]} | {c[3]} | {c[4]} ({c[4] / max(c[0], 1):.0%})"
    )


if __name__ == "__main__":
    main()
