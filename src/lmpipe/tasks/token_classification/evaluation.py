"""Token classification's evaluation (evaluate, analyze's baseline, export's gate, ``lmpipe compare``): the
CRF baseline over hand-written word features (sklearn-crfsuite), the entity scores of both, their paired
comparison over sentences (bootstrap CIs, McNemar on whole-sentence correctness) and the tables."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmpipe.errors import UserError
from lmpipe.params import CrfParams
from lmpipe.tasks.base import Baseline, Predictions
from lmpipe.tasks.token_classification import (
    entities_text,
    entity_spans,
    predict_words,
    scores_from_counts,
    sentence_counts,
)


def word_features(tokens: Sequence[str], i: int) -> dict[str, Any]:
    """Hand-written features of word ``i`` and its neighbours, for the CRF baseline."""

    def of(word: str, prefix: str) -> dict[str, Any]:
        shape = re.sub(r"[A-Z]+", "X", re.sub(r"[a-z]+", "x", re.sub(r"[0-9]+", "d", word)))
        return {
            f"{prefix}lower": word.lower(),
            f"{prefix}title": word.istitle(),
            f"{prefix}upper": word.isupper(),
            f"{prefix}shape": shape[:6],
        }

    word = tokens[i]
    features: dict[str, Any] = {
        "bias": 1.0,
        **of(word, ""),
        "suffix3": word[-3:].lower(),
        "suffix2": word[-2:].lower(),
        "prefix3": word[:3].lower(),
        "digit": word.isdigit(),
        "mention": word.startswith("@"),
        "hashtag": word.startswith("#"),
        "url": word.lower().startswith(("http", "www.")),
        "length": min(len(word), 10),
    }
    features.update(of(tokens[i - 1], "-1:") if i > 0 else {"BOS": True})
    features.update(of(tokens[i + 1], "+1:") if i + 1 < len(tokens) else {"EOS": True})
    return features


def sentence_features(tokens: Sequence[str]) -> list[dict[str, Any]]:
    return [word_features(tokens, i) for i in range(len(tokens))]


def fit_crf(train: pd.DataFrame, cfg: CrfParams):
    """A linear-chain CRF (L-BFGS, elastic-net ``c1``/``c2``) on hand-written word features, fit on
    ``train``: the classic NER baseline. Deterministic: L-BFGS from zero weights."""
    import sklearn_crfsuite

    crf = sklearn_crfsuite.CRF(
        algorithm="lbfgs",
        c1=cfg.c1,
        c2=cfg.c2,
        max_iterations=cfg.max_iterations,
        all_possible_transitions=True,
    )
    crf.fit([sentence_features(list(t)) for t in train["tokens"]], [list(t) for t in train["tags"]])
    return crf


def crf_tags(crf, frame: pd.DataFrame) -> tuple[list[list[str]], list[np.ndarray]]:
    """The CRF's tag per word and that tag's marginal probability."""
    features = [sentence_features(list(t)) for t in frame["tokens"]]
    tags = crf.predict(features)
    marginals = crf.predict_marginals(features)
    scores = [np.array([m[w][t] for w, t in enumerate(s)]) for s, m in zip(tags, marginals, strict=True)]
    return [list(t) for t in tags], scores


def crf_marginals(crf, frame: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """The CRF's marginal probability of every tag (columns in ``names`` order; 0 for a tag it never saw
    in train), for every word of every sentence, stacked: ``[words, tags]``."""
    features = [sentence_features(list(t)) for t in frame["tokens"]]
    rows = [[m.get(name, 0.0) for name in names] for s in crf.predict_marginals(features) for m in s]
    return np.array(rows, dtype=np.float64).reshape(-1, len(names))


class CrfBaseline(Baseline):
    title = "CRF"

    def __init__(self, crf, labels: list[str]):
        self.crf, self.labels = crf, labels

    def predict(self, frame: pd.DataFrame) -> Predictions:
        tags, proba = crf_tags(self.crf, frame)
        return Predictions(labels=self.labels, predicted=tags, confidence=proba)

    def unit_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return crf_marginals(self.crf, frame, self.labels)


def tags_from_predictions(predictions: pd.DataFrame, frame: pd.DataFrame) -> list[list[str]]:
    """Each sentence of ``frame`` tagged as a ``predictions_frame`` (one row per word) says, in order."""
    by_id = {
        str(sid): rows.sort_values("position")["predicted"].astype(str).tolist()
        for sid, rows in predictions.groupby("id")
    }
    missing = [str(sid) for sid in frame["id"] if str(sid) not in by_id]
    if missing:
        raise UserError(
            f"predictions: no rows for sentence id {missing[0]} of the split ({len(missing)} missing)"
        )
    return [by_id[str(sid)] for sid in frame["id"]]


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A ``predictions_frame`` CSV, tags as written (``O``, ``B-NA``... never read as missing values)."""
    return pd.read_csv(path, dtype={"id": str, "predicted": str}, keep_default_na=False)


