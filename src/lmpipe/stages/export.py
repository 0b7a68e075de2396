"""export: ONNX + ONNX Runtime int8, parity and latency checks, a registered MLflow model with a promotion
gate, and a model card. ``run`` picks the model and its records; the steps below do the rest, in order:
export and parity, benchmark, register and gate, card."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lmpipe import data, io, modelcard, models, ner, promotion, reports, serving, tracking
from lmpipe import export as lib
from lmpipe.compare import predictions_frame, versus_baseline, versus_baseline_entities
from lmpipe.errors import UserError
from lmpipe.metrics import classification_metrics
from lmpipe.params import Params
from lmpipe.serving import (
    CLASSIFIER_FILE,
    FP32_FILE,
    INT8_FILE,
    OPT_FILE,
    OPT_INT8_FILE,
    VARIANT_FILES,
    OnnxTextClassifier,
)


@dataclass(frozen=True)
class Paths:
    source: list[str]  # NAME=FOLDER pairs: the models export.source may choose from
    data: str  # folder with test.parquet
    prepare_report: str  # prepare stage report (for the card)
    split_report: str  # split stage report (for the card)
    train_report: str  # train stage report (run id, for the card)
    eval_scores: str  # evaluate's scores (for the gate and the card)
    baseline_predictions: str  # evaluate's baseline predictions on test (the gate's paired CI)
    calibration: str | None  # analyze's fitted temperature (served probabilities are softmax(logits / T))
    compress_report: str | None  # report of the compressed variants (for the card)
    out: str  # the export folder
    metrics: str  # headline figures (DVC metrics)
    report: str  # the export report


def chosen_model(params: Params, pairs: list[str]) -> Path:
    """The folder of the model ``export.source`` names, among the stage's NAME=FOLDER pairs."""
    sources = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--source: expected NAME=FOLDER, got {pair!r}")
        sources[name] = folder
    if params.export.source not in sources:
        raise UserError(
            f"export.source: '{params.export.source}' is not among the models this stage was given "
            f"({', '.join(sorted(sources))}); add --source {params.export.source}=<folder> in dvc.yaml"
        )
    chosen = Path(sources[params.export.source])
    if not (chosen / "config.json").is_file():
        raise UserError(
            f"export.source: '{params.export.source}' has no model in {chosen} (is that compress variant "
            "enabled in params.yaml?)"
        )
    return chosen


def budget_check(params: Params, compression: dict | None) -> dict[str, Any]:
    """Refuse a compress variant that broke compress's quality budget on val, unless
    ``export.allow_over_budget`` names it. Returns what the report records about the source's budget."""
    source = params.export.source
    row = (compression or {}).get("variants", {}).get(source)
    if source == "model" or row is None or "within_budget" not in row:
        return {"source_within_budget": None}
    loss, budget = row["val_f1_loss"], row["max_loss"]
    if not row["within_budget"]:
        if source not in params.export.allow_over_budget:
            raise UserError(
                f"export.source: '{source}' loses {100 * loss:.2f} pt of val macro-F1 against the trained "
                f"model, over compress's budget of {100 * budget:g} pt; ship another model, or add "
                f"'{source}' to export.allow_over_budget to ship it anyway"
            )
        print(
            f"export: WARNING: shipping '{source}' although it loses {100 * loss:.2f} pt of val macro-F1, "
            f"over the budget of {100 * budget:g} pt (export.allow_over_budget)"
        )
    return {
        "source_within_budget": row["within_budget"],
        "source_val_f1_loss": loss,
        "source_max_loss": budget,
    }


def registry_task_check(params: Params) -> None:
    """Refuse to register a model under a name that holds another task's models: the gate could not
    score one task's champion on the other's test split, and the MLflow UI would mix the two."""
    name = params.export.registered_model
    held = tracking.registered_model_tag(name, "task")
    if held is not None and held != params.base.task:
        raise UserError(
            f"export.registered_model: '{name}' holds {held} models, and this is a {params.base.task} model; "
            "give it a registered model name of its own"
        )


