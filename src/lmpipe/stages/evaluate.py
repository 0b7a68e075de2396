"""evaluate: score the trained model and the task's baseline on the test split, with the model-minus-
baseline difference and its confidence interval (TF-IDF + logistic regression for text classification,
a CRF over word features for token classification: ``lmpipe.tasks``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmpipe import data, io, plots, reports, tasks, tracking
from lmpipe.modeling import hub
from lmpipe.params import Params
from lmpipe.tasks.base import Evaluation

# what export reads (a dep of export in dvc.yaml): the scores without run ids, so that an evaluate re-run
# that scores the same leaves its bytes, and export, alone
# the modules of the task's package this stage uses (dvc.yaml: src/lmpipe/tasks/${base.task}/<part>.py)
TASK_PARTS = ("evaluation",)


SCORES = "scores.json"
# the baseline's per-row predictions, for export's gate (the served model against it, paired)
BASELINE_PREDICTIONS = "baseline_predictions.csv"


@dataclass(frozen=True)
class Paths:
    data: str  # folder with train.parquet and test.parquet
    model: str  # the trained model folder
    train_report: str  # train stage report (for the MLflow run id)
    out: str  # folder for the evaluation outputs


def run(params: Params, paths: Paths) -> str:
    task = tasks.for_stage(params.base.task, "evaluate", TASK_PARTS)
    train, test = data.read_split(paths.data, "train"), data.read_split(paths.data, "test")
    train_run_id = io.read_json(paths.train_report).get("mlflow_run_id", "")
    with tracking.stage_run(params, "evaluate", tags={"train_run_id": train_run_id}) as run:
        result = task.evaluate(paths.model, train, test, params)
        record(
            paths.out,
            result,
            task.headline.get("evaluate"),
            run.info.run_id,
            train_run_id,
            hub.record_of(params.base),
        )
    return task.evaluate_summary(result.scores)


def record(out_dir: str, result: Evaluation, headline, run_id: str, train_run_id: str, model: dict) -> None:
    """Write every output together (or none), and log the same to MLflow: the headline scores on the
    evaluate run (and the model's on its train run), the tables and figures, ``scores.json``, the report
    and its DVC metrics."""
    metrics = {**result.scores, "mlflow_run_id": run_id, "train_mlflow_run_id": train_run_id}
    with io.staged_outputs(out_dir) as out:
        for name, frame in result.plots.items():
            path = out / "plots" / f"{name}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(path, index=False)
        for name, frame in result.tables.items():
            frame.to_csv(out / name, index=False)
        io.write_json(out / "per_class.json", result.per_class)
        for prefix, values in result.logged.items():
            tracking.log_metrics(values, prefix=prefix)
        for name, fig in result.figures.items():
            tracking.log_figure(fig, f"plots/{name}.png")
            plots.close(fig)
        tracking.log_metrics(metrics["model"], prefix="test_")
        tracking.log_metrics(metrics["baseline"], prefix="baseline_test_")
        tracking.log_metrics(metrics["model_minus_baseline"], prefix="model_minus_baseline_")
        for file in ("per_class.json", "misclassified.csv", "predictions.csv"):
            tracking.log_artifact(Path(out) / file, "evaluation")
        if train_run_id and not tracking.log_metrics_to(train_run_id, metrics["model"], prefix="test_"):
            print(
                f"evaluate: train run {train_run_id} is not in the MLflow store {tracking.tracking_uri()}; "
                "the test scores are logged on the evaluate run only"
            )
        io.write_json(out / SCORES, result.scores)
        reports.write("evaluate", metrics, out / "metrics.json", out / "report.json", headline, model=model)
        tracking.log_dict(metrics, "evaluate_report.json")
