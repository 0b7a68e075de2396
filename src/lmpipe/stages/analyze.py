"""analyze: what a clean test score does not say. Robustness under perturbations and a black-box attack,
token attributions with a faithfulness score, calibration (and the temperature served models apply), and
slices by length and class: each for the model and the TF-IDF baseline alike (docs/analysis.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lmpipe import calibration, data, io, ner, plots, reports, robustness, serving, slices, tracking
from lmpipe.encoding import model_reading
from lmpipe.errors import ParamsError
from lmpipe.evaluation import aligned_proba, fit_baseline
from lmpipe.inference import predict_logits_model
from lmpipe.metrics import classification_metrics
from lmpipe.models import device, load_classifier, load_tokenizer
from lmpipe.params import Params
from lmpipe.serving import read_texts

# every table the stage declares in dvc.yaml, by the part that fills it: a part switched off in params
# still writes its files, with one row saying so, since DVC wants every declared output
TABLES = {
    "robustness": "robustness",
    "fragile": "robustness",
    "attack": "attack",
    "faithfulness": "explain",
    "top_tokens": "explain",
    "slices_length": "slices",
    "slices_class": "slices",
}


@dataclass(frozen=True)
class Paths:
    data: str  # folder with train.parquet, val.parquet and test.parquet
    model: str  # the trained model folder
    train_report: str  # train stage report (for the MLflow run id)
    out: str  # folder for the analysis outputs
    calibration: str  # JSON file with the fitted temperature (export's dep)


def _check_sample(key: str, wanted: int, available: int, what: str) -> None:
    if wanted > available:
        raise ParamsError(key, f"asks for {wanted} texts, but the test split has {available} {what}")


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    return classification_metrics(y, pred)["macro_f1"]


def run(params: Params, paths: Paths) -> str:
    if params.base.task == ner.TASK:
        return run_entities(params, paths)
    cfg, seed, max_length = params.analyze, params.base.seed, params.base.max_length
    train = data.read_split(paths.data, "train")
    val = data.read_split(paths.data, "val")
    test = data.read_split(paths.data, "test")
    _check_sample(
        "analyze.explain.samples", cfg.explain.samples if cfg.explain.enabled else 0, len(test), "texts"
    )
    _check_sample(
        "analyze.attack.samples", cfg.attack.samples if cfg.attack.enabled else 0, len(test), "texts"
    )
    train_run_id = io.read_json(paths.train_report).get("mlflow_run_id", "")
    texts = test["text"].tolist()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[part] = round(now - clock, 1)
        clock = now

    model = load_classifier(paths.model).to(device()).eval()
    tokenizer = load_tokenizer(paths.model)
    batch = params.train.eval_batch_size

    def logits_of(items: list[str], desc: str | None = None) -> np.ndarray:
        return predict_logits_model(model, tokenizer, items, max_length, batch, desc)[0]

    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    label2id = data.model_label2id(names)
    y = data.encode_labels(test["label"], label2id, f"the model in {paths.model}")
    y_val = data.encode_labels(val["label"], label2id, f"the model in {paths.model}")
    clean_logits = logits_of(texts, "test")
    clean_pred = clean_logits.argmax(axis=1)
    baseline = fit_baseline(train, params.evaluate.baseline, seed)
    base_proba = aligned_proba(baseline, texts, names)
    base_pred = base_proba.argmax(axis=1)
    lap("clean")

    report: dict = {"test_rows": len(test)}
    tables: dict[str, pd.DataFrame] = {}
    figures: dict[str, object] = {}
    with tracking.stage_run(params, "analyze", tags={"train_run_id": train_run_id}) as run:
        # ------------------------------------------------------------------------------ calibration
        temperature = 1.0
        if cfg.calibration.enabled:
            temperature = calibration.fit_temperature(logits_of(val["text"].tolist(), "val"), y_val)
        proba_raw = calibration.softmax(clean_logits)
        proba_scaled = calibration.softmax(clean_logits, temperature)
        reliab = {
            "model": calibration.reliability(proba_raw, y, cfg.calibration.bins),
            "model_scaled": calibration.reliability(proba_scaled, y, cfg.calibration.bins),
            "baseline": calibration.reliability(base_proba, y, cfg.calibration.bins),
        }
        report["calibration"] = {
            "enabled": cfg.calibration.enabled,
            "temperature": temperature,
            "bins": cfg.calibration.bins,
            "model": calibration.summary(proba_raw, y, cfg.calibration.bins),
            "model_scaled": calibration.summary(proba_scaled, y, cfg.calibration.bins),
            "baseline": calibration.summary(base_proba, y, cfg.calibration.bins),
        }
        eces = {k: report["calibration"][k]["ece"] for k in reliab}
        figures["reliability"] = plots.reliability_figure(reliab, eces)
        lap("calibration")

        # ------------------------------------------------------------------------------ robustness
        if cfg.robustness.enabled:
            tables["robustness"], flips = _robustness(
                texts, y, clean_logits, base_pred, logits_of, tokenizer, max_length, model_reading(model),
                lambda t: aligned_proba(baseline, t, names), cfg.robustness, seed,
            )  # fmt: skip
            report["robustness"] = _robustness_report(tables["robustness"])
            tables["fragile"] = _fragile(test, names, clean_pred, flips)
            report["robustness_flipped_by_all"] = int((tables["fragile"]["all_flipping"]).sum())
            figures["robustness"] = plots.robustness_figure(tables["robustness"])
            lap("robustness")

        # ------------------------------------------------------------------------------ attack
        if cfg.attack.enabled:
            both_right = np.flatnonzero((clean_pred == y) & (base_pred == y))
            # how many texts both get right depends on the models, not on the user: fewer is a note
            samples = min(cfg.attack.samples, len(both_right))
            if samples < cfg.attack.samples:
                print(
                    f"analyze: note: analyze.attack.samples is {cfg.attack.samples}, but the model and the "
                    f"baseline both get only {len(both_right)} test texts right: attacking those"
                )
            rng = np.random.default_rng(seed)
            chosen = np.sort(rng.choice(both_right, size=samples, replace=False))
            picked = [texts[i] for i in chosen]
            report["attack"] = {"samples": samples, "max_edit_share": cfg.attack.max_edit_share}
            frames = []
            for name, proba_fn, read in (
                (
                    "model",
                    lambda t: calibration.softmax(logits_of(t)),
                    # a windows model reads every word; the others max_length tokens' worth
                    (lambda t: None)
                    if model_reading(model)["mode"] == "windows"
                    else robustness.words_read(tokenizer, max_length),
                ),
                ("baseline", lambda t: aligned_proba(baseline, t, names), lambda t: None),
            ):
                frame, summary = robustness.attack_many(
                    picked, y[chosen], proba_fn, cfg.attack.max_edit_share, read, desc=f"attack ({name})"
                )
                frame.insert(0, "predictor", name)
                frame.insert(1, "id", test["id"].to_numpy()[chosen])
                frames.append(frame)
                report["attack"][name] = summary
            tables["attack"] = pd.concat(frames, ignore_index=True)
            lap("attack")

        # ------------------------------------------------------------------------------ explanations
        if cfg.explain.enabled:
            from lmpipe import explain

            wrong = np.flatnonzero(clean_pred != y)
            rest = np.setdiff1d(np.arange(len(test)), wrong)
            rng = np.random.default_rng(seed)
            extra = max(0, cfg.explain.samples - len(wrong))
            rows = np.concatenate(
                [wrong[: cfg.explain.samples], np.sort(rng.choice(rest, extra, replace=False))]
            )
            picked = [texts[i] for i in rows]
            targets = clean_pred[rows]
            attributions = explain.attribute(
                model, tokenizer, picked, targets, max_length, n_steps=cfg.explain.n_steps
            )
            base_terms = explain.baseline_terms(baseline, picked, names)
            proba_rows = proba_raw[rows]
            explanations = [
                explain.Explanation(
                    id=test["id"].iloc[i],
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
                model, tokenizer, picked, targets, attributions, cfg.explain.top_k_share, seed,
                max_length=max_length,
            )  # fmt: skip
            faith.insert(0, "id", test["id"].to_numpy()[rows])
            tables["faithfulness"] = faith
            tables["top_tokens"] = explain.top_tokens(explanations, cfg.explain.top_tokens)
            report["explain"] = {
                "samples": len(rows),
                "misclassified": int(min(len(wrong), cfg.explain.samples)),
                "n_steps": cfg.explain.n_steps,
                "top_k_share": cfg.explain.top_k_share,
                "faithfulness": explain.faithfulness_summary(faith),
            }
            html = explain.html_report(explanations, "Token attributions (integrated gradients), test texts")
            figures["top_tokens"] = plots.top_tokens_figure(tables["top_tokens"])
            lap("explain")

        # ------------------------------------------------------------------------------ slices
        if cfg.slices.enabled:
            lengths = np.array(
                [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
            )
            preds = {"model": clean_pred, "baseline": base_pred}
            resamples = cfg.robustness.resamples
            tables["slices_length"] = slices.by_length(
                lengths, y, preds, len(names), max_length, cfg.slices.length_edges, resamples, seed
            )
            tables["slices_class"] = slices.by_class(y, preds, names, resamples, seed)
            report["slices"] = {
                "length": tables["slices_length"].to_dict(orient="records"),
                "class": tables["slices_class"].to_dict(orient="records"),
            }
            lap("slices")
        report["seconds"] = {**seconds, "total": round(sum(seconds.values()), 1)}
        report["mlflow_run_id"] = run.info.run_id
        report["train_mlflow_run_id"] = train_run_id

        if not cfg.explain.enabled:
            html = "<!doctype html><title>attributions</title><p>off: analyze.explain.enabled is false</p>"
        _write_outputs(
            paths,
            report,
            tables,
            reliab,
            figures,
            html,
            temperature,
            val_rows=len(val),
            fitted=cfg.calibration.enabled,
        )
    return _summary(report)


NOT_FOR_TOKENS = "not for token classification: the attack and the attributions explain one label per text"


def run_entities(params: Params, paths: Paths) -> str:
    """Token classification: calibration of the word tag probabilities (a temperature fit on val, ECE and
    Brier over the test words, model and CRF baseline alike), robustness to perturbations that edit words
    in place (entity F1, and the sentences whose entities change), and entity F1 by sentence length and
    by type, with CIs. The attack and the attributions explain one label per text: their tables say so."""
    cfg, seed, max_length = params.analyze, params.base.seed, params.base.max_length
    train, val, test = (data.read_split(paths.data, s) for s in ("train", "val", "test"))
    train_run_id = io.read_json(paths.train_report).get("mlflow_run_id", "")
    model = load_classifier(paths.model).to(device()).eval()
    tokenizer = load_tokenizer(paths.model)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    tag2id = {name: i for i, name in enumerate(names)}
    started = time.perf_counter()

    def word_rows(sentences: list[list[str]], desc: str) -> list[np.ndarray]:
        dataset, rows, _ = ner.token_logits(
            model, tokenizer, sentences, max_length, params.train.eval_batch_size, desc
        )
        return [dataset.word_logits(r, i) for i, r in enumerate(rows)]

    def tagged(rows: list[np.ndarray]) -> list[list[str]]:
        return [serving.tags_of(w, names)[0] for w in rows]

    def stacked(rows: list[np.ndarray], truth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The words the model read: their logits, true tag ids, and which of all the words they are."""
        logits = np.concatenate(rows)
        y = np.array([tag2id[tag] for tags in truth for tag in tags])
        read = ~np.isnan(logits[:, 0])
        return logits[read], y[read], read

    sentences, true = [list(s) for s in test["tokens"]], [list(t) for t in test["tags"]]
    clean_rows = word_rows(sentences, "test")
    clean = tagged(clean_rows)
    crf = ner.fit_crf(train, params.evaluate.crf)
    base_clean, _ = ner.crf_tags(crf, test)
    report: dict = {"task": ner.TASK, "test_rows": len(test)}
    tables: dict[str, pd.DataFrame] = {}
    figures: dict[str, object] = {}
    with tracking.stage_run(params, "analyze", tags={"train_run_id": train_run_id}) as run:
        temperature = 1.0
        if cfg.calibration.enabled:
            val_logits, y_val, _ = stacked(word_rows([list(s) for s in val["tokens"]], "val"), val["tags"])
            temperature = calibration.fit_temperature(val_logits, y_val)
        logits, y, read = stacked(clean_rows, true)
        probas = {
            "model": calibration.softmax(logits),
            "model_scaled": calibration.softmax(logits, temperature),
            "baseline": ner.crf_marginals(crf, test, names)[read],
        }
        bins = cfg.calibration.bins
        reliab = {k: calibration.reliability(v, y, bins) for k, v in probas.items()}
        report["calibration"] = {
            "enabled": cfg.calibration.enabled,
            "temperature": temperature,
            "bins": bins,
            "words": len(y),
            **{k: calibration.summary(v, y, bins) for k, v in probas.items()},
        }
        figures["reliability"] = plots.reliability_figure(
            reliab, {k: report["calibration"][k]["ece"] for k in reliab}
        )
        if cfg.robustness.enabled:
            kinds = {
                k: v for k, v in cfg.robustness.perturbations.items() if k in robustness.WORD_PERTURBATIONS
            }
            skipped = sorted(set(cfg.robustness.perturbations) - set(kinds))
            rows, changed_by = [], {}
            clean_scores = {
                "model": ner.entity_scores(true, clean)["metrics"],
                "baseline": ner.entity_scores(true, base_clean)["metrics"],
            }
            for kind in kinds:
                for who, s in clean_scores.items():
                    rows.append({"perturbation": kind, "strength": 0.0, "predictor": who, "macro_f1": s["macro_f1"],
                                 "f1": s["f1"], "drop": 0.0, "flip_rate": 0.0, "flip_rate_ci95_low": 0.0,
                                 "flip_rate_ci95_high": 0.0, "texts_changed": 0})  # fmt: skip
            for kind, strengths in kinds.items():
                for strength in strengths:
                    noisy = robustness.perturb_sentences(sentences, kind, strength, seed)
                    base_noisy, _ = ner.crf_tags(crf, test.assign(tokens=noisy))
                    edited = sum(a != b for a, b in zip(noisy, sentences, strict=True))
                    for who, before, after in (
                        ("model", clean, tagged(word_rows(noisy, f"{kind}@{strength:g}"))),
                        ("baseline", base_clean, base_noisy),
                    ):
                        s = ner.entity_scores(true, after)["metrics"]
                        changed = ner.changed_sentences(before, after)
                        rows.append(
                            {
                                "perturbation": kind,
                                "strength": strength,
                                "predictor": who,
                                "macro_f1": s["macro_f1"],
                                "f1": s["f1"],
                                "drop": clean_scores[who]["macro_f1"] - s["macro_f1"],
                                # the share of sentences whose entities changed
                                **robustness.flip_rate(
                                    np.zeros(len(changed)), changed, cfg.robustness.resamples, seed
                                ),
                                "texts_changed": edited,
                            }
                        )
                        if who == "model":
                            changed_by[f"{kind}@{strength:g}"] = (changed, after)
            tables["robustness"] = pd.DataFrame(rows)
            report["robustness"] = _robustness_report(tables["robustness"])
            if skipped:
                report["robustness"]["skipped"] = {
                    k: "changes the words, so the tags would not align" for k in skipped
                }
            tables["fragile"] = _fragile_sentences(test, clean, changed_by)
            if len(tables["robustness"]):
                figures["robustness"] = plots.robustness_figure(tables["robustness"])
        if cfg.slices.enabled:
            preds = {"model": clean, "baseline": base_clean}
            resamples = cfg.robustness.resamples
            tables["slices_length"] = slices.entities_by_length(
                ner.token_lengths(tokenizer, test), true, preds, max_length, cfg.slices.length_edges,
                resamples, seed,
            )  # fmt: skip
            tables["slices_class"] = slices.entities_by_type(true, preds, resamples, seed)
            report["slices"] = {
                "length": tables["slices_length"].to_dict(orient="records"),
                "class": tables["slices_class"].to_dict(orient="records"),
            }
        for name in ("attack", "faithfulness", "top_tokens"):
            tables[name] = pd.DataFrame({"note": [NOT_FOR_TOKENS]})
        html = f"<!doctype html><title>attributions</title><p>{NOT_FOR_TOKENS}</p>"
        report["seconds"] = {"total": round(time.perf_counter() - started, 1)}
        report["mlflow_run_id"] = run.info.run_id
        report["train_mlflow_run_id"] = train_run_id
        _write_outputs(
            paths, report, tables, reliab, figures, html, temperature, len(val), cfg.calibration.enabled
        )
    return _summary(report)


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
        row["clean"] = ner.entities_text(tokens, clean[i])
        row |= {key: ner.entities_text(tokens, after[i]) for key, (_, after) in changed_by.items()}
        rows.append(row)
    columns = ["id", "perturbations_changing", "text", "clean", *changed_by]
    return pd.DataFrame(rows, columns=columns)


