"""The model card's shared sections: a Markdown page written beside the export, from the pipeline's own
records. Each task writes its card (``Task.model_card``) from these and its own sentences."""

from __future__ import annotations

from typing import Any

from lmpipe.params import Params


def fmt(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` decimals, or ``n/a``."""
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def registered(export: dict) -> str:
    """Where the model is registered, and its aliases."""
    reg, gate = export.get("registry", {}), export.get("gate", {})
    return (
        f"Registered in MLflow as `{reg.get('name', 'n/a')}` version {reg.get('version', 'n/a')} "
        f"(aliases: {', '.join(gate.get('aliases', [])) or 'none'})."
    )


def base_model(params: Params) -> str:
    """The base model as the card names it: its id and the exact version the pipeline resolved (a hub
    model's commit hash, an embedded model's package version)."""
    from lmpipe.modeling import hub

    record = hub.record_of(params.base)
    return f"`{params.base.model}`" + (
        f" (revision `{record['revision']}`)" if record.get("revision") else ""
    )


def training_params(params: Params) -> str:
    return (
        "- Training params: "
        + ", ".join(f"{k}={v}" for k, v in params.to_dict()["train"].items())
        + f"; max_length={params.base.max_length}."
    )


def timing_note(record: dict) -> str:
    """One sentence on how far a stage's timings can be trusted (``latency.reliability``'s verdict) and
    which figure its speed-ups come from."""
    load, reliable = record.get("other_load"), record.get("latency_reliable")
    if reliable is None:
        return (
            "Other processes' load was not measured here (no /proc/stat): speed-ups are from wall-clock p50."
        )
    if reliable:
        return (
            f"Timed on a quiet machine (other processes used {100 * load:.0f}% of its cores): speed-ups are "
            "from wall-clock p50."
        )
    threads = record.get("cpu_threads")
    return (
        f"**Timed on a busy machine** (other processes used {100 * load:.0f}% of its cores): the wall-clock "
        "latencies are not reliable, and the speed-ups here come from CPU cost per call (the process's "
        f"CPU time over the timed calls{f', measured on {threads} thread(s)' if threads else ''}). "
        "Re-run export alone for wall-clock figures."
    )


def latency_table(params: Params, export: dict) -> list[str]:
    """The latency of every timed backend: p50, p95 and CPU cost per call for each batch size, and the
    speed-up over PyTorch fp32 at batch 1 (from whichever figure the busy check trusts)."""
    timing = params.export.latency
    lines = [
        f"Latency (ms, CPU, {timing.threads} threads, {timing.warmup} warm-up and {timing.repeats} timed "
        f"runs, inputs padded to the longest text of the batch and at most {params.base.max_length} tokens; "
        f"1-minute load average {export.get('latency_load_average', 'n/a')} while timing). "
        + timing_note(export),
        "",
        "| backend | "
        + " | ".join(f"batch {n} p50 | batch {n} p95 | batch {n} CPU per call" for n in timing.batch_sizes)
        + f" | speed-up b1 ({export.get('speedup_basis', 'wall')}) |",
        "|---|" + "---|---|---|" * len(timing.batch_sizes) + "---|",
    ]
    for backend, cases in export.get("latency", {}).items():
        cells = []
        for n in timing.batch_sizes:
            cells += [fmt(cases.get(f"latency_b{n}_p50_ms"), 2), fmt(cases.get(f"latency_b{n}_p95_ms"), 2)]
            cells.append(fmt(cases.get(f"cpu_b{n}_ms"), 2))
        ratio = (
            1.0 if backend == "pytorch_fp32" else export.get("speedup", {}).get(f"{backend}_vs_pytorch_b1")
        )
        lines.append(f"| {backend} | " + " | ".join(cells) + f" | {fmt(ratio, 2)}x |")
    return lines


def compression_section(params: Params, export: dict, compression: dict | None) -> list[str]:
    """What was shipped (the trained model or a compress variant, and its budget), and compress's table."""
    lines = ["## Compression", ""]
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
    if not variants:
        return lines
    basis = (
        "CPU cost per call, as compress was timed on a busy machine"
        if compression.get("latency_reliable") is False
        else "wall-clock p50"
    )
    lines += [
        "",
        "The compress stage's variants: their val macro-F1 loss against the trained model and its "
        + (
            f"{100 * compression['confidence']:g}% upper bound (paired bootstrap over val rows"
            + (
                "; a prediction bound: on the loss a new split as large as test will show"
                if compression.get("bound") == "prediction"
                else ""
            )
            + "), the bound "
            if compression.get("confidence") is not None
            else "point value, "
        )
        + f"judged against the quality budget (`compress.max_loss`, {100 * compression.get('max_loss', 0):g} "
        "pt by default); their test loss with its 95% CI (reported, never used to choose), "
        f"and their test scores (CPU, batch 1; speed-ups from {basis}):",
        "",
        "| variant | val loss (pt) | its upper bound (pt) | within budget | test loss (pt) [95% CI] "
        "| test macro-F1 | change | size (MB) | non-zero params | p50 latency (ms) | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pt(value):
        return fmt(None if value is None else 100 * value, 2)

    for name, v in variants.items():
        flag = {True: "yes", False: "**no**"}.get(v.get("within_budget"), "")
        ci = v.get("test_f1_loss_ci95")
        test = f"{pt(v.get('test_f1_loss'))} [{pt(ci[0])}, {pt(ci[1])}]" if ci else ""
        lines.append(
            f"| {name} | {pt(v.get('val_f1_loss'))} | {pt(v.get('val_f1_loss_bound'))} | {flag} | {test} | "
            f"{fmt(v.get('macro_f1'), 4)} | {fmt(v.get('delta_macro_f1'), 4)} | "
            f"{fmt(v.get('size_mb'), 1)} | {v.get('nonzero_parameters', 'n/a')} | "
            f"{fmt(v.get('latency_b1_p50_ms'), 1)} | {fmt(v.get('speedup_b1'), 2)} |"
        )
    notes = []
    if "sparsity" in variants.get("pruned", {}):
        notes.append(
            f"pruned at sparsity {variants['pruned']['sparsity']:g} ({variants['pruned']['chosen_by']})"
        )
    if variants.get("int8", {}).get("fp32_layers"):
        notes.append(f"int8 keeps these Linear layers fp32: {', '.join(variants['int8']['fp32_layers'])}")
    return lines + (["", *[f"- {n}" for n in notes]] if notes else [])


def versus_baseline(gap: dict) -> list[str]:
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


def gate_lines(gate: dict) -> list[str]:
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
