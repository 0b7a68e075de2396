"""Text classification's analyses (analyze): the model pass over texts, robustness to perturbations, the
deletion attack, token attributions and their faithfulness, and scores by length and by class."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from lmpipe import data
from lmpipe.tasks.base import Part, Pass


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    from lmpipe.metrics import classification_metrics

    return classification_metrics(y, pred)["macro_f1"]


def _robustness(
    texts: list[str],
    y: np.ndarray,
    clean_logits: np.ndarray,
    base_pred: np.ndarray,
    logits_of: Callable[[list[str], str | None], np.ndarray],
    tokenizer,
    max_length: int,
    reading: dict,
    base_proba: Callable[[list[str]], np.ndarray],
    cfg,
    seed: int,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The robustness table (strength 0 = clean), and which texts each perturbation flips (model)."""
    from lmpipe.analysis import robustness

    clean_pred = clean_logits.argmax(axis=1)
    clean_ids = read_ids(tokenizer, texts, max_length, reading)
    rows = [
        {"perturbation": kind, "strength": 0.0, "predictor": who, "macro_f1": _macro_f1(y, pred), "drop": 0.0,
         "flip_rate": 0.0, "flip_rate_ci95_low": 0.0, "flip_rate_ci95_high": 0.0, "texts_changed": 0,
         "model_inputs_changed": 0}
        for kind in cfg.perturbations for who, pred in (("model", clean_pred), ("baseline", base_pred))
    ]  # fmt: skip
    flips: dict[str, np.ndarray] = {}
    for kind, strengths in cfg.perturbations.items():
        for strength in strengths:
            noisy = robustness.perturb(texts, kind, strength, seed)
            # the model reads token ids: where a perturbation leaves them as they were (case for an
            # uncased model, whitespace), its clean prediction stands and no forward pass is spent
            ids = read_ids(tokenizer, noisy, max_length, reading)
            changed = np.array([a != b for a, b in zip(ids, clean_ids, strict=True)])
            logits = clean_logits.copy()
            texts_changed = sum(a != b for a, b in zip(noisy, texts, strict=True))
            if changed.any():
                logits[changed] = logits_of(
                    [t for t, c in zip(noisy, changed, strict=True) if c], f"{kind}@{strength:g}"
                )
            for who, clean, pred in (
                ("model", clean_pred, logits.argmax(axis=1)),
                ("baseline", base_pred, base_proba(noisy).argmax(axis=1)),
            ):
                f1 = _macro_f1(y, pred)
                rows.append(
                    {
                        "perturbation": kind,
                        "strength": strength,
                        "predictor": who,
                        "macro_f1": f1,
                        "drop": _macro_f1(y, clean) - f1,
                        **robustness.flip_rate(clean, pred, cfg.resamples, seed),
                        "texts_changed": texts_changed,
                        "model_inputs_changed": int(changed.sum()),
                    }
                )
                if who == "model":
                    flips[f"{kind}@{strength:g}"] = pred != clean
    return pd.DataFrame(rows), flips


def read_ids(tokenizer, texts: list[str], max_length: int, reading: dict) -> list[list[list[int]]]:
    """The token ids the model reads of each text (one list per window: ``serving.read_texts``)."""
    from lmpipe.serve.serving import read_texts

    features, owner = read_texts(tokenizer, texts, max_length, reading)
    units: list[list[list[int]]] = [[] for _ in texts]
    for ids, text in zip(features["input_ids"], owner, strict=True):
        units[int(text)].append(list(ids))
    return units


