"""train: fine-tune a sequence classifier on the pretrained encoder with `train.strategy`, keep the best epoch.

Reads:  params.yaml (base, train, mlflow), <data>/{train,val}.parquet, <labels> (label map),
        <search> (the search stage's best params, laid over `train` when the search was enabled)
Writes: <out>/ (save_pretrained folder: safetensors, config with label maps, tokenizer; for lora the
        adapters merged in), <adapter>/ (lora: the unmerged peft adapter; otherwise adapter.json saying
        there is none), <metrics> (best val scores, timings, parameter counts, augmented rows, phases,
        MLflow run id), <history> (per-epoch CSV, a DVC plot)
Keeps:  <checkpoints>/<key>/ while training (key = hash of params and inputs), so that a killed run
        resumes from its last epoch on the next run; deleted once the outputs are written.
Logs:   an MLflow run with the params, per-step loss/lr, per-epoch val metrics, per-phase metrics
        (gradual unfreezing, step = phase) and the final model.
"""

from lmpipe.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", required=True, help="folder with train.parquet and val.parquet")
    parser.add_argument("--labels", required=True, help="labels.json from prepare")
    parser.add_argument("--search", required=True, help="best_params.json from the search stage")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--adapter", required=True, help="folder for the unmerged LoRA adapter")
    parser.add_argument("--checkpoints", required=True, help="resumable checkpoints (not a DVC output)")
    parser.add_argument("--metrics", required=True, help="training summary (JSON metrics)")
    parser.add_argument("--history", required=True, help="per-epoch history (CSV plot)")
    args = parser.parse_args()

    import dataclasses
    from pathlib import Path

    import pandas as pd

    from lmpipe import augment, checkpoints, data, io, models, plots, strategies, tracking
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
    strategies.validate(model, cfg)  # a bad strategy setting fails here, before a run or a checkpoint
    train_frame, augmented = augment.augment_frame(
        data.read_split(args.data, "train"), cfg.augment, base.seed
    )
    train_set = frame_dataset(tokenizer, train_frame, label2id, base.max_length)
    val_set = frame_dataset(tokenizer, data.read_split(args.data, "val"), label2id, base.max_length)

    inputs = [Path(args.data) / "train.parquet", Path(args.data) / "val.parquet", Path(args.labels)]
    key = checkpoints.checkpoint_key(
        {"base": dataclasses.asdict(base), "train": dataclasses.asdict(cfg)}, inputs
    )
    run_dir = Path(args.checkpoints) / key
    previous = checkpoints.read_run(run_dir).get("mlflow_run_id")
    resume_step = checkpoints.step_of(checkpoints.latest(run_dir))
    if checkpoints.others(args.checkpoints, key):
        print(f"train: ignoring checkpoints of other params or data in {args.checkpoints}/ (safe to delete)")
    if resume_step:
        print(f"train: resuming from the checkpoint at step {resume_step} in {run_dir}")

    tags = {"search_run_id": searched["mlflow_run_id"]} if searched.get("mlflow_run_id") else {}
    if previous:
        tags.update(resumed_from_run_id=previous, resumed_from_step=str(resume_step))
    with tracking.run(
        params.mlflow.experiment,
        "train",
        params.to_dict(),
        params.digest(),
        "train",
        tags={
            **tags,
            "search_params": ",".join(sorted(searched.get("params", {}))),
            "strategy": cfg.strategy,
        },
    ) as run:
        if previous:
            tracking.mark_resumed(previous, run.info.run_id, resume_step)
        checkpoints.write_run(run_dir, {"mlflow_run_id": run.info.run_id, "params_hash": params.digest()})
        counts = models.count_parameters(model)
        result = train_model(
            model,
            tokenizer,
            train_set,
            val_set,
            cfg,
            base.seed,
            callbacks=[tracking.MlflowTrainingLogger()],
            checkpoint_dir=run_dir,
        )
        counts["trainable_parameters"] = result.trainable_parameters
        tracking.log_metrics({**counts, "augmented_rows": augmented})
        for phase in result.phases:  # gradual unfreezing: one step per phase
            tracking.log_metrics(
                {f"phase_{k}": v for k, v in phase.items() if k != "phase"}, step=phase["phase"]
            )
        for row in result.history:  # epochs done before a resume: their val metrics were logged elsewhere
            if row["step"] <= result.resumed_from_step:
                tracking.log_metrics(
                    {k: v for k, v in row.items() if k.startswith("val_")}, step=row["epoch"]
                )
        # both folders appear only if all else succeeded; neither is ever half-written
        with io.atomic_dir(args.out) as model_tmp, io.atomic_dir(args.adapter) as adapter_tmp:
            lora = cfg.strategy == "lora"
            final = strategies.finalize_model(result.model, adapter_tmp if lora else None)
            if not lora:
                io.write_json(adapter_tmp / "adapter.json", {"strategy": cfg.strategy, "adapter": None})
            models.write_model(final, tokenizer, model_tmp)
            summary = {
                **result.summary(),
                **counts,
                "strategy": cfg.strategy,
                "train_rows": len(train_set),
                "augmented_rows": augmented,
                "val_rows": len(val_set),
                "resumed_from_step": result.resumed_from_step,
                "phases": {
                    str(p["phase"]): {k: v for k, v in p.items() if k != "phase"} for p in result.phases
                },
                "device": str(models.device()),
                "mlflow_run_id": run.info.run_id,
            }
            tracking.log_metrics(result.summary())
            tracking.log_artifact(model_tmp, "model")  # the final (best) model, once
            if lora:
                tracking.log_artifact(adapter_tmp, "adapter")
            fig = plots.history_figure(result.history)
            tracking.log_figure(fig, "plots/history.png")
            plots.close(fig)
            io.write_csv(args.history, pd.DataFrame(result.history))
            io.write_json(args.metrics, summary)
    checkpoints.remove(run_dir)  # a finished run leaves no checkpoints behind
    print(
        f"train: {cfg.strategy}, best val macro-F1 {result.best_val_macro_f1:.4f} at epoch {result.best_epoch} "
        f"({result.epochs_run} epochs, {result.train_seconds:.0f} s, "
        f"{result.trainable_parameters:,} trainable params); MLflow run {summary['mlflow_run_id']}"
    )


if __name__ == "__main__":
    run_stage(main)
