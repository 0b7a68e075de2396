"""evaluate: score the trained model and a TF-IDF + logistic-regression baseline on the test split, with
the model-minus-baseline difference and its confidence interval."""

from __future__ import annotations

from dataclasses import dataclass

from lmpipe import data, io, plots, reports, tracking
from lmpipe.compare import predictions_frame, versus_baseline
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

            tracking.log_metrics(metrics["model"], prefix="test_")
            tracking.log_metrics(metrics["baseline"], prefix="baseline_test_")
            tracking.log_metrics(metrics["model_minus_baseline"], prefix="model_minus_baseline_")
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
