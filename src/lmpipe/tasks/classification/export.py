"""Text classification's export (export): the ONNX classifier checked and timed (``lmpipe.serve.checks``),
the served variant against evaluate's baseline, and the model card's sections."""

from __future__ import annotations

import pandas as pd

from lmpipe.tasks.base import Exported


def _sentence(phrase: str) -> str:
    return phrase[:1].upper() + phrase[1:]


def _card_data(params, records: dict) -> list[str]:
    prepare, sizes = records["prepare"], records["split"].get("sizes", {})
    tl = prepare.get("token_length", {})
    truncated = f"{100 * tl['truncated_fraction']:.1f}" if "truncated_fraction" in tl else "n/a"
    return [
        "## Data",
        "",
        f"- Source: {prepare.get('source') or f'`{params.prepare.source}`'}; {prepare.get('rows_in', 'n/a')} rows in, "
        f"{prepare.get('rows_out', 'n/a')} after cleaning and de-duplication.",
        f"- Split (seed {params.base.seed}, stratified): train {sizes.get('train', 'n/a')}, "
        f"val {sizes.get('val', 'n/a')}, test {sizes.get('test', 'n/a')}.",
        f"- Token lengths: median {tl.get('p50', 'n/a')}, p95 {tl.get('p95', 'n/a')}; "
        f"{truncated}% of texts are longer than `max_length` = {params.base.max_length} tokens and truncated.",
        "",
    ]


def _card_training(params, records: dict, export: dict) -> list[str]:
    from lmpipe.serve import modelcard as card
    from lmpipe.serve.modelcard import fmt, training_params

    train = records["train"]
    return [
        "## Model and training",
        "",
        f"- Base model: {card.base_model(params)}; {train.get('parameters', 'n/a')} parameters.",
        f"- Exported source: `{params.export.source}`.",
        f"- Probabilities: softmax(logits / T) with T = {export.get('temperature', 1.0):g}, fit on val by "
        "the analyze stage (temperature scaling: it changes no prediction, only how sure the model says it is).",
        training_params(params),
        f"- Best val macro-F1 {fmt(train.get('best_val_macro_f1'))} at epoch {train.get('best_epoch', 'n/a')}.",
        f"- MLflow training run: `{train.get('mlflow_run_id', 'n/a')}`; git commit `{export.get('git_commit', 'n/a')}`.",
        "",
    ]


def _card_scores(params, records: dict, export: dict) -> list[str]:
    from lmpipe.serve.modelcard import fmt, versus_baseline

    evaluate, sizes = records["evaluate"], records["split"].get("sizes", {})
    model, baseline = evaluate.get("model", {}), evaluate.get("baseline", {})
    fp32, int8 = export.get("onnx_fp32", {}), export.get("onnx_int8", {})
    return [
        "## Test metrics",
        "",
        "| predictor | macro-F1 | accuracy |",
        "|---|---|---|",
        f"| PyTorch fp32 (this model) | {fmt(model.get('macro_f1'))} | {fmt(model.get('accuracy'))} |",
        f"| ONNX fp32 | {fmt(fp32.get('macro_f1'))} | {fmt(fp32.get('accuracy'))} |",
        f"| ONNX Runtime int8 | {fmt(int8.get('macro_f1'))} | {fmt(int8.get('accuracy'))} |",
        f"| TF-IDF + logistic regression baseline | {fmt(baseline.get('macro_f1'))} | {fmt(baseline.get('accuracy'))} |",
        "",
        f"{evaluate.get('test_rows', sizes.get('test', 'n/a'))} test rows. The served variant is "
        f"**{params.export.registered_variant}** (test macro-F1 {fmt(export.get('served', {}).get('macro_f1'))}).",
        *versus_baseline(evaluate.get("model_minus_baseline", {})),
        "",
    ]


def _card_export(params, export: dict) -> list[str]:
    from lmpipe.serve.modelcard import fmt, latency_table

    fp32, int8, size = export.get("onnx_fp32", {}), export.get("onnx_int8", {}), export.get("size_mb", {})
    return [
        "## Export",
        "",
        f"- ONNX fp32 vs PyTorch: max |logit difference| {fp32.get('max_abs_logit_diff', float('nan')):.2e}, "
        f"label agreement {fmt(fp32.get('label_agreement'))}.",
        f"- ONNX Runtime dynamic int8: label agreement with PyTorch {fmt(int8.get('label_agreement'))}; "
        f"macro-F1 change vs PyTorch {fmt(int8.get('macro_f1_minus_pytorch'))}.",
        f"- Sizes: fp32 {fmt(size.get('fp32'), 1)} MB, int8 {fmt(size.get('int8'), 1)} MB.",
        "",
        *latency_table(params, export),
    ]


