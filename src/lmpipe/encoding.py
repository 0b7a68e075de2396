"""Texts to model inputs: the one tokenisation path of training, search, evaluation and compression.

Kept apart from ``training`` so that scoring a model (evaluate, compress) does not depend on the
training loop, its strategies or its checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from lmpipe.data import encode_labels


class TextDataset(torch.utils.data.Dataset):
    """Tokenised texts (truncated to ``max_length``, padded per batch by the collator) and label ids."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        texts: Sequence[str],
        labels: Sequence[int] | None,
        max_length: int,
    ):
        self.encodings = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.labels = None if labels is None else [int(x) for x in labels]

    def __len__(self) -> int:
        return len(self.encodings["input_ids"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def frame_dataset(
    tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame, label2id: dict[str, int], max_length: int
) -> TextDataset:
    """A split frame (``text``, ``label``) as a dataset; a label outside ``label2id`` is an error."""
    labels = encode_labels(frame["label"], label2id, "the label map of the prepared data")
    return TextDataset(tokenizer, frame["text"].tolist(), labels.tolist(), max_length)
