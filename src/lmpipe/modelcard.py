"""The model card: a Markdown page written beside the export, from the pipeline's own records."""

from __future__ import annotations

from typing import Any

from lmpipe.params import Params


def _f(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def render(
    params: Params,
    prepare: dict,
    split: dict,
    train: dict,
    evaluate: dict,
    export: dict,
    compression: dict | None = None,
) -> str:
    """Markdown covering data, base model and training params, test metrics against the baseline,
    compression and export figures, intended use and limitations."""
    data_name = prepare.get("source") or f"`{params.prepare.source}`"
    sizes = split.get("sizes", {})
    labels = export.get("labels", [])
    model, baseline = evaluate.get("model", {}), evaluate.get("baseline", {})
    served = export.get("served", {})
    reg = export.get("registry", {})
    gate = export.get("gate", {})
    tl = prepare.get("token_length", {})
    lines = [
        f"# Model card: {params.export.registered_model}",
        "",
        f"A {len(labels)}-class text classifier ({', '.join(labels)}), fine-tuned from `{params.base.model}` "
        f"and exported to ONNX. Registered in MLflow as `{reg.get('name', 'n/a')}` version "
        f"{reg.get('version', 'n/a')} (aliases: {', '.join(gate.get('aliases', [])) or 'none'}).",
        "",
        "## Data",
        "",
        f"- Source: {data_name}; {prepare.get('rows_in', 'n/a')} rows in, {prepare.get('rows_out', 'n/a')} "
        f"after cleaning and de-duplication.",
        f"- Split (seed {params.base.seed}, stratified): train {sizes.get('train', 'n/a')}, "
        f"val {sizes.get('val', 'n/a')}, test {sizes.get('test', 'n/a')}.",
        f"- Token lengths: median {tl.get('p50', 'n/a')}, p95 {tl.get('p95', 'n/a')}; "
        f"{_f(100 * tl['truncated_fraction'], 1) if 'truncated_fraction' in tl else 'n/a'}% of texts are "
        f"longer than `max_length` = {params.base.max_length} tokens and truncated.",
        "",
        "## Model and training",
        "",
        f"- Base model: `{params.base.model}`; {train.get('parameters', 'n/a')} parameters.",
        f"- Exported source: `{params.export.source}`.",
        f"- Probabilities: softmax(logits / T) with T = {export.get('temperature', 1.0):g}, fit on val by "
        "the analyze stage (temperature scaling: it changes no prediction, only how sure the model says it is).",
        "- Training params: "
        + ", ".join(f"{k}={v}" for k, v in params.to_dict()["train"].items())
        + f"; max_length={params.base.max_length}.",
        f"- Best val macro-F1 {_f(train.get('best_val_macro_f1'))} at epoch {train.get('best_epoch', 'n/a')}.",
        f"- MLflow training run: `{train.get('mlflow_run_id', 'n/a')}`; "
        f"git commit `{export.get('git_commit', 'n/a')}`.",
        "",
        "## Test metrics",
        "",
        "| predictor | macro-F1 | accuracy |",
        "|---|---|---|",
        f"| PyTorch fp32 (this model) | {_f(model.get('macro_f1'))} | {_f(model.get('accuracy'))} |",
        f"| ONNX fp32 | {_f(export.get('onnx_fp32', {}).get('macro_f1'))} | "
        f"{_f(export.get('onnx_fp32', {}).get('accuracy'))} |",
        f"| ONNX Runtime int8 | {_f(export.get('onnx_int8', {}).get('macro_f1'))} | "
        f"{_f(export.get('onnx_int8', {}).get('accuracy'))} |",
        f"| TF-IDF + logistic regression baseline | {_f(baseline.get('macro_f1'))} | "
        f"{_f(baseline.get('accuracy'))} |",
        "",
        f"{evaluate.get('test_rows', sizes.get('test', 'n/a'))} test rows. The served variant is "
        f"**{params.export.registered_variant}** (test macro-F1 {_f(served.get('macro_f1'))}).",
        *_versus_baseline(evaluate.get("model_minus_baseline", {})),
        "",
        "## Export",
        "",
        f"- ONNX fp32 vs PyTorch: max |logit difference| "
        f"{export.get('onnx_fp32', {}).get('max_abs_logit_diff', float('nan')):.2e}, "
        f"label agreement {_f(export.get('onnx_fp32', {}).get('label_agreement'))}.",
        f"- ONNX Runtime dynamic int8: label agreement with PyTorch "
        f"{_f(export.get('onnx_int8', {}).get('label_agreement'))}; macro-F1 change vs PyTorch "
        f"{_f(export.get('onnx_int8', {}).get('macro_f1_minus_pytorch'))}.",
        f"- Sizes: fp32 {_f(export.get('size_mb', {}).get('fp32'), 1)} MB, int8 "
        f"{_f(export.get('size_mb', {}).get('int8'), 1)} MB.",
        "",
        f"Latency (ms, CPU, {params.export.latency.threads} threads, {params.export.latency.warmup} warm-up "
        f"and {params.export.latency.repeats} timed runs, inputs padded to the longest text of the batch "
        f"and at most {params.base.max_length} tokens; 1-minute load average "
        f"{export.get('latency_load_average', 'n/a')} while timing):",
        "",
        "| backend | "
        + " | ".join(f"batch {n} p50 | batch {n} p95" for n in params.export.latency.batch_sizes)
        + " |",
        "|---|" + "---|---|" * len(params.export.latency.batch_sizes),
    ]
    for backend, cases in export.get("latency", {}).items():
        cells = []
        for n in params.export.latency.batch_sizes:
            cells += [_f(cases.get(f"latency_b{n}_p50_ms"), 2), _f(cases.get(f"latency_b{n}_p95_ms"), 2)]
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    lines += ["", "## Compression", ""]
    lines.append(
        "This export is the trained model itself (`export.source: model`)."
        if params.export.source == "model"
        else f"This export is the compress stage's `{params.export.source}` variant."
    )
    if export.get("source_within_budget") is False:
        lines.append(
            f"**It broke compress's quality budget**: it loses {100 * export['source_val_f1_loss']:.2f} pt of val "
            f"macro-F1 against the trained model, over the {100 * export['source_max_loss']:g} pt allowed; it "
            "was shipped only because `export.allow_over_budget` names it."
        )
    variants = (compression or {}).get("variants", {})
    if variants:
        lines += [
            "",
            "The compress stage's variants: their val macro-F1 loss against the trained model, judged against "
            f"the quality budget (`compress.max_loss`, {100 * compression.get('max_loss', 0):g} pt by default), "
            "and their test scores (CPU, batch 1):",
            "",
            "| variant | val loss (pt) | within budget | test macro-F1 | change | size (MB) | non-zero params "
            "| p50 latency (ms) | speed-up |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, v in variants.items():
            loss = v.get("val_f1_loss")
            flag = {True: "yes", False: "**no**"}.get(v.get("within_budget"), "")
            lines.append(
                f"| {name} | {_f(None if loss is None else 100 * loss, 2)} | {flag} | "
                f"{_f(v.get('macro_f1'), 4)} | {_f(v.get('delta_macro_f1'), 4)} | "
                f"{_f(v.get('size_mb'), 1)} | {v.get('nonzero_parameters', 'n/a')} | "
                f"{_f(v.get('latency_b1_p50_ms'), 1)} | {_f(v.get('speedup_b1'), 2)} |"
            )
        notes = []
        if "sparsity" in variants.get("pruned", {}):
            notes.append(
                f"pruned at sparsity {variants['pruned']['sparsity']:g} ({variants['pruned']['chosen_by']})"
            )
        if variants.get("int8", {}).get("fp32_layers"):
            notes.append(f"int8 keeps these Linear layers fp32: {', '.join(variants['int8']['fp32_layers'])}")
        lines += ["", *[f"- {n}" for n in notes]] if notes else []
    lines += [
        "",
        *_gate_lines(gate),
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
        f"{_f(100 / sizes['test'], 2) if sizes.get('test') else 'n/a'} points.",
        "- Calibration is not checked: probabilities rank well but are not guaranteed frequencies.",
        "",
    ]
    return "\n".join(lines)


def _versus_baseline(gap: dict) -> list[str]:
    """One sentence on whether the model's gap to the baseline is more than test-set noise."""
    if "macro_f1_ci95_low" not in gap:
        return []
    verdict = "significant" if gap["macro_f1_significant"] else "not significant"
    return [
        "",
        f"Model minus baseline: {100 * gap['macro_f1']:+.2f} pt macro-F1, paired bootstrap 95% CI "
        f"[{100 * gap['macro_f1_ci95_low']:+.2f}, {100 * gap['macro_f1_ci95_high']:+.2f}] pt ({verdict}); "
        f"the model alone is right on {gap['model_only_right']} test texts, the baseline alone on "
        f"{gap['baseline_only_right']} (McNemar p = {gap['mcnemar_p']:.3f}).",
    ]


def render_entities(params: Params, records: dict, export: dict) -> str:
    """The model card of a token classifier (named-entity recognition): data, training, entity scores
    against the CRF baseline, export parity and latency, the served output, the gate, use and limits."""
    prepare, split, train = records["prepare"], records["split"], records["train"]
    evaluate = records["evaluate"]
    sizes = split.get("sizes", {})
    types = sorted({t[2:] for t in export.get("labels", []) if t[:2] in ("B-", "I-")})
    model, baseline = evaluate.get("model", {}), evaluate.get("baseline", {})
    gap = evaluate.get("model_minus_baseline", {})
    reg, gate, served = export.get("registry", {}), export.get("gate", {}), export.get("served", {})
    fp32, int8 = export.get("onnx_fp32", {}), export.get("onnx_int8", {})
    lines = [
        f"# Model card: {params.export.registered_model}",
        "",
        f"A named-entity tagger (token classification, BIO tags over {len(types)} entity types: "
        f"{', '.join(types)}), fine-tuned from `{params.base.model}` and exported to ONNX. Registered in "
        f"MLflow as `{reg.get('name', 'n/a')}` version {reg.get('version', 'n/a')} (aliases: "
        f"{', '.join(gate.get('aliases', [])) or 'none'}).",
        "",
        "## Data",
        "",
        f"- Source: {prepare.get('source') or params.prepare.source}; {prepare.get('rows_in', 'n/a')} "
        f"sentences in, {prepare.get('rows_out', 'n/a')} after cleaning and de-duplication.",
        f"- Split (seed {params.base.seed}, by sentence): train {sizes.get('train', 'n/a')}, val "
        f"{sizes.get('val', 'n/a')}, test {sizes.get('test', 'n/a')}.",
        "",
        "## Model and training",
        "",
        f"- Base model: `{params.base.model}`; {train.get('parameters', 'n/a')} parameters; labels on each "
        "word's first subword.",
        "- Training params: "
        + ", ".join(f"{k}={v}" for k, v in params.to_dict()["train"].items())
        + f"; max_length={params.base.max_length}.",
        f"- Best val entity macro-F1 {_f(train.get('best_val_macro_f1'))} at epoch "
        f"{train.get('best_epoch', 'n/a')}; MLflow training run `{train.get('mlflow_run_id', 'n/a')}`; git "
        f"commit `{export.get('git_commit', 'n/a')}`.",
        "",
        "## Test scores (entity level, seqeval's strict IOB2 spans)",
        "",
        "| predictor | micro-F1 | macro-F1 | word accuracy |",
        "|---|---|---|---|",
        f"| PyTorch fp32 (this model) | {_f(model.get('f1'))} | {_f(model.get('macro_f1'))} | "
        f"{_f(model.get('accuracy'))} |",
        f"| ONNX fp32 | {_f(fp32.get('f1'))} | {_f(fp32.get('macro_f1'))} | {_f(fp32.get('accuracy'))} |",
        f"| ONNX Runtime int8 | {_f(int8.get('f1'))} | {_f(int8.get('macro_f1'))} | {_f(int8.get('accuracy'))} |",
        f"| CRF baseline (hand-written word features) | {_f(baseline.get('f1'))} | "
        f"{_f(baseline.get('macro_f1'))} | {_f(baseline.get('accuracy'))} |",
        "",
        f"{evaluate.get('test_rows', 'n/a')} test sentences, {evaluate.get('test_entities', 'n/a')} entities."
        + (
            f" Model minus baseline: {100 * gap['f1']:+.2f} pt micro-F1, paired bootstrap 95% CI over "
            f"sentences [{100 * gap['f1_ci95_low']:+.2f}, {100 * gap['f1_ci95_high']:+.2f}]; "
            f"{100 * gap['macro_f1']:+.2f} pt macro-F1 [{100 * gap['macro_f1_ci95_low']:+.2f}, "
            f"{100 * gap['macro_f1_ci95_high']:+.2f}]."
            if "f1_ci95_low" in gap
            else ""
        ),
        "",
        "## Export and serving",
        "",
        f"- ONNX fp32 vs PyTorch over {fp32.get('words', 'n/a')} test words: max |logit difference| "
        f"{fp32.get('max_abs_logit_diff', float('nan')):.2e}, word tag agreement {_f(fp32.get('label_agreement'))}.",
        f"- ONNX Runtime dynamic int8: word tag agreement {_f(int8.get('label_agreement'))}, entity "
        f"macro-F1 change {_f(int8.get('macro_f1_minus_pytorch'))}.",
        f"- Served variant: **{served.get('variant', 'n/a')}** ({_f(served.get('size_mb'), 1)} MB, batch-1 "
        f"p50 {_f(served.get('latency_b1_p50_ms'), 1)} ms on {export.get('latency_threads', 'n/a')} CPU "
        "threads).",
        "- Output: for each text, a list of entities `{type, start, end, text, score}`: character offsets "
        "into the text (end exclusive) and the mean probability of the entity's word tags (raw softmax).",
        "",
        *_gate_lines(gate),
        "## Intended use",
        "",
        "Finding names of people, places, companies and the other types above in short English texts like "
        "the training data, with a person checking what matters.",
        "",
        "## Limitations",
        "",
        "- Words are the text's whitespace-separated tokens, as in the training data: punctuation glued to a "
        "word (`Paris,`) is part of it, and of the entity's text.",
        f"- Only the first {params.base.max_length} subword tokens of a text are read; later words are "
        "tagged `O`.",
        f"- The test split is small ({sizes.get('test', 'n/a')} sentences), and rare types have a handful of "
        "entities: per-type scores move a lot with one error.",
        "- Scores are not calibrated probabilities.",
        "",
    ]
    return "\n".join(lines)


def _gate_lines(gate: dict) -> list[str]:
    """The promotion gate's section: its decision and every reason."""
    decision = "passed" if gate.get("passed") else "not promoted"
    return [
        "## Promotion gate",
        "",
        f"Decision: {decision}.",
        "",
        *[f"- {r}" for r in gate.get("reasons", [])],
        "",
    ]
