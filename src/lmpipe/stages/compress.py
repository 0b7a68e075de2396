"""compress: int8 quantization, magnitude pruning and distillation of the trained model, each measured
against the original with the evaluate stage's scoring, then timed together on the CPU.

Each variant is one function below that trains or converts it, writes it and returns a ``Variant``; the
stage then times every variant in the same interleaved rounds and writes one comparison table.

With ``train.distributed`` asking for several processes, the stage launches them (``lmpipe.distributed``)
and the fine-tunes (pruning recovery, distillation) train with DDP: ranks other than 0 run only those
fine-tunes (``fine_tunes``) and stop; rank 0 does everything else, the timing included, alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from lmpipe import compression as lib
from lmpipe import data, distributed, io, latency, models, plots, reports, tracking
from lmpipe.encoding import frame_dataset
from lmpipe.evaluation import score
from lmpipe.inference import predict_proba_model
from lmpipe.params import Params, TrainParams
from lmpipe.training import TrainResult, train_model


@dataclass(frozen=True)
class Paths:
    data: str  # folder with train/val/test.parquet
    model: str  # the trained model folder (the original and the teacher)
    out: str  # folder for the compressed variants
    metrics: str  # headline figures (DVC metrics)
    report: str  # the comparison table
    plot: str  # macro-F1 vs batch-1 latency points (CSV plot)


@dataclass
class Inputs:
    """What every variant is built from and measured on."""

    params: Params
    model_dir: Path
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    tokenizer: Any
    label2id: dict[str, int]
    source: dict[str, str]  # the original's path and weights hash, recorded with the int8 recipe

    def datasets(self):
        max_length = self.params.base.max_length
        return (
            frame_dataset(self.tokenizer, self.train, self.label2id, max_length),
            frame_dataset(self.tokenizer, self.val, self.label2id, max_length),
        )


@dataclass
class Variant:
    """A measured model: its test scores and sizes (``row``), the model on the CPU for timing, its run."""

    row: dict[str, Any]
    model: nn.Module
    run_id: str = ""


def run(params: Params, paths: Paths) -> str:
    cfg = params.compress
    launched = distributed.launch(params.train.distributed)
    if launched is not None:
        return f"compress: {launched.message}"
    model_dir = Path(paths.model)
    config = lib.load_config(model_dir)
    if cfg.distill.enabled:  # a wrong layer list fails now, not after the other variants
        lib.student_layers(cfg.distill.keep_layers, config.num_hidden_layers)
    source_hash = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    inputs = Inputs(
        params,
        model_dir,
        *(data.read_split(paths.data, s) for s in ("train", "val", "test")),
        tokenizer=models.load_tokenizer(model_dir),
        label2id=dict(config.label2id),
        source={"path": str(model_dir), "model.safetensors_sha256_16": source_hash},
    )
    if distributed.is_worker():  # its share is the fine-tunes; rank 0 measures and writes
        fine_tunes(inputs)
        return ""
    tags = {"source_model": str(model_dir), "source_sha256_16": source_hash}
    with io.atomic_dir(paths.out) as out, tracking.stage_run(params, "compress", tags=tags) as parent:
        builders = [("original", original, True), ("int8", quantized, cfg.quantize.enabled)]
        builders += [("pruned", pruned, cfg.prune.enabled), ("student", student, cfg.distill.enabled)]
        variants: dict[str, Variant] = {}
        for name, build, enabled in builders:
            if enabled:
                with child_run(params, name, variant_params(params, name)) as child:
                    variants[name] = build(inputs, out / name)
                    variants[name].run_id = child.info.run_id
        time_variants(inputs, variants)
        rows = comparison(variants, cfg.latency.batch_size)
        for name, variant in variants.items():
            tracking.log_metrics_to(variant.run_id, rows[name])
        names = list(rows)
        b1 = "latency_b1_p50_ms"
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
        lat = cfg.latency
        metrics = {
            "variants": rows,
            "pareto": [n for n, f in zip(names, front, strict=True) if f],
            "latency_setup": {
                "device": "cpu",
                "threads": lat.threads,
                "max_length": params.base.max_length,
                "warmup": lat.warmup,
                "repeats_b1": lat.repeats,
                f"repeats_b{lat.batch_size}": lat.batch_repeats,
            },
            "test_rows": len(inputs.test),
            "source_model": str(model_dir),
            "mlflow_run_id": parent.info.run_id,
        }
        tracking.log_metrics({f"{n}.{k}": v for n, r in rows.items() for k, v in r.items()})
        tracking.log_dict(metrics, "compress_report.json")
        io.write_csv(paths.plot, points)
        reports.write("compress", metrics, paths.metrics, paths.report)
    lines = ["compress: variant      macro-F1  (delta)   size MB  b1 p50 ms  speed-up"]
    for name, row in rows.items():
        lines.append(
            f"compress: {name:<10} {row['macro_f1']:.4f}  ({row['delta_macro_f1']:+.4f})  "
            f"{row['size_mb']:7.1f}  {row[b1]:9.2f}  {row['speedup_b1']:.2f}x"
        )
    return "\n".join(lines)


def child_run(params: Params, name: str, section: dict):
    return tracking.child_run(
        params, name, {"variant": name, **section}, "compress-variant", {"variant": name}
    )


def variant_params(params: Params, name: str) -> dict[str, Any]:
    """The params a variant's child run logs: its own section (and its fine-tune's settings)."""
    cfg = params.compress
    if name == "original":
        return {}
    if name == "int8":
        return dataclasses.asdict(cfg.quantize)
    if name == "pruned":
        section: dict[str, Any] = {"prune": dataclasses.asdict(cfg.prune)}
        if cfg.prune.recovery_epochs:
            section["train"] = dataclasses.asdict(recovery_params(params))
        return section
    return {"distill": dataclasses.asdict(cfg.distill), "train": dataclasses.asdict(student_params(params))}


def plain_train(params: Params) -> TrainParams:
    """The recovery and distillation fine-tunes train every weight of their model, whatever
    train.strategy says (a LoRA wrapper or a frozen encoder would undo pruning or starve the student)."""
    return dataclasses.replace(params.train, strategy="full", fgm_epsilon=0.0)


def recovery_params(params: Params) -> TrainParams:
    p = params.compress.prune
    return dataclasses.replace(
        plain_train(params), epochs=max(p.recovery_epochs, 1), learning_rate=p.learning_rate
    )


def student_params(params: Params) -> TrainParams:
    d = params.compress.distill
    return dataclasses.replace(plain_train(params), epochs=d.epochs, learning_rate=d.learning_rate)


def measure(inputs: Inputs, model: nn.Module, folder: Path, desc: str) -> dict[str, Any]:
    """Test accuracy and macro-F1 through the evaluate stage's scoring, weight size and parameters."""
    base = inputs.params.base
    proba, names = predict_proba_model(
        model, inputs.tokenizer, inputs.test["text"].tolist(), base.max_length,
        inputs.params.train.eval_batch_size, desc=desc,
    )  # fmt: skip
    y_true = data.encode_labels(
        inputs.test["label"], data.model_label2id(names), f"the model in {inputs.model_dir}"
    )
    m = score(y_true, proba, names)["metrics"]
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "size_mb": lib.weights_bytes(folder) / 2**20,
        "layers": model.config.num_hidden_layers,
        **lib.parameter_counts(model),
    }


