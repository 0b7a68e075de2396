"""The deployable classifier: an ONNX model, its tokenizer and its label names, in one folder.

This file is self-contained on purpose (numpy, pandas, onnxruntime, transformers and mlflow only, no
``lmpipe`` imports): it is logged as the code of the MLflow pyfunc model ("models from code"), so a
registered model runs wherever those packages are installed, without this repository. lmpipe uses the
same ``OnnxTextClassifier`` for the export checks and ``lmpipe predict``: one implementation.

The folder (``CLASSIFIER_FILE`` + ``model.onnx`` + tokenizer files) holds no pickles: ONNX protobuf,
JSON and the tokenizer's own files. Texts longer than ``max_length`` tokens are truncated (the head and
lead are kept), exactly as in training and evaluation. Probabilities are softmax(logits / temperature),
with the temperature the analyze stage fit on val (``classifier.json``; 1 = the raw softmax).
"""

from __future__ import annotations

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


class InputError(ValueError):
    """A request or input file the classifier cannot score: the message names the row."""


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


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

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="np"
        )
        return {name: enc[name].astype(np.int64) for name in self.input_names}

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, features)[0]

    def proba(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of logits: softmax(logits / temperature)."""
        return softmax(logits / self.temperature)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        chunks = [
            self.proba(self.logits(self.encode(texts[i : i + batch_size])))
            for i in range(0, len(texts), batch_size)
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
