"""Token classification's model side (search, train, compress): a split's word logits and entity scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lmpipe.tasks.base import Outputs
from lmpipe.tasks.token_classification import entity_scores, token_logits, word_tags


def val_outputs(
    model: torch.nn.Module, tokenizer, frame: pd.DataFrame, max_length: int, batch_size: int, desc=None
) -> Outputs:
    """A token classifier on a split frame (``tokens``, ``tags``): the logits of every word it read (each
    word's first subword, stacked ``[words, tags]``), its entity scores (``entity_scores``), and each
    sentence's predicted and true tags (joined by spaces)."""
    dataset, rows, names = token_logits(model, tokenizer, list(frame["tokens"]), max_length, batch_size, desc)
    words = np.concatenate([dataset.word_logits(r, i) for i, r in enumerate(rows)])
    pred, _ = word_tags(dataset, rows, names)
    truth = [list(t) for t in frame["tags"]]
    scores = entity_scores(truth, pred)["metrics"]
    return Outputs(
        words[~np.isnan(words[:, 0])], scores, [" ".join(t) for t in pred], [" ".join(t) for t in truth]
    )