def predictions_frame(
    frame: pd.DataFrame, pred: Sequence[Sequence[str]], proba: Sequence[np.ndarray]
) -> pd.DataFrame:
    """One row per word: ``id`` (the sentence), ``position``, ``token``, ``actual``, ``predicted``,
    ``correct`` and ``p_predicted``; the sentences with an entity wrong first (most wrong first), then
    the rest in split order. Its actual and predicted columns make the tag confusion plot."""
    rows, order = [], []
    for k, (sid, tokens, tags) in enumerate(frame[["id", "tokens", "tags"]].itertuples(index=False)):
        gold, guess = set(entity_spans(tags)), set(entity_spans(pred[k]))
        order.append((-len(gold ^ guess), k))
        rows.append(
            pd.DataFrame(
                {
                    "id": sid,
                    "position": np.arange(len(tokens)),
                    "token": list(tokens),
                    "actual": list(tags),
                    "predicted": list(pred[k]),
                    "p_predicted": np.round(np.asarray(proba[k], dtype=float), 6),
                }
            )
        )
    frames = [rows[k] for _, k in sorted(order)]
    out = pd.concat(frames, ignore_index=True)
    out["correct"] = out["actual"] == out["predicted"]
    return out[["id", "position", "token", "actual", "predicted", "correct", "p_predicted"]]


def misclassified_frame(
    frame: pd.DataFrame, pred: Sequence[Sequence[str]], baseline: Sequence[Sequence[str]]
) -> pd.DataFrame:
    """The sentences whose entities the model gets wrong (a missed, spurious or mis-typed span), most
    errors first: the true entities, the model's and the baseline's, readable."""
    rows = []
    for k, (sid, tokens, tags, text) in enumerate(
        frame[["id", "tokens", "tags", "text"]].itertuples(index=False)
    ):
        gold, guess = set(entity_spans(tags)), set(entity_spans(pred[k]))
        if gold != guess:
            rows.append(
                {
                    "id": sid,
                    "errors": len(gold ^ guess),
                    "actual": entities_text(tokens, tags),
                    "predicted": entities_text(tokens, pred[k]),
                    "baseline": entities_text(tokens, baseline[k]),
                    "text": text,
                }
            )
    columns = ["id", "errors", "actual", "predicted", "baseline", "text"]
    return pd.DataFrame(rows, columns=columns).sort_values("errors", ascending=False, kind="stable")


def versus_baseline(
    true: Sequence[Sequence[str]],
    model: Sequence[Sequence[str]],
    baseline: Sequence[Sequence[str]],
    seed: int,
    resamples: int = 2000,
) -> dict:
    """Model minus baseline in entity micro-F1 (``f1``), macro-F1 and token accuracy, each with a paired
    bootstrap 95% CI over sentences (the same resamples for both), and McNemar's test on the sentences
    exactly one of the two tags wholly right. Keys as classification's, plus ``f1``'s."""
    from lmpipe.experiments.compare import bootstrap_weights, mcnemar

    types = sorted({t for seqs in (true, model, baseline) for tags in seqs for t, _, _ in entity_spans(tags)})
    ours, theirs = sentence_counts(true, model, types), sentence_counts(true, baseline, types)
    point = {
        k: scores_from_counts(ours)[k] - scores_from_counts(theirs)[k] for k in ("f1", "macro_f1", "accuracy")
    }
    diffs: dict[str, list] = {k: [] for k in point}
    for weights in bootstrap_weights(len(true), resamples, seed):
        a, b = scores_from_counts(ours, weights), scores_from_counts(theirs, weights)
        for k in diffs:
            diffs[k].append(a[k] - b[k])
    out: dict[str, Any] = {}
    for k, value in point.items():
        low, high = np.percentile(np.concatenate(diffs[k]), [2.5, 97.5])
        out.update({k: float(value), f"{k}_ci95_low": float(low), f"{k}_ci95_high": float(high)})
    out["macro_f1_significant"] = bool(out["macro_f1_ci95_low"] > 0 or out["macro_f1_ci95_high"] < 0)
    out["f1_significant"] = bool(out["f1_ci95_low"] > 0 or out["f1_ci95_high"] < 0)
    right_model = np.array([list(t) == list(p) for t, p in zip(true, model, strict=True)])
    right_base = np.array([list(t) == list(p) for t, p in zip(true, baseline, strict=True)])
    test = mcnemar(right_base, right_model)
    out.update(model_only_right=test["b_only"], baseline_only_right=test["a_only"], mcnemar_p=test["p_value"])
    return out


