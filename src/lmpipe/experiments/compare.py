"""Comparing experiments the way a careful researcher would, on their per-example test predictions.

For two or more candidates (DVC experiments, git revisions or MLflow runs, see ``lmpipe.experiments``):

* each candidate's test accuracy and macro-F1 with a bootstrap 95% confidence interval;
* for every pair, the difference in accuracy and macro-F1 with a **paired** bootstrap 95% CI (both
  models are scored on the same resampled examples, so the noise of the test set cancels out), and
  McNemar's test on the examples where exactly one of the two is right (exact binomial when there are
  fewer than 25 such examples, chi-square with continuity correction otherwise), Holm-adjusted when
  there are several pairs;
* for candidates whose params differ only by ``base.seed``: mean +- std across the seeds.

A difference is called significant only when its CI excludes 0; the report says so plainly either way.
The bootstrap is seeded, so the same inputs give the same report.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lmpipe import tasks
from lmpipe.errors import UserError

if TYPE_CHECKING:
    from lmpipe.tasks.base import Task

METRICS = ("accuracy", "macro_f1")
SEED_KEY = "base.seed"
# params that do not change the model, so runs differing only in them still count as the same setting
IGNORED_PREFIXES = ("mlflow.",)
EXACT_BELOW = 25  # discordant pairs under which McNemar's test uses the exact binomial distribution
CHUNK = 256  # bootstrap resamples drawn at a time (bounds memory on large test sets)


@dataclass
class Candidate:
    """One model's test predictions and the params that produced it."""

    label: str  # how the report names it (the DVC experiment name, a git rev, or "run:<id>")
    source: str  # where it came from, for the reader
    predictions: pd.DataFrame  # reports/evaluate/predictions.csv: id, actual, predicted, ...
    params: dict[str, str] = field(default_factory=dict)  # flattened, values as strings; {} = unknown
    run_id: str = ""  # the evaluate MLflow run, when known
    task: str = tasks.CLASSIFICATION  # what its evaluate report records (lmpipe.tasks): how rows are scored


def aligned(
    candidates: Sequence[Candidate], unpaired: bool = False, task: Task | None = None
) -> tuple[list[np.ndarray], list[np.ndarray], list[str], bool]:
    """Encode the candidates' predictions (true labels, predicted labels; rows ordered by example id).

    Returns ``(truths, predictions, classes, paired)``. ``paired`` is True when all were made on the
    same examples with the same true labels. Otherwise it raises ``UserError``, unless ``unpaired``.
    An example is what ``task.paired_rows`` makes a row of (a text, or a sentence from its words).
    """
    task = task or candidates_task(candidates)
    if len(candidates) < 2:
        raise UserError(f"compare needs at least two experiments or runs, got {len(candidates)}")
    labels = [c.label for c in candidates]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise UserError(f"compare: {', '.join(dupes)} given more than once")
    frames = []
    for c in candidates:
        missing = {"id", "actual", "predicted"} - set(c.predictions.columns)
        if missing:
            raise UserError(f"{c.label}: predictions lack column(s) {', '.join(sorted(missing))}")
        frame = task.paired_rows(c.predictions)
        frame = frame[["id", "actual", "predicted"]].astype(str)
        if frame["id"].duplicated().any():
            raise UserError(f"{c.label}: predictions repeat example ids")
        frames.append(frame.sort_values("id", kind="stable").reset_index(drop=True))
    ref = frames[0]
    mismatch = ""
    for c, frame in zip(candidates[1:], frames[1:], strict=True):
        if len(frame) != len(ref) or not frame["id"].equals(ref["id"]):
            mismatch = (
                f"predictions are on different test sets: {candidates[0].label} has {len(ref)} examples, "
                f"{c.label} has {len(frame)}, and {len(set(frame['id']) ^ set(ref['id']))} ids differ"
            )
        elif not frame["actual"].equals(ref["actual"]):
            n = int((frame["actual"] != ref["actual"]).sum())
            mismatch = (
                f"predictions are on different test sets: {n} examples have different true labels "
                f"in {candidates[0].label} and {c.label}"
            )
        if mismatch:
            break
    if mismatch and not unpaired:
        seeds = {c.params.get(SEED_KEY) for c in candidates}
        hint = (
            " (base.seed also draws the sample and the split: add --unpaired to compare the settings by "
            "their mean over seeds, without paired tests)"
            if len(seeds) > 1 and None not in seeds
            else ""
        )
        raise UserError(mismatch + hint)
    classes = sorted(set().union(*(set(f["actual"]) | set(f["predicted"]) for f in frames)))
    code = {name: i for i, name in enumerate(classes)}
    truths = [f["actual"].map(code).to_numpy() for f in frames]
    preds = [f["predicted"].map(code).to_numpy() for f in frames]
    return truths, preds, classes, not mismatch


