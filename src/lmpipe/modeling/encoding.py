"""Texts to model inputs: the one tokenisation path of training, search, evaluation and compression.

Kept apart from ``training`` so that scoring a model (evaluate, compress) does not depend on the
training loop, its strategies or its checkpoints. What a model reads of a long text (``base.reading``:
its head, tail, head and tail, or every window) is ``serving.read_texts``, shared with the exported
model, so that serving reads a text exactly as training did. Words (a tagger's sentences) become
tokens through ``serving.encode_words`` alike, which gives each word after the first the space it had
in the text where the tokenizer needs it (byte-level BPE decoders), so that a word is read as it is in
running text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from lmpipe.data import encode_labels
from lmpipe.serve.serving import HEAD_READING, READING_KEY, encode_words, pool_logits, read_texts

__all__ = ["encode_words", "frame_dataset", "model_reading", "set_model_reading", "TextDataset"]


def model_reading(model: torch.nn.Module) -> dict[str, Any]:
    """How ``model`` reads a long text: its config's ``lmpipe_reading`` (set by train), else the head."""
    config = getattr(model, "config", None)
    return {**HEAD_READING, **(getattr(config, READING_KEY, None) or {})}


def set_model_reading(model: torch.nn.Module, reading: Mapping[str, Any] | None) -> None:
    """Record the reading in the model's config (saved in config.json, read by every later consumer)."""
    setattr(model.config, READING_KEY, {**HEAD_READING, **(reading or {})})


class TextDataset(torch.utils.data.Dataset):
    """Tokenised texts (``read_texts``: at most ``max_length`` tokens per row, padded per batch by the
    collator) and label ids. With ``reading.mode: windows`` a row is one window: ``owner`` maps rows to
    texts. ``sample_windows=True`` (training) makes each text one row instead, which yields a different
    window of the text at each visit (seeded; the text's windows in a shuffled cycle), so that long
    texts do not outweigh short ones and an epoch costs what a head-only epoch does."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        texts: Sequence[str],
        labels: Sequence[int] | None,
        max_length: int,
        reading: Mapping[str, Any] | None = None,
        sample_windows: bool = False,
        seed: int = 0,
    ):
        self.reading = {**HEAD_READING, **(reading or {})}
        self.n_texts = len(texts)
        self.encodings, self.owner = read_texts(tokenizer, texts, max_length, self.reading)
        self.labels = None if labels is None else [int(x) for x in labels]
        self.sampled = sample_windows and not np.array_equal(self.owner, np.arange(self.n_texts))
        if self.sampled:
            rng = np.random.default_rng(seed)
            starts = np.searchsorted(self.owner, np.arange(self.n_texts))
            counts = np.bincount(self.owner, minlength=self.n_texts)
            self.cycles = [start + rng.permutation(n) for start, n in zip(starts, counts, strict=True)]
            self.visits = np.zeros(self.n_texts, dtype=np.int64)

    @property
    def windowed(self) -> bool:
        """Whether rows are windows whose logits ``pool`` must turn into the texts' (evaluation)."""
        return not self.sampled and not np.array_equal(self.owner, np.arange(self.n_texts))

    def pool(self, logits: np.ndarray) -> np.ndarray:
        return pool_logits(logits, self.owner, self.n_texts, self.reading["pooling"])

    def collator(self, tokenizer: PreTrainedTokenizerBase):
        """Pads each batch to its longest row."""
        return DataCollatorWithPadding(tokenizer)

    def __len__(self) -> int:
        return self.n_texts if self.sampled else len(self.owner)

    def __getitem__(self, i: int) -> dict[str, Any]:
        text = i
        if self.sampled:
            cycle = self.cycles[i]
            i, self.visits[text] = int(cycle[self.visits[text] % len(cycle)]), self.visits[text] + 1
        else:
            text = int(self.owner[i])
        item = {k: v[i] for k, v in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[text]
        return item


def frame_dataset(
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    label2id: dict[str, int],
    max_length: int,
    reading: Mapping[str, Any] | None = None,
    train: bool = False,
    seed: int = 0,
) -> TextDataset:
    """A split frame (``text``, ``label``) as a dataset; a label outside ``label2id`` is an error.
    ``train=True``: one sampled window per text per visit (``TextDataset``)."""
    labels = encode_labels(frame["label"], label2id, "the label map of the prepared data")
    return TextDataset(
        tokenizer,
        frame["text"].tolist(),
        labels.tolist(),
        max_length,
        reading,
        sample_windows=train,
        seed=seed,
    )