def bootstrap_scorer(
    truths: list[np.ndarray], preds: list[np.ndarray], classes: list[str], metrics: Sequence[str]
):
    """``lmpipe compare``'s scorer over sentences (``classes`` are the sentences' tag strings, joined by
    spaces): ``score(i, weights)`` gives candidate ``i``'s token accuracy and entity macro-F1 (seqeval's
    strict spans) for each row of ``weights``, from per-sentence counts; and the tags to report."""

    def tags(codes: np.ndarray) -> list[list[str]]:
        return [classes[c].split(" ") for c in codes]

    truth_tags = [tags(y) for y in truths]
    pred_tags = [tags(p) for p in preds]
    types = sorted(
        {kind for seqs in truth_tags + pred_tags for seq in seqs for kind, _, _ in entity_spans(seq)}
    )
    counts = [sentence_counts(y, p, types) for y, p in zip(truth_tags, pred_tags, strict=True)]

    def score(i: int, weights: np.ndarray) -> dict[str, np.ndarray]:
        scores = scores_from_counts(counts[i], np.atleast_2d(weights).astype(np.float64))
        return {m: scores[m] for m in metrics}

    return score, sorted({tag for seqs in truth_tags for seq in seqs for tag in seq})


def predict(model_dir, frame, max_length, batch_size, desc=None):
    from lmpipe.modeling import models

    model = models.load_model(model_dir).to(models.device())
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    tags, proba = predict_words(
        model, models.load_tokenizer(model_dir), list(frame["tokens"]), max_length, batch_size, desc=desc
    )
    return Predictions(labels=names, predicted=tags, confidence=proba)


def fit_baseline(train, params, labels):
    return CrfBaseline(fit_crf(train, params.evaluate.crf), list(labels))


def tables(frame, model, baseline):
    return {
        "predictions.csv": predictions_frame(frame, model.predicted, model.confidence),
        "baseline_predictions.csv": predictions_frame(frame, baseline.predicted, baseline.confidence),
        "misclassified.csv": misclassified_frame(frame, model.predicted, baseline.predicted),
    }


def plots(frame, model, baseline, scores):
    from sklearn.metrics import confusion_matrix

    from lmpipe import plots

    ours, theirs = scores["model"]["per_type"], scores["baseline"]["per_type"]
    types = sorted(set(ours) | set(theirs))
    per_type = pd.DataFrame(
        {
            "type": types,
            "model_f1": [ours.get(t, {}).get("f1-score", 0.0) for t in types],
            "baseline_f1": [theirs.get(t, {}).get("f1-score", 0.0) for t in types],
            "support": [ours.get(t, {}).get("support", 0) for t in types],
        }
    )
    flat = [t for tags in frame["tags"] for t in tags]
    figures = {}
    for name, guess, title in (
        ("confusion_matrix", model.predicted, "Test tag confusion (words)"),
        ("baseline_confusion_matrix", baseline.predicted, "Baseline (CRF) tag confusion (words)"),
    ):
        matrix = confusion_matrix(flat, [t for tags in guess for t in tags], labels=model.labels)
        figures[name] = plots.confusion_figure(matrix, model.labels, title)
    return {"per_type_f1": per_type}, figures, {}


def evaluate_summary(scores):
    m, b, d = scores["model"], scores["baseline"], scores["model_minus_baseline"]
    return (
        f"evaluate: entity micro-F1 model {m['f1']:.4f}, baseline (CRF) {b['f1']:.4f}; macro-F1 model "
        f"{m['macro_f1']:.4f}, baseline {b['macro_f1']:.4f} | {scores['test_rows']} test sentences, "
        f"{scores['test_entities']} entities\n"
        f"evaluate: model minus baseline {100 * d['f1']:+.2f} pt micro-F1, 95% CI "
        f"[{100 * d['f1_ci95_low']:+.2f}, {100 * d['f1_ci95_high']:+.2f}]; {100 * d['macro_f1']:+.2f} pt "
        f"macro-F1 [{100 * d['macro_f1_ci95_low']:+.2f}, {100 * d['macro_f1_ci95_high']:+.2f}]; sentences only "
        f"the model tags right {d['model_only_right']}, only the baseline {d['baseline_only_right']}, "
        f"McNemar p = {d['mcnemar_p']:.3f}"
    )


def paired_rows(predictions):
    """Word-level predictions as one row per sentence, its true and predicted tags joined by spaces: a
    sentence is the example that is resampled, and it is right when every one of its tags is."""
    words = predictions.astype({"id": str, "actual": str, "predicted": str})
    words = words.sort_values(["id", "position"], kind="stable")
    joined = words.groupby("id", sort=True).agg(
        actual=("actual", " ".join), predicted=("predicted", " ".join)
    )
    return joined.reset_index()
