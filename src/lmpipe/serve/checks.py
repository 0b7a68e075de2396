"""A text classifier's export, checked: the ONNX files (fp32, int8, and ONNX Runtime's fused graph with
``export.optimize``) written into the export folder, each variant's parity with PyTorch on the test split,
the compress variants ``export.compare`` names exported beside it, and the latency of them all. The
text-classification task's ``export`` (``lmpipe.tasks.classification``) runs these in order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmpipe import data, latency
from lmpipe.errors import UserError
from lmpipe.experiments.compare import predictions_frame, versus_baseline
from lmpipe.metrics import classification_metrics
from lmpipe.params import Params
from lmpipe.serve import onnx_export, serving
from lmpipe.serve.serving import OPT_FILE, OPT_INT8_FILE, VARIANT_FILES, OnnxTextClassifier


def int8_fp32_layers(params: Params, compression: dict | None) -> list[str]:
    """The Linear layers compress's int8 variant kept fp32 to meet its budget: the ONNX int8 model keeps
    the same ones (they were ranked on the trained model, so only when that is what is shipped)."""
    row = (compression or {}).get("variants", {}).get("int8", {})
    return row.get("fp32_layers", []) if params.export.source == "model" else []


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
    onnx_export.write_classifier_folder(
        model_dir, out, params.base.max_length, cfg.opset, cfg.allow_spinning, temperature
    )
    onnx_export.quantize_onnx_int8(out, fp32_layers)
    optimize = (
        onnx_export.optimize_onnx(model_dir, out, params.base.max_length, cfg.opset)
        if cfg.optimize
        else {"skipped": "export.optimize is false"}
    )
    if cfg.optimize and "skipped" in optimize:  # asked for, not built: say why once (it is in the report)
        print(f"export: {optimize['skipped']}")

    # checked and timed with spinning off whatever is served: a spinning ONNX Runtime pool slows the
    # PyTorch call timed after it (3x on 2 cores), and the table must compare the backends fairly
    def load(variant: str) -> OnnxTextClassifier:
        return OnnxTextClassifier(
            out, VARIANT_FILES[variant], threads=cfg.latency.threads, allow_spinning=False
        )

    sessions = {v: load(v) for v in ("fp32", "int8", "fp32_opt") if (out / VARIANT_FILES[v]).is_file()}
    fp32 = sessions["fp32"]
    labels = fp32.labels
    y_true = data.encode_labels(test["label"], data.model_label2id(labels), f"the model in {model_dir}")
    batches = onnx_export.Batches.of(fp32, test["text"].tolist(), cfg.batch_size)
    pytorch = onnx_export.torch_runner(model_dir)
    ref = onnx_export.all_logits(pytorch, batches, "pytorch fp32")
    torch_scores = classification_metrics(y_true, ref.argmax(axis=1))
    logits: dict[str, np.ndarray] = {}
    rows: dict[str, dict[str, Any]] = {}

    def check(variant: str) -> None:
        logits[variant] = onnx_export.all_logits(sessions[variant].logits, batches, f"onnx {variant}")
        row = onnx_export.parity_report(ref, logits[variant], y_true)
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
            onnx_export.quantize_onnx_int8(out, fp32_layers, OPT_FILE, OPT_INT8_FILE)
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
    on the same inputs; each one's speed-up over PyTorch fp32, and the optimised graphs' over the plain,
    from wall-clock p50 or, when other processes disturbed the timing, from CPU cost per call
    (``onnx_export.latency_benchmark``)."""
    cfg = params.export.latency

    def runners(threads: int | None = None) -> dict[str, Any]:
        def session(s):  # the checked session, or the same graph on ``threads``
            return (s if threads is None else s.threaded(threads)).logits

        out = {"pytorch_fp32": checked.pytorch_runner}  # PyTorch's threads are set process-wide
        out |= {f"onnx_{v}": session(checked.sessions[v]) for v in VARIANT_FILES if v in checked.sessions}
        for name, other in (others or {}).items():
            out[f"{name}_onnx_int8"] = session(other.sessions[other.int8_variant])
        return out

    timed = onnx_export.latency_benchmark(runners(), checked.fp32, texts, cfg, lambda: runners(1))
    for basis in ("wall", "cpu"):
        for n in cfg.batch_sizes:
            for variant in ("fp32", "int8"):
                plain, opt = (timed["latency"].get(f"onnx_{v}") for v in (variant, f"{variant}_opt"))
                value = latency.speedup(plain, opt, n, basis) if plain and opt else None
                if value is not None:
                    timed[f"speedup_{basis}"][f"onnx_{variant}_opt_vs_onnx_{variant}_b{n}"] = value
    timed["speedup"] = dict(timed[f"speedup_{timed['speedup_basis']}"])
    return {
        **timed,
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
