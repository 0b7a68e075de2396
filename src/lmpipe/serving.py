"""The deployable classifier: an ONNX model, its tokenizer and its label names, in one folder.

This file is self-contained on purpose (numpy, pandas, onnxruntime, transformers and mlflow only, no
``lmpipe`` imports): it is logged as the code of the MLflow pyfunc model ("models from code"), so a
registered model runs wherever those packages are installed, without this repository. lmpipe uses the
same ``OnnxTextClassifier`` for the export checks and ``lmpipe predict``: one implementation.

The folder (``CLASSIFIER_FILE`` + ``model.onnx`` + tokenizer files) holds no pickles: ONNX protobuf,
JSON and the tokenizer's own files. A text longer than ``max_length`` tokens is read the way the model
was trained to read it (``read_texts``, the one tokenisation path of training, evaluation and serving):
its head, its tail, its head and tail, or every window, with the windows' logits pooled. Probabilities
are softmax(logits / temperature), with the temperature the analyze stage fit on val
(``classifier.json``; 1 = the raw softmax).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pydantic
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

CLASSIFIER_FILE = "classifier.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPT_FILE = "model.opt.onnx"  # fp32 after ONNX Runtime's transformer fusions (export.optimize)
OPT_INT8_FILE = "model.opt.int8.onnx"  # int8 quantised from the optimised graph
VARIANT_FILES = {"fp32": FP32_FILE, "int8": INT8_FILE, "fp32_opt": OPT_FILE, "int8_opt": OPT_INT8_FILE}
TEXT_COLUMN = "text"
# how a text longer than max_length is read (params.yaml base.reading; saved in the model's config.json
# as ``lmpipe_reading`` and in classifier.json as ``reading``): a model without one reads the head
READING_KEY = "lmpipe_reading"
HEAD_READING = {"mode": "head", "head_share": 0.5, "stride": 32, "pooling": "mean"}


class InputError(ValueError):
    """A request or input file the classifier cannot score: the message names the row."""


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def read_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int, reading: dict[str, Any] | None = None
) -> tuple[dict[str, list[list[int]]], np.ndarray]:
    """Token features (unpadded lists) of the units the model reads, and the index of the text each
    unit belongs to. One unit per text, except for ``windows``.

    * ``head``: the first ``max_length`` tokens (special tokens included);
    * ``tail``: the last ones;
    * ``head_tail``: ``head_share`` of the token budget from the start, the rest from the end (Sun et
      al. 2019); a text that fits is read whole, as by ``head``;
    * ``windows``: every window of ``max_length`` tokens, consecutive windows sharing ``stride``
      tokens; ``pool_logits`` turns the windows' logits into the text's.
    """
    r = {**HEAD_READING, **(reading or {})}
    texts = list(texts)
    if r["mode"] == "head":
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        return {k: list(v) for k, v in enc.items()}, np.arange(len(texts))
    if r["mode"] == "windows":
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("base.reading.mode: windows needs a fast (Rust) tokenizer for its offsets")
        enc = tokenizer(
            texts,
            truncation=True,
            max_length=max_length,
            stride=int(r["stride"]),
            return_overflowing_tokens=True,
        )
        owner = np.asarray(enc.pop("overflow_to_sample_mapping"), dtype=np.int64)
        return {k: list(v) for k, v in enc.items()}, owner
    if r["mode"] not in ("tail", "head_tail"):
        raise ValueError(f"base.reading.mode: unknown reading '{r['mode']}'")
    wrap = _special_wrapping(tokenizer)
    budget = max_length - len(wrap["input_ids"][0]) - len(wrap["input_ids"][1])
    head = round(budget * float(r["head_share"])) if r["mode"] == "head_tail" else 0
    features: dict[str, list[list[int]]] = {key: [] for key in wrap}
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        if len(ids) > budget:
            ids = ids[:head] + ids[len(ids) - (budget - head) :]
        for key, (prefix, suffix, fill) in wrap.items():
            features[key].append(prefix + (list(ids) if key == "input_ids" else [fill] * len(ids)) + suffix)
    return features, np.arange(len(texts))


@functools.lru_cache(maxsize=8)  # per tokenizer, not per request: serving calls read_texts per batch
def _special_wrapping(tokenizer: Any) -> dict[str, tuple[list[int], list[int], int]]:
    """How the tokenizer wraps one text's tokens, per feature: (prefix, suffix, value per text token),
    e.g. ``input_ids``: ([CLS], [SEP], -), ``token_type_ids``: ([0], [0], 0), ``attention_mask``:
    ([1], [1], 1). Read off a probe text, so that it holds for any tokenizer's template."""
    probe = "a b"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)
    ids = list(full["input_ids"])
    start = next(i for i in range(len(ids) - len(bare) + 1) if ids[i : i + len(bare)] == list(bare))
    end = start + len(bare)
    wrap = {}
    for key, values in full.items():
        values = list(values)
        fill = values[start] if key != "input_ids" else -1
        wrap[key] = (values[:start], values[end:], fill)
    return wrap


