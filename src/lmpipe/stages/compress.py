"""compress: int8 quantization, magnitude pruning and distillation of the trained model, each measured
against the original with the evaluate stage's scoring, then timed together on the CPU.

Each variant is one function below that trains or converts it, writes it and returns a ``Variant``; the
stage then times every variant in the same interleaved rounds and writes one comparison table.

With ``train.distributed`` asking for several processes, the stage launches them (``lmpipe.distributed``)
and the fine-tunes (pruning recovery, distillation) train with DDP: ranks other than 0 run only those
fine-tunes (``fine_tunes``) and stop; rank 0 does everything else, the timing included, alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lmpipe import data, distributed, io, reports, tasks, tracking
from lmpipe.compress import compression
from lmpipe.compress.variants import (
    CURVE_COLUMNS,
    Inputs,
    Variant,
    child_run,
    comparison,
    fine_tunes,
    judge,
    original,
    pruned,
    quantized,
    student,
    time_variants,
    variant_params,
)
from lmpipe.modeling import hub, models
from lmpipe.params import Params
from lmpipe.tasks.base import Compress

# the modules of the task's package this stage uses (dvc.yaml: src/lmpipe/tasks/${base.task}/<part>.py)
TASK_PARTS = ("model", "evaluation", "export")
NOT_YET = "not available for {task}"  # a task without "compress" in its supports


@dataclass(frozen=True)
class Paths:
    data: str  # folder with train/val/test.parquet
    model: str  # the trained model folder (the original and the teacher)
    out: str  # folder for the compressed variants
    metrics: str  # headline figures (DVC metrics)
    report: str  # the comparison table
    plot: str  # macro-F1 vs batch-1 latency points (CSV plot)
    prune_curve: str  # val macro-F1 against sparsity (CSV plot)


def run(params: Params, paths: Paths) -> str:
    cfg = params.compress
    task = tasks.for_stage(params.base.task, "compress", TASK_PARTS)  # val budgets: its datasets and scores
    if "compress" not in task.supports:
        return reports.not_applicable(
            "compress", NOT_YET.format(task=task.name), paths.metrics, paths.report, [paths.out],
            [paths.plot, paths.prune_curve], model=hub.record_of(params.base),
        )  # fmt: skip
    if task.own_compression:
        return own(params, paths, task)
    launched = distributed.launch(params.train.distributed)
    if launched is not None:
        return f"compress: {launched.message}"
    model_dir = Path(paths.model)
    config = compression.load_config(model_dir)
    if cfg.distill.enabled:  # a wrong layer list fails now, not after the other variants
        compression.student_layers(cfg.distill.keep_layers, config.num_hidden_layers)
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
                    if name != "original":
                        judge(inputs, name, variants[name])
        timing = time_variants(inputs, variants)
        rows, warned = record(params, paths, inputs, variants, parent.info.run_id, timing)
    return summary(params, rows, warned, timing, len(inputs.test))


def own(params: Params, paths: Paths, task) -> str:
    """A task's own variants (``Task.compress``): built, judged and timed by the task, recorded here."""
    model_dir = Path(paths.model)
    source_hash = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    source = {"path": str(model_dir), "model.safetensors_sha256_16": source_hash}
    tags = {"source_model": str(model_dir), "source_sha256_16": source_hash}
    splits = [data.read_split(paths.data, s) for s in ("train", "val", "test")]
    with io.atomic_dir(paths.out) as out, tracking.stage_run(params, "compress", tags=tags) as parent:
        done = task.compress(Compress(params, model_dir, *splits, folder=out, source=source))
        report = {**done.report, "budget_warnings": done.warnings, "mlflow_run_id": parent.info.run_id}
        rows = report["variants"]
        tracking.log_metrics({f"{n}.{k}": v for n, r in rows.items() for k, v in r.items()})
        tracking.log_dict(report, "compress_report.json")
        if done.warnings:
            tracking.set_tags({"budget_warnings": " | ".join(done.warnings)[:5000]})
        io.write_csv(paths.plot, done.points)
        io.write_csv(
            paths.prune_curve, pd.DataFrame([], columns=CURVE_COLUMNS)
        )  # no pruning: its note says why
        reports.write(
            "compress",
            report,
            paths.metrics,
            paths.report,
            task.headline.get("compress"),
            model=hub.record_of(params.base),
        )
    return done.summary