def _write_outputs(
    paths: Paths,
    report: dict,
    tables: dict[str, pd.DataFrame],
    reliab: dict[str, pd.DataFrame],
    figures: dict[str, object],
    html: str,
    temperature: float,
    val_rows: int,
    fitted: bool,
) -> None:
    """Every output the stage declares, together or not at all, the same in the active MLflow run, and
    the temperature export serves (``paths.calibration``). A table no part filled gets one row saying
    why: DVC wants every declared output."""
    for name, part in TABLES.items():
        tables.setdefault(name, pd.DataFrame({"note": [f"off: analyze.{part}.enabled is false"]}))
    with io.staged_outputs(paths.out) as out:  # all outputs appear together, or none
        for name, frame in tables.items():
            frame.to_csv(out / f"{name}.csv", index=False)
        for name, table in reliab.items():
            (out / "plots" / "reliability").mkdir(parents=True, exist_ok=True)
            table.to_csv(out / "plots" / "reliability" / f"{name}.csv", index=False)
        if "robustness" in tables:
            (out / "plots" / "robustness").mkdir(parents=True, exist_ok=True)
            wide = tables["robustness"].pivot_table(
                index=["perturbation", "strength"], columns="predictor", values="macro_f1"
            )
            for kind, part in wide.groupby(level=0):
                part.reset_index(level=0, drop=True).add_suffix("_macro_f1").reset_index().to_csv(
                    out / "plots" / "robustness" / f"{kind}.csv", index=False
                )
        (out / "attributions.html").write_text(html, encoding="utf-8")
        for name, fig in figures.items():
            tracking.log_figure(fig, f"plots/{name}.png")
            plots.close(fig)
        for entry in sorted(out.iterdir()):
            if entry.is_file():
                tracking.log_artifact(entry, "analysis")
        tracking.log_metrics(tracking.flatten(reports.headline("analyze", report)))
        reports.write("analyze", report, out / "metrics.json", out / "report.json")
        tracking.log_dict(report, "analyze_report.json")
    io.write_json(
        paths.calibration,
        {
            "temperature": temperature,
            "fitted_on": "val" if fitted else None,
            "rows": val_rows,
        },
    )


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
    features, owner = read_texts(tokenizer, texts, max_length, reading)
    units: list[list[list[int]]] = [[] for _ in texts]
    for ids, text in zip(features["input_ids"], owner, strict=True):
        units[int(text)].append(list(ids))
    return units


