"""ONNX export of a trained classifier, ONNX Runtime parity checks, int8 quantisation, and latency.

Everything here runs on the CPU on purpose: the deployment target is ONNX Runtime's CPU provider, and
the PyTorch reference is measured on the same cores with the same thread count, so the figures compare.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lmpipe import latency, serving
from lmpipe.errors import UserError
from lmpipe.metrics import classification_metrics
from lmpipe.models import load_classifier, load_tokenizer
from lmpipe.params import Params
from lmpipe.serving import CLASSIFIER_FILE, FP32_FILE, INT8_FILE, VARIANT_FILES, OnnxTextClassifier, softmax


def write_classifier_folder(model_dir: str | Path, out_dir: str | Path, max_length: int, opset: int) -> Path:
    """Export ``model_dir`` (a save_pretrained classifier) to ``out_dir``: ``model.onnx`` with dynamic
    batch and sequence axes, the tokenizer, and ``classifier.json`` (labels, max_length, inputs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_classifier(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    # two texts of different lengths, so padding and the attention mask are part of the traced graph
    sample = tokenizer(
        ["an example text to trace the graph with", "short"],
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    names = list(sample.keys())
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # The TorchScript exporter (dynamo=False) bakes the traced sequence length into transformers'
    # attention-mask code, so other lengths drift (1e-2 on logits); the dynamo exporter keeps both
    # axes symbolic and matches PyTorch to ~1e-8. It needs onnxscript.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.onnx.export(
        model,
        (),
        str(out_dir / FP32_FILE),
        kwargs=dict(sample),
        input_names=names,
        output_names=["logits"],
        dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
        opset_version=opset,
        dynamo=True,
        external_data=False,  # one self-contained file (models up to 2 GB)
        verbose=False,
    )
    tokenizer.save_pretrained(out_dir)
    info = {"labels": labels, "max_length": max_length, "onnx_file": FP32_FILE, "inputs": names}
    (out_dir / CLASSIFIER_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir


def quantize_int8(folder: str | Path) -> Path:
    """ONNX Runtime dynamic quantisation: int8 weights of MatMul/Gemm, activations quantised per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = Path(folder)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs "consider pre-processing" on the root logger
    try:
        quantize_dynamic(folder / FP32_FILE, folder / INT8_FILE, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return folder / INT8_FILE


@dataclass
class Batches:
    """The test texts tokenised once, so every backend sees exactly the same inputs."""

    features: list[dict[str, np.ndarray]]

    @classmethod
    def of(cls, classifier: OnnxTextClassifier, texts: Sequence[str], batch_size: int) -> Batches:
        return cls([classifier.encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])


def torch_runner(model_dir: str | Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """PyTorch fp32 logits on the CPU for numpy features (the reference the exports are checked against)."""
    model = load_classifier(model_dir).eval()

    def run(features: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in features.items()}).logits.float().numpy()

    return run


def all_logits(run: Callable, batches: Batches, desc: str) -> np.ndarray:
    return np.concatenate([run(f) for f in tqdm(batches.features, desc=desc, unit="batch")])


def parity_report(
    reference: np.ndarray, candidate: np.ndarray, y_true: np.ndarray | None = None
) -> dict[str, float]:
    """How closely ``candidate`` logits follow the PyTorch ``reference``: max abs difference, label
    agreement, and (with ``y_true``) the candidate's own test scores."""
    ref_pred, cand_pred = reference.argmax(axis=1), candidate.argmax(axis=1)
    out = {
        "max_abs_logit_diff": float(np.abs(reference - candidate).max()) if len(reference) else 0.0,
        "label_agreement": float((ref_pred == cand_pred).mean()) if len(reference) else 1.0,
        "labels_differing": int((ref_pred != cand_pred).sum()),
    }
    if y_true is not None:
        scores = classification_metrics(y_true, cand_pred)
        out.update({"macro_f1": scores["macro_f1"], "accuracy": scores["accuracy"]})
    return out


def latency_benchmark(
    runners: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]],
    classifier: OnnxTextClassifier,
    texts: Sequence[str],
    batch_sizes: Sequence[int],
    warmup: int,
    repeats: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{backend: {"batch_<n>": {p50_ms, p95_ms, mean_ms}}}``. Each batch is the first ``n`` test texts
    (cycled if the split is smaller), tokenised once at ``max_length`` and padded to its longest text;
    the backends are timed in rotating rounds on it (``latency.time_interleaved``)."""
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in runners}
    for n in batch_sizes:
        features = classifier.encode([texts[i % len(texts)] for i in range(n)])
        calls = {name: (lambda r=run, f=features: r(f)) for name, run in runners.items()}
        for name, seconds in latency.time_interleaved(calls, warmup, repeats, f"latency batch {n}").items():
            out[name][f"batch_{n}"] = latency.milliseconds(seconds)
    return out


def probabilities(logits: np.ndarray) -> np.ndarray:
    return softmax(logits.astype(np.float64))


# ------------------------------------------------------------------------------------- the whole stage
def split_fingerprint(test: pd.DataFrame) -> str:
    """A hash of the test split's texts and labels: versions scored on the same split share it."""
    blob = "\n".join(f"{t}\t{y}" for t, y in zip(test["text"], test["label"], strict=True))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def pip_requirements() -> list[str]:
    """What the served model needs (no torch: it runs ONNX with the tokenizer), pinned to this env."""
    pins = []
    for package in ("mlflow", "onnxruntime", "transformers", "tokenizers", "numpy", "pandas", "pydantic"):
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    return pins


def score_registered(uri: str, texts: Sequence[str], y_true: np.ndarray, labels: list[str]) -> float | None:
    """Macro-F1 of a registered model's own ONNX classifier on ``texts``; None when its classes differ
    from ``labels`` (it was trained on other data, so the same test split cannot score it)."""
    from lmpipe import tracking

    with tempfile.TemporaryDirectory() as tmp:
        folder = tracking.download_model(uri, tmp) / "artifacts" / "classifier"
        classifier = OnnxTextClassifier(folder)
        if classifier.labels != labels:
            return None
        proba = classifier.predict_proba(list(texts))
    return classification_metrics(y_true, proba.argmax(axis=1))["macro_f1"]


def run_export(
    params: Params,
    model_dir: str | Path,
    test: pd.DataFrame,
    records: dict[str, Any],
    out_dir: str | Path,
    metrics_path: str | Path,
    run_id: str,
) -> dict[str, Any]:
    """Export, check, benchmark, log, register, gate and describe ``model_dir``; write ``out_dir`` (the
    export folder with its model card) and ``metrics_path``, both only if everything succeeded."""
    from lmpipe import io, modelcard, promotion, tracking

    cfg = params.export
    texts = test["text"].tolist()
    torch.set_num_threads(cfg.latency.threads)
    with io.atomic_dir(out_dir) as tmp:
        write_classifier_folder(model_dir, tmp, params.base.max_length, cfg.opset)
        quantize_int8(tmp)
        fp32 = OnnxTextClassifier(tmp, FP32_FILE, threads=cfg.latency.threads)
        int8 = OnnxTextClassifier(tmp, INT8_FILE, threads=cfg.latency.threads)
        labels = fp32.labels
        unknown = sorted(set(test["label"]) - set(labels))
        if unknown:
            raise UserError(f"{model_dir}: test labels {unknown} are unknown to the model (labels: {labels})")
        y_true = test["label"].map({n: i for i, n in enumerate(labels)}).to_numpy()

        batches = Batches.of(fp32, texts, cfg.batch_size)
        pytorch = torch_runner(model_dir)
        ref = all_logits(pytorch, batches, "pytorch fp32")
        torch_scores = classification_metrics(y_true, ref.argmax(axis=1))
        onnx_fp32 = parity_report(ref, all_logits(fp32.logits, batches, "onnx fp32"), y_true)
        onnx_int8 = parity_report(ref, all_logits(int8.logits, batches, "onnx int8"), y_true)
        onnx_int8["macro_f1_minus_pytorch"] = onnx_int8["macro_f1"] - torch_scores["macro_f1"]
        fp32_ok = onnx_fp32["max_abs_logit_diff"] <= cfg.max_logit_diff and onnx_fp32["labels_differing"] == 0
        onnx_fp32["ok"] = fp32_ok
        onnx_int8["ok"] = onnx_int8["label_agreement"] >= cfg.min_int8_agreement
        if not fp32_ok:
            raise UserError(
                f"export.max_logit_diff: the ONNX fp32 export differs from PyTorch by "
                f"{onnx_fp32['max_abs_logit_diff']:.2e} (limit {cfg.max_logit_diff:g}) with "
                f"{onnx_fp32['labels_differing']} label(s) changed on {model_dir}; not registering it"
            )

        latency = latency_benchmark(
            {"pytorch_fp32": pytorch, "onnx_fp32": fp32.logits, "onnx_int8": int8.logits},
            fp32,
            texts,
            cfg.latency.batch_sizes,
            cfg.latency.warmup,
            cfg.latency.repeats,
        )
        speedup = {
            f"onnx_int8_vs_pytorch_{case}": round(latency["pytorch_fp32"][case]["p50_ms"] / ms["p50_ms"], 3)
            for case, ms in latency["onnx_int8"].items()
            if ms["p50_ms"] > 0
        }
        served = {"fp32": onnx_fp32, "int8": onnx_int8}[cfg.registered_variant]
        evaluate, train_run_id = records["evaluate"], records["train"].get("mlflow_run_id", "")
        baseline_f1 = float(evaluate["baseline"]["macro_f1"])
        git = tracking.git_info()

        # the registered model: the served ONNX variant as model.onnx, with tokenizer and labels
        with tempfile.TemporaryDirectory() as staging_root:
            staging = Path(staging_root) / "classifier"
            shutil.copytree(tmp, staging, ignore=shutil.ignore_patterns("*.onnx", "*.md"))
            shutil.copy2(tmp / VARIANT_FILES[cfg.registered_variant], staging / FP32_FILE)
            info = json.loads((staging / CLASSIFIER_FILE).read_text())
            info.update(onnx_file=FP32_FILE, variant=cfg.registered_variant)
            (staging / CLASSIFIER_FILE).write_text(json.dumps(info, indent=2) + "\n")
            example = [t[:300] for t in texts[:2]]
            model_uri = tracking.log_pyfunc_model(
                serving.__file__, {"classifier": staging}, example, pip_requirements()
            )

        name = cfg.registered_model
        champion_version = tracking.alias_version(name, promotion.CHAMPION)
        champion_f1 = None
        if champion_version is not None:
            champion_f1 = score_registered(f"models:/{name}@{promotion.CHAMPION}", texts, y_true, labels)
        checks = []
        if cfg.registered_variant == "int8":
            checks.append(
                (
                    onnx_int8["ok"],
                    f"int8 label agreement {onnx_int8['label_agreement']:.4f} vs min_int8_agreement "
                    f"{cfg.min_int8_agreement}",
                )
            )
        decision = promotion.decide(
            served["macro_f1"], baseline_f1, cfg.gate, champion_f1, champion_version, checks
        )
        version = tracking.register_model_version(
            model_uri,
            name,
            tags={
                "train_run_id": train_run_id,
                # the evaluate run that gave these scores; an evaluate re-run that gave the same scores
                # (a new run id only) does not re-run export, so this can name the earlier, identical run
                "evaluate_run_id": evaluate.get("mlflow_run_id", ""),
                "export_run_id": run_id,
                "git_commit": git["git_commit"],
                "git_dirty": git["git_dirty"],
                "params_hash": params.digest(),
                "source": cfg.source,
                "variant": cfg.registered_variant,
                "test_macro_f1": f"{served['macro_f1']:.6f}",
                "test_accuracy": f"{served['accuracy']:.6f}",
                "baseline_test_macro_f1": f"{baseline_f1:.6f}",
                "test_rows": len(test),
                "test_split_sha256": split_fingerprint(test),
                "gate_passed": str(decision.passed).lower(),
            },
            description=(
                f"ONNX {cfg.registered_variant} export of '{cfg.source}' from training run "
                f"{train_run_id or 'n/a'} at git commit {git['git_commit']}. "
                f"Test macro-F1 {served['macro_f1']:.4f} (accuracy {served['accuracy']:.4f}) on "
                f"{len(test)} rows; TF-IDF baseline {baseline_f1:.4f}. Gate: " + "; ".join(decision.reasons)
            ),
        )
        for alias in decision.aliases:
            tracking.set_alias(name, alias, version)

        metrics = {
            "source": cfg.source,
            "labels": labels,
            "test_rows": len(test),
            "pytorch_fp32": {"macro_f1": torch_scores["macro_f1"], "accuracy": torch_scores["accuracy"]},
            "onnx_fp32": onnx_fp32,
            "onnx_int8": onnx_int8,
            "served": {
                "variant": cfg.registered_variant,
                "macro_f1": served["macro_f1"],
                "accuracy": served["accuracy"],
            },
            "latency": latency,
            "speedup": speedup,
            "latency_threads": cfg.latency.threads,
            # other processes on the machine skew the timings: the 1-minute load average when they were taken
            "latency_load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "size_mb": {v: round((tmp / f).stat().st_size / 2**20, 3) for v, f in VARIANT_FILES.items()},
            "registry": {"name": name, "version": version, "model_uri": model_uri},
            "gate": {
                **decision.to_dict(),
                "baseline_macro_f1": baseline_f1,
                "champion_before": champion_version,
                "champion_before_macro_f1": champion_f1,
            },
            "git_commit": git["git_commit"],
            "mlflow_run_id": run_id,
        }
        card = modelcard.render(
            params,
            records["prepare"],
            records["split"],
            records["train"],
            evaluate,
            metrics,
            records.get("compression"),
        )
        (tmp / "MODEL_CARD.md").write_text(card, encoding="utf-8")
        tracking.log_metrics(
            {
                k: metrics[k]
                for k in ("pytorch_fp32", "onnx_fp32", "onnx_int8", "latency", "speedup", "size_mb")
            }
        )
        tracking.log_metrics({"gate_passed": int(decision.passed), "registered_version": int(version)})
        tracking.log_artifact(tmp / "MODEL_CARD.md")
        tracking.log_dict(metrics, "export_metrics.json")
        io.write_json(metrics_path, metrics)
    return metrics
