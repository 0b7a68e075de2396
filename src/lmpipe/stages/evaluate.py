"""evaluate: score the trained model and a baseline on the test split, with the model-minus-baseline
difference and its confidence interval. The baseline is TF-IDF + logistic regression for classification,
a CRF over word features for token classification (scored on entities, ``lmpipe.ner``)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from lmpipe import data, io, models, ner, plots, reports, tracking
from lmpipe.compare import predictions_frame, versus_baseline, versus_baseline_entities
from lmpipe.evaluation import baseline_proba, curve_frames, misclassified_frame, score
from lmpipe.inference import predict_proba
from lmpipe.params import Params

# what export reads (a dep of export in dvc.yaml): the scores without run ids, so that an evaluate re-run
# that scores the same leaves its bytes, and export, alone
SCORES = "scores.json"
# the baseline's per-text predictions, for export's gate (the served model against it, paired)
BASELINE_PREDICTIONS = "baseline_predictions.csv"


@dataclass(frozen=True)
class Paths:
    data: str  # folder with train.parquet and test.parquet
    model: str  # the trained model folder
    train_report: str  # train stage report (for the MLflow run id)
    out: str  # folder for the evaluation outputs


def run(params: Params, paths: Paths) -> str:
    if params.base.task == ner.TASK:
        return run_entities(params, paths)
    train, test = data.read_split(paths.data, "train"), data.read_split(paths.data, "test")
    train_run_id = io.read_json(paths.train_report).get("mlflow_run_id", "")

    with tracking.stage_run(params, "evaluate", tags={"train_run_id": train_run_id}) as run:
        proba, names = predict_proba(
            paths.model,
            test["text"].tolist(),
            params.base.max_length,
            params.evaluate.batch_size,
            desc="test",
        )
        y_true = data.encode_labels(test["label"], data.model_label2id(names), f"the model in {paths.model}")
        model_scores = score(y_true, proba, names)
        base_proba = baseline_proba(
            train, test["text"].tolist(), names, params.evaluate.baseline, params.base.seed
        )
        base_scores = score(y_true, base_proba, names)
        predictions = predictions_frame(test, proba, names)
        base_predictions = predictions_frame(test, base_proba, names)

        scores = {
            "model": model_scores["metrics"],
            "baseline": base_scores["metrics"],
            "model_minus_baseline": versus_baseline(predictions, base_predictions, params.base.seed),
            "test_rows": len(test),
        }
        metrics = {
            **scores,
            "mlflow_run_id": run.info.run_id,
            "train_mlflow_run_id": train_run_id,
        }
        roc, pr = curve_frames(model_scores["curves"])
        with io.staged_outputs(paths.out) as out:  # all outputs appear together, or none
            for kind, frames in (("roc", roc), ("pr", pr)):
                (out / "plots" / kind).mkdir(parents=True)
                for name, frame in frames.items():
                    frame.to_csv(out / "plots" / kind / f"{name}.csv", index=False)
            predictions.to_csv(out / "predictions.csv", index=False)
            base_predictions.to_csv(out / BASELINE_PREDICTIONS, index=False)
            misclassified_frame(test, predictions).to_csv(out / "misclassified.csv", index=False)
            io.write_json(
                out / "per_class.json",
                {"model": model_scores["per_class"], "baseline": base_scores["per_class"]},
            )

            tracking.log_metrics(
                {n: c["roc_auc"] for n, c in model_scores["curves"].items()}, prefix="test_roc_auc_"
            )
            for name, fig in (
                (
                    "confusion_matrix",
                    plots.confusion_figure(model_scores["confusion"], names, "Test confusion matrix"),
                ),
                (
                    "baseline_confusion_matrix",
                    plots.confusion_figure(
                        base_scores["confusion"], names, "Baseline (TF-IDF + LR) confusion"
                    ),
                ),
                ("roc", plots.curves_figure(model_scores["curves"], "roc", "One-vs-rest ROC (test)")),
                (
                    "pr",
                    plots.curves_figure(model_scores["curves"], "pr", "One-vs-rest precision-recall (test)"),
                ),
            ):
                tracking.log_figure(fig, f"plots/{name}.png")
                plots.close(fig)
            record(out, scores, metrics, train_run_id)

    m, b, d = metrics["model"], metrics["baseline"], metrics["model_minus_baseline"]
    return (
        f"evaluate: model macro-F1 {m['macro_f1']:.4f} acc {m['accuracy']:.4f} | "
        f"baseline macro-F1 {b['macro_f1']:.4f} acc {b['accuracy']:.4f} | {len(test)} test rows\n"
        f"evaluate: model minus baseline {100 * d['macro_f1']:+.2f} pt macro-F1, 95% CI "
        f"[{100 * d['macro_f1_ci95_low']:+.2f}, {100 * d['macro_f1_ci95_high']:+.2f}] "
        f"({'significant' if d['macro_f1_significant'] else 'not significant'}); only the model right on "
        f"{d['model_only_right']} texts, only the baseline on {d['baseline_only_right']}, "
        f"McNemar p = {d['mcnemar_p']:.3f}"
    )


def record(out, scores: dict, metrics: dict, train_run_id: str) -> None:
    """What both tasks log and write alike: the headline scores on the evaluate run (and the model's on
    its train run), the tables as artefacts, ``scores.json``, the report and its DVC metrics."""
    tracking.log_metrics(metrics["model"], prefix="test_")
    tracking.log_metrics(metrics["baseline"], prefix="baseline_test_")
    tracking.log_metrics(metrics["model_minus_baseline"], prefix="model_minus_baseline_")
    for file in ("per_class.json", "misclassified.csv", "predictions.csv"):
        tracking.log_artifact(out / file, "evaluation")
    if train_run_id and not tracking.log_metrics_to(train_run_id, metrics["model"], prefix="test_"):
        print(
            f"evaluate: train run {train_run_id} is not in the MLflow store {tracking.tracking_uri()}; "
            "the test scores are logged on the evaluate run only"
        )
    io.write_json(out / SCORES, scores)
    reports.write("evaluate", metrics, out / "metrics.json", out / "report.json")
    tracking.log_dict(metrics, "evaluate_report.json")


def run_entities(params: Params, paths: Paths) -> str:
    """Token classification: entity-level scores (seqeval's strict IOB2 spans) of the model and the CRF
    baseline, their paired difference over sentences, token-level predictions and the wrong sentences."""
    from sklearn.metrics import confusion_matrix

    train, test = data.read_split(paths.data, "train"), data.read_split(paths.data, "test")
    train_run_id = io.read_json(paths.train_report).get("mlflow_run_id", "")
    true = [list(tags) for tags in test["tags"]]
    with tracking.stage_run(params, "evaluate", tags={"train_run_id": train_run_id}) as run:
        model = models.load_classifier(paths.model).to(models.device())
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        pred, proba = ner.predict_words(
            model,
            models.load_tokenizer(paths.model),
            list(test["tokens"]),
            params.base.max_length,
            params.evaluate.batch_size,
            desc="test",
        )
        base_pred, base_proba = ner.crf_tags(ner.fit_crf(train, params.evaluate.crf), test)
        model_scores, base_scores = ner.entity_scores(true, pred), ner.entity_scores(true, base_pred)
        scores = {
            "task": ner.TASK,
            "model": model_scores["metrics"],
            "baseline": base_scores["metrics"],
            "model_minus_baseline": versus_baseline_entities(true, pred, base_pred, params.base.seed),
            "test_rows": len(test),
            "test_entities": int(sum(v["support"] for v in model_scores["per_type"].values())),
        }
        metrics = {**scores, "mlflow_run_id": run.info.run_id, "train_mlflow_run_id": train_run_id}
        per_type = {"model": model_scores["per_type"], "baseline": base_scores["per_type"]}
        types = sorted(set(per_type["model"]) | set(per_type["baseline"]))
        per_type_plot = {
            "type": types,
            "model_f1": [per_type["model"].get(t, {}).get("f1-score", 0.0) for t in types],
            "baseline_f1": [per_type["baseline"].get(t, {}).get("f1-score", 0.0) for t in types],
            "support": [per_type["model"].get(t, {}).get("support", 0) for t in types],
        }
        flat = [t for tags in true for t in tags]
        with io.staged_outputs(paths.out) as out:  # all outputs appear together, or none
            (out / "plots").mkdir()
            io.write_csv(out / "plots" / "per_type_f1.csv", pd.DataFrame(per_type_plot))
            ner.predictions_frame(test, pred, proba).to_csv(out / "predictions.csv", index=False)
            ner.predictions_frame(test, base_pred, base_proba).to_csv(out / BASELINE_PREDICTIONS, index=False)
            ner.misclassified_frame(test, pred, base_pred).to_csv(out / "misclassified.csv", index=False)
            io.write_json(out / "per_class.json", per_type)
            for name, guess, title in (
                ("confusion_matrix", pred, "Test tag confusion (words)"),
                ("baseline_confusion_matrix", base_pred, "Baseline (CRF) tag confusion (words)"),
            ):
                matrix = confusion_matrix(flat, [t for tags in guess for t in tags], labels=names)
                fig = plots.confusion_figure(matrix, names, title)
                tracking.log_figure(fig, f"plots/{name}.png")
                plots.close(fig)
            record(out, scores, metrics, train_run_id)
    m, b, d = metrics["model"], metrics["baseline"], metrics["model_minus_baseline"]
    return (
        f"evaluate: entity micro-F1 model {m['f1']:.4f}, baseline (CRF) {b['f1']:.4f}; macro-F1 model "
        f"{m['macro_f1']:.4f}, baseline {b['macro_f1']:.4f} | {len(test)} test sentences, "
        f"{scores['test_entities']} entities\n"
        f"evaluate: model minus baseline {100 * d['f1']:+.2f} pt micro-F1, 95% CI "
        f"[{100 * d['f1_ci95_low']:+.2f}, {100 * d['f1_ci95_high']:+.2f}]; {100 * d['macro_f1']:+.2f} pt "
        f"macro-F1 [{100 * d['macro_f1_ci95_low']:+.2f}, {100 * d['macro_f1_ci95_high']:+.2f}]; sentences only "
        f"the model tags right {d['model_only_right']}, only the baseline {d['baseline_only_right']}, "
        f"McNemar p = {d['mcnemar_p']:.3f}"
    )