def _card_use(params, records: dict) -> list[str]:
    from lmpipe.serve.modelcard import fmt

    sizes = records["split"].get("sizes", {})
    data_name = records["prepare"].get("source") or f"`{params.prepare.source}`"
    return [
        "## Intended use",
        "",
        f"Routing or tagging English texts like the training data ({data_name}) into the classes above, "
        "with a human in the loop for decisions that matter. Use the class probabilities to send "
        "low-confidence texts to a person.",
        "",
        "## Limitations",
        "",
        f"- Only the first {params.base.max_length} tokens of a text are read; the rest is truncated "
        "silently by the model (`lmpipe predict` flags such rows in its `truncated` column).",
        "- Trained on one corpus: other sources, periods, styles or languages will score lower, "
        "and a text from outside these classes is still forced into one of them.",
        f"- The test split is small ({sizes.get('test', 'n/a')} rows): one error moves accuracy by "
        f"{fmt(100 / sizes['test'], 2) if sizes.get('test') else 'n/a'} points.",
        "- Calibration is not checked: probabilities rank well but are not guaranteed frequencies.",
        "",
    ]


def export(job):
    """The ONNX files checked against PyTorch (``lmpipe.serve.checks``), the compress variants
    ``export.compare`` names beside them, their latency, and the served variant against evaluate's
    baseline. Served probabilities are softmax(logits / T), T analyze's temperature."""
    from lmpipe.serve import checks, onnx_export
    from lmpipe.serve.serving import VARIANT_FILES

    params, test, tmp, cfg = job.params, job.test, job.folder, job.params.export
    if cfg.source != "model" and job.temperature != 1.0:
        print(
            f"export: serving '{cfg.source}' at the temperature fit on the trained model "
            f"({job.temperature:g}); its own calibration may differ (docs/analysis.md)"
        )
    fp32_layers = checks.int8_fp32_layers(params, job.records["compression"])
    checked = checks.export_and_check(params, job.model_dir, test, tmp, fp32_layers, job.temperature)
    checked.served_variant = checks.served_variant(params, checked)
    others = checks.compared(params, job.sources, test, tmp, job.temperature)
    latency = checks.benchmark(params, checked, test["text"].tolist(), others)
    baseline = pd.read_csv(job.baseline_predictions)
    versus = checks.versus_evaluated_baseline(params, checked, test, baseline, job.records["evaluate"])
    sizes = {
        v: round((tmp / f).stat().st_size / 2**20, 3) for v, f in VARIANT_FILES.items() if (tmp / f).is_file()
    }
    sizes |= {
        f"{n}_int8": round((tmp / n / VARIANT_FILES[o.int8_variant]).stat().st_size / 2**20, 3)
        for n, o in others.items()
    }
    variant = checked.served_variant
    report = {
        "temperature": job.temperature,
        "labels": checked.labels,
        "test_rows": len(test),
        "pytorch_fp32": checked.pytorch,
        "onnx_fp32": checked.onnx_fp32,
        "onnx_int8": checked.rows["int8"],
        **{f"onnx_{v}": checked.rows[v] for v in ("fp32_opt", "int8_opt") if v in checked.rows},
        "optimize": checked.optimize,
        **{
            f"{n}_onnx_int8": {
                **o.rows[o.int8_variant],
                "variant": o.int8_variant,
                "optimize": o.optimize,
            }
            for n, o in others.items()
        },
        "served": {
            "variant": variant,
            "macro_f1": checked.served["macro_f1"],
            "accuracy": checked.served["accuracy"],
            "latency_b1_p50_ms": latency["latency"][f"onnx_{variant}"].get("latency_b1_p50_ms"),
            "size_mb": sizes[variant],
        },
        **latency,
        "comparison": checks.comparison(checked, others, latency),
        "size_mb": sizes,
    }
    texts = test["text"].tolist()
    return Exported(
        report=report,
        variant=variant,
        served=checked.served,
        versus=versus,
        score_registered=lambda uri: onnx_export.score_registered(uri, texts, checked.y_true, checked.labels),
        logged=("pytorch_fp32", "onnx_fp32", "onnx_int8", "latency", "speedup", "size_mb", "comparison"),
        subfolders=list(others),
    )


def export_summary(report):
    b1 = {name: cases.get("latency_b1_p50_ms", float("nan")) for name, cases in report["latency"].items()}
    return (
        f"export: ONNX fp32 max |dlogit| {report['onnx_fp32']['max_abs_logit_diff']:.1e}, int8 agreement "
        f"{report['onnx_int8']['label_agreement']:.4f} | batch-1 p50: pytorch {b1['pytorch_fp32']:.1f} ms, "
        f"int8 {b1['onnx_int8']:.1f} ms"
    )


def model_card(params, records, export):
    """MODEL_CARD.md: data, base model and training, test metrics against the baseline, export and
    latency, compression, the gate, intended use and limitations."""
    from lmpipe.serve import modelcard as card
    from lmpipe.tasks.classification import TASK

    return "\n".join(
        [
            f"# Model card: {params.export.registered_model}",
            "",
            f"{_sentence(TASK.describe(export.get('labels', [])))}, fine-tuned from {card.base_model(params)} "
            f"and exported to ONNX. {card.registered(export)}",
            "",
            *_card_data(params, records),
            *_card_training(params, records, export),
            *_card_scores(params, records, export),
            *_card_export(params, export),
            "",
            *card.compression_section(params, export, records.get("compression")),
            "",
            *card.gate_lines(export.get("gate", {})),
            *_card_use(params, records),
        ]
    )
