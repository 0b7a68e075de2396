"""Scoring predictions against the truth, the TF-IDF baseline, and the evaluation tables (the model's own
predictions come from ``lmpipe.inference``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from lmpipe.compare import Candidate, compare
from lmpipe.metrics import classification_metrics, confusion, one_vs_rest_curves, per_class_report
from lmpipe.params import BaselineParams


def baseline_proba(
    train: pd.DataFrame, texts: Sequence[str], names: Sequence[str], cfg: BaselineParams, seed: int
) -> np.ndarray:
    """TF-IDF (sublinear tf, word 1..n-grams) + multinomial logistic regression, fit on ``train``."""
    pipeline = make_pipeline(
        TfidfVectorizer(
            sublinear_tf=True,
            ngram_range=(1, cfg.ngram_max),
            max_features=cfg.max_features,
            min_df=1,
            strip_accents="unicode",
        ),
        LogisticRegression(C=cfg.C, max_iter=2000, random_state=seed),
    )
    pipeline.fit(train["text"].tolist(), train["label"].tolist())
    proba = pipeline.predict_proba(list(texts))
    # align the classifier's column order with the model's class order
    order = [list(pipeline.classes_).index(name) if name in pipeline.classes_ else -1 for name in names]
    aligned = np.zeros((len(texts), len(names)))
    for j, col in enumerate(order):
        if col >= 0:
            aligned[:, j] = proba[:, col]
    return aligned


def score(y_true: np.ndarray, proba: np.ndarray, names: Sequence[str]) -> dict:
    """Everything evaluate reports for one predictor."""
    y_pred = proba.argmax(axis=1)
    return {
        "metrics": classification_metrics(y_true, y_pred),
        "per_class": per_class_report(y_true, y_pred, names),
        "confusion": confusion(y_true, y_pred, len(names)),
        "curves": one_vs_rest_curves(y_true, proba, names),
        "y_pred": y_pred,
    }


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
    exactly one of the two gets right: ``lmpipe.compare``, the code of ``lmpipe compare``. Flat keys, so
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


def misclassified_frame(test: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    wrong = predictions[~predictions["correct"]].copy()
    wrong["confidence"] = [row[f"p_{row['predicted']}"] for _, row in wrong.iterrows()]
    wrong = wrong.merge(test[["id", "text"]], on="id", how="left")
    return wrong[["id", "actual", "predicted", "confidence", "text"]].sort_values(
        "confidence", ascending=False
    )


def curve_frames(curves: dict[str, dict]) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Per-class ROC and PR point tables, rounded so DVC plot files stay small and diff cleanly."""
    roc = {n: pd.DataFrame({"fpr": c["fpr"].round(5), "tpr": c["tpr"].round(5)}) for n, c in curves.items()}
    pr = {
        n: pd.DataFrame({"recall": c["recall"].round(5), "precision": c["precision"].round(5)})
        for n, c in curves.items()
    }
    return roc, pr
