"""Benchmark: does a trained model read whole articles better than their opening? Scores the saved model
on val and test with its first ``base.max_length`` tokens (what the pipeline does) and with the mean of its
class probabilities over up to K overlapping windows of the whole text.

    python benchmarks/windows.py --model models/model --data data/split [--stride 32] [--windows 1 2 4 8 100]

A few minutes on a 2-core CPU (every window of every val and test text is scored once).
"""

from __future__ import annotations

import argparse

import numpy as np

from lmpipe import data
from lmpipe.metrics import classification_metrics
from lmpipe.modeling import models
from lmpipe.modeling.inference import batches_proba
from lmpipe.params import load_params


def window_proba(model, tokenizer, texts: list[str], max_length: int, stride: int, batch_size: int = 64):
    """Class probabilities of every window, and the index of the text each window belongs to."""
    enc = tokenizer(
        texts, truncation=True, max_length=max_length, stride=stride, return_overflowing_tokens=True,
        padding=True, return_tensors="pt",
    )  # fmt: skip
    owner = enc.pop("overflow_to_sample_mapping").numpy()
    batches = ({k: v[i : i + batch_size] for k, v in enc.items()} for i in range(0, len(owner), batch_size))
    return batches_proba(model, batches), owner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model")
    parser.add_argument("--data", default="data/split")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stride", type=int, default=32, help="tokens shared by consecutive windows")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8, 100])
    args = parser.parse_args()

    max_length = load_params(args.params).base.max_length
    model = models.load_model(args.model).eval()
    tokenizer = models.load_tokenizer(args.model)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    print("| split | windows (at most) | macro-F1 | errors |\n|---|---|---|---|")
    for split in ("val", "test"):
        frame = data.read_split(args.data, split)
        y = frame["label"].map({n: i for i, n in enumerate(names)}).to_numpy()
        proba, owner = window_proba(model, tokenizer, frame["text"].tolist(), max_length, args.stride)
        for k in args.windows:
            mean = np.stack([proba[np.flatnonzero(owner == t)[:k]].mean(axis=0) for t in range(len(frame))])
            pred = mean.argmax(axis=1)
            f1 = classification_metrics(y, pred)["macro_f1"]
            print(f"| {split} | {k} | {f1:.4f} | {int((pred != y).sum())} |")


if __name__ == "__main__":
    main()
