"""Text classification's evaluation (evaluate, analyze's baseline): the model's class probabilities, the
TF-IDF + logistic-regression baseline (``lmpipe.evaluation``), their scores, the paired comparison, the
tables and the plots."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from lmpipe import data
from lmpipe.tasks.base import Baseline, Predictions


class TfidfBaseline(Baseline):
    title = "TF-IDF + LR"

    def __init__(self, pipeline, labels: list[str]):
        self.pipeline, self.labels = pipeline, labels

    def unit_proba_of_texts(self, texts: list[str]) -> np.ndarray:
        from lmpipe.evaluation import aligned_proba

        return aligned_proba(self.pipeline, texts, self.labels)

    def unit_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return self.unit_proba_of_texts(frame["text"].tolist())

    def predict(self, frame: pd.DataFrame) -> Predictions:
        return _predictions(self.unit_proba(frame), self.labels)


def _predictions(proba: np.ndarray, labels: list[str]) -> Predictions:
    best = proba.argmax(axis=1)
    return Predictions(
        labels=list(labels),
        predicted=[labels[i] for i in best],
        confidence=proba[np.arange(len(best)), best].tolist(),
        proba=proba,
    )


def predict(model_dir, frame, max_length, batch_size, desc=None):
    from lmpipe.modeling.inference import predict_proba

    proba, names = predict_proba(model_dir, frame["text"].tolist(), max_length, batch_size, desc=desc)
    # a test label the model has no class for is an error, before anything is scored
    data.encode_labels(frame["label"], data.model_label2id(names), f"the model in {model_dir}")
    return _predictions(proba, names)


def fit_baseline(train, params, labels):
    from lmpipe.evaluation import fit_baseline

    return TfidfBaseline(fit_baseline(train, params.evaluate.baseline, params.base.seed), list(labels))


def score(frame, pred):
    from lmpipe.evaluation import score

    y_true = data.encode_labels(frame["label"], data.model_label2id(pred.labels), "the model's labels")
    return score(y_true, pred.proba, pred.labels)


def versus_baseline(frame, model, baseline, seed):
    from lmpipe.experiments.compare import predictions_frame, versus_baseline

    return versus_baseline(
        predictions_frame(frame, model.proba, model.labels),
        predictions_frame(frame, baseline.proba, baseline.labels),
        seed,
    )


def tables(frame, model, baseline):
    from lmpipe.evaluation import misclassified_frame
    from lmpipe.experiments.compare import predictions_frame

    ours = predictions_frame(frame, model.proba, model.labels)
    return {
        "predictions.csv": ours,
        "baseline_predictions.csv": predictions_frame(frame, baseline.proba, baseline.labels),
        "misclassified.csv": misclassified_frame(frame, ours),
    }


def plots(frame, model, baseline, scores: Mapping[str, dict]):
    from lmpipe import plots
    from lmpipe.evaluation import curve_frames

    ours, theirs, names = scores["model"], scores["baseline"], model.labels
    roc, pr = curve_frames(ours["curves"])
    tables = {f"roc/{n}": f for n, f in roc.items()} | {f"pr/{n}": f for n, f in pr.items()}
    figures = {
        "confusion_matrix": plots.confusion_figure(ours["confusion"], names, "Test confusion matrix"),
        "baseline_confusion_matrix": plots.confusion_figure(
            theirs["confusion"], names, "Baseline (TF-IDF + LR) confusion"
        ),
        "roc": plots.curves_figure(ours["curves"], "roc", "One-vs-rest ROC (test)"),
        "pr": plots.curves_figure(ours["curves"], "pr", "One-vs-rest precision-recall (test)"),
    }
    logged = {"test_roc_auc_": {n: c["roc_auc"] for n, c in ours["curves"].items()}}
    return tables, figures, logged


def evaluate_summary(scores: Mapping[str, Any]) -> str:
    m, b, d = scores["model"], scores["baseline"], scores["model_minus_baseline"]
    return (
        f"evaluate: model macro-F1 {m['macro_f1']:.4f} acc {m['accuracy']:.4f} | "
        f"baseline macro-F1 {b['macro_f1']:.4f} acc {b['accuracy']:.4f} | {scores['test_rows']} test rows\n"
        f"evaluate: model minus baseline {100 * d['macro_f1']:+.2f} pt macro-F1, 95% CI "
        f"[{100 * d['macro_f1_ci95_low']:+.2f}, {100 * d['macro_f1_ci95_high']:+.2f}] "
        f"({'significant' if d['macro_f1_significant'] else 'not significant'}); only the model right on "
        f"{d['model_only_right']} texts, only the baseline on {d['baseline_only_right']}, "
        f"McNemar p = {d['mcnemar_p']:.3f}"
    )


def bootstrap_scorer(truths, preds, classes, metrics):
    """``lmpipe compare``'s scorer: accuracy and macro-F1 over one label per text, under bootstrap weights."""
    from lmpipe.experiments.compare import weighted_scores

    k = len(classes)
    return (lambda i, w: weighted_scores(w, truths[i], preds[i], k)), classes
