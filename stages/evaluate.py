"""evaluate: score the trained model and a TF-IDF + logistic-regression baseline on the test split.

Reads:  params.yaml (base, evaluate, mlflow), <data>/{train,test}.parquet, <model>/, <train-report>
Writes: <out>/report.json ({"model": {...}, "baseline": {...}, "model_minus_baseline": {...}, run ids}),
        <out>/metrics.json (its headline figures, the DVC metrics), <out>/scores.json (the scores alone,
        what export reads: its bytes change only when a score does), <out>/per_class.json,
        <out>/predictions.csv (per-example, also the confusion-matrix plot), <out>/baseline_predictions.csv
        (the baseline's, for export's gate),
        <out>/misclassified.csv, <out>/plots/{roc,pr}/<class>.csv (one-vs-rest curves, DVC plots)
Logs:   an MLflow run with the test metrics, per-class report and PNG plots; the model's test metrics
        are also added to the train run, so one row in the MLflow UI shows params and test scores.
"""

from lmpipe.runner import paths_of, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", required=True, help="folder with train.parquet and test.parquet")
    parser.add_argument("--model", required=True, help="trained model folder")
    parser.add_argument("--train-report", required=True, help="train stage report (for the MLflow run id)")
    parser.add_argument("--out", required=True, help="folder for the evaluation outputs")
    args = parser.parse_args()

    from lmpipe.params import load_params

    params = load_params(args.params)  # a typo answers here, before the heavy imports below
    from lmpipe.stages import evaluate

    print(evaluate.run(params, paths_of(evaluate.Paths, args)))


if __name__ == "__main__":
    run_stage(main)
