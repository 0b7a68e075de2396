"""Token classification's export (export): the ONNX tagger checked word by word against PyTorch, its int8,
their latency, the served model's gate score, and the model card."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lmpipe.errors import UserError
from lmpipe.serve.serving import tags_of
from lmpipe.tasks import TOKEN_CLASSIFICATION
from lmpipe.tasks.base import Exported
from lmpipe.tasks.token_classification import entity_scores, token_logits
from lmpipe.tasks.token_classification.evaluation import (
    read_predictions,
    tags_from_predictions,
    versus_baseline,
)


def word_parity(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str]
) -> dict[str, float]:
    """How closely ``candidate`` per-word logits (``[words, tags]`` per sentence, nan where not read) follow
    the PyTorch ``reference``: max abs difference over the words read, and word tag agreement."""
    ref, cand = np.concatenate(list(reference)), np.concatenate(list(candidate))
    read = ~np.isnan(ref[:, 0])
    ref_tags, cand_tags = ref[read].argmax(axis=1), cand[read].argmax(axis=1)
    return {
        "max_abs_logit_diff": float(np.abs(ref[read] - cand[read]).max(initial=0.0)),
        "label_agreement": float((ref_tags == cand_tags).mean()) if read.any() else 1.0,
        "labels_differing": int((ref_tags != cand_tags).sum()),
        "words": int(read.sum()),
    }


def score_registered(uri: str, frame: pd.DataFrame, labels: list[str]) -> float | None:
    """Entity macro-F1 of a registered token classifier's own ONNX model on a split's sentences; None when
    its tags differ from ``labels`` or it is not a token classifier (another task or other data): the
    promotion gate's score of the current champion."""
    import tempfile

    from lmpipe import tracking
    from lmpipe.serve.serving import CLASSIFIER_FILE, OnnxEntityTagger

    with tempfile.TemporaryDirectory() as tmp:
        folder = tracking.download_model(uri, tmp) / "artifacts" / "classifier"
        if (
            json.loads((folder / CLASSIFIER_FILE).read_text(encoding="utf-8")).get("task")
            != TOKEN_CLASSIFICATION
        ):
            return None
        tagger = OnnxEntityTagger(folder)
        if tagger.labels != labels:
            return None
        pred, _ = tagger.tag_words([list(s) for s in frame["tokens"]])
    return entity_scores([list(t) for t in frame["tags"]], pred)["metrics"]["macro_f1"]


def model_card(params, records: dict, export: dict) -> str:
    """The model card of a token classifier (named-entity recognition): data, training, entity scores
    against the CRF baseline, export parity and latency, the served output, the gate, use and limits."""
    from lmpipe.serve import modelcard as card
    from lmpipe.serve.modelcard import fmt, gate_lines

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
        f"{', '.join(types)}), fine-tuned from {card.base_model(params)} and exported to ONNX. Registered in "
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
        f"- Base model: {card.base_model(params)}; {train.get('parameters', 'n/a')} parameters; labels on each "
        "word's first subword.",
        "- Training params: "
        + ", ".join(f"{k}={v}" for k, v in params.to_dict()["train"].items())
        + f"; max_length={params.base.max_length}.",
        f"- Best val entity macro-F1 {fmt(train.get('best_val_macro_f1'))} at epoch "
        f"{train.get('best_epoch', 'n/a')}; MLflow training run `{train.get('mlflow_run_id', 'n/a')}`; git "
        f"commit `{export.get('git_commit', 'n/a')}`.",
        "",
        "## Test scores (entity level, seqeval's strict IOB2 spans)",
        "",
        "| predictor | micro-F1 | macro-F1 | word accuracy |",
        "|---|---|---|---|",
        f"| PyTorch fp32 (this model) | {fmt(model.get('f1'))} | {fmt(model.get('macro_f1'))} | "
        f"{fmt(model.get('accuracy'))} |",
        f"| ONNX fp32 | {fmt(fp32.get('f1'))} | {fmt(fp32.get('macro_f1'))} | {fmt(fp32.get('accuracy'))} |",
        f"| ONNX Runtime int8 | {fmt(int8.get('f1'))} | {fmt(int8.get('macro_f1'))} | {fmt(int8.get('accuracy'))} |",
        f"| CRF baseline (hand-written word features) | {fmt(baseline.get('f1'))} | "
        f"{fmt(baseline.get('macro_f1'))} | {fmt(baseline.get('accuracy'))} |",
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
        f"{fp32.get('max_abs_logit_diff', float('nan')):.2e}, word tag agreement {fmt(fp32.get('label_agreement'))}.",
        f"- ONNX Runtime dynamic int8: word tag agreement {fmt(int8.get('label_agreement'))}, entity "
        f"macro-F1 change {fmt(int8.get('macro_f1_minus_pytorch'))}.",
        f"- Served variant: **{served.get('variant', 'n/a')}** ({fmt(served.get('size_mb'), 1)} MB, batch-1 "
        f"p50 {fmt(served.get('latency_b1_p50_ms'), 1)} ms on {export.get('latency_threads', 'n/a')} CPU "
        "threads).",
        "- Output: for each text, a list of entities `{type, start, end, text, score}`: character offsets "
        "into the text (end exclusive) and the mean probability of the entity's word tags (raw softmax).",
        "",
        *gate_lines(gate),
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


