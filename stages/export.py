"""export: ONNX + ONNX Runtime int8, parity and latency checks, a registered MLflow model, a model card.

Reads:  params.yaml (base, prepare.source, train, export, mlflow), the model chosen by `export.source`
        among the --source NAME=FOLDER pairs, <data>/test.parquet, and the prepare, split, train and
        evaluate metrics (for the card, the baseline and the run ids)
Writes: <out>/ (model.onnx, model.int8.onnx, tokenizer, classifier.json, MODEL_CARD.md),
        <metrics> (parity, int8 agreement and macro-F1, latency p50/p95, registry version, gate decision)
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
    parser.add_argument("--prepare-metrics", required=True, help="prepare stage metrics (for the card)")
    parser.add_argument("--split-metrics", required=True, help="split stage metrics (for the card)")
    parser.add_argument("--train-metrics", required=True, help="train stage metrics (run id, for the card)")
    parser.add_argument(
        "--eval-metrics", required=True, help="evaluate metrics (scores for the gate and model card)"
    )
    parser.add_argument("--compress-metrics", help="optional: metrics of the exported compressed variant")
    parser.add_argument("--out", required=True, help="export folder to write")
    parser.add_argument("--metrics", required=True, help="export metrics (JSON, DVC metrics)")
    args = parser.parse_args()

    from lmpipe.params import load_params
    from lmpipe.stages import export

    print(export.run(load_params(args.params), paths_of(export.Paths, args)))


if __name__ == "__main__":
    run_stage(main)