def record(
    params: Params, paths: Paths, inputs: Inputs, variants: dict[str, Variant], run_id: str, timing: dict
):
    """The comparison table (each variant's row also on its own MLflow run), the pruning curve and the
    Pareto points (DVC plots), the report and its DVC metrics. Returns the rows and the budget warnings."""
    cfg = params.compress
    rows = comparison(variants, cfg.latency.batch_size, timing["speedup_basis"])
    curve = variants["pruned"].row.pop("curve") if "pruned" in variants else []
    for name, variant in variants.items():
        tracking.log_metrics_to(variant.run_id, rows[name])
    names = list(rows)
    b1 = "latency_b1_p50_ms"
    front = compression.pareto_front([(rows[n][b1], rows[n]["macro_f1"]) for n in names])
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
    warned = [w for v in variants.values() for w in v.warnings]
    metrics = {
        "variants": rows,
        "max_loss": cfg.max_loss,
        "confidence": cfg.confidence,  # the budget rule: the loss's one-sided upper bound at this level
        "bound": cfg.bound,  # prediction: on the loss a new split as large as test will show (issue 35)
        "resamples": cfg.resamples,
        "bootstrap_seconds": round(inputs.bootstrap_seconds, 2),  # what the bounds and CIs cost (issue 35)
        "budget_warnings": warned,
        "prune_curve": curve,
        "pareto": [n for n, f in zip(names, front, strict=True) if f],
        **timing,
        "latency_setup": {
            "device": "cpu",
            "threads": lat.threads,
            "max_length": params.base.max_length,
            "warmup": lat.warmup,
            "repeats_b1": lat.repeats,
            f"repeats_b{lat.batch_size}": lat.batch_repeats,
            "max_other_load": lat.max_other_load,
        },
        "test_rows": len(inputs.test),
        "source_model": str(inputs.model_dir),
        "mlflow_run_id": run_id,
    }
    tracking.log_metrics({f"{n}.{k}": v for n, r in rows.items() for k, v in r.items()})
    tracking.log_dict(metrics, "compress_report.json")
    io.write_csv(paths.plot, points)
    io.write_csv(paths.prune_curve, pd.DataFrame(curve, columns=CURVE_COLUMNS))
    if warned:
        tracking.set_tags({"budget_warnings": " | ".join(warned)[:5000]})
    reports.write("compress", metrics, paths.metrics, paths.report, model=hub.record_of(params.base))
    return rows, warned


def summary(params: Params, rows: dict[str, dict], warned: list[str], timing: dict, test_rows: int) -> str:
    """The stage's printed table: each variant's test score, val loss against its budget, size and speed
    (wall-clock p50 and CPU cost at batch 1; the speed-up from whichever the busy check trusts)."""
    cfg, b1 = params.compress, "latency_b1_p50_ms"
    rule = (
        "its val loss (compress.confidence: null)"
        if cfg.confidence is None
        else f"its loss's {100 * cfg.confidence:g}% upper bound (paired bootstrap over val rows)"
        if cfg.bound == "confidence"
        else f"the {100 * cfg.confidence:g}% upper bound of the loss {test_rows} new rows will show "
        "(paired bootstrap over val rows, the new rows' own noise added; compress.bound: prediction)"
    )
    lines = [
        f"compress: budget {100 * cfg.max_loss:g} pt of val macro-F1, judged on {rule}; per-variant budgets "
        "in the report",
        "compress: variant      test F1  (delta)   val loss  bound     budget  test loss [95% CI]        "
        f"size MB  b1 p50 ms  b1 cpu ms  speed-up ({timing['speedup_basis']})",
    ]
    for name, row in rows.items():
        verdict = "" if name == "original" else ("ok" if row["within_budget"] else "MISSED")
        bound = row.get("val_f1_loss_bound")
        bound_text = f"{100 * bound:+6.2f}" if bound is not None else "   n/a"
        test = row.get("test_f1_loss_ci95")
        test_text = (
            f"{100 * row['test_f1_loss']:+6.2f} [{100 * test[0]:+.2f}, {100 * test[1]:+.2f}]" if test else ""
        )
        lines.append(
            f"compress: {name:<10} {row['macro_f1']:.4f}  ({row['delta_macro_f1']:+.4f})  "
            f"{100 * row['val_f1_loss']:+6.2f} pt  {bound_text}  {verdict:<6}  {test_text:<24}  "
            f"{row['size_mb']:7.1f}  {row[b1]:9.2f}  {row['cpu_b1_ms']:9.2f}  {row['speedup_b1']:.2f}x"
        )
    if "pruned" in rows:
        lines.append(
            f"compress: pruned at sparsity {rows['pruned']['sparsity']:g} ({rows['pruned']['chosen_by']})"
        )
    if "int8" in rows and rows["int8"]["fp32_layer_count"]:
        lines.append(
            f"compress: int8 keeps {rows['int8']['fp32_layer_count']} Linear layer(s) fp32 (see report.json)"
        )
    lines += [f"compress: WARNING: {w}" for w in warned]
    return "\n".join(lines)