def read_records(params: Params, paths: Paths) -> dict[str, Any]:
    """The earlier stages' reports the card, the gate and the registry tags are written from, and the run
    ids: the evaluate run is the latest finished one of the train run (the scores carry no run id, so that
    an evaluate re-run that scores the same does not re-run export).

    Compress's report is read first and the source's budget checked on it, before any other file is
    opened: a variant outside the budget is refused with that reason, not with a missing file's."""
    compression = io.read_json(paths.compress_report) if paths.compress_report else None
    budget = budget_check(params, compression)
    registry_task_check(params)
    records = {
        "prepare": io.read_json(paths.prepare_report),
        "split": io.read_json(paths.split_report),
        "train": io.read_json(paths.train_report),
        "evaluate": io.read_json(paths.eval_scores),
        "compression": compression,
        "budget": budget,
    }
    train_run_id = records["train"].get("mlflow_run_id", "")
    evaluation = tracking.evaluate_run_of(train_run_id) if train_run_id else None
    records["evaluate_run_id"] = evaluation.info.run_id if evaluation else ""
    return records


def run(params: Params, paths: Paths) -> str:
    if params.base.task == ner.TASK:
        return run_entities(params, paths)
    model_dir = chosen_model(params, paths.source)
    records = read_records(params, paths)  # checks the source's budget before any work
    budget = records["budget"]
    fp32_layers = int8_fp32_layers(params, records["compression"])
    train_run_id = records["train"].get("mlflow_run_id", "")
    test = data.read_split(paths.data, "test")
    calibration = io.read_json(paths.calibration) if paths.calibration else {"temperature": 1.0}
    temperature = float(calibration["temperature"])
    if params.export.source != "model" and temperature != 1.0:
        print(
            f"export: serving '{params.export.source}' at the temperature fit on the trained model "
            f"({temperature:g}); its own calibration may differ (docs/analysis.md)"
        )
    tags = {
        "train_run_id": train_run_id,
        "evaluate_run_id": records["evaluate_run_id"],
        "export_source": params.export.source,
    }
    cfg = params.export
    torch.set_num_threads(cfg.latency.threads)
    with tracking.stage_run(params, "export", tags=tags) as active, io.atomic_dir(paths.out) as tmp:
        checked = export_and_check(params, model_dir, test, tmp, fp32_layers, temperature)
        checked.served_variant = served_variant(params, checked)
        others = compared(params, paths.source, test, tmp, temperature)
        latency = benchmark(params, checked, test["text"].tolist(), others)
        git = tracking.git_info()  # once: the registered version's tags and the metrics name the same commit
        baseline = pd.read_csv(paths.baseline_predictions)
        versus = versus_evaluated_baseline(params, checked, test, baseline, records["evaluate"])
        registered = register_and_gate(
            params,
            checked.served,
            checked.served_variant,
            versus,
            lambda uri: lib.score_registered(uri, test["text"].tolist(), checked.y_true, checked.labels),
            test,
            tmp,
            records,
            active.info.run_id,
            git,
            list(others),
        )
        sizes = {
            v: round((tmp / f).stat().st_size / 2**20, 3)
            for v, f in VARIANT_FILES.items()
            if (tmp / f).is_file()
        }
        sizes |= {
            f"{n}_int8": round((tmp / n / VARIANT_FILES[o.int8_variant]).stat().st_size / 2**20, 3)
            for n, o in others.items()
        }
        metrics = {
            "source": cfg.source,
            **budget,
            "temperature": temperature,
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
                "variant": checked.served_variant,
                "macro_f1": checked.served["macro_f1"],
                "accuracy": checked.served["accuracy"],
                "latency_b1_p50_ms": latency["latency"][f"onnx_{checked.served_variant}"].get(
                    "latency_b1_p50_ms"
                ),
                "size_mb": sizes[checked.served_variant],
            },
            **latency,
            "comparison": comparison(checked, others, latency),
            "size_mb": sizes,
            **registered,
            "git_commit": git["git_commit"],
            "mlflow_run_id": active.info.run_id,
        }
        write_card(params, records, metrics, tmp)
        tracking.log_metrics(
            {
                k: metrics[k]
                for k in (
                    "pytorch_fp32",
                    "onnx_fp32",
                    "onnx_int8",
                    "latency",
                    "speedup",
                    "size_mb",
                    "comparison",
                )
            }
        )
        tracking.log_metrics(
            {
                "gate_passed": int(metrics["gate"]["passed"]),
                "registered_version": int(metrics["registry"]["version"]),
            }
        )
        tracking.log_dict(metrics, "export_report.json")
        reports.write("export", metrics, paths.metrics, paths.report)
    b1 = {name: cases.get("latency_b1_p50_ms", float("nan")) for name, cases in metrics["latency"].items()}
    gate = gate_line(metrics["gate"])
    return (
        f"export: ONNX fp32 max |dlogit| {metrics['onnx_fp32']['max_abs_logit_diff']:.1e}, int8 agreement "
        f"{metrics['onnx_int8']['label_agreement']:.4f} | batch-1 p50: pytorch {b1['pytorch_fp32']:.1f} ms, "
        f"int8 {b1['onnx_int8']:.1f} ms | {metrics['registry']['name']} v{metrics['registry']['version']} "
        f"aliases: {', '.join(metrics['gate']['aliases']) or 'none'}\nexport: {gate}"
    )


