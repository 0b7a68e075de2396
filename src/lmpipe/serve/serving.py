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

A token classifier's folder (``classifier.json`` ``task: token_classification``) is served by
``OnnxEntityTagger``: a text's words are its whitespace-separated tokens (as CoNLL tokens joined by
spaces), each word is tagged on its first subword, and the BIO tags become entities ``{type, start,
end, text, score}`` with character offsets into the text.
"""

from __future__ import annotations

import functools
import json
import re
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
# classifier.json ``task`` (absent = text classification): lmpipe.tasks' names, written again here since
# this file is logged with the MLflow model and imports nothing of lmpipe (tests/code/test_reading.py)
TEXT_TASK = "classification"
TOKEN_TASK = "token_classification"
GENERATION_TASK = "generation"  # served by lmpipe.serve.generator (ONNX Runtime GenAI), not by this file
OUTSIDE = "O"
WORD = re.compile(r"\S+")


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


def encode_words(tokenizer: Any, sentences: Sequence[Sequence[str]], **kwargs: Any) -> Any:
    """Sentences given as words (``is_split_into_words``), encoded as the same words read in running text,
    with ``word_ids`` mapping subwords to words: the one path from words to tokens (training, evaluation,
    analysis, serving). A byte-level BPE tokenizer without a prefix space (GPT-2, Llama, SmolLM2) reads a
    word given alone as if it began the text (``world``, where the text has ``Ġworld``), so every word
    after the first is given its space (``_words_need_space``); WordPiece (BERT, MiniLM) and SentencePiece
    tokenizers need none, and get the words as they are (their ids unchanged)."""
    words = [list(s) for s in sentences]
    if words and _words_need_space(tokenizer):
        words = [[w if i == 0 else f" {w}" for i, w in enumerate(s)] for s in words]
    return tokenizer(words, is_split_into_words=True, **kwargs)


@functools.lru_cache(maxsize=8)  # per tokenizer: a probe, as for _special_wrapping
def _words_need_space(tokenizer: Any) -> bool:
    """Whether the tokenizer reads words split apart otherwise than the text they come from (a byte-level
    BPE loses each word's leading-space marker), read off a probe."""
    probe = ["Hello", "world"]
    as_words = tokenizer(probe, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    as_text = tokenizer(" ".join(probe), add_special_tokens=False)["input_ids"]
    return list(as_words) != list(as_text)


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


class OnnxFolder:
    """An ONNX Runtime session over a folder written by the export stage, with its tokenizer and labels."""

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
        self.folder, self.onnx_file, self.allow_spinning = folder, onnx_file, allow_spinning
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

    @property
    def task(self) -> str:
        return self.info.get("task", TEXT_TASK)

    def threaded(self, threads: int) -> OnnxFolder:
        """The same graph in a new session on ``threads`` intra-op threads (to time it on one)."""
        return type(self)(self.folder, self.onnx_file, threads, self.allow_spinning)

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, features)[0]


class OnnxTextClassifier(OnnxFolder):
    """ONNX Runtime inference over a text classifier folder: one label per text."""

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

    def proba(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of logits: softmax(logits / temperature)."""
        return softmax(logits / self.temperature)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        chunks = [
            self.proba(self.text_logits(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.labels)), dtype=np.float32)


def words_of(text: str) -> list[tuple[str, int, int]]:
    """A text's words as a token classifier reads them, its whitespace-separated tokens, each with its
    character offsets (end exclusive)."""
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def first_subword_rows(logits: np.ndarray, word_ids: Sequence[int | None], n_words: int) -> np.ndarray:
    """Per-word rows of one sentence's token rows (``[positions, tags]``): each word's first subword's. A
    word the model did not read (past max_length) gets a row of nan."""
    out = np.full((n_words, logits.shape[-1]), np.nan, dtype=np.float32)
    previous = None
    for position, word in enumerate(word_ids):
        if word is not None and word != previous:
            out[word] = logits[position]
        previous = word
    return out


def tags_of(word_logits: np.ndarray, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Each word's tag and that tag's softmax probability; a word not read (a nan row) is ``O`` with
    probability nan."""
    read = ~np.isnan(word_logits[:, 0]) if len(word_logits) else np.zeros(0, dtype=bool)
    ids = np.full(len(word_logits), list(labels).index(OUTSIDE) if OUTSIDE in labels else 0)
    proba = np.full(len(word_logits), np.nan)
    if read.any():
        p = softmax(word_logits[read].astype(np.float64))
        ids[read], proba[read] = p.argmax(axis=1), p.max(axis=1)
    return [labels[k] for k in ids], proba


def bio_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities of a BIO tag sequence as ``(type, first word, end word)``, end exclusive, by the
    strict IOB2 rule (seqeval's ``mode="strict"``): a ``B-X`` and the ``I-X`` right after it; an ``I-``
    that continues no entity starts none."""
    spans, kind, first = [], None, 0
    for i, tag in enumerate([*tags, OUTSIDE]):
        if kind is not None and tag != f"I-{kind}":
            spans.append((kind, first, i))
            kind = None
        if tag.startswith("B-"):
            kind, first = tag[2:], i
    return spans


def entities_of(
    text: str, words: Sequence[tuple[str, int, int]], tags: Sequence[str], scores: Sequence[float]
) -> list[dict[str, Any]]:
    """Entities as ``{type, start, end, text, score}``: character offsets into ``text`` (end exclusive),
    and the mean probability of the entity's word tags."""
    out = []
    for kind, first, end in bio_spans(tags):
        start, stop = words[first][1], words[end - 1][2]
        score = float(np.mean(np.asarray(scores[first:end], dtype=float)))
        out.append(
            {"type": kind, "start": start, "end": stop, "text": text[start:stop], "score": round(score, 4)}
        )
    return out


class OnnxEntityTagger(OnnxFolder):
    """ONNX Runtime inference over a token classifier folder: texts in, entities out."""

    def read_words(self, sentences: Sequence[Sequence[str]]) -> tuple[dict[str, np.ndarray], list[list]]:
        """The padded model inputs of sentences given as words, and each row's subword-to-word map."""
        enc = encode_words(self.tokenizer, sentences, truncation=True, max_length=self.max_length)
        word_ids = [enc.word_ids(i) for i in range(len(sentences))]
        padded = self.tokenizer.pad(dict(enc), padding=True, return_tensors="np")
        return {name: padded[name].astype(np.int64) for name in self.input_names}, word_ids

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The padded model inputs of ``texts``, read as their words."""
        return self.read_words([[w for w, _, _ in words_of(text)] for text in texts])[0]

    def word_logits(self, sentences: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Per sentence, each word's logits (``first_subword_rows``)."""
        features, word_ids = self.read_words(sentences)
        logits = self.logits(features)
        return [first_subword_rows(logits[i], word_ids[i], len(s)) for i, s in enumerate(sentences)]

    def tag_words(
        self, sentences: Sequence[Sequence[str]], batch_size: int = 32
    ) -> tuple[list[list[str]], list[np.ndarray]]:
        """Each sentence's tag per word and its probability (``tags_of``)."""
        tags, scores = [], []
        for i in range(0, len(sentences), batch_size):
            for rows in self.word_logits(sentences[i : i + batch_size]):
                found, proba = tags_of(rows, self.labels)
                tags.append(found)
                scores.append(proba)
        return tags, scores

    def entities(self, texts: Sequence[str], batch_size: int = 32) -> list[list[dict[str, Any]]]:
        """Each text's entities (``entities_of``)."""
        words = [words_of(text) for text in texts]
        tags, scores = self.tag_words([[w for w, _, _ in ws] for ws in words], batch_size)
        return [entities_of(*row) for row in zip(texts, words, tags, scores, strict=True)]


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


class Entity(pydantic.BaseModel):
    """One entity found in a text: its type, character offsets (end exclusive), text and mean tag
    probability."""

    type: str
    start: int
    end: int
    text: str
    score: float


class TaggedText(pydantic.BaseModel):
    """One text's result: its entities, in text order."""

    entities: list[Entity]


class EntityTaggerModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc of a token classifier: a list of texts in, one ``TaggedText`` per text out."""

    def load_context(self, context):
        self.tagger = OnnxEntityTagger(context.artifacts["classifier"])

    def predict(self, context, model_input: list[str], params=None) -> list[TaggedText]:
        try:
            texts = texts_from_input(model_input)
        except InputError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        return [
            TaggedText(entities=[Entity(**found) for found in row]) for row in self.tagger.entities(texts)
        ]


# MLflow executes this file under a module name starting with "code_model_" when it loads the model:
# only then is the model object set, the one its ``model_config`` ``task`` names (logged by export).
# Importing lmpipe.serve.serving has no side effect.
if __name__.startswith("code_model_"):
    _task = mlflow.models.ModelConfig(development_config={"task": TEXT_TASK}).get("task")
    mlflow.models.set_model(EntityTaggerModel() if _task == TOKEN_TASK else TextClassifierModel())
