"""export: ONNX + ONNX Runtime int8, parity and latency checks, a registered MLflow model, a model card.

Reads:  params.yaml (base, prepare.source, train, export, mlflow), the model chosen by `export.source`
        among the --source NAME=FOLDER pairs, <data>/test.parquet, and the prepare, split, train and
        evaluate metrics (for the card, the baseline and the run ids)
Writes: <out>/ (model.onnx, model.int8.onnx, tokenizer, classifier.json, MODEL_CARD.md),
        <metrics> (parity, int8 agreement and macro-F1, latency p50/p95, registry version, gate decision)
Logs:   an MLflow run holding a pyfunc model (ONNX + tokenizer, code-based: no pickle), registered as a
        new version of `export.registered_model`; aliases `challenger`/`champion` from the promotion gate.
"""

from lmpipe.cli import run_stage, stage_parser


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

    from pathlib import Path

    from lmpipe import data, io, tracking
    from lmpipe.errors import UserError
    from lmpipe.export import run_export
    from lmpipe.params import load_params

    params = load_params(args.params)
    sources = {}
    for pair in args.source:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--source: expected NAME=FOLDER, got {pair!r}")
        sources[name] = folder
    if params.export.source not in sources:
        raise UserError(
            f"export.source: '{params.export.source}' is not among the models this stage was given "
            f"({', '.join(sorted(sources))}); add --source {params.export.source}=<folder> in dvc.yaml"
        )
    chosen = sources[params.export.source]
    if not (Path(chosen) / "config.json").is_file():
        raise UserError(
            f"export.source: '{params.export.source}' has no model in {chosen} (is that compress variant "
            "enabled in params.yaml?)"
        )
    records = {
        "prepare": io.read_json(args.prepare_metrics),
        "split": io.read_json(args.split_metrics),
        "train": io.read_json(args.train_metrics),
        "evaluate": io.read_json(args.eval_metrics),
        "compression": io.read_json(args.compress_metrics) if args.compress_metrics else None,
    }
    test = data.read_split(args.data, "test")
    with tracking.run(
        params.mlflow.experiment,
        "export",
        params.to_dict(),
        params.digest(),
        "export",
        tags={
            "train_run_id": records["train"].get("mlflow_run_id", ""),
            "evaluate_run_id": records["evaluate"].get("mlflow_run_id", ""),
            "export_source": params.export.source,
        },
    ) as active:
        metrics = run_export(params, chosen, test, records, args.out, args.metrics, active.info.run_id)
    gate, lat = metrics["gate"], metrics["latency"]
    print(
        f"export: ONNX fp32 max |dlogit| {metrics['onnx_fp32']['max_abs_logit_diff']:.1e}, int8 agreement "
        f"{metrics['onnx_int8']['label_agreement']:.4f} | batch-1 p50: pytorch "
        f"{lat['pytorch_fp32']['batch_1']['p50_ms'] if 'batch_1' in lat['pytorch_fp32'] else float('nan'):.1f} "
        f"ms, int8 {lat['onnx_int8']['batch_1']['p50_ms'] if 'batch_1' in lat['onnx_int8'] else float('nan'):.1f}"
        f" ms | {metrics['registry']['name']} v{metrics['registry']['version']} "
        f"aliases: {', '.join(gate['aliases']) or 'none'}"
    )


if __name__ == "__main__":
    run_stage(main)