def _fragile(
    test: pd.DataFrame, names: list[str], clean_pred: np.ndarray, flips: dict[str, np.ndarray]
) -> pd.DataFrame:
    """Texts the model's prediction flips under some perturbation, most-flipped first. ``all_flipping``:
    flipped by every perturbation that flips anything (a perturbation that never flips, such as case for
    an uncased model, cannot be part of "every")."""
    effective = {k: v for k, v in flips.items() if v.any()}
    matrix = np.column_stack(list(flips.values())) if flips else np.zeros((len(test), 0), dtype=bool)
    count = matrix.sum(axis=1)
    frame = pd.DataFrame(
        {
            "id": test["id"].to_numpy(),
            "actual": test["label"].to_numpy(),
            "clean_prediction": [names[i] for i in clean_pred],
            "flips": count,
            "all_flipping": np.column_stack(list(effective.values())).all(axis=1) if effective else False,
            "flipped_by": [", ".join(k for k, v in flips.items() if v[i]) for i in range(len(test))],
            "text": test["text"].str.slice(0, 300).to_numpy(),
        }
    )
    return frame[frame["flips"] > 0].sort_values(["flips", "id"], ascending=[False, True])


def analysis_pass(model, tokenizer, frame, max_length, batch_size, desc=None):
    from lmpipe.modeling.inference import predict_logits_model

    logits, names = predict_logits_model(
        model, tokenizer, frame["text"].tolist(), max_length, batch_size, desc
    )
    y = data.encode_labels(frame["label"], data.model_label2id(names), "the model's labels")
    return Pass(logits=logits, y=y, read=np.ones(len(y), dtype=bool), predicted=logits.argmax(axis=1))


def robustness(analysis):
    from lmpipe import plots
    from lmpipe.analysis import robustness
    from lmpipe.modeling.encoding import model_reading
    from lmpipe.modeling.inference import predict_logits_model

    a, base = analysis, analysis.params.base
    texts, labels = a.test["text"].tolist(), a.labels

    def logits_of(items, desc=None):
        return predict_logits_model(
            a.model, a.tokenizer, items, base.max_length, a.params.train.eval_batch_size, desc
        )[0]

    base_pred = a.baseline_proba.argmax(axis=1)
    table, flips = _robustness(
        texts, a.clean.y, a.clean.logits, base_pred, logits_of, a.tokenizer, base.max_length,
        model_reading(a.model), a.baseline.unit_proba_of_texts, a.params.analyze.robustness, base.seed,
    )  # fmt: skip
    fragile = _fragile(a.test, labels, a.clean.predicted, flips)
    report = {
        "robustness": robustness.summary(table),
        "robustness_flipped_by_all": int(fragile["all_flipping"].sum()),
    }
    return Part(
        report, {"robustness": table, "fragile": fragile}, {"robustness": plots.robustness_figure(table)}
    )


def attack(analysis):
    from lmpipe.analysis import calibration, robustness
    from lmpipe.modeling.encoding import model_reading
    from lmpipe.modeling.inference import predict_logits_model

    a, cfg, base = analysis, analysis.params.analyze.attack, analysis.params.base
    texts, y, clean_pred = a.test["text"].tolist(), a.clean.y, a.clean.predicted
    base_pred = a.baseline_proba.argmax(axis=1)
    both_right = np.flatnonzero((clean_pred == y) & (base_pred == y))
    # how many texts both get right depends on the models, not on the user: fewer is a note
    samples = min(cfg.samples, len(both_right))
    if samples < cfg.samples:
        print(
            f"analyze: note: analyze.attack.samples is {cfg.samples}, but the model and the "
            f"baseline both get only {len(both_right)} test texts right: attacking those"
        )
    chosen = np.sort(np.random.default_rng(base.seed).choice(both_right, size=samples, replace=False))
    picked = [texts[i] for i in chosen]
    report = {"samples": samples, "max_edit_share": cfg.max_edit_share}
    batch = a.params.train.eval_batch_size

    def model_proba(items):
        return calibration.softmax(
            predict_logits_model(a.model, a.tokenizer, items, base.max_length, batch)[0]
        )

    frames = []
    for name, proba_fn, read in (
        # a windows model reads every word; the others max_length tokens' worth
        ("model", model_proba, (lambda t: None) if model_reading(a.model)["mode"] == "windows"
         else robustness.words_read(a.tokenizer, base.max_length)),
        ("baseline", a.baseline.unit_proba_of_texts, lambda t: None),
    ):  # fmt: skip
        frame, summary = robustness.attack_many(
            picked, y[chosen], proba_fn, cfg.max_edit_share, read, desc=f"attack ({name})"
        )
        frame.insert(0, "predictor", name)
        frame.insert(1, "id", a.test["id"].to_numpy()[chosen])
        frames.append(frame)
        report[name] = summary
    return Part({"attack": report}, {"attack": pd.concat(frames, ignore_index=True)})