def export(job):
    """The ONNX export checked word by word against PyTorch on the test sentences, its int8, their
    latency, and the served variant against evaluate's CRF baseline (entity macro-F1, paired over
    sentences). Served probabilities are the raw softmax (no temperature); a registered model's
    output is entities with character offsets (``serving.EntityTaggerModel``)."""
    import os

    from lmpipe.serve import onnx_export, serving
    from lmpipe.serve.checks import int8_fp32_layers
    from lmpipe.serve.serving import VARIANT_FILES

    params, test, tmp, cfg = job.params, job.test, job.folder, job.params.export
    true = [list(t) for t in test["tags"]]
    onnx_export.write_classifier_folder(
        job.model_dir, tmp, params.base.max_length, cfg.opset, cfg.allow_spinning
    )
    onnx_export.quantize_onnx_int8(tmp, int8_fp32_layers(params, job.records["compression"]))
    taggers = {
        v: serving.OnnxEntityTagger(tmp, VARIANT_FILES[v], threads=cfg.latency.threads, allow_spinning=False)
        for v in ("fp32", "int8")
    }
    rows, predicted, pytorch, names = check_taggers(job, taggers)
    if cfg.compare:
        print(
            f"export: export.compare ({', '.join(cfg.compare)}): compress variants are exported beside the "
            "model for text classification only; compress's table compares them for this task"
        )
    variant = cfg.registered_variant.removesuffix("_opt")
    if variant != cfg.registered_variant:
        print(
            f"export: export.registered_variant '{cfg.registered_variant}': no optimised graph for token "
            f"classification yet; serving '{variant}'"
        )
    timed = time_taggers(job, taggers)
    latency = timed["latency"]
    baseline_tags = tags_from_predictions(read_predictions(job.baseline_predictions), test)
    versus = versus_baseline(true, predicted[variant], baseline_tags, params.base.seed)
    versus["baseline_macro_f1"] = float(job.records["evaluate"]["baseline"]["macro_f1"])
    sizes = {v: round((tmp / VARIANT_FILES[v]).stat().st_size / 2**20, 3) for v in taggers}
    example = test["text"].iloc[0]
    report = {
        "labels": names,
        "test_rows": len(test),
        "pytorch_fp32": {k: pytorch[k] for k in ("f1", "macro_f1", "accuracy")},
        "onnx_fp32": rows["fp32"],
        "onnx_int8": rows["int8"],
        "optimize": {"skipped": "no optimised graph for token classification yet"},
        "served": {
            "variant": variant,
            "f1": rows[variant]["f1"],
            "macro_f1": rows[variant]["macro_f1"],
            "accuracy": rows[variant]["accuracy"],
            "latency_b1_p50_ms": latency[f"onnx_{variant}"].get("latency_b1_p50_ms"),
            "size_mb": sizes[variant],
            "example": {"text": example, "entities": taggers[variant].entities([example])[0]},
        },
        **timed,
        "latency_threads": cfg.latency.threads,
        "latency_load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "size_mb": sizes,
    }
    return Exported(
        report=report,
        variant=variant,
        served=rows[variant],
        versus=versus,
        score_registered=lambda uri: score_registered(uri, test, names),
        logged=("pytorch_fp32", "onnx_fp32", "onnx_int8", "latency", "size_mb"),
    )