def pool_logits(logits: np.ndarray, owner: np.ndarray, n_texts: int, pooling: str = "mean") -> np.ndarray:
    """The texts' logits from their units' (``read_texts``): the mean or the max over each text's
    windows, per class; one unit per text passes through."""
    owner = np.asarray(owner)
    if len(owner) == n_texts and np.array_equal(owner, np.arange(n_texts)):
        return logits
    out = np.zeros((n_texts, logits.shape[-1]), dtype=np.float64)
    if pooling == "max":
        out[:] = -np.inf
        np.maximum.at(out, owner, logits)
    else:
        np.add.at(out, owner, logits)
        out /= np.bincount(owner, minlength=n_texts)[:, None]
    return out.astype(logits.dtype)


def check_texts(values: Sequence[Any], first_row: int = 1) -> list[str]:
    """The texts as a list of non-empty strings, or an ``InputError`` naming the first bad row."""
    texts = []
    for i, value in enumerate(values):
        row = first_row + i
        if value is None or (isinstance(value, float) and np.isnan(value)):
            raise InputError(f"row {row}: text is missing")
        if not isinstance(value, str):
            raise InputError(f"row {row}: text must be a string, got {type(value).__name__} {value!r}")
        if not value.strip():
            raise InputError(f"row {row}: text is empty")
        texts.append(value)
    return texts


class OnnxTextClassifier:
    """ONNX Runtime inference over a classifier folder written by the export stage."""

    def __init__(
        self,
        folder: str | Path,
        onnx_file: str | None = None,
        threads: int | None = None,
        allow_spinning: bool | None = None,
    ):
        """``allow_spinning`` (default: the folder's ``classifier.json``, else False): whether ONNX Runtime's
        worker threads spin-wait for the next call. Spinning saves a little latency on cores that nothing
        else needs, and steals them from everything else on a shared machine, including whatever runs
        right after a call (it tripled the PyTorch latency measured after an ONNX call on 2 cores)."""
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = Path(folder)
        self.info = json.loads((folder / CLASSIFIER_FILE).read_text(encoding="utf-8"))
        self.labels: list[str] = list(self.info["labels"])
        self.max_length: int = int(self.info["max_length"])
        self.reading: dict[str, Any] = {**HEAD_READING, **self.info.get("reading", {})}
        self.temperature: float = float(self.info.get("temperature", 1.0))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        spin = self.info.get("allow_spinning", False) if allow_spinning is None else allow_spinning
        for pool in ("intra_op", "inter_op"):
            options.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spin else "0")
        path = folder / (onnx_file or self.info["onnx_file"])
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )

    def read(self, texts: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The padded model inputs of what the model reads of ``texts`` (``read_texts``), and the text
        each input row belongs to."""
        features, owner = read_texts(self.tokenizer, texts, self.max_length, self.reading)
        enc = self.tokenizer.pad(features, padding=True, return_tensors="np")
        return {name: enc[name].astype(np.int64) for name in self.input_names}, owner

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The padded model inputs of ``texts`` (every window of a text, for ``windows``)."""
        return self.read(texts)[0]

    def text_logits(self, texts: Sequence[str]) -> np.ndarray:
        """One row of logits per text (its windows pooled, for ``windows``)."""
        features, owner = self.read(texts)
        return pool_logits(self.logits(features), owner, len(texts), self.reading["pooling"])

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, features)[0]

    def proba(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of logits: softmax(logits / temperature)."""
        return softmax(logits / self.temperature)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        chunks = [
            self.proba(self.text_logits(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.labels)), dtype=np.float32)


def texts_from_input(model_input: Any) -> list[str]:
    """A list, Series, ndarray or DataFrame (a ``text`` column, or a single column) of texts."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN in model_input.columns:
            values = model_input[TEXT_COLUMN].tolist()
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            known = ", ".join(map(str, model_input.columns))
            raise InputError(f"input needs a '{TEXT_COLUMN}' column (got columns: {known})")
    elif isinstance(model_input, pd.Series | np.ndarray):
        values = list(model_input.reshape(-1) if isinstance(model_input, np.ndarray) else model_input)
    elif isinstance(model_input, list | tuple):
        values = list(model_input)
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        raise InputError(f"input must be a list of texts or a DataFrame, got {type(model_input).__name__}")
    if not values:
        raise InputError("input holds no texts")
    return check_texts(values)


class Prediction(pydantic.BaseModel):
    """One text's result: the predicted label and every class's probability."""

    label: str
    probabilities: dict[str, float]


class TextClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a list of texts (or a one-column DataFrame of them) in, one ``Prediction`` per text
    out. The type hints are the signature: MLflow rejects non-string items with a 400 before ``predict``
    runs, and ``predict`` rejects empty texts with a 400 naming the row."""

    def load_context(self, context):
        self.classifier = OnnxTextClassifier(context.artifacts["classifier"])

    def predict(self, context, model_input: list[str], params=None) -> list[Prediction]:
        try:
            texts = texts_from_input(model_input)
        except InputError as err:
            # MLflow's scoring server turns this into a 400 with the message, not a 500
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        proba = self.classifier.predict_proba(texts)
        labels = self.classifier.labels
        return [
            Prediction(
                label=labels[int(row.argmax())], probabilities=dict(zip(labels, map(float, row), strict=True))
            )
            for row in proba
        ]


# MLflow executes this file under a module name starting with "code_model_" when it loads the model:
# only then is the model object set. Importing lmpipe.serving has no side effect.
if __name__.startswith("code_model_"):
    mlflow.models.set_model(TextClassifierModel())