def explain(analysis):
    from lmpipe import plots
    from lmpipe.analysis import calibration, explain

    a, cfg, base = analysis, analysis.params.analyze.explain, analysis.params.base
    texts, y, clean_pred, names = a.test["text"].tolist(), a.clean.y, a.clean.predicted, a.labels
    base_pred = a.baseline_proba.argmax(axis=1)
    wrong = np.flatnonzero(clean_pred != y)
    rest = np.setdiff1d(np.arange(len(a.test)), wrong)
    extra = max(0, cfg.samples - len(wrong))
    rng = np.random.default_rng(base.seed)
    rows = np.concatenate([wrong[: cfg.samples], np.sort(rng.choice(rest, extra, replace=False))])
    picked, targets = [texts[i] for i in rows], clean_pred[rows]
    attributions = explain.attribute(
        a.model, a.tokenizer, picked, targets, base.max_length, n_steps=cfg.n_steps
    )
    base_terms = explain.baseline_terms(a.baseline.pipeline, picked, names)
    proba_rows = calibration.softmax(a.clean.logits)[rows]
    explanations = [
        explain.Explanation(
            id=a.test["id"].iloc[i],
            text=texts[i],
            actual=names[y[i]],
            predicted=names[clean_pred[i]],
            probability=float(proba_rows[j, clean_pred[i]]),
            tokens=attributions[j][0],
            scores=attributions[j][1],
            baseline_terms=base_terms[j],
            baseline_predicted=names[base_pred[i]],
        )
        for j, i in enumerate(rows)
    ]
    faith = explain.faithfulness(
        a.model,
        a.tokenizer,
        picked,
        targets,
        attributions,
        cfg.top_k_share,
        base.seed,
        max_length=base.max_length,
    )
    faith.insert(0, "id", a.test["id"].to_numpy()[rows])
    top = explain.top_tokens(explanations, cfg.top_tokens)
    report = {
        "samples": len(rows),
        "misclassified": int(min(len(wrong), cfg.samples)),
        "n_steps": cfg.n_steps,
        "top_k_share": cfg.top_k_share,
        "faithfulness": explain.faithfulness_summary(faith),
    }
    return Part(
        {"explain": report},
        {"faithfulness": faith, "top_tokens": top},
        {"top_tokens": plots.top_tokens_figure(top)},
        html=explain.html_report(explanations, "Token attributions (integrated gradients), test texts"),
    )


def slices(analysis):
    from lmpipe.analysis import slices

    a, cfg, base = analysis, analysis.params.analyze, analysis.params.base
    texts = a.test["text"].tolist()
    lengths = np.array([len(ids) for ids in a.tokenizer(texts, truncation=False, verbose=False)["input_ids"]])
    preds = {"model": a.clean.predicted, "baseline": a.baseline_proba.argmax(axis=1)}
    resamples, y, k = cfg.robustness.resamples, a.clean.y, len(a.labels)
    by_length = slices.by_length(
        lengths, y, preds, k, base.max_length, cfg.slices.length_edges, resamples, base.seed
    )
    by_class = slices.by_class(y, preds, a.labels, resamples, base.seed)
    report = {"length": by_length.to_dict(orient="records"), "class": by_class.to_dict(orient="records")}
    return Part({"slices": report}, {"slices_length": by_length, "slices_class": by_class})