def int8_fp32_layers(params: Params, compression: dict | None) -> list[str]:
    """The Linear layers compress's int8 variant kept fp32 to meet its budget: the ONNX int8 model keeps
    the same ones (they were ranked on the trained model, so only when that is what is shipped)."""
    row = (compression or {}).get("variants", {}).get("int8", {})
    return row.get("fp32_layers", []) if params.export.source == "model" else []


def gate_line(gate: dict[str, Any]) -> str:
    """The gate's decision in a few words, with the failed checks."""
    failed = [r.removeprefix("FAIL: ") for r in gate["reasons"] if r.startswith("FAIL: ")]
    return "gate passed" if gate["passed"] else "gate FAILED: " + "; ".join(failed)


ONNX_FILES = {"fp32": FP32_FILE, "int8": INT8_FILE, "fp32_opt": OPT_FILE, "int8_opt": OPT_INT8_FILE}


def run_entities(params: Params, paths: Paths) -> str:
    """Token classification: the ONNX export checked word by word against PyTorch on the test sentences,
    its int8, their latency, a registered model whose output is entities with character offsets
    (``serving.EntityTaggerModel``), the gate against evaluate's CRF baseline (entity macro-F1, paired
    over sentences), and the card. Served probabilities are the raw softmax (no temperature)."""
    cfg = params.export
    model_dir = chosen_model(params, paths.source)
    records = read_records(params, paths)  # checks the source's budget before any work
    budget = records["budget"]
    train_run_id = records["train"].get("mlflow_run_id", "")
    test = data.read_split(paths.data, "test")
    sentences, true = [list(s) for s in test["tokens"]], [list(t) for t in test["tags"]]
    tags = {
        "train_run_id": train_run_id,
        "evaluate_run_id": records["evaluate_run_id"],
        "export_source": cfg.source,
    }
    torch.set_num_threads(cfg.latency.threads)
    with tracking.stage_run(params, "export", tags=tags) as active, io.atomic_dir(paths.out) as tmp:
        lib.write_classifier_folder(model_dir, tmp, params.base.max_length, cfg.opset, cfg.allow_spinning)
        lib.quantize_onnx_int8(tmp, int8_fp32_layers(params, records["compression"]))
        taggers = {
            v: serving.OnnxEntityTagger(tmp, ONNX_FILES[v], threads=cfg.latency.threads, allow_spinning=False)
            for v in ("fp32", "int8")
        }
        model = models.load_classifier(model_dir).eval()  # on the CPU, where the exports run
        dataset, token_rows, names = ner.token_logits(
            model,
            taggers["fp32"].tokenizer,
            sentences,
            params.base.max_length,
            cfg.batch_size,
            "pytorch fp32",
        )
        reference = [dataset.word_logits(r, i) for i, r in enumerate(token_rows)]
        pytorch = ner.entity_scores(true, [serving.tags_of(w, names)[0] for w in reference])["metrics"]
        rows, predicted = {}, {}
        for variant, tagger in taggers.items():
            words = [
                w
                for i in tqdm(range(0, len(sentences), cfg.batch_size), desc=f"onnx {variant}", unit="batch")
                for w in tagger.word_logits(sentences[i : i + cfg.batch_size])
            ]
            predicted[variant] = [serving.tags_of(w, names)[0] for w in words]
            scores = ner.entity_scores(true, predicted[variant])["metrics"]
            row = ner.word_parity(reference, words, names)
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
                f"{rows['fp32']['labels_differing']} word tag(s) changed on {model_dir}; not registering it"
            )
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
        runners = {"pytorch_fp32": lib.torch_runner(model_dir)}
        runners |= {f"onnx_{v}": tagger.logits for v, tagger in taggers.items()}
        latency = lib.latency_benchmark(
            runners, taggers["fp32"], test["text"].tolist(), cfg.latency.batch_sizes, cfg.latency.warmup,
            cfg.latency.repeats, cfg.latency.batch_repeats,
        )  # fmt: skip
        speedup = {
            f"{name}_vs_pytorch_b{n}": round(
                latency["pytorch_fp32"][f"latency_b{n}_p50_ms"] / latency[name][f"latency_b{n}_p50_ms"], 3
            )
            for name in runners
            if name != "pytorch_fp32"
            for n in cfg.latency.batch_sizes
        }
        baseline_tags = ner.tags_from_predictions(ner.read_predictions(paths.baseline_predictions), test)
        versus = versus_baseline_entities(true, predicted[variant], baseline_tags, params.base.seed)
        versus["baseline_macro_f1"] = float(records["evaluate"]["baseline"]["macro_f1"])
        git = tracking.git_info()
        registered = register_and_gate(
            params,
            rows[variant],
            variant,
            versus,
            lambda uri: lib.score_registered_entities(uri, test, names),
            test,
            tmp,
            records,
            active.info.run_id,
            git,
        )
        sizes = {v: round((tmp / ONNX_FILES[v]).stat().st_size / 2**20, 3) for v in taggers}
        example = test["text"].iloc[0]
        metrics = {
            "task": ner.TASK,
            "source": cfg.source,
            **budget,
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
            "latency": latency,
            "speedup": speedup,
            "latency_threads": cfg.latency.threads,
            "latency_load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "size_mb": sizes,
            **registered,
            "git_commit": git["git_commit"],
            "mlflow_run_id": active.info.run_id,
        }
        card = modelcard.render_entities(params, records, metrics)
        (tmp / "MODEL_CARD.md").write_text(card, encoding="utf-8")
        tracking.log_artifact(tmp / "MODEL_CARD.md")
        tracking.log_metrics(
            {k: metrics[k] for k in ("pytorch_fp32", "onnx_fp32", "onnx_int8", "latency", "size_mb")}
        )
        tracking.log_metrics(
            {
                "gate_passed": int(metrics["gate"]["passed"]),
                "registered_version": int(metrics["registry"]["version"]),
            }
        )
        tracking.log_dict(metrics, "export_report.json")
        reports.write("export", metrics, paths.metrics, paths.report)
    b1 = {name: cases.get("latency_b1_p50_ms", float("nan")) for name, cases in latency.items()}
    gate = gate_line(metrics["gate"])
    return (
        f"export: ONNX fp32 max |dlogit| {rows['fp32']['max_abs_logit_diff']:.1e} over "
        f"{rows['fp32']['words']} test words, int8 word-tag agreement {rows['int8']['label_agreement']:.4f}, "
        f"entity macro-F1 {variant} {rows[variant]['macro_f1']:.4f} (PyTorch {pytorch['macro_f1']:.4f}) | "
        f"batch-1 p50: pytorch {b1['pytorch_fp32']:.1f} ms, int8 {b1['onnx_int8']:.1f} ms | "
        f"{metrics['registry']['name']} v{metrics['registry']['version']} aliases: "
        f"{', '.join(metrics['gate']['aliases']) or 'none'}\nexport: {gate}"
    )