def export_summary(report):
    served, fp32, int8 = report["served"], report["onnx_fp32"], report["onnx_int8"]
    b1 = {name: cases.get("latency_b1_p50_ms", float("nan")) for name, cases in report["latency"].items()}
    return (
        f"export: ONNX fp32 max |dlogit| {fp32['max_abs_logit_diff']:.1e} over {fp32['words']} test words, "
        f"int8 word-tag agreement {int8['label_agreement']:.4f}, entity macro-F1 {served['variant']} "
        f"{served['macro_f1']:.4f} (PyTorch {report['pytorch_fp32']['macro_f1']:.4f}) | "
        f"batch-1 p50: pytorch {b1['pytorch_fp32']:.1f} ms, int8 {b1['onnx_int8']:.1f} ms"
    )


def check_taggers(job, taggers: dict) -> tuple[dict, dict, dict, list[str]]:
    """Each ONNX tagger's word logits against PyTorch's on the test sentences (``word_parity``) and its
    entity scores; an fp32 export that drifts past ``export.max_logit_diff`` (or changes a word's tag)
    fails the stage. Returns the rows, each variant's predicted tags, PyTorch's scores and the tags."""
    from tqdm.auto import tqdm

    from lmpipe.modeling import models

    params, test, cfg = job.params, job.test, job.params.export
    sentences, true = [list(s) for s in test["tokens"]], [list(t) for t in test["tags"]]
    model = models.load_model(job.model_dir).eval()  # on the CPU, where the exports run
    dataset, token_rows, names = token_logits(
        model,
        taggers["fp32"].tokenizer,
        sentences,
        params.base.max_length,
        cfg.batch_size,
        "pytorch fp32",
    )
    reference = [dataset.word_logits(r, i) for i, r in enumerate(token_rows)]
    pytorch = entity_scores(true, [tags_of(w, names)[0] for w in reference])["metrics"]
    rows, predicted = {}, {}
    for variant, tagger in taggers.items():
        words = [
            w
            for i in tqdm(range(0, len(sentences), cfg.batch_size), desc=f"onnx {variant}", unit="batch")
            for w in tagger.word_logits(sentences[i : i + cfg.batch_size])
        ]
        predicted[variant] = [tags_of(w, names)[0] for w in words]
        scores = entity_scores(true, predicted[variant])["metrics"]
        row = word_parity(reference, words, names)
        row.update({k: scores[k] for k in ("f1", "macro_f1", "accuracy")})
        if variant == "fp32":
            row["ok"] = row["max_abs_logit_diff"] <= cfg.max_logit_diff and row["labels_differing"] == 0
        else:
            row["macro_f1_minus_pytorch"] = row["macro_f1"] - pytorch["macro_f1"]
            row["ok"] = row["label_agreement"] >= cfg.min_int8_agreement
        rows[variant] = row
    if not rows["fp32"]["ok"]:
        raise UserError(
            f"export.max_logit_diff: the ONNX fp32 export differs from PyTorch by "
            f"{rows['fp32']['max_abs_logit_diff']:.2e} (limit {cfg.max_logit_diff:g}) with "
            f"{rows['fp32']['labels_differing']} word tag(s) changed on {job.model_dir}; not registering it"
        )
    return rows, predicted, pytorch, names


def time_taggers(job, taggers: dict) -> dict:
    """PyTorch fp32 and each ONNX tagger timed on the same test texts; each one's speed-up over PyTorch
    (``onnx_export.latency_benchmark``: wall and CPU cost, the busy check's verdict)."""
    from lmpipe.serve import onnx_export

    pytorch = onnx_export.torch_runner(job.model_dir)  # its threads are set process-wide

    def runners(threads: int | None = None) -> dict:
        out = {"pytorch_fp32": pytorch}
        out |= {
            f"onnx_{v}": (t if threads is None else t.threaded(threads)).logits for v, t in taggers.items()
        }
        return out

    texts = job.test["text"].tolist()
    cfg = job.params.export.latency
    return onnx_export.latency_benchmark(runners(), taggers["fp32"], texts, cfg, lambda: runners(1))