def _robustness_report(table: pd.DataFrame) -> dict:
    """Per perturbation and strength: both predictors' macro-F1, drop from clean and flip rate; and the
    mean drop over them all (a headline metric)."""
    out: dict = {"perturbations": {}}
    perturbed = table[table["strength"] > 0]
    for (kind, strength), part in perturbed.groupby(["perturbation", "strength"], sort=False):
        entry = {}
        for r in part.itertuples():
            entry.update({f"{r.predictor}_{k}": getattr(r, k) for k in ("macro_f1", "drop", "flip_rate")})
        out["perturbations"][f"{kind}@{strength:g}"] = entry
    for who in ("model", "baseline"):
        rows = perturbed[perturbed["predictor"] == who]
        out[f"{who}_mean_drop"] = float(rows["drop"].mean()) if len(rows) else 0.0
        out[f"{who}_mean_flip_rate"] = float(rows["flip_rate"].mean()) if len(rows) else 0.0
    return out


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


def _summary(report: dict) -> str:
    lines = []
    cal = report["calibration"]
    lines.append(
        f"analyze: calibration: temperature {cal['temperature']:.3f}; test ECE {cal['model']['ece']:.4f} -> "
        f"{cal['model_scaled']['ece']:.4f} (baseline {cal['baseline']['ece']:.4f})"
    )
    for key, r in report.get("robustness", {}).get("perturbations", {}).items():
        lines.append(
            f"analyze: {key:<22} model macro-F1 {r['model_macro_f1']:.4f} (flips {100 * r['model_flip_rate']:.1f}%) | "
            f"baseline {r['baseline_macro_f1']:.4f} (flips {100 * r['baseline_flip_rate']:.1f}%)"
        )
    if report.get("attack", {}).get("samples"):
        a = report["attack"]
        lines.append(
            f"analyze: attack ({a['samples']} texts, <= {100 * a['max_edit_share']:g}% of words deleted): success model "
            f"{100 * a['model']['success_rate']:.0f}%, baseline {100 * a['baseline']['success_rate']:.0f}%"
        )
    if "explain" in report:
        f = report["explain"]["faithfulness"]
        lines.append(
            f"analyze: faithfulness: comprehensiveness {f['comprehensiveness']:.3f} (random "
            f"{f['random_comprehensiveness']:.3f}), sufficiency {f['sufficiency']:.3f} (random "
            f"{f['random_sufficiency']:.3f})"
        )
    lines.append(f"analyze: {report['seconds']['total']:.0f} s ({report['seconds']})")
    return "\n".join(lines)
