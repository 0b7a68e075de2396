"""Where does a predictor fail? Macro-F1 by text-length bucket and F1 by class, each with a 95% bootstrap
CI (the resampling of ``lmpipe.compare``), for the model and the baseline side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from lmpipe.compare import bootstrap_weights, weighted_scores


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


# ------------------------------------------------------------- token classification (lmpipe.ner's scores)
def entity_scores_ci(
    counts: Mapping[str, np.ndarray], keys: Sequence[str], resamples: int, seed: int
) -> dict[str, float]:
    """``scores_from_counts`` (``keys`` of it) with a 95% bootstrap CI over sentences for each."""
    from lmpipe.ner import scores_from_counts

    point = scores_from_counts(counts)
    draws: dict[str, list] = {k: [] for k in keys}
    for weights in bootstrap_weights(len(counts["words"]), resamples, seed):
        scores = scores_from_counts(counts, weights)
        for k in keys:
            draws[k].append(scores[k])
    out = {}
    for k in keys:
        low, high = np.percentile(np.concatenate(draws[k]), [2.5, 97.5])
        out.update({k: float(point[k]), f"{k}_ci95_low": float(low), f"{k}_ci95_high": float(high)})
    return out


def entities_by_length(
    lengths: np.ndarray,
    true: Sequence[Sequence[str]],
    preds: Mapping[str, Sequence[Sequence[str]]],
    max_length: int,
    edges: Sequence[float],
    resamples: int,
    seed: int,
) -> pd.DataFrame:
    """Entity micro and macro F1 with CIs per sentence-length bucket (subword tokens, edges as multiples
    of ``max_length``: past 1.0 the words beyond ``max_length`` are not read) and predictor: token
    classification's ``by_length``."""
    from lmpipe.ner import entity_spans, sentence_counts

    types = sorted({t for tags in true for t, _, _ in entity_spans(tags)})
    rows = []
    for bucket, mask in length_buckets(lengths, max_length, edges):
        inside = np.flatnonzero(mask)
        for name, pred in preds.items():
            counts = sentence_counts([true[i] for i in inside], [pred[i] for i in inside], types)
            rows.append(
                {
                    **bucket,
                    "predictor": name,
                    "texts": len(inside),
                    "entities": int(counts["true"].sum()),
                    **entity_scores_ci(counts, ("f1", "macro_f1"), resamples, seed),
                }
            )
    return pd.DataFrame(rows)


def entities_by_type(
    true: Sequence[Sequence[str]], preds: Mapping[str, Sequence[Sequence[str]]], resamples: int, seed: int
) -> pd.DataFrame:
    """Each entity type's F1 with its CI (sentences resampled as a whole), per predictor: token
    classification's ``by_class``."""
    from lmpipe.ner import entity_spans, sentence_counts

    types = sorted({t for tags in true for t, _, _ in entity_spans(tags)})
    rows = []
    for name, pred in preds.items():
        counts = sentence_counts(true, pred, types)
        for j, kind in enumerate(types):
            one = {k: (v[:, [j]] if v.ndim == 2 else v) for k, v in counts.items()}
            rows.append(
                {
                    "class": kind,
                    "predictor": name,
                    "support": int(one["true"].sum()),
                    **entity_scores_ci(one, ("f1",), resamples, seed),
                }
            )
    return pd.DataFrame(rows)
