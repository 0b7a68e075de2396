"""compress: int8 quantization, magnitude pruning and distillation of the trained model, each measured
against the original with the evaluate stage's code.

Reads:  params.yaml (base, train, compress, mlflow), <data>/{train,val,test}.parquet,
        <model>/ (the trained model: the original and the teacher)
Writes: <out>/int8/ (int8.safetensors + quantization.json recipe, config, tokenizer; load with
        lmpipe.compression.load_int8), <out>/pruned/ and <out>/student/ (save_pretrained folders),
        <metrics> (one row per variant and the original: test scores and their change, size, parameters,
        CPU latency, throughput; DVC metrics), <plot> (macro-F1 against batch-1 latency, a DVC plot)
Logs:   one MLflow parent run with a child run per variant (and the original); the pruning recovery
        fine-tune and the distillation log like a training run.
"""

from lmpipe.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", required=True, help="folder with train/val/test.parquet")
    parser.add_argument("--model", required=True, help="the trained model folder")
    parser.add_argument("--out", required=True, help="folder for the compressed variants")
    parser.add_argument("--metrics", required=True, help="the comparison table (JSON metrics)")
    parser.add_argument("--plot", required=True, help="macro-F1 vs latency points (CSV plot)")
    args = parser.parse_args()

    import dataclasses
    import hashlib
    from pathlib import Path

    import pandas as pd

    from lmpipe import compression as lib
    from lmpipe import data, io, models, plots, tracking
    from lmpipe.evaluation import predict_proba, predict_proba_model, score
    from lmpipe.params import load_params
    from lmpipe.training import frame_dataset, train_model

    params = load_params(args.params)
    base, cfg, lat = params.base, params.compress, params.compress.latency
    # the recovery and distillation fine-tunes train every weight of their model, whatever train.strategy
    # says (a LoRA wrapper or a frozen encoder would undo pruning or starve the student)
    plain_train = dataclasses.replace(params.train, strategy="full", fgm_epsilon=0.0)
    model_dir = Path(args.model)
    train, val, test = (data.read_split(args.data, s) for s in ("train", "val", "test"))
    texts, eval_bs = test["text"].tolist(), params.train.eval_batch_size
    tokenizer = models.load_tokenizer(model_dir)
    config = lib.load_config(model_dir)
    label2id = dict(config.label2id)
    if cfg.distill.enabled:  # a wrong layer list fails now, not after the other variants
        lib.student_layers(cfg.distill.keep_layers, config.num_hidden_layers)
    source_hash = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    source = {"path": str(model_dir), "model.safetensors_sha256_16": source_hash}

    def datasets():
        return (
            frame_dataset(tokenizer, train, label2id, base.max_length),
            frame_dataset(tokenizer, val, label2id, base.max_length),
        )

    def test_scores(proba, names) -> dict:
        unknown = sorted(set(test["label"]) - set(names))
        if unknown:
            raise ValueError(f"test labels {unknown} are unknown to the model in {model_dir}")
        y_true = test["label"].map({n: i for i, n in enumerate(names)}).to_numpy()
        m = score(y_true, proba, names)["metrics"]
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    rows: dict[str, dict] = {}
    loaded: dict[str, object] = {}  # the reloaded variants, on the CPU, for timing
    run_ids: dict[str, str] = {}

    def child(name: str, section: dict):
        return tracking.run(
            params.mlflow.experiment,
            name,
            {"variant": name, **section},
            params.digest(),
            "compress-variant",
            tags={"variant": name},
            nested=True,
        )

    def log_training(result) -> None:
        tracking.log_metrics(result.summary())
        fig = plots.history_figure(result.history)
        tracking.log_figure(fig, "plots/history.png")
        plots.close(fig)

    with (
        io.atomic_dir(args.out) as out,
        tracking.run(
            params.mlflow.experiment,
            "compress",
            params.to_dict(),
            params.digest(),
            "compress",
            tags={"source_model": str(model_dir), "source_sha256_16": source_hash},
        ) as parent,
    ):
        # the original, through the evaluate stage's own code path
        with child("original", {"path": str(model_dir)}) as run:
            run_ids["original"] = run.info.run_id
            rows["original"] = {
                **test_scores(*predict_proba(model_dir, texts, base.max_length, eval_bs, desc="original")),
                "size_mb": lib.weights_bytes(model_dir) / 2**20,
                "layers": models.load_classifier(model_dir).config.num_hidden_layers,
            }
            loaded["original"] = models.load_classifier(model_dir).cpu().eval()
            rows["original"].update(lib.parameter_counts(loaded["original"]))

        if cfg.quantize.enabled:
            with child("int8", dataclasses.asdict(cfg.quantize)) as run:
                run_ids["int8"] = run.info.run_id
                folder = out / "int8"
                lib.save_int8(lib.quantize_int8(loaded["original"]), tokenizer, folder, source)
                model = lib.load_int8(folder)  # measure what was saved
                rows["int8"] = {
                    **test_scores(
                        *predict_proba_model(model, tokenizer, texts, base.max_length, eval_bs, desc="int8")
                    ),
                    "size_mb": lib.weights_bytes(folder) / 2**20,
                    "layers": model.config.num_hidden_layers,
                    **lib.parameter_counts(model),
                }
                tracking.log_artifact(folder / lib.INT8_RECIPE)
                loaded["int8"] = model

        if cfg.prune.enabled:
            p = cfg.prune
            recovery = dataclasses.replace(
                plain_train, epochs=max(p.recovery_epochs, 1), learning_rate=p.learning_rate
            )
            section = {"prune": dataclasses.asdict(p)}
            if p.recovery_epochs:
                section["train"] = dataclasses.asdict(recovery)
            with child("pruned", section) as run:
                run_ids["pruned"] = run.info.run_id
                models.seed_everything(base.seed)
                model = models.load_classifier(model_dir).to(models.device())
                keep = lib.magnitude_prune(model, p.sparsity)
                extra = {"sparsity_after_pruning": lib.sparsity_of(model)}
                if p.recovery_epochs:
                    train_set, val_set = datasets()
                    result = train_model(
                        model,
                        tokenizer,
                        train_set,
                        val_set,
                        recovery,
                        base.seed,
                        callbacks=[lib.KeepPruned(model, keep), tracking.MlflowTrainingLogger()],
                    )
                    log_training(result)
                    extra["recovery_epochs_run"] = result.epochs_run
                folder = out / "pruned"
                models.write_model(model, tokenizer, folder)
                model = models.load_classifier(folder).cpu().eval()
                rows["pruned"] = {
                    **test_scores(*predict_proba(folder, texts, base.max_length, eval_bs, desc="pruned")),
                    "size_mb": lib.weights_bytes(folder) / 2**20,
                    "layers": model.config.num_hidden_layers,
                    **lib.parameter_counts(model),
                    "target_sparsity": p.sparsity,
                    "measured_sparsity": lib.sparsity_of(model),
                    **extra,
                }
                loaded["pruned"] = model

        if cfg.distill.enabled:
            d = cfg.distill
            student_cfg = dataclasses.replace(plain_train, epochs=d.epochs, learning_rate=d.learning_rate)
            with child(
                "student", {"distill": dataclasses.asdict(d), "train": dataclasses.asdict(student_cfg)}
            ) as run:
                run_ids["student"] = run.info.run_id
                models.seed_everything(base.seed)
                teacher = models.load_classifier(model_dir).to(models.device())
                student = lib.make_student(teacher, d.keep_layers)
                tracking.log_metrics({"student_parameters": lib.parameter_counts(student)["parameters"]})
                loss = lib.DistillationLoss(teacher, student, d.temperature, d.alpha)
                train_set, val_set = datasets()
                try:
                    result = train_model(
                        student,
                        tokenizer,
                        train_set,
                        val_set,
                        student_cfg,
                        base.seed,
                        callbacks=[tracking.MlflowTrainingLogger()],
                        compute_loss=loss,
                    )
                finally:
                    loss.close()
                log_training(result)
                folder = out / "student"
                models.write_model(student, tokenizer, folder)
                tracking.log_artifact(folder, "model")
                model = models.load_classifier(folder).cpu().eval()
                rows["student"] = {
                    **test_scores(*predict_proba(folder, texts, base.max_length, eval_bs, desc="student")),
                    "size_mb": lib.weights_bytes(folder) / 2**20,
                    "layers": model.config.num_hidden_layers,
                    "kept_layers": ",".join(map(str, model.config.distilled_from_layers)),
                    **lib.parameter_counts(model),
                    "best_val_macro_f1": result.best_val_macro_f1,
                }
                loaded["student"] = model
                del teacher

        # CPU latency, every model in the same rounds
        for batch_size, repeats in ((1, lat.repeats), (lat.batch_size, lat.batch_repeats)):
            batch = lib.fixed_batch(tokenizer, texts, batch_size, base.max_length)
            seconds = lib.time_models(
                loaded, batch, lat.warmup, repeats, lat.threads, desc=f"latency batch {batch_size}"
            )
            for name, values in seconds.items():
                rows[name].update(lib.latency_summary(values, batch_size))

        first = rows["original"]
        b1 = "latency_b1_p50_ms"
        for name, row in rows.items():
            row["size_mb"] = round(row["size_mb"], 3)
            row["delta_accuracy"] = row["accuracy"] - first["accuracy"]
            row["delta_macro_f1"] = row["macro_f1"] - first["macro_f1"]
            row["speedup_b1"] = round(first[b1] / row[b1], 3)
            row[f"speedup_b{lat.batch_size}"] = round(
                first[f"latency_b{lat.batch_size}_p50_ms"] / row[f"latency_b{lat.batch_size}_p50_ms"], 3
            )
            row["size_ratio"] = round(row["size_mb"] / first["size_mb"], 3)
            row["mlflow_run_id"] = run_ids[name]
            tracking.log_metrics_to(run_ids[name], row)
        names = list(rows)
        front = lib.pareto_front([(rows[n][b1], rows[n]["macro_f1"]) for n in names])
        points = pd.DataFrame(
            {
                "variant": names,
                b1: [rows[n][b1] for n in names],
                "macro_f1": [round(rows[n]["macro_f1"], 6) for n in names],
                "size_mb": [rows[n]["size_mb"] for n in names],
                "pareto": front,
            }
        )
        metrics = {
            "variants": rows,
            "pareto": [n for n, f in zip(names, front, strict=True) if f],
            "latency_setup": {
                "device": "cpu",
                "threads": lat.threads,
                "max_length": base.max_length,
                "warmup": lat.warmup,
                "repeats_b1": lat.repeats,
                f"repeats_b{lat.batch_size}": lat.batch_repeats,
            },
            "test_rows": len(test),
            "source_model": str(model_dir),
            "mlflow_run_id": parent.info.run_id,
        }
        tracking.log_metrics({f"{n}.{k}": v for n, r in rows.items() for k, v in r.items()})
        tracking.log_dict(metrics, "compress_metrics.json")
        io.write_csv(args.plot, points)
        io.write_json(args.metrics, metrics)

    print("compress: variant      macro-F1  (delta)   size MB  b1 p50 ms  speed-up")
    for name, row in rows.items():
        print(
            f"compress: {name:<10} {row['macro_f1']:.4f}  ({row['delta_macro_f1']:+.4f})  "
            f"{row['size_mb']:7.1f}  {row[b1]:9.2f}  {row['speedup_b1']:.2f}x"
        )


if __name__ == "__main__":
    run_stage(main)
