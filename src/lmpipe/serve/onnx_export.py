"""ONNX export of a trained classifier, ONNX Runtime parity checks, int8 quantisation, and latency.

Everything here runs on the CPU on purpose: the deployment target is ONNX Runtime's CPU provider, and
the PyTorch reference is measured on the same cores with the same thread count, so the figures compare.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lmpipe import latency, tasks
from lmpipe.metrics import classification_metrics
from lmpipe.modeling import families
from lmpipe.modeling.encoding import model_reading
from lmpipe.modeling.inference import batches_logits
from lmpipe.modeling.models import SOFT_PROMPT_KEY, load_model, load_tokenizer, model_task
from lmpipe.params import ExportLatencyParams
from lmpipe.serve.serving import (
    CLASSIFIER_FILE,
    FP32_FILE,
    INT8_FILE,
    OPT_FILE,
    OnnxTextClassifier,
    pool_logits,
)


def write_classifier_folder(
    model_dir: str | Path,
    out_dir: str | Path,
    max_length: int,
    opset: int,
    allow_spinning: bool = False,
    temperature: float = 1.0,
) -> Path:
    """Export ``model_dir`` (a save_pretrained classifier) to ``out_dir``: ``model.onnx`` with dynamic
    batch and sequence axes, the tokenizer, and ``classifier.json`` (labels, max_length, the reading of
    long texts, inputs, the temperature its probabilities are served at, and whether served ONNX Runtime sessions let their
    threads spin)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir).eval()
    # a decoder's forward would also return its key-value cache (config.use_cache), which the exported
    # graph cannot hold and a classifier never reuses; an encoder has none (its graph is unchanged)
    model.config.use_cache = False
    tokenizer = load_tokenizer(model_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    sample = trace_sample(tokenizer, max_length)
    names = list(sample.keys())
    torch_export(model, sample, out_dir / FP32_FILE, opset)
    tokenizer.save_pretrained(out_dir)
    info = {
        "labels": labels,
        "max_length": max_length,
        "onnx_file": FP32_FILE,
        "inputs": names,
        "allow_spinning": allow_spinning,
        "temperature": temperature,
        # how the model reads a text longer than max_length (serving.read_texts), as it was trained to
        "reading": model_reading(model),
    }
    if model_task(model.config) == tasks.TOKEN_CLASSIFICATION:  # served by serving.OnnxEntityTagger
        info["task"] = tasks.TOKEN_CLASSIFICATION
    (out_dir / CLASSIFIER_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir


def trace_sample(tokenizer, max_length: int) -> dict:
    """Two texts of different lengths, so padding and the attention mask are part of the traced graph."""
    return dict(
        tokenizer(
            ["an example text to trace the graph with", "short"],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
    )


def torch_export(
    module: torch.nn.Module, sample: dict, path: Path, opset: int, onnx_optimize: bool = True
) -> None:
    """The one ``torch.onnx.export`` call: dynamo, dynamic batch and sequence axes, one self-contained
    file. ``onnx_optimize=False`` skips onnxscript's own graph clean-up (it merges the two Unsqueezes of
    BERT's mask into one, which ONNX Runtime's attention fusion then does not recognise)."""
    names = list(sample.keys())
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # The TorchScript exporter (dynamo=False) bakes the traced sequence length into transformers'
    # attention-mask code, so other lengths drift (1e-2 on logits); the dynamo exporter keeps both
    # axes symbolic and matches PyTorch to ~1e-8. It needs onnxscript.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.onnx.export(
        module,
        (),
        str(path),
        kwargs=dict(sample),
        input_names=names,
        output_names=["logits"],
        dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
        opset_version=opset,
        dynamo=True,
        external_data=False,  # one self-contained file (models up to 2 GB)
        optimize=onnx_optimize,
        verbose=False,
    )


# ------------------------------------------------------------------ ONNX Runtime transformer optimisations
FUSABLE_ATTENTION = "lmpipe_fusable"
FUSED_OPS = ("Attention", "SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu", "EmbedLayerNormalization")


def _fusable_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (no dropout: export is inference) written the way ONNX Runtime's BERT attention
    fusion matches it: scores *divided* by sqrt(head size), then the additive mask. transformers 5
    multiplies by the inverse, and the fusion, looking for the mask's ``Mul`` among the ``Add``'s inputs,
    then takes the scores' ``Mul`` and gives up."""
    scale = query.shape[-1] ** 0.5 if scaling is None else 1.0 / scaling
    scores = torch.matmul(query, key.transpose(2, 3)) / scale
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


class _ClassicMask(torch.nn.Module):
    """The classifier fed BERT's classic additive mask, ``(1 - mask) * min`` over [batch, 1, 1, seq],
    built with two Unsqueezes and a Cast: the subgraph the fusion recognises (transformers 5 builds a
    boolean mask with GatherND, which it does not). Same inputs and logits as the classifier."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask):  # named as BERT's tokenizer names them
        mask = attention_mask.unsqueeze(1).unsqueeze(2).to(torch.float32)
        additive = (1.0 - mask) * torch.finfo(torch.float32).min
        return self.model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=additive).logits


def optimize_onnx(model_dir: str | Path, folder: str | Path, max_length: int, opset: int) -> dict[str, Any]:
    """ONNX Runtime's transformer optimizer (``optimize_model``, model type ``bert``, heads and hidden size
    from the model's config) on a fusable export of ``model_dir`` (the same weights and inputs as
    ``model.onnx`` in ``folder``), written to ``model.opt.onnx``. Returns the fused op counts, or
    ``{"skipped": why}`` for a model the BERT optimizer does not cover (a decoder: ``families``' line).
    Parity is the caller's check."""
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AttentionInterface

    folder = Path(folder)
    model = load_model(model_dir).eval()
    config = model.config
    why = families.unsupported(config, "onnx_fusions", "export.optimize")  # a decoder's: the plain graph
    if why:
        return {"skipped": why}
    if config.model_type != "bert":
        return {"skipped": f"model type '{config.model_type}': ONNX Runtime's optimizer here covers bert"}
    if getattr(config, SOFT_PROMPT_KEY, None):  # its forward widens the 2-D mask the fusable export replaces
        return {
            "skipped": "a soft prompt (train.strategy prompt_tuning): the fusable export takes a plain BERT"
        }
    AttentionInterface.register(FUSABLE_ATTENTION, _fusable_attention)
    model.set_attn_implementation(FUSABLE_ATTENTION)
    tokenizer = load_tokenizer(model_dir)
    sample = trace_sample(tokenizer, max_length)
    if set(sample) != {"input_ids", "token_type_ids", "attention_mask"}:
        return {"skipped": f"inputs {sorted(sample)}: the fusable export takes BERT's three"}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "fusable.onnx"
        torch_export(_ClassicMask(model).eval(), sample, raw, opset, onnx_optimize=False)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the fusions log each pattern they miss
        try:
            optimized = optimize_model(
                str(raw),
                model_type="bert",
                num_heads=config.num_attention_heads,
                hidden_size=config.hidden_size,
            )
        finally:
            root.setLevel(level)
        optimized.save_model_to_file(str(folder / OPT_FILE))
    return fused_ops(folder / OPT_FILE)


def fused_ops(onnx_path: str | Path) -> dict[str, int]:
    """How many nodes of each of ONNX Runtime's fused op types the graph holds."""
    import onnx

    counts = Counter(n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def quantize_onnx_int8(
    folder: str | Path, fp32_layers: Sequence[str] = (), source: str = FP32_FILE, target: str = INT8_FILE
) -> Path:
    """ONNX Runtime dynamic quantisation of ``source`` into ``target``: int8 weights of MatMul/Gemm,
    activations quantised per batch. The MatMul/Gemm nodes of the torch Linear layers named in
    ``fp32_layers`` stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = Path(folder)
    # an optimised graph's rebuilt nodes lost their module scopes: find them by the plain graph's weights
    reference = folder / FP32_FILE if source != FP32_FILE else None
    exclude = nodes_of_modules(folder / source, fp32_layers, reference) if fp32_layers else []
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs "consider pre-processing" on the root logger
    try:
        quantize_dynamic(
            folder / source, folder / target, weight_type=QuantType.QInt8, nodes_to_exclude=exclude
        )
    finally:
        root.setLevel(level)
    return folder / target


def nodes_of_modules(
    onnx_path: str | Path, modules: Sequence[str], reference: str | Path | None = None
) -> list[str]:
    """The names of the MatMul/Gemm nodes that the torch modules ``modules`` (e.g.
    ``bert.encoder.layer.3.output.dense``) became in a dynamo export: its ``pkg.torch.onnx.name_scopes``
    metadata lists the module path of each node, outermost first, ending with the op (``linear_12``).
    In a graph ONNX Runtime's optimiser rewrote, the nodes it rebuilt have no scopes: with ``reference``
    (the plain export it was optimised from) a module is found by its weight's values instead
    (``nodes_by_weight``). A module with no node is an error."""
    import ast

    import onnx

    wanted = set(modules)
    found: dict[str, list[str]] = {}
    graph = onnx.load(str(onnx_path), load_external_data=reference is not None).graph
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        for module in wanted.intersection(scopes):
            # the quantizer first splits a Gemm into MatMul + Add, naming the MatMul <gemm>_MatMul
            names = [node.name, f"{node.name}_MatMul"] if node.op_type == "Gemm" else [node.name]
            found.setdefault(module, []).extend(names)
    missing = wanted - set(found)
    if missing and reference is not None:
        for module, names in nodes_by_weight(graph, reference, missing).items():
            found[module] = names
        missing = wanted - set(found)
    if missing:
        raise ValueError(f"{onnx_path}: no MatMul/Gemm node for the modules {sorted(missing)}")
    return list(dict.fromkeys(name for module in modules for name in found[module]))


def nodes_by_weight(graph, reference: str | Path, modules: set[str]) -> dict[str, list[str]]:
    """The nodes of ``graph`` (an optimised graph) that multiply by the weights of ``modules`` in the
    ``reference`` export: a MatMul/Gemm whose weight has the same values, or a fused Attention whose
    packed query/key/value weight holds them as a block of columns (the whole Attention node then stays
    fp32)."""
    import ast

    import onnx
    from onnx import numpy_helper

    plain = onnx.load(str(reference)).graph
    values = {i.name: i for i in plain.initializer}
    weights: dict[str, np.ndarray] = {}
    for node in plain.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in values:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        for module in modules.intersection(ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))):
            weights[module] = numpy_helper.to_array(values[node.input[1]])
    initializers = {i.name: i for i in graph.initializer}
    found: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Attention") or len(node.input) < 2:
            continue
        if node.input[1] not in initializers:
            continue
        array = numpy_helper.to_array(initializers[node.input[1]])
        for module, weight in weights.items():
            same = array.shape == weight.shape and np.array_equal(array, weight)
            block = (
                node.op_type == "Attention"
                and array.ndim == 2
                and array.shape[0] == weight.shape[0]
                and any(
                    np.array_equal(array[:, i : i + weight.shape[1]], weight)
                    for i in range(0, array.shape[1] - weight.shape[1] + 1, weight.shape[1])
                )
            )
            if same or block:
                names = [node.name, f"{node.name}_MatMul"] if node.op_type == "Gemm" else [node.name]
                found.setdefault(module, []).extend(names)
    return found


@dataclass
class Batches:
    """The test texts tokenised once, so every backend sees exactly the same inputs."""

    features: list[dict[str, np.ndarray]]
    # per batch, the text each input row belongs to, and how rows are pooled into texts (windows)
    owners: list[np.ndarray] | None = None
    pooling: str = "mean"

    @classmethod
    def of(cls, classifier: OnnxTextClassifier, texts: Sequence[str], batch_size: int) -> Batches:
        read = [classifier.read(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        return cls([f for f, _ in read], [o for _, o in read], classifier.reading["pooling"])


def torch_runner(model_dir: str | Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """PyTorch fp32 logits on the CPU for numpy features (the reference the exports are checked against)."""
    model = load_model(model_dir).eval()
    return lambda features: batches_logits(model, [features])


def all_logits(run: Callable, batches: Batches, desc: str) -> np.ndarray:
    """One row of logits per text (a windows model's windows pooled, as served)."""
    owners = batches.owners or [None] * len(batches.features)
    return np.concatenate(
        [
            run(f) if o is None else pool_logits(run(f), o, int(o.max(initial=-1)) + 1, batches.pooling)
            for f, o in zip(tqdm(batches.features, desc=desc, unit="batch"), owners, strict=True)
        ]
    )


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
    cfg: ExportLatencyParams,
    one_thread: Callable[[], dict[str, Callable]] | None = None,
) -> dict[str, Any]:
    """Every backend timed on the same inputs (``cfg``: ``export.latency``) and its speed-ups over the
    ``pytorch_fp32`` runner: ``latency`` is ``{backend: {latency_b<n>_p50_ms, latency_b<n>_p95_ms,
    throughput_b<n>_per_s, cpu_b<n>_ms}}`` (``latency.summary``, as in compress) for each batch size ``n``;
    ``speedup_wall`` and ``speedup_cpu`` are ``{<backend>_vs_pytorch_b<n>: ratio}`` from wall-clock p50 and
    from CPU cost per call, and ``speedup`` is the one the busy check trusts (``latency.reliability``,
    whose verdict is merged in). Each batch is the first ``n`` test texts (cycled if the split is
    smaller), tokenised once at ``max_length`` and padded to its longest text; the backends are timed in
    rotating rounds on it (``latency.time_interleaved``): ``cfg.repeats`` rounds at batch 1,
    ``cfg.batch_repeats`` at larger batches, whose every call costs ~n times more.

    When other processes disturbed the timing and ``cfg.threads`` > 1, the CPU cost is measured again
    on one thread (``one_thread`` builds the runners so; ``latency.reliability`` says why)."""

    def timed(cases: dict[str, Callable], desc: str) -> tuple[dict[str, dict[str, float]], list]:
        rows: dict[str, dict[str, float]] = {name: {} for name in cases}
        shares = []
        for n in cfg.batch_sizes:
            features = classifier.encode([texts[i % len(texts)] for i in range(n)])
            calls = {name: (lambda r=run, f=features: r(f)) for name, run in cases.items()}
            rounds = cfg.repeats if n == 1 else cfg.batch_repeats
            measured = latency.time_interleaved(calls, cfg.warmup, rounds, f"{desc} batch {n}")
            for name in cases:
                rows[name].update(measured.summary(name, n))
            shares += measured.other_load.values()
        return rows, shares

    def cpu_on_one_thread() -> None:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single, _ = timed(one_thread(), "cpu cost, 1 thread")
        finally:
            torch.set_num_threads(previous)
        for name, row in single.items():
            out[name].update({k: v for k, v in row.items() if k.startswith("cpu_")})

    out, shares = timed(runners, "latency")
    verdict = latency.reliability(
        shares, cfg.max_other_load, "export", cfg.threads, cpu_on_one_thread if one_thread else None
    )
    ratios = {
        basis: {
            f"{name}_vs_pytorch_b{n}": latency.speedup(out["pytorch_fp32"], out[name], n, basis)
            for name in runners
            if name != "pytorch_fp32"
            for n in cfg.batch_sizes
        }
        for basis in ("wall", "cpu")
    }
    return {
        "latency": out,
        "speedup": dict(ratios[verdict["speedup_basis"]]),
        "speedup_wall": ratios["wall"],
        "speedup_cpu": ratios["cpu"],
        **verdict,
    }


# ------------------------------------------------------------------------------------------ the registry
def split_fingerprint(test: pd.DataFrame) -> str:
    """A hash of the test split's texts and their truth (a label, a sentence's tags, a generator's target):
    versions scored on the same split share it."""
    column = next(c for c in ("label", "tags", "target") if c in test.columns)
    truth = [" ".join(v) if isinstance(v, list | tuple | np.ndarray) else str(v) for v in test[column]]
    blob = "\n".join(f"{t}\t{y}" for t, y in zip(test["text"], truth, strict=True))
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


# ------------------------------------------------------------------------------- causal LM (GenAI)
def build_genai_folder(
    model_dir: str | Path,
    out_dir: str | Path,
    precision: str,
    generator_info: dict[str, Any],
    block_size: int = 32,
    algo: str = "default",
) -> dict[str, Any]:
    """A causal LM (a ``save_pretrained`` folder) as an ONNX Runtime GenAI folder: ONNX Runtime GenAI's
    model builder writes the graph with its KV cache (``model.onnx`` + ``model.onnx.data``) and
    ``genai_config.json``, in ``precision`` fp32 or int4 (group-wise 4-bit weights of ``block_size``,
    MatMulNBits, for the CPU; ``algo`` is the builder's ``algo_config``: ``default``/``rtn`` round to
    nearest, ``k_quant`` llama.cpp's k-quants, ``k_quant_mixed`` those with the most sensitive MatMuls in
    int8, as llama.cpp's Q4_K_M). The model's own tokenizer and ``generator.json`` (how prompts are made,
    ``generator_info``) go beside it. Returns the build's recipe (also written as ``build.json``).

    The builder runs in its own process: it loads the whole model again, and its memory is given back
    when it ends; its output is kept for an error message."""
    import subprocess
    import sys
    import time

    from lmpipe.errors import UserError
    from lmpipe.serve.generator import GENERATOR_FILE

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir),
        "-p", precision, "-e", "cpu", "-c", str(out_dir / ".builder_cache"),
    ]  # fmt: skip
    if precision == "int4":
        command += ["--extra_options", f"block_size={block_size}", f"algo_config={algo}"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise UserError(f"ONNX Runtime GenAI's model builder failed on {model_dir} ({precision}): {tail}")
    import shutil

    shutil.rmtree(out_dir / ".builder_cache", ignore_errors=True)
    load_tokenizer(model_dir).save_pretrained(out_dir)  # the model's own files, as training read them
    (out_dir / GENERATOR_FILE).write_text(json.dumps(generator_info, indent=2) + "\n")
    recipe = {
        "builder": "onnxruntime_genai.models.builder",
        "onnxruntime_genai": metadata.version("onnxruntime-genai"),
        "precision": precision,
        "execution_provider": "cpu",
        **(
            {
                "int4_block_size": block_size,
                "int4_algo": algo,
                "weights": "MatMulNBits, 4-bit, a scale per block",
            }
            if precision == "int4"
            else {}
        ),
        "source": str(model_dir),
        "build_seconds": round(seconds, 1),
    }
    (out_dir / "build.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def folder_mb(folder: str | Path, patterns: Sequence[str] = ("*.onnx", "*.onnx.data")) -> float:
    """The size of a folder's model files in MB (2**20 bytes)."""
    return round(sum(f.stat().st_size for p in patterns for f in Path(folder).glob(p)) / 2**20, 3)