@dataclass
class Checked:
    """The exported ONNX files of one model, loaded, with how closely each follows PyTorch on the test
    split. Variants: ``fp32``, ``int8`` (from fp32), and with ``export.optimize`` ``fp32_opt`` (ONNX
    Runtime's fused graph) and ``int8_opt`` (quantised from it), when the fused graph holds parity."""

    sessions: dict[str, OnnxTextClassifier]
    rows: dict[str, dict[str, Any]]  # variant -> parity vs PyTorch and test scores
    logits: dict[str, np.ndarray]  # variant -> test logits
    pytorch_runner: Any  # numpy features -> PyTorch fp32 logits
    labels: list[str]
    y_true: np.ndarray
    pytorch: dict[str, float]  # PyTorch's own test scores
    optimize: dict[str, Any]  # fused op counts, or why the plain graph is used
    served_variant: str = "fp32"  # the registered variant, after any fallback

    @property
    def fp32(self) -> OnnxTextClassifier:
        return self.sessions["fp32"]

    @property
    def onnx_fp32(self) -> dict[str, Any]:
        return self.rows["fp32"]

    @property
    def onnx_int8(self) -> dict[str, Any]:
        return self.rows[self.int8_variant]

    @property
    def int8_variant(self) -> str:
        """The int8 served for this model: quantised from the optimised graph when there is one."""
        return "int8_opt" if "int8_opt" in self.rows else "int8"

    @property
    def served(self) -> dict[str, Any]:
        return self.rows[self.served_variant]

    @property
    def served_logits(self) -> np.ndarray:
        return self.logits[self.served_variant]