def log_training(result: TrainResult) -> None:
    tracking.log_metrics(result.summary())
    fig = plots.history_figure(result.history)
    tracking.log_figure(fig, "plots/history.png")
    plots.close(fig)


def original(inputs: Inputs, folder: Path) -> Variant:
    """The trained model itself, scored the same way as the variants (nothing is written to ``folder``)."""
    model = models.load_classifier(inputs.model_dir).to(models.device())
    row = measure(inputs, model, inputs.model_dir, "original")
    return Variant(row, model.cpu().eval())


def quantized(inputs: Inputs, folder: Path) -> Variant:
    """Dynamic int8 of every Linear layer; measured as reloaded from what was saved."""
    fp32 = models.load_classifier(inputs.model_dir).cpu().eval()
    lib.save_int8(lib.quantize_dynamic_int8(fp32), inputs.tokenizer, folder, inputs.source)
    model = lib.load_int8(folder)
    tracking.log_artifact(folder / lib.INT8_RECIPE)
    return Variant(measure(inputs, model, folder, "int8"), model)


def fine_tunes(inputs: Inputs) -> None:
    """What a rank other than 0 runs: the variants' fine-tunes, in the order rank 0 runs them."""
    cfg = inputs.params.compress
    if cfg.prune.enabled and cfg.prune.recovery_epochs:
        prune_and_recover(inputs)
    if cfg.distill.enabled:
        distill(inputs)


