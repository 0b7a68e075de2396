"""train: fine-tune a sequence-classification head on the pretrained encoder, keep the best epoch.

Reads:  params.yaml (base, train, mlflow), <data>/{train,val}.parquet, <labels> (label map),
        <search> (the search stage's best params, laid over `train` when the search was enabled)
Writes: <out>/ (save_pretrained folder: safetensors, config with label maps, tokenizer),
        <metrics> (best val scores, timings, MLflow run id), <history> (per-epoch CSV, a DVC plot)
Logs:   an MLflow run with the params, per-step loss/lr, per-epoch val metrics and the final model.
"""

from lmpipe.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", required=True, help="folder with train.parquet and val.parquet")
    parser.add_argument("--labels", required=True, help="labels.json from prepare")
    parser.add_argument("--search", required=True, help="best_params.json from the search stage")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--metrics", required=True, help="training summary (JSON metrics)")
    parser.add_argument("--history", required=True, help="per-epoch history (CSV plot)")
    args = parser.parse_args()

    import pandas as pd

    from lmpipe import data, io, models, plots, tracking
    from lmpipe.params import load_params
    from lmpipe.training import frame_dataset, train_model

    searched = io.read_json(args.search)
    # what is logged below is what is used: the file's params plus the search's best values
    params = load_params(args.params, overrides={"train": searched.get("params", {})})
    base, cfg = params.base, params.train
    label2id = data.read_label_map(args.labels)
    model_dir = models.resolve_model_dir(base.model)
    models.seed_everything(base.seed)  # before the head is created: its init is random
    tokenizer = models.load_tokenizer(model_dir)
    model = models.load_classifier(model_dir, label2id)
    train_set = frame_dataset(tokenizer, data.read_split(args.data, "train"), label2id, base.max_length)
    val_set = frame_dataset(tokenizer, data.read_split(args.data, "val"), label2id, base.max_length)

    tags = {"search_run_id": searched["mlflow_run_id"]} if searched.get("mlflow_run_id") else {}
    with tracking.run(
        params.mlflow.experiment,
        "train",
        params.to_dict(),
        params.digest(),
        "train",
        tags={**tags, "search_params": ",".join(sorted(searched.get("params", {})))},
    ) as run:
        counts = models.count_parameters(model)
        tracking.log_metrics(counts)
        result = train_model(
            model, tokenizer, train_set, val_set, cfg, base.seed, callbacks=[tracking.MlflowTrainingLogger()]
        )
        with io.atomic_dir(args.out) as model_tmp:  # the model folder appears only if all else succeeded
            models.write_model(model, tokenizer, model_tmp)
            summary = {
                **result.summary(),
                **counts,
                "train_rows": len(train_set),
                "val_rows": len(val_set),
                "device": str(models.device()),
                "mlflow_run_id": run.info.run_id,
            }
            tracking.log_metrics(result.summary())
            tracking.log_artifact(model_tmp, "model")  # the final (best) model, once
            fig = plots.history_figure(result.history)
            tracking.log_figure(fig, "plots/history.png")
            plots.close(fig)
            io.write_csv(args.history, pd.DataFrame(result.history))
            io.write_json(args.metrics, summary)
    print(
        f"train: best val macro-F1 {result.best_val_macro_f1:.4f} at epoch {result.best_epoch} "
        f"({result.epochs_run} epochs, {result.train_seconds:.0f} s); MLflow run {summary['mlflow_run_id']}"
    )


if __name__ == "__main__":
    run_stage(main)
