"""export: ONNX + ONNX Runtime int8, parity and latency checks, a registered MLflow model, a model card.

Reads:  params.yaml (base, prepare.source, train, export, mlflow), the model chosen by `export.source`
        among the --source NAME=FOLDER pairs, <data>/test.parquet, the prepare, split, train and compress
        reports (for the card and the run ids) and evaluate's scores (for the gate and the card)
Writes: <out>/ (model.onnx, model.int8.onnx, tokenizer, classifier.json, MODEL_CARD.md),
        <report> (parity, int8 agreement and macro-F1, latency p50/p95, registry version, gate decision),
        <metrics> (the served variant's macro-F1, batch-1 latency and size, and the gate; DVC metrics)
Logs:   an MLflow run holding a pyfunc model (ONNX + tokenizer, code-based: no pickle), registered as a
        new version of `export.registered_model`; aliases `challenger`/`champion` from the promotion gate.
"""

from lmpipe.runner import paths_of, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="NAME=FOLDER",
        help="a model export.source may choose (repeatable), e.g. model=models/model",
    )
    parser.add_argument("--data", required=True, help="folder with test.parquet")
    parser.add_argument("--prepare-report", required=True, help="prepare stage report (for the card)")
    parser.add_argument("--split-report", required=True, help="split stage report (for the card)")
    parser.add_argument("--train-report", required=True, help="train stage report (run id, for the card)")
    parser.add_argument(
        "--eval-scores", required=True, help="evaluate's scores.json (for the gate and model card)"
    )
    parser.add_argument(
        "--baseline-predictions",
        required=True,
        help="evaluate's baseline test predictions (the gate's paired CI)",
    )
    parser.add_argument("--compress-report", help="optional: report of the compressed variants")
    parser.add_argument(
        "--calibration", help="optional: analyze's calibration.json (the temperature served; default 1)"
    )
    parser.add_argument("--out", required=True, help="export folder to write")
    parser.add_argument("--metrics", required=True, help="headline figures (DVC metrics JSON)")
    parser.add_argument("--report", required=True, help="the export report (JSON)")
    args = parser.parse_args()

    from lmpipe.params import load_params

    params = load_params(args.params)  # a typo answers here, before the heavy imports below
    from lmpipe.stages import export

    print(export.run(params, paths_of(export.Paths, args)))


if __name__ == "__main__":
    run_stage(main)
