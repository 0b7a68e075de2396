"""Seeded token-level text augmentation (EDA-style, without synonyms), for the train split only.

Each augmented copy of a row applies, in order: random deletion (each word dropped with probability
``deletion``, at least one kept), random swaps (``swap`` x the word count, rounded, pairs of positions
exchanged) and random replacement (each word, with probability ``replacement``, becomes a word drawn
from the train split's own vocabulary). Words are whitespace-separated tokens. One NumPy generator
seeded from ``base.seed`` drives everything, so the same params give the same rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmpipe.params import AugmentParams


def augment_tokens(
    words: list[str], cfg: AugmentParams, rng: np.random.Generator, vocabulary: np.ndarray
) -> list[str]:
    """One augmented version of ``words``."""
    out = list(words)
    if cfg.deletion > 0 and len(out) > 1:
        keep = rng.random(len(out)) >= cfg.deletion
        if not keep.any():
            keep[rng.integers(len(out))] = True
        out = [w for w, k in zip(out, keep, strict=True) if k]
    n_swaps = round(cfg.swap * len(out)) if len(out) > 1 else 0
    for _ in range(n_swaps):
        i, j = rng.choice(len(out), size=2, replace=False)
        out[i], out[j] = out[j], out[i]
    if cfg.replacement > 0 and len(vocabulary):
        replace = rng.random(len(out)) < cfg.replacement
        for i in np.flatnonzero(replace):
            out[i] = str(vocabulary[rng.integers(len(vocabulary))])
    return out


def augment_frame(frame: pd.DataFrame, cfg: AugmentParams, seed: int) -> tuple[pd.DataFrame, int]:
    """``frame`` followed by ``cfg.copies`` augmented copies of each row (ids ``<id>#aug<k>``, same
    label); copies identical to their source are dropped. Returns the frame and the rows added."""
    if cfg.copies == 0 or frame.empty:
        return frame, 0
    rng = np.random.default_rng(seed)
    vocabulary = np.array(sorted({w for text in frame["text"] for w in str(text).split()}))
    added = []
    for k in range(1, cfg.copies + 1):
        for row in frame.to_dict("records"):
            words = str(row["text"]).split()
            text = " ".join(augment_tokens(words, cfg, rng, vocabulary))
            if text and text != " ".join(words):
                added.append({**row, "id": f"{row['id']}#aug{k}", "text": text})
    extra = pd.DataFrame(added, columns=frame.columns)
    return pd.concat([frame, extra], ignore_index=True), len(extra)