def prune_and_recover(inputs: Inputs) -> tuple[nn.Module, dict[str, Any]]:
    """The pruned model, after its recovery fine-tune if there is one, and what to report about it."""
    params, p = inputs.params, inputs.params.compress.prune
    models.seed_everything(params.base.seed)
    model = models.load_classifier(inputs.model_dir).to(models.device())
    keep = lib.magnitude_prune(model, p.sparsity)
    extra: dict[str, Any] = {"sparsity_after_pruning": lib.sparsity_of(model)}
    if p.recovery_epochs:
        train_set, val_set = inputs.datasets()
        result = train_model(
            model,
            inputs.tokenizer,
            train_set,
            val_set,
            recovery_params(params),
            params.base.seed,
            callbacks=[lib.KeepPruned(model, keep), tracking.MlflowTrainingLogger()],
        )
        log_training(result)
        extra["recovery_epochs_run"] = result.epochs_run
    return model, extra


def pruned(inputs: Inputs, folder: Path) -> Variant:
    """Global magnitude pruning of the encoder's Linear weights, with an optional recovery fine-tune
    that keeps the pruned weights at zero."""
    p = inputs.params.compress.prune
    model, extra = prune_and_recover(inputs)
    models.write_model(model, inputs.tokenizer, folder)
    model = models.load_classifier(folder).to(models.device()).eval()
    row = measure(inputs, model, folder, "pruned")
    row.update(target_sparsity=p.sparsity, measured_sparsity=lib.sparsity_of(model), **extra)
    return Variant(row, model.cpu())


def distill(inputs: Inputs) -> tuple[nn.Module, TrainResult]:
    """A shallower student that keeps some of the teacher's layers, distilled in the shared loop."""
    params, d = inputs.params, inputs.params.compress.distill
    models.seed_everything(params.base.seed)
    teacher = models.load_classifier(inputs.model_dir).to(models.device())
    model = lib.make_student(teacher, d.keep_layers)
    tracking.log_metrics({"student_parameters": lib.parameter_counts(model)["parameters"]})
    loss = lib.DistillationLoss(teacher, model, d.temperature, d.alpha)
    train_set, val_set = inputs.datasets()
    try:
        result = train_model(
            model,
            inputs.tokenizer,
            train_set,
            val_set,
            student_params(params),
            params.base.seed,
            callbacks=[tracking.MlflowTrainingLogger()],
            compute_loss=loss,
        )
    finally:
        loss.close()
    log_training(result)
    return model, result


def student(inputs: Inputs, folder: Path) -> Variant:
    """The distilled student (``distill``), written and measured."""
    model, result = distill(inputs)
    models.write_model(model, inputs.tokenizer, folder)
    tracking.log_artifact(folder, "model")
    model = models.load_classifier(folder).to(models.device()).eval()
    row = measure(inputs, model, folder, "student")
    row.update(
        kept_layers=",".join(map(str, model.config.distilled_from_layers)),
        best_val_macro_f1=result.best_val_macro_f1,
    )
    return Variant(row, model.cpu())


def time_variants(inputs: Inputs, variants: dict[str, Variant]) -> None:
    """CPU latency of every variant, in the same interleaved rounds, at batch 1 and the larger batch."""
    lat, max_length = inputs.params.compress.latency, inputs.params.base.max_length
    texts = inputs.test["text"].tolist()
    loaded = {name: v.model for name, v in variants.items()}
    for batch_size, repeats in ((1, lat.repeats), (lat.batch_size, lat.batch_repeats)):
        batch = lib.fixed_batch(inputs.tokenizer, texts, batch_size, max_length)
        seconds = lib.time_models(
            loaded, batch, lat.warmup, repeats, lat.threads, desc=f"latency batch {batch_size}"
        )
        for name, values in seconds.items():
            variants[name].row.update(latency.summary(values, batch_size))


def comparison(variants: dict[str, Variant], batch_size: int) -> dict[str, dict[str, Any]]:
    """Each variant's row with its change against the original: scores, speed-ups, size ratio."""
    first = variants["original"].row
    rows = {}
    for name, variant in variants.items():
        row = dict(variant.row)
        row["size_mb"] = round(row["size_mb"], 3)
        row["delta_accuracy"] = row["accuracy"] - first["accuracy"]
        row["delta_macro_f1"] = row["macro_f1"] - first["macro_f1"]
        for n in (1, batch_size):
            row[f"speedup_b{n}"] = round(first[f"latency_b{n}_p50_ms"] / row[f"latency_b{n}_p50_ms"], 3)
        row["size_ratio"] = round(row["size_mb"] / round(first["size_mb"], 3), 3)
        row["mlflow_run_id"] = variant.run_id
        rows[name] = row
    return rows
