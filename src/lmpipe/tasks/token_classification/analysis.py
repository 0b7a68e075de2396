"""Token classification's analyses (analyze): the model pass over words, robustness to perturbations that
edit words in place, and entity F1 by sentence length and by type, with CIs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from lmpipe.serve.serving import tags_of
from lmpipe.tasks.base import Part, Pass
from lmpipe.tasks.token_classification import (
    changed_sentences,
    entities_text,
    entity_scores,
    entity_spans,
    scores_from_counts,
    sentence_counts,
    token_lengths,
    token_logits,
)


def entity_scores_ci(
    counts: Mapping[str, np.ndarray], keys: Sequence[str], resamples: int, seed: int
) -> dict[str, float]:
    """``scores_from_counts`` (``keys`` of it) with a 95% bootstrap CI over sentences for each."""
    from lmpipe.experiments.compare import bootstrap_weights

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
    of ``max_length``: past 1.0 the words beyond ``max_length`` are not read) and predictor: the slices by
    length (``lmpipe.analysis.slices.by_length`` for texts)."""
    from lmpipe.analysis.slices import length_buckets

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
    """Each entity type's F1 with its CI (sentences resampled as a whole), per predictor: the slices by
    class (``lmpipe.analysis.slices.by_class`` for texts)."""
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


def _fragile_sentences(
    test: pd.DataFrame, clean: list[list[str]], changed_by: dict[str, tuple[np.ndarray, list[list[str]]]]
) -> pd.DataFrame:
    """The test sentences whose predicted entities some perturbation changes, the most changed first: the
    clean entities and each perturbation's."""
    counts = (
        np.sum([changed for changed, _ in changed_by.values()], axis=0) if changed_by else np.zeros(len(test))
    )
    rows = []
    for i in np.argsort(-counts, kind="stable"):
        if counts[i] == 0:
            break
        tokens = list(test["tokens"].iloc[i])
        row = {
            "id": test["id"].iloc[i],
            "perturbations_changing": int(counts[i]),
            "text": test["text"].iloc[i],
        }
        row["clean"] = entities_text(tokens, clean[i])
        row |= {key: entities_text(tokens, after[i]) for key, (_, after) in changed_by.items()}
        rows.append(row)
    columns = ["id", "perturbations_changing", "text", "clean", *changed_by]
    return pd.DataFrame(rows, columns=columns)


def analysis_pass(model, tokenizer, frame, max_length, batch_size, desc=None):
    """Every word's logits (its first subword's; nan for a word past max_length), the tags they make."""
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    dataset, rows, _ = token_logits(
        model, tokenizer, [list(s) for s in frame["tokens"]], max_length, batch_size, desc
    )
    words = [dataset.word_logits(r, i) for i, r in enumerate(rows)]
    logits = np.concatenate(words)
    tag2id = {name: i for i, name in enumerate(names)}
    y = np.array([tag2id[tag] for tags in frame["tags"] for tag in tags])
    read = ~np.isnan(logits[:, 0])
    tagged = [tags_of(w, names)[0] for w in words]
    return Pass(logits=logits[read], y=y[read], read=read, predicted=tagged)


def robustness(analysis):
    """Perturbations that edit words in place (the tags stay aligned; the others are skipped): entity
    F1 of both predictors, and the share of sentences whose entities change."""
    from lmpipe import plots
    from lmpipe.analysis import robustness

    a, cfg, base = analysis, analysis.params.analyze.robustness, analysis.params.base
    test, seed = a.test, base.seed
    sentences, true = [list(s) for s in test["tokens"]], [list(t) for t in test["tags"]]
    clean, base_clean = a.clean.predicted, a.baseline_clean.predicted

    def model_tags(noisy, desc):
        frame = test.assign(tokens=noisy)
        return analysis_pass(
            a.model, a.tokenizer, frame, base.max_length, a.params.train.eval_batch_size, desc
        ).predicted

    kinds = {k: v for k, v in cfg.perturbations.items() if k in robustness.WORD_PERTURBATIONS}
    skipped = sorted(set(cfg.perturbations) - set(kinds))
    rows, changed_by = [], {}
    clean_scores = {
        "model": entity_scores(true, clean)["metrics"],
        "baseline": entity_scores(true, base_clean)["metrics"],
    }
    for kind in kinds:
        for who, s in clean_scores.items():
            rows.append({"perturbation": kind, "strength": 0.0, "predictor": who, "macro_f1": s["macro_f1"],
                         "f1": s["f1"], "drop": 0.0, "flip_rate": 0.0, "flip_rate_ci95_low": 0.0,
                         "flip_rate_ci95_high": 0.0, "texts_changed": 0})  # fmt: skip
    for kind, strengths in kinds.items():
        for strength in strengths:
            noisy = robustness.perturb_sentences(sentences, kind, strength, seed)
            base_noisy = a.baseline.predict(test.assign(tokens=noisy)).predicted
            edited = sum(x != y for x, y in zip(noisy, sentences, strict=True))
            for who, before, after in (
                ("model", clean, model_tags(noisy, f"{kind}@{strength:g}")),
                ("baseline", base_clean, base_noisy),
            ):
                s = entity_scores(true, after)["metrics"]
                changed = changed_sentences(before, after)
                rows.append(
                    {
                        "perturbation": kind,
                        "strength": strength,
                        "predictor": who,
                        "macro_f1": s["macro_f1"],
                        "f1": s["f1"],
                        "drop": clean_scores[who]["macro_f1"] - s["macro_f1"],
                        # the share of sentences whose entities changed
                        **robustness.flip_rate(np.zeros(len(changed)), changed, cfg.resamples, seed),
                        "texts_changed": edited,
                    }
                )
                if who == "model":
                    changed_by[f"{kind}@{strength:g}"] = (changed, after)
    table = pd.DataFrame(rows)
    report = robustness.summary(table)
    if skipped:
        report["skipped"] = {k: "changes the words, so the tags would not align" for k in skipped}
    figures = {"robustness": plots.robustness_figure(table)} if len(table) else {}
    return Part(
        {"robustness": report},
        {"robustness": table, "fragile": _fragile_sentences(test, clean, changed_by)},
        figures,
    )


def slices(analysis):
    a, cfg, base = analysis, analysis.params.analyze, analysis.params.base
    true = [list(t) for t in a.test["tags"]]
    preds = {"model": a.clean.predicted, "baseline": a.baseline_clean.predicted}
    resamples = cfg.robustness.resamples
    by_length = entities_by_length(
        token_lengths(a.tokenizer, a.test),
        true,
        preds,
        base.max_length,
        cfg.slices.length_edges,
        resamples,
        base.seed,
    )
    by_type = entities_by_type(true, preds, resamples, base.seed)
    report = {"length": by_length.to_dict(orient="records"), "class": by_type.to_dict(orient="records")}
    return Part({"slices": report}, {"slices_length": by_length, "slices_class": by_type})
