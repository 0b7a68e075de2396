"""Scoring predictions against the truth, the TF-IDF baseline, and the evaluation tables (the model's own
predictions come from ``lmpipe.modeling.inference``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline

from lmpipe.metrics import classification_metrics, confusion, one_vs_rest_curves, per_class_report
from lmpipe.params import BaselineParams


def fit_baseline(train: pd.DataFrame, cfg: BaselineParams, seed: int) -> Pipeline:
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
    return pipeline.fit(train["text"].tolist(), train["label"].tolist())


def aligned_proba(pipeline: Pipeline, texts: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """The fitted baseline's class probabilities for ``texts``, columns in the model's class order."""
    proba = pipeline.predict_proba(list(texts))
    order = [list(pipeline.classes_).index(name) if name in pipeline.classes_ else -1 for name in names]
    aligned = np.zeros((len(texts), len(names)))
    for j, col in enumerate(order):
        if col >= 0:
            aligned[:, j] = proba[:, col]
    return aligned


def baseline_proba(
    train: pd.DataFrame, texts: Sequence[str], names: Sequence[str], cfg: BaselineParams, seed: int
) -> np.ndarray:
    """The baseline fit on ``train``, its probabilities for ``texts`` (the model's class order)."""
    return aligned_proba(fit_baseline(train, cfg, seed), texts, names)


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
