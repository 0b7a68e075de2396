"""Classification metrics, the same code for val (during training) and test (in evaluate)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    auc,
    classification_report,
    confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_curve,
)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, and macro and weighted precision/recall/F1 (zero_division=0: a never-predicted class
    scores 0 rather than raising)."""
    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        out.update(
            {f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)}
        )
    return out


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str]) -> dict[str, dict]:
    report = classification_report(
        y_true,
        y_pred,
        labels=list(range(len(names))),
        target_names=list(names),
        output_dict=True,
        zero_division=0,
    )
    return {name: {k: float(v) for k, v in report[name].items()} for name in names}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def one_vs_rest_curves(y_true: np.ndarray, proba: np.ndarray, names: Sequence[str]) -> dict[str, dict]:
    """Per class: ROC points (fpr, tpr) with AUC, and precision-recall points with average precision."""
    curves = {}
    for k, name in enumerate(names):
        positive = (y_true == k).astype(int)
        if positive.sum() == 0 or positive.sum() == len(positive):
            continue  # a curve needs both positives and negatives
        fpr, tpr, _ = roc_curve(positive, proba[:, k])
        precision, recall, _ = precision_recall_curve(positive, proba[:, k])
        curves[name] = {
            "fpr": fpr,
            "tpr": tpr,
            "roc_auc": float(auc(fpr, tpr)),
            "precision": precision,
            "recall": recall,
            "pr_auc": float(auc(recall, precision)),
        }
    return curves