def export_and_check(
    params: Params,
    model_dir: Path,
    test: pd.DataFrame,
    out: Path,
    fp32_layers: list[str],
    temperature: float = 1.0,
) -> Checked:
    """Write the ONNX files into ``out`` (int8 keeps ``fp32_layers``, torch module names, in fp32) and
    check each against PyTorch on the test split. An fp32 export that drifts past
    ``export.max_logit_diff`` (or changes a label) fails the stage; an optimised graph that does is
    dropped, loudly, and int8 is then quantised from the plain graph only."""
    cfg = params.export
    lib.write_classifier_folder(
        model_dir, out, params.base.max_length, cfg.opset, cfg.allow_spinning, temperature
    )
    lib.quantize_onnx_int8(out, fp32_layers)
    optimize = (
        lib.optimize_onnx(model_dir, out, params.base.max_length, cfg.opset)
        if cfg.optimize
        else {"skipped": "export.optimize is false"}
    )

    # checked and timed with spinning off whatever is served: a spinning ONNX Runtime pool slows the
    # PyTorch call timed after it (3x on 2 cores), and the table must compare the backends fairly
    def load(variant: str) -> OnnxTextClassifier:
        return OnnxTextClassifier(out, ONNX_FILES[variant], threads=cfg.latency.threads, allow_spinning=False)

    sessions = {v: load(v) for v in ("fp32", "int8", "fp32_opt") if (out / ONNX_FILES[v]).is_file()}
    fp32 = sessions["fp32"]
    labels = fp32.labels
    y_true = data.encode_labels(test["label"], data.model_label2id(labels), f"the model in {model_dir}")
    batches = lib.Batches.of(fp32, test["text"].tolist(), cfg.batch_size)
    pytorch = lib.torch_runner(model_dir)
    ref = lib.all_logits(pytorch, batches, "pytorch fp32")
    torch_scores = classification_metrics(y_true, ref.argmax(axis=1))
    logits: dict[str, np.ndarray] = {}
    rows: dict[str, dict[str, Any]] = {}

    def check(variant: str) -> None:
        logits[variant] = lib.all_logits(sessions[variant].logits, batches, f"onnx {variant}")
        row = lib.parity_report(ref, logits[variant], y_true)
        if variant.startswith("fp32"):
            # what is served: calibrated probabilities, PyTorch's (softmax(logits / T)) against the ONNX
            # classifier's
            row["max_abs_proba_diff"] = float(
                np.abs(serving.softmax(ref / temperature) - fp32.proba(logits[variant])).max(initial=0.0)
            )
            row["temperature"] = fp32.temperature
            row["ok"] = (
                row["max_abs_logit_diff"] <= cfg.max_logit_diff
                and row["labels_differing"] == 0
                and row["max_abs_proba_diff"] <= cfg.max_logit_diff
            )
        else:
            row["fp32_layers"] = fp32_layers
            row["macro_f1_minus_pytorch"] = row["macro_f1"] - torch_scores["macro_f1"]
            row["ok"] = row["label_agreement"] >= cfg.min_int8_agreement
        rows[variant] = row

    for variant in list(sessions):
        check(variant)
    if not rows["fp32"]["ok"]:
        row = rows["fp32"]
        raise UserError(
            f"export.max_logit_diff: the ONNX fp32 export differs from PyTorch by "
            f"{row['max_abs_logit_diff']:.2e} (limit {cfg.max_logit_diff:g}) with "
            f"{row['labels_differing']} label(s) changed (calibrated probabilities differ by "
            f"{row['max_abs_proba_diff']:.2e}) on {model_dir}; not registering it"
        )
    if "fp32_opt" in rows and not rows["fp32_opt"]["ok"]:
        row = rows.pop("fp32_opt")
        optimize["fallback"] = (
            f"the optimised graph differs from PyTorch by {row['max_abs_logit_diff']:.2e} (limit "
            f"{cfg.max_logit_diff:g}, {row['labels_differing']} label(s) changed): int8 is quantised from "
            "the plain graph"
        )
        optimize["failed_parity"] = row
        print(f"export: WARNING: {model_dir}: {optimize['fallback']}")
        del sessions["fp32_opt"], logits["fp32_opt"]
        (out / OPT_FILE).unlink()
    elif "fp32_opt" in rows:
        try:
            lib.quantize_onnx_int8(out, fp32_layers, OPT_FILE, OPT_INT8_FILE)
        except ValueError as err:  # a layer kept fp32 was fused away: int8 stays the plain graph's
            optimize["int8_opt_skipped"] = str(err)
            print(f"export: WARNING: no int8 from the optimised graph: {err}")
        else:
            sessions["int8_opt"] = load("int8_opt")
            check("int8_opt")
    return Checked(
        sessions,
        rows,
        logits,
        pytorch,
        labels,
        y_true,
        {"macro_f1": torch_scores["macro_f1"], "accuracy": torch_scores["accuracy"]},
        optimize,
    )