def candidates_task(candidates: Sequence[Candidate]) -> Task:
    """The one task all ``candidates`` were evaluated on (a one-line error if they differ)."""
    names = {c.task for c in candidates}
    if len(names) > 1:
        raise UserError(f"compare: the runs are of different tasks ({', '.join(sorted(names))})")
    task = tasks.get(names.pop() if names else tasks.CLASSIFICATION)
    if "compare" not in task.supports:
        raise UserError(
            f"compare: not yet for {task.name}: its paired tests are on class labels; compare the runs' "
            "test scores and CIs with `dvc exp show` (or `dvc metrics diff`)"
        )
    return task


def weighted_scores(weights: np.ndarray, y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict:
    """Accuracy and macro-F1 of ``pred`` for each row of ``weights`` (how often each example is drawn).

    Macro-F1 averages over the classes present in the (resampled) truth or predictions, with 0 for a
    class never predicted right: the same as ``sklearn.metrics.f1_score(average="macro")`` and
    ``lmpipe.metrics.classification_metrics``.
    """
    weights = np.atleast_2d(weights).astype(np.float64)
    correct = (y == pred).astype(np.float64)
    total = weights.sum(axis=1)
    f1_sum = np.zeros(len(weights))
    present = np.zeros(len(weights))
    for c in range(n_classes):
        is_true, is_pred = y == c, pred == c
        tp = weights @ (is_true & is_pred).astype(np.float64)
        fp = weights @ (~is_true & is_pred).astype(np.float64)
        fn = weights @ (is_true & ~is_pred).astype(np.float64)
        denom = 2 * tp + fp + fn
        f1_sum += np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
        present += denom > 0
    return {
        "accuracy": weights @ correct / total,
        "macro_f1": np.divide(f1_sum, present, out=np.zeros_like(f1_sum), where=present > 0),
    }


def bootstrap_weights(n: int, resamples: int, seed: int):
    """Yield blocks of resampling weights (rows: resamples, columns: how often each example is drawn)."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < resamples:
        size = min(CHUNK, resamples - done)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=size)
        done += size


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's test of equal accuracy on paired predictions.

    ``a_only``/``b_only`` count the examples only A (only B) gets right. Exact two-sided binomial test
    when they total fewer than 25, else the chi-square statistic with continuity correction.
    """
    from scipy.stats import binomtest, chi2

    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "method": "exact binomial", "statistic": None, "p_value": 1.0}
    if n < EXACT_BELOW:
        p = binomtest(a_only, n, 0.5, alternative="two-sided").pvalue
        return {
            "a_only": a_only,
            "b_only": b_only,
            "method": "exact binomial",
            "statistic": None,
            "p_value": float(min(1.0, p)),
        }
    stat = (abs(a_only - b_only) - 1) ** 2 / n
    return {
        "a_only": a_only,
        "b_only": b_only,
        "method": "chi-square, continuity-corrected",
        "statistic": float(stat),
        "p_value": float(chi2.sf(stat, df=1)),
    }


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (controls the family-wise error over all pairs)."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def seed_groups(candidates: Sequence[Candidate]) -> list[list[int]]:
    """Indices of candidates whose known params are identical except ``base.seed``, seeds distinct;
    only groups of two or more."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(candidates):
        if not c.params or SEED_KEY not in c.params:
            continue
        key = tuple(
            sorted(
                (k, v) for k, v in c.params.items() if k != SEED_KEY and not k.startswith(IGNORED_PREFIXES)
            )
        )
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        seeds = [candidates[i].params[SEED_KEY] for i in members]
        if len(members) >= 2 and len(set(seeds)) == len(seeds):
            out.append(members)
    return out


def differing_params(candidates: Sequence[Candidate], members: Sequence[int] | None = None) -> list[str]:
    """The params keys whose values differ among the given candidates (all of them by default)."""
    chosen = [candidates[i] for i in (members if members is not None else range(len(candidates)))]
    chosen = [c for c in chosen if c.params]
    keys = sorted(set().union(*(c.params for c in chosen))) if chosen else []
    return [
        k
        for k in keys
        if not k.startswith(IGNORED_PREFIXES) and len({c.params.get(k, "(absent)") for c in chosen}) > 1
    ]


def compare(
    candidates: Sequence[Candidate],
    resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    unpaired: bool = False,
) -> dict[str, Any]:
    """All the numbers of the report, as a JSON-able dict.

    ``unpaired=True`` accepts models scored on different test sets (runs with another ``base.seed``
    draw another split): each model then gets its own CI, settings are compared by their mean over
    seeds (Welch's t-test), and there are no paired tests, since no example is shared.
    """
    if resamples < 100:
        raise UserError(f"--resamples must be >= 100, got {resamples}")
    if not 0 < alpha < 0.5:
        raise UserError(f"--alpha must be between 0 and 0.5, got {alpha}")
    task = candidates_task(candidates)
    truths, preds, classes, paired = aligned(candidates, unpaired, task)
    score, classes = task.bootstrap_scorer(truths, preds, classes, METRICS)
    point = [{m: float(v[0]) for m, v in score(i, np.ones(len(y))).items()} for i, y in enumerate(truths)]

    # paired: one set of resamples for every candidate, so single CIs and differences share them;
    # unpaired: each candidate resamples its own test set (same seed, so still reproducible)
    draws: list[dict[str, list[np.ndarray]]] = [{m: [] for m in METRICS} for _ in preds]
    if paired:
        for w in bootstrap_weights(len(truths[0]), resamples, seed):
            for i in range(len(preds)):
                for m, v in score(i, w).items():
                    draws[i][m].append(v)
    else:
        for i, y in enumerate(truths):
            for w in bootstrap_weights(len(y), resamples, seed):
                for m, v in score(i, w).items():
                    draws[i][m].append(v)
    samples = [{m: np.concatenate(d[m]) for m in METRICS} for d in draws]
    y = truths[0]
    lo_q, hi_q = 100 * alpha / 2, 100 * (1 - alpha / 2)

    runs = []
    for c, pt, s in zip(candidates, point, samples, strict=True):
        runs.append(
            {
                "label": c.label,
                "source": c.source,
                "run_id": c.run_id,
                "seed": c.params.get(SEED_KEY),
                **{
                    m: {
                        "value": pt[m],
                        "ci": [float(np.percentile(s[m], lo_q)), float(np.percentile(s[m], hi_q))],
                    }
                    for m in METRICS
                },
            }
        )

    pairs = []
    for i, j in itertools.combinations(range(len(candidates)) if paired else (), 2):
        entry: dict[str, Any] = {"a": candidates[i].label, "b": candidates[j].label}
        for m in METRICS:
            diff = samples[j][m] - samples[i][m]
            lo, hi = float(np.percentile(diff, lo_q)), float(np.percentile(diff, hi_q))
            entry[m] = {
                "diff": point[j][m] - point[i][m],
                "ci": [lo, hi],
                "significant": bool(lo > 0 or hi < 0),
            }
        entry["mcnemar"] = mcnemar(y == preds[i], y == preds[j])
        pairs.append(entry)
    for entry, adj in zip(pairs, holm([e["mcnemar"]["p_value"] for e in pairs]), strict=True):
        entry["mcnemar"]["p_holm"] = adj
        entry["mcnemar"]["significant"] = bool(adj < alpha)

    groups = []
    for members in seed_groups(candidates):
        values = {m: np.array([point[i][m] for i in members]) for m in METRICS}
        groups.append(
            {
                "members": [candidates[i].label for i in members],
                "seeds": [candidates[i].params[SEED_KEY] for i in members],
                **{m: {"mean": float(v.mean()), "std": float(v.std(ddof=1))} for m, v in values.items()},
                "_values": {m: v.tolist() for m, v in values.items()},
            }
        )
    setting_diffs = _between_settings(groups, alpha)
    for g in groups:
        del g["_values"]

    return {
        "task": task.name,
        "paired": paired,
        "test_examples": len(y) if paired else [len(t) for t in truths],
        "classes": classes,
        "resamples": resamples,
        "seed": seed,
        "alpha": alpha,
        "confidence": 1 - alpha,
        "differing_params": differing_params(candidates),
        "runs": runs,
        "pairs": pairs,
        "seed_groups": groups,
        "between_settings": setting_diffs,
    }


def _between_settings(groups: list[dict], alpha: float) -> list[dict]:
    """Each pair of seed groups (two settings): difference of the means over seeds, Welch's t-test."""
    from scipy.stats import ttest_ind

    out = []
    for ga, gb in itertools.combinations(groups, 2):
        entry: dict[str, Any] = {"a": ga["members"], "b": gb["members"]}
        for m in METRICS:
            a, b = np.array(ga["_values"][m]), np.array(gb["_values"][m])
            p = float(ttest_ind(b, a, equal_var=False).pvalue)
            entry[m] = {
                "diff": float(b.mean() - a.mean()),
                "p_value": None if np.isnan(p) else p,
                "significant": bool(not np.isnan(p) and p < alpha),
            }
        out.append(entry)
    return out


# ------------------------------------------------------------- the model against the baseline (evaluate, export)
def predictions_frame(test: pd.DataFrame, proba: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """One row per test example: id, actual, predicted, correct and each class's probability."""
    y_pred = proba.argmax(axis=1)
    frame = pd.DataFrame(
        {
            "id": test["id"].to_numpy(),
            "actual": test["label"].to_numpy(),
            "predicted": [names[i] for i in y_pred],
        }
    )
    frame["correct"] = frame["actual"] == frame["predicted"]
    for j, name in enumerate(names):
        frame[f"p_{name}"] = np.round(proba[:, j], 6)
    return frame


def versus_baseline(model: pd.DataFrame, baseline: pd.DataFrame, seed: int) -> dict:
    """Is the model's lead over the baseline (or its deficit) real, or test-set noise?

    Takes both ``predictions_frame``s on the same test split. Returns the difference (model minus
    baseline) in accuracy and macro-F1 with its paired bootstrap 95% CI, and McNemar's test on the texts
    exactly one of the two gets right: ``lmpipe.experiments.compare``, the code of ``lmpipe compare``. Flat keys, so
    that ``dvc metrics show`` and ``dvc metrics diff`` list them. With ~200 test texts one error is
    ~0.5 pt, so a gap of a few texts is usually not significant, and the metrics should say so.
    """
    result = compare(
        [Candidate("baseline", "evaluate", baseline), Candidate("model", "evaluate", model)], seed=seed
    )
    pair = result["pairs"][0]
    out: dict = {}
    for m in ("accuracy", "macro_f1"):
        low, high = pair[m]["ci"]
        out.update({m: pair[m]["diff"], f"{m}_ci95_low": low, f"{m}_ci95_high": high})
    out["macro_f1_significant"] = pair["macro_f1"]["significant"]
    out["model_only_right"] = pair["mcnemar"]["b_only"]
    out["baseline_only_right"] = pair["mcnemar"]["a_only"]
    out["mcnemar_p"] = pair["mcnemar"]["p_value"]
    return out


# ------------------------------------------------------------- one setting over several seeded splits
def across_splits(
    models: Sequence[Candidate],
    baselines: Sequence[Candidate],
    resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The yardstick that is not one split: the same setting run on k seeded splits (``base.seed``), each
    model with the baseline evaluate trained on the same split (``baselines[i]`` pairs ``models[i]``).

    * per split: model and baseline macro-F1 and accuracy, and their paired difference with its
      bootstrap CI and McNemar's test (``compare`` on the pair, as evaluate reports it);
    * across splits: mean +- std of model and baseline (``compare``'s seed statistics, unpaired, with
      Welch's t-test between the two), and the mean paired difference with a t-interval over the k
      per-split differences (df = k - 1): the split-to-split spread, not one test set's noise.
    """
    from scipy.stats import t as student_t

    if len(models) != len(baselines):
        raise ValueError(f"{len(models)} models but {len(baselines)} baselines")
    if len(models) < 2:
        raise UserError(f"splits needs at least two runs on different seeds, got {len(models)}")
    seeds = [m.params.get(SEED_KEY) for m in models]
    if None in seeds or len(set(seeds)) != len(seeds):
        raise UserError(
            f"splits needs runs that differ in base.seed (one split each); got seeds {seeds} for "
            f"{', '.join(m.label for m in models)}"
        )
    others = differing_params(models)
    if [k for k in others if k != SEED_KEY]:
        raise UserError(
            f"splits needs one setting over several seeds, but the runs also differ in "
            f"{', '.join(k for k in others if k != SEED_KEY)} (use `lmpipe compare --unpaired` for settings)"
        )

    def marked(c: Candidate, who: str) -> Candidate:  # one label and setting per predictor
        return Candidate(
            f"{c.label} ({who})", c.source, c.predictions, {**c.params, "predictor": who}, c.run_id, c.task
        )

    splits = []
    for model, baseline in zip(models, baselines, strict=True):
        pair = compare([marked(baseline, "baseline"), marked(model, "model")], resamples, seed, alpha)
        entry = {"run": model.label, "seed": model.params[SEED_KEY], "test_examples": pair["test_examples"]}
        for m in METRICS:
            entry[m] = {
                "model": pair["runs"][1][m]["value"],
                "baseline": pair["runs"][0][m]["value"],
                "diff": pair["pairs"][0][m]["diff"],
                "ci": pair["pairs"][0][m]["ci"],
                "significant": pair["pairs"][0][m]["significant"],
            }
        entry["mcnemar_p"] = pair["pairs"][0]["mcnemar"]["p_value"]
        splits.append(entry)

    # compare's seed statistics: the models form one seed group, the baselines another
    both = [marked(c, "baseline") for c in baselines] + [marked(c, "model") for c in models]
    unpaired = compare(both, resamples=resamples, seed=seed, alpha=alpha, unpaired=True)
    groups = {g["members"][0].rsplit("(", 1)[1].rstrip(")"): g for g in unpaired["seed_groups"]}
    k = len(models)
    summary: dict[str, Any] = {"splits": k, "seeds": seeds}
    for m in METRICS:
        diffs = np.array([s[m]["diff"] for s in splits])
        half = float(student_t.ppf(1 - alpha / 2, k - 1) * diffs.std(ddof=1) / np.sqrt(k))
        low, high = float(diffs.mean() - half), float(diffs.mean() + half)
        between = unpaired["between_settings"][0][m] if unpaired["between_settings"] else {}
        summary[m] = {
            "model": groups["model"][m],
            "baseline": groups["baseline"][m],
            "diff": {
                "mean": float(diffs.mean()),
                "std": float(diffs.std(ddof=1)),
                "ci": [low, high],
                "significant": bool(low > 0 or high < 0),
                "welch_p": between.get("p_value"),
            },
            "model_ahead_on": int((diffs > 0).sum()),
        }
    return {
        "confidence": 1 - alpha,
        "resamples": resamples,
        "seed": seed,
        "per_split": splits,
        "summary": summary,
    }
