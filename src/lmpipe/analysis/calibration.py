"""Are the probabilities honest? Expected calibration error, the Brier score, reliability tables, and
temperature scaling (Guo et al., 2017): one scalar T fit on val, logits / T at serving time.

Temperature scaling never changes a prediction (argmax of logits / T is argmax of logits), only how sure
the model says it is. The fitted T is written beside the model and applied wherever probabilities are
served: the ONNX classifier (``classifier.json``), the MLflow pyfunc model and ``lmpipe predict``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from lmpipe.serve.serving import softmax as serving_softmax

# T is fit as exp(t), t in this range: T from ~0.02 to ~55, far beyond what a sane model needs
_LOG_T_BOUNDS = (-4.0, 4.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) in float64: the served classifier's softmax (``serving.softmax``), so analysis
    and serving compute calibrated probabilities with one function."""
    return serving_softmax(np.asarray(logits, dtype=np.float64) / temperature)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / T)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 that minimises the NLL of ``y`` under softmax(logits / T): deterministic (a bounded
    scalar search), rounded to 4 decimals so the same logits always write the same bytes."""
    result = minimize_scalar(
        lambda t: nll(logits, y, float(np.exp(t))),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return round(float(np.exp(result.x)), 4)


def reliability(proba: np.ndarray, y: np.ndarray, bins: int) -> pd.DataFrame:
    """Top-label reliability table: per equal-width confidence bin, how sure the predictor said it was
    (mean confidence) against how often it was right (accuracy)."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        rows.append(
            {
                "bin": b,
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": n,
                "confidence": float(confidence[inside].mean()) if n else float("nan"),
                "accuracy": float(correct[inside].mean()) if n else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def ece(proba: np.ndarray, y: np.ndarray, bins: int) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
    table = reliability(proba, y, bins)
    used = table[table["count"] > 0]
    return float((used["count"] * (used["accuracy"] - used["confidence"]).abs()).sum() / len(y))


def brier(proba: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over texts of the squared distance to the one-hot truth (0 best, 2 worst)."""
    onehot = np.eye(proba.shape[1])[y]
    return float(((proba - onehot) ** 2).sum(axis=1).mean())


def summary(proba: np.ndarray, y: np.ndarray, bins: int) -> dict[str, float]:
    return {
        "ece": ece(proba, y, bins),
        "brier": brier(proba, y),
        "nll": nll(np.log(np.clip(proba, 1e-12, 1)), y),
    }