def served_variant(params: Params, checked: Checked) -> str:
    """``export.registered_variant``, or its plain graph when the optimised one was dropped (loudly)."""
    wanted = params.export.registered_variant
    if wanted in checked.rows:
        return wanted
    plain = wanted.removesuffix("_opt")
    print(f"export: WARNING: export.registered_variant '{wanted}' was not built; serving '{plain}'")
    return plain


def compared(
    params: Params, pairs: list[str], test: pd.DataFrame, out: Path, temperature: float
) -> dict[str, Checked]:
    """The compress variants ``export.compare`` names, each exported and checked like the shipped model
    (the same code) into ``out/<name>/``, a classifier folder of its own; one not built is skipped."""
    sources = dict(pair.partition("=")[::2] for pair in pairs)
    checked = {}
    for name in params.export.compare:
        if name == params.export.source:
            continue  # already the main rows
        folder = Path(sources.get(name, ""))
        if name not in sources or not (folder / "config.json").is_file():
            print(f"export: export.compare: no '{name}' model to compare (is it enabled in compress?)")
            continue
        checked[name] = export_and_check(params, folder, test, out / name, [], temperature)
    return checked


def benchmark(
    params: Params, checked: Checked, texts: list[str], others: dict[str, Checked] | None = None
) -> dict[str, Any]:
    """PyTorch fp32 and every ONNX variant of the shipped model, and each compared model's int8, timed
    on the same inputs; each one's speed-up over PyTorch fp32, and the optimised graphs' over the plain."""
    cfg = params.export.latency
    runners = {"pytorch_fp32": checked.pytorch_runner}
    runners |= {f"onnx_{v}": checked.sessions[v].logits for v in ONNX_FILES if v in checked.sessions}
    for name, other in (others or {}).items():
        runners[f"{name}_onnx_int8"] = other.sessions[other.int8_variant].logits
    latency = lib.latency_benchmark(
        runners, checked.fp32, texts, cfg.batch_sizes, cfg.warmup, cfg.repeats, cfg.batch_repeats
    )

    def ratio(slow: str, fast: str, n: int) -> float | None:
        key = f"latency_b{n}_p50_ms"
        if slow not in latency or fast not in latency or not latency[fast][key] > 0:
            return None
        return round(latency[slow][key] / latency[fast][key], 3)

    speedup = {f"{r}_vs_pytorch_b{n}": ratio("pytorch_fp32", r, n) for r in runners for n in cfg.batch_sizes}
    speedup = {k: v for k, v in speedup.items() if v is not None and not k.startswith("pytorch_fp32")}
    for n in cfg.batch_sizes:
        for variant in ("fp32", "int8"):
            value = ratio(f"onnx_{variant}", f"onnx_{variant}_opt", n)
            if value is not None:
                speedup[f"onnx_{variant}_opt_vs_onnx_{variant}_b{n}"] = value
    return {
        "latency": latency,
        "speedup": speedup,
        "latency_threads": cfg.threads,
        "latency_spinning": False,  # ONNX Runtime timed without spinning (export.allow_spinning is for serving)
        # other processes on the machine skew the timings: the 1-minute load average when they were taken
        "latency_load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def comparison(checked: Checked, others: dict[str, Checked], latency: dict[str, Any]) -> dict[str, Any]:
    """One row per timed model: batch-1 p50 and its speed-up over PyTorch fp32, test macro-F1 and its
    loss in points against the trained PyTorch fp32 model, and parity against the row's own PyTorch."""
    base = checked.pytorch["macro_f1"]
    scores = {"pytorch_fp32": (checked.pytorch, {})}
    scores |= {f"onnx_{v}": (row, row) for v, row in checked.rows.items()}
    scores |= {f"{n}_onnx_int8": (o.rows[o.int8_variant], o.rows[o.int8_variant]) for n, o in others.items()}
    rows = {}
    for name, (score, parity) in scores.items():
        timing = latency["latency"].get(name, {})
        rows[name] = {
            "latency_b1_p50_ms": timing.get("latency_b1_p50_ms"),
            "speedup_b1": latency["speedup"].get(
                f"{name}_vs_pytorch_b1", 1.0 if name == "pytorch_fp32" else None
            ),
            "macro_f1": score["macro_f1"],
            "macro_f1_loss_pt": round(100 * (base - score["macro_f1"]), 3),
            "max_abs_logit_diff": parity.get("max_abs_logit_diff", 0.0),
            "label_agreement": parity.get("label_agreement", 1.0),
        }
    return rows


def versus_evaluated_baseline(
    params: Params, checked: Checked, test: pd.DataFrame, baseline: pd.DataFrame, evaluate: dict
) -> dict[str, Any]:
    """The served variant against evaluate's baseline on the same test rows, paired: evaluate's code."""
    proba = serving.softmax(checked.served_logits)
    versus = versus_baseline(predictions_frame(test, proba, checked.labels), baseline, params.base.seed)
    return {**versus, "baseline_macro_f1": float(evaluate["baseline"]["macro_f1"])}


def register_and_gate(
    params: Params,
    served: dict[str, Any],
    variant: str,
    versus: dict[str, Any],
    score_champion: Callable[[str], float | None],
    test: pd.DataFrame,
    folder: Path,
    records: dict,
    run_id: str,
    git: dict[str, str],
    subfolders: list[str] = (),
) -> dict[str, Any]:
    """Log the served ONNX variant (test scores ``served``) as a pyfunc model, decide the promotion gate
    against the baseline (``versus``: the paired difference, ``versus_evaluated_baseline``'s keys) and the
    current champion (``score_champion`` scores a registered model on this test split, or None), register
    the new version with its provenance tags, and set its aliases."""
    cfg, task = params.export, params.base.task
    texts = test["text"].tolist()
    train_run_id = records["train"].get("mlflow_run_id", "")
    baseline_f1 = versus["baseline_macro_f1"]

    # the registered model: the served ONNX variant as model.onnx, with tokenizer and labels
    with tempfile.TemporaryDirectory() as staging_root:
        staging = Path(staging_root) / "classifier"
        shutil.copytree(folder, staging, ignore=shutil.ignore_patterns("*.onnx", "*.md", *subfolders))
        shutil.copy2(folder / VARIANT_FILES[variant], staging / FP32_FILE)
        info = json.loads((staging / CLASSIFIER_FILE).read_text())
        info.update(onnx_file=FP32_FILE, variant=variant)
        (staging / CLASSIFIER_FILE).write_text(json.dumps(info, indent=2) + "\n")
        example = [t[:300] for t in texts[:2]]
        model_uri = tracking.log_pyfunc_model(
            serving.__file__, {"classifier": staging}, example, lib.pip_requirements(), {"task": task}
        )

    name = cfg.registered_model
    champion_version = tracking.alias_version(name, promotion.CHAMPION)
    champion_f1 = None
    if champion_version is not None:
        champion_f1 = score_champion(f"models:/{name}@{promotion.CHAMPION}")
    checks = []
    if variant.startswith("int8"):
        agreement = served["label_agreement"]
        checks.append(
            (
                served["ok"],
                f"int8 label agreement {agreement:.4f} vs min_int8_agreement {cfg.min_int8_agreement}",
            )
        )
    decision = promotion.decide(served["macro_f1"], versus, cfg.gate, champion_f1, champion_version, checks)
    version = tracking.register_model_version(
        model_uri,
        name,
        tags={
            "train_run_id": train_run_id,
            # the latest finished evaluate run of this train run (evaluate runs before export)
            "evaluate_run_id": records["evaluate_run_id"],
            "export_run_id": run_id,
            "git_commit": git["git_commit"],
            "git_dirty": git["git_dirty"],
            "params_hash": params.digest(),
            "task": task,
            "source": cfg.source,
            "variant": variant,
            "test_macro_f1": f"{served['macro_f1']:.6f}",
            "test_accuracy": f"{served['accuracy']:.6f}",
            "baseline_test_macro_f1": f"{baseline_f1:.6f}",
            "minus_baseline_macro_f1_ci95": f"[{versus['macro_f1_ci95_low']:.4f}, {versus['macro_f1_ci95_high']:.4f}]",
            "test_rows": len(test),
            "test_split_sha256": lib.split_fingerprint(test),
            "gate_passed": str(decision.passed).lower(),
        },
        description=(
            f"ONNX {variant} export of '{cfg.source}' from training run "
            f"{train_run_id or 'n/a'} at git commit {git['git_commit']}. "
            f"Test macro-F1 {served['macro_f1']:.4f} (accuracy {served['accuracy']:.4f}) on "
            f"{len(test)} rows; baseline {baseline_f1:.4f}. Gate: " + "; ".join(decision.reasons)
        ),
    )
    tracking.set_registered_model_tag(name, "task", task)  # registry_task_check reads it
    for alias in decision.aliases:
        tracking.set_alias(name, alias, version)
    return {
        "registry": {"name": name, "version": version, "model_uri": model_uri},
        "gate": {
            **decision.to_dict(),
            "baseline_macro_f1": baseline_f1,
            "minus_baseline": {k: v for k, v in versus.items() if k != "baseline_macro_f1"},
            "champion_before": champion_version,
            "champion_before_macro_f1": champion_f1,
        },
    }


def write_card(params: Params, records: dict, metrics: dict, folder: Path) -> None:
    """MODEL_CARD.md in the export folder, and in the MLflow run."""
    card = modelcard.render(
        params,
        records["prepare"],
        records["split"],
        records["train"],
        records["evaluate"],
        metrics,
        records.get("compression"),
    )
    (folder / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    tracking.log_artifact(folder / "MODEL_CARD.md")
