"""Where does a predictor fail? Macro-F1 by text-length bucket and F1 by class, each with a 95% bootstrap
CI (the resampling of ``lmpipe.experiments.compare``), for the model and the baseline side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from lmpipe.experiments.compare import bootstrap_weights, weighted_scores


def _ci(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _macro_f1_ci(y: np.ndarray, pred: np.ndarray, n_classes: int, resamples: int, seed: int) -> dict:
    point = float(weighted_scores(np.ones(len(y)), y, pred, n_classes)["macro_f1"][0])
    draws = np.concatenate(
        [
            weighted_scores(w, y, pred, n_classes)["macro_f1"]
            for w in bootstrap_weights(len(y), resamples, seed)
        ]
    )
    low, high = _ci(draws)
    return {"macro_f1": point, "ci95_low": low, "ci95_high": high}


def by_length(
    lengths: np.ndarray,
    y: np.ndarray,
    preds: Mapping[str, np.ndarray],
    n_classes: int,
    max_length: int,
    edges: Sequence[float],
    resamples: int,
    seed: int,
) -> pd.DataFrame:
    """One row per length bucket (in tokens, edges given as multiples of ``max_length``) and predictor.
    Empty buckets are left out."""
    rows = []
    for bucket, inside in length_buckets(lengths, max_length, edges):
        for name, pred in preds.items():
            rows.append(
                {
                    **bucket,
                    "predictor": name,
                    "texts": int(inside.sum()),
                    **_macro_f1_ci(y[inside], pred[inside], n_classes, resamples, seed),
                }
            )
    return pd.DataFrame(rows)


def length_buckets(lengths: np.ndarray, max_length: int, edges: Sequence[float]):
    """Yield each non-empty length bucket (``bucket``, ``min_tokens``, ``max_tokens``; edges as multiples
    of ``max_length``) and the mask of the rows in it."""
    bounds = [0, *[e * max_length for e in edges], np.inf]
    for low, high in zip(bounds[:-1], bounds[1:], strict=True):
        inside = (lengths > low) & (lengths <= high)
        if not inside.any():
            continue
        label = (
            f"<= {int(high)}"
            if low == 0
            else (f"> {int(low)}" if np.isinf(high) else f"{int(low) + 1}-{int(high)}")
        )
        yield (
            {
                "bucket": label,
                "min_tokens": int(low) + 1,
                "max_tokens": None if np.isinf(high) else int(high),
            },
            inside,
        )


def by_class(
    y: np.ndarray, preds: Mapping[str, np.ndarray], names: Sequence[str], resamples: int, seed: int
) -> pd.DataFrame:
    """F1 of each class with its CI (texts resampled as a whole), per predictor."""
    rows = []
    for name, pred in preds.items():
        draws = {c: [] for c in range(len(names))}
        for w in bootstrap_weights(len(y), resamples, seed):
            w = w.astype(np.float64)
            for c in range(len(names)):
                tp = w @ ((y == c) & (pred == c))
                denom = 2 * tp + w @ ((y != c) & (pred == c)) + w @ ((y == c) & (pred != c))
                draws[c].append(np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0))
        for c, label in enumerate(names):
            tp = np.sum((y == c) & (pred == c))
            denom = 2 * tp + np.sum((y != c) & (pred == c)) + np.sum((y == c) & (pred != c))
            low, high = _ci(np.concatenate(draws[c]))
            rows.append(
                {
                    "class": label,
                    "predictor": name,
                    "texts": int(np.sum(y == c)),
                    "f1": float(2 * tp / denom) if denom else 0.0,
                    "ci95_low": low,
                    "ci95_high": high,
                }
            )
    return pd.DataFrame(rows)
