"""Token classification (``base.task: token_classification``; named-entity recognition): a BIO tag per
word. What differs from text classification, in one package: the task object (``TASK``, at the end of this
module, the tagging core above it) and one module per group of stages (``data``, ``model``,
``evaluation``, ``analysis``, ``export``), loaded when a stage asks for them. The package holds:

* **reading** the data: the built-in WNUT 2016 Twitter NER corpus, CoNLL-style files (a token and a tag
  per line, blank lines between sentences) and JSONL (``tokens`` and ``tags`` lists);
* **cleaning**: empty tokens and empty sentences dropped, exact duplicate sentences removed, BIO checked
  (``prepare.on_bad_bio``: an ``I-`` tag that does not continue an entity is repaired to ``B-`` or
  rejected, naming the line);
* the seeded **split** by sentence, with the entities per type in each part;
* the **dataset**: words tokenised into subwords, the tag on each word's first subword and -100 (ignored
  by the loss) on the others and on special tokens;
* the **metrics**: entity-level precision, recall and F1 with seqeval's definitions (IOB2, strict: a
  span counts only if its type, start and end all match), micro and macro over the entity types, and
  token accuracy beside them. Macro entity-F1 is the selection metric (``macro_f1``), as macro-F1 is for
  classification, so early stopping, search, compare and the promotion gate read the same key;
* the **baseline**: a linear-chain CRF over hand-written word features (sklearn-crfsuite), trained on the
  same train split, and the paired comparison over sentences (bootstrap CIs, McNemar on whole-sentence
  correctness);
* **decoding** predicted tags into entities with character offsets into the input text.

A split frame has the columns ``id`` (where the sentence came from: its first line in a CoNLL file, its
row in a JSONL file), ``tokens`` and ``tags`` (lists of strings) and ``text`` (the tokens joined by one
space: the text duplicates and leakage are judged on, and the text a served model is given).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from lmpipe.errors import UserError
from lmpipe.serve.serving import encode_words, first_subword_rows, tags_of
from lmpipe.tasks import TOKEN_CLASSIFICATION
from lmpipe.tasks.base import Task

IGNORE_INDEX = -100  # label of the positions the loss and the metrics skip


# epochs full fine-tuning needed on the WNUT 2016 data (val entity F1 0.27 after 2 epochs, 0.49 after 5:
# docs/ner.md); the classification default (2, sized on BBC) is too few for NER
RECOMMENDED_EPOCHS = 6


def epochs_warning(epochs: int, strategy: str) -> str | None:
    """A warning when ``train.epochs`` is below what NER needed on WNUT 2016 (not for gradual unfreezing,
    whose phases set their own epochs)."""
    if strategy == "gradual_unfreezing" or epochs >= RECOMMENDED_EPOCHS:
        return None
    return (
        f"train: warning: train.epochs {epochs} is few for token classification: MiniLM on WNUT 2016 "
        f"scored val entity F1 0.27 after 2 epochs and 0.49 after 5 (docs/ner.md); "
        f"consider train.epochs {RECOMMENDED_EPOCHS} with train.patience 2"
    )


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities of one IOB2 tag sequence as ``(type, start, end)`` word spans (end exclusive), with
    seqeval's strict IOB2 reading: an entity starts at ``B-X`` and runs over the ``I-X`` that follow; an
    ``I-`` that continues nothing starts no entity."""
    from seqeval.scheme import IOB2, Entities

    if not len(tags):
        return []
    found = Entities([list(tags)], IOB2, suffix=False).entities[0]
    return [(e.tag, e.start, e.end) for e in found]


def entity_counts(tag_lists: Sequence[Sequence[str]]) -> dict[str, int]:
    """Entities per type, sorted by type."""
    counts = Counter(t for tags in tag_lists for t, _, _ in entity_spans(tags))
    return dict(sorted(counts.items()))


def tag_map(tag_lists: Sequence[Sequence[str]]) -> dict[str, int]:
    """Every tag seen, sorted by name (so ids never depend on row order)."""
    return {tag: i for i, tag in enumerate(sorted({t for tags in tag_lists for t in tags}))}


def token_lengths(tokenizer, frame: pd.DataFrame) -> np.ndarray:
    """Subword tokens per sentence, with the special tokens, as the model reads it."""
    encoded = encode_words(tokenizer, frame["tokens"], verbose=False)
    return np.array([len(ids) for ids in encoded["input_ids"]])


def check_known_tags(frame: pd.DataFrame, tag2id: Mapping[str, int], name: str) -> None:
    """A tag of ``frame`` (val or test) that train never had is an error naming a sentence with it."""
    for sid, tags in frame[["id", "tags"]].itertuples(index=False):
        unknown = sorted(set(tags) - set(tag2id))
        if unknown:
            raise UserError(
                f"split: {name} sentence {sid} has tag(s) {unknown} that no train sentence has; a model "
                "cannot learn a tag it never saw (add such sentences to the data, or try another base.seed)"
            )


class TokenDataset(torch.utils.data.Dataset):
    """Sentences as subword ids (at most ``max_length`` with the special tokens; the words past it are
    not read, and count as predicted ``O``), with each word's tag id on its first subword and
    ``IGNORE_INDEX`` on the other subwords and the special tokens."""

    windowed = False  # one row per sentence: nothing to pool

    def __init__(
        self,
        tokenizer,
        sentences: Sequence[Sequence[str]],
        tags: Sequence[Sequence[int]] | None,
        max_length: int,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(
                "base.model: token classification needs the model's fast tokenizer (tokenizer.json), "
                "which maps subwords back to words"
            )
        self.reading = {"mode": "head"}  # a sentence's first max_length tokens (the rest count as O)
        self.n_texts = len(sentences)
        words = [list(s) for s in sentences]
        self.encodings = encode_words(tokenizer, words, truncation=True, max_length=max_length)
        self.word_ids = [self.encodings.word_ids(i) for i in range(self.n_texts)]
        self.n_words = [len(s) for s in words]
        self.tags = None if tags is None else [list(t) for t in tags]
        self.labels = None if tags is None else [self._align(i) for i in range(self.n_texts)]
        self.names: list[str] = []  # tag names in id order (``frame_dataset``), for the val metrics

    def _align(self, i: int) -> list[int]:
        labels, previous = [], None
        for word in self.word_ids[i]:
            labels.append(IGNORE_INDEX if word is None or word == previous else int(self.tags[i][word]))
            previous = word
        return labels

    def word_logits(self, logits: np.ndarray, i: int) -> np.ndarray:
        """Per-word logits of row ``i`` from its token logits (``[positions, tags]``): each word's first
        subword's; a word not read (past max_length) gets a row of nan, which ``word_tags`` makes ``O``
        (``serving.first_subword_rows``, what the served model does)."""
        return first_subword_rows(logits, self.word_ids[i], self.n_words[i])

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)

    def compute_metrics(self, prediction) -> dict[str, float]:
        """The training loop's val scores (``training.eval_metrics``): entity scores, ``eval_metrics``."""
        return eval_metrics(prediction, self)

    def __len__(self) -> int:
        return self.n_texts

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def frame_dataset(tokenizer, frame: pd.DataFrame, tag2id: Mapping[str, int], max_length: int) -> TokenDataset:
    """A split frame (``tokens``, ``tags``) as a dataset; a tag outside ``tag2id`` is an error."""
    check_known_tags(frame, tag2id, "the label map's")
    tags = [[tag2id[t] for t in tags] for tags in frame["tags"]]
    dataset = TokenDataset(tokenizer, list(frame["tokens"]), tags, max_length)
    dataset.names = [name for name, _ in sorted(tag2id.items(), key=lambda kv: kv[1])]
    return dataset


def word_tags(dataset: TokenDataset, token_logits: Sequence[np.ndarray], names: Sequence[str]):
    """Each sentence's predicted tag per word and the softmax probability of that tag; a word the model
    did not read (past max_length) is ``O`` with probability nan."""
    tags, scores = [], []
    for i, logits in enumerate(token_logits):
        found, proba = tags_of(dataset.word_logits(np.asarray(logits, dtype=np.float32), i), list(names))
        tags.append(found)
        scores.append(proba)
    return tags, scores


def sentence_counts(
    true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], types: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per sentence and type: true positives, predicted and true entities (``[sentences, types]``), and
    per sentence the words tagged right and the words: the parts every entity score is a sum of."""
    index = {t: j for j, t in enumerate(types)}
    shape = (len(true), len(types))
    tp, n_pred, n_true = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    right, words = np.zeros(len(true)), np.zeros(len(true))
    for i, (t, p) in enumerate(zip(true, pred, strict=True)):
        gold, guess = set(entity_spans(t)), set(entity_spans(p))
        for kind, _, _ in gold:
            n_true[i, index[kind]] += 1
        for kind, _, _ in guess:
            if kind in index:
                n_pred[i, index[kind]] += 1
        for kind, _, _ in gold & guess:
            tp[i, index[kind]] += 1
        right[i] = sum(a == b for a, b in zip(t, p, strict=True))
        words[i] = len(t)
    return {"tp": tp, "pred": n_pred, "true": n_true, "right": right, "words": words}


def _prf(tp, pred, true):
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(pred > 0, tp / np.maximum(pred, 1), 0.0)
        r = np.where(true > 0, tp / np.maximum(true, 1), 0.0)
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
    return p, r, f


def scores_from_counts(counts: Mapping[str, np.ndarray], weights: np.ndarray | None = None) -> dict:
    """Entity micro and macro precision/recall/F1 and token accuracy from ``sentence_counts``; with
    ``weights`` (``[resamples, sentences]``, a bootstrap) each score is an array over the resamples.
    Macro averages the types present in truth or prediction, as seqeval's report does."""
    if weights is None:
        tp, pred, true = (counts[k].sum(axis=0) for k in ("tp", "pred", "true"))
        right, words = counts["right"].sum(), counts["words"].sum()
    else:
        tp, pred, true = (weights @ counts[k] for k in ("tp", "pred", "true"))
        right, words = weights @ counts["right"], weights @ counts["words"]
    mp, mr, mf = _prf(tp.sum(axis=-1), pred.sum(axis=-1), true.sum(axis=-1))
    p, r, f = _prf(tp, pred, true)
    present = (pred + true) > 0
    n = np.maximum(present.sum(axis=-1), 1)
    return {
        "precision": mp,
        "recall": mr,
        "f1": mf,
        "macro_precision": (p * present).sum(axis=-1) / n,
        "macro_recall": (r * present).sum(axis=-1) / n,
        "macro_f1": (f * present).sum(axis=-1) / n,
        "accuracy": right / np.maximum(words, 1),
    }


def entity_scores(true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Headline scores (floats) and a per-type table (precision, recall, f1-score, support)."""
    types = sorted({t for tags in true for t, _, _ in entity_spans(tags)})
    types += sorted({t for tags in pred for t, _, _ in entity_spans(tags)} - set(types))
    counts = sentence_counts(true, pred, types)
    metrics = {k: float(v) for k, v in scores_from_counts(counts).items()}
    tp, n_pred, n_true = (counts[k].sum(axis=0) for k in ("tp", "pred", "true"))
    p, r, f = _prf(tp, n_pred, n_true)
    per_type = {
        t: {
            "precision": float(p[j]),
            "recall": float(r[j]),
            "f1-score": float(f[j]),
            "support": int(n_true[j]),
        }
        for j, t in enumerate(types)
    }
    return {"metrics": metrics, "per_type": per_type, "counts": counts, "types": types}


def eval_metrics(prediction, val_set: TokenDataset) -> dict[str, float]:
    """``compute_metrics`` of the training loop for token classification: entity scores on val, every
    word of every sentence counted (a word past max_length as predicted ``O``)."""
    logits = (
        prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    )
    names = val_set.names
    pred, _ = word_tags(val_set, list(np.asarray(logits)), names)
    true = [[names[k] for k in tags] for tags in val_set.tags]
    metrics = entity_scores(true, pred)["metrics"]
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "f1": metrics["f1"],
        "rows": val_set.n_texts,
    }


def entities_text(tokens: Sequence[str], tags: Sequence[str]) -> str:
    """A sentence's entities, readable: ``Empire State Building/facility; ESB/facility``."""
    return "; ".join(f"{' '.join(tokens[s:e])}/{kind}" for kind, s, e in entity_spans(tags))


def token_logits(
    model: torch.nn.Module,
    tokenizer,
    tokens: Sequence[Sequence[str]],
    max_length: int,
    batch_size: int,
    desc=None,
) -> tuple[TokenDataset, list[np.ndarray], list[str]]:
    """A token classifier's logits per subword position of each sentence (``[positions, tags]``, padding
    dropped), the dataset that maps them back to words, and the tag names in id order."""
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    model = model.eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    dataset = TokenDataset(tokenizer, tokens, None, max_length)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=DataCollatorWithPadding(tokenizer)
    )
    model_device = next(model.parameters()).device
    rows: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=desc is None):
            logits = model(**{k: v.to(model_device) for k, v in batch.items()}).logits.float().cpu().numpy()
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            rows.extend(logits[j, :n] for j, n in enumerate(lengths))
    return dataset, rows, names


def predict_words(
    model: torch.nn.Module,
    tokenizer,
    tokens: Sequence[Sequence[str]],
    max_length: int,
    batch_size: int,
    desc=None,
) -> tuple[list[list[str]], list[np.ndarray]]:
    """A token classifier's tag per word of each sentence, and its probability (``word_tags``)."""
    return word_tags(*token_logits(model, tokenizer, tokens, max_length, batch_size, desc))


def changed_sentences(clean: Sequence[Sequence[str]], perturbed: Sequence[Sequence[str]]) -> np.ndarray:
    """Per sentence, whether its entities (span and type) differ between two taggings."""
    return np.array(
        [set(entity_spans(a)) != set(entity_spans(b)) for a, b in zip(clean, perturbed, strict=True)]
    )


class TokenClassification(Task):
    name = TOKEN_CLASSIFICATION
    unit = "word"
    row = "sentence"
    # reads each sentence's head; no augmentation, prompt tuning, folds, attack, explain
    supports = frozenset({"calibration", "robustness", "slices", "compress", "export", "compare"})
    refusals = {
        "augment": "token-level augmentation would move words off their tags: use 0 with token_classification",
        "prompt_tuning": (
            "prompt_tuning prepends tokens a token-classification head would tag: not with token_classification"
        ),
        "folds": "k-fold search stratifies by class label: use 1 (the val split) with token_classification",
    }
    peft_task_type = "TOKEN_CLS"
    comparison_note = (
        "Token classification: an example is a test sentence (resampled whole), accuracy is token "
        "accuracy, macro-F1 is entity macro-F1 (seqeval's strict IOB2 spans), and McNemar's test counts "
        "the sentences each model tags wholly right."
    )
    # evaluate's headline: entity micro-F1 (the figure NER papers report) beside macro-F1
    headline = {
        "evaluate": (
            "model.f1",
            "model.macro_f1",
            "baseline.macro_f1",  # baseline.f1 is model.f1 less the gap
            "model_minus_baseline.f1",
            "model_minus_baseline.f1_ci95_low",
            "model_minus_baseline.f1_ci95_high",
        ),
    }

    # ------------------------------------------------------------------------------------ prepare, split
    def label_map(self, frame):
        return tag_map(frame["tags"])

    def token_lengths(self, tokenizer, frame):
        return token_lengths(tokenizer, frame)

    def prepare_summary(self, report, labels, prep):
        return (
            f"{report['conflicting_texts']} with conflicting tags [{prep.on_conflict}], "
            f"{report['bio_repaired']} I- tags repaired to B-); {report['tokens']} tokens, "
            f"{sum(report['entities_per_type'].values())} entities of {report['classes']} types, {len(labels)} tags"
        )

    # -------------------------------------------------------------------------- search, train, compress
    def head(self) -> type:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def dataset(self, tokenizer, frame, label2id, max_length, reading=None, train=False, seed=0, params=None):
        return frame_dataset(tokenizer, frame, label2id, max_length)

    def param_problems(self, params):
        """Params that make no sense for token classification, each by its key."""
        if params.base.reading.mode != "head":
            yield (
                "base.reading.mode",
                "token_classification reads each sentence's first max_length tokens: use head",
            )
        yield from super().param_problems(params)  # augmentation, prompt tuning, folds: see refusals

    def warnings(self, params):
        warning = epochs_warning(params.train.epochs, params.train.strategy)
        return [warning] if warning else []

    # ------------------------------------------------------------------------------------------ evaluate
    def score(self, frame, pred):
        scores = entity_scores([list(tags) for tags in frame["tags"]], pred.predicted)
        return {**scores, "per_class": scores["per_type"]}

    def versus_baseline(self, frame, model, baseline, seed):
        true = [list(tags) for tags in frame["tags"]]
        return self.part("evaluation").versus_baseline(true, model.predicted, baseline.predicted, seed)

    def test_counts(self, frame, scores):
        return {
            "test_rows": len(frame),
            "test_entities": int(sum(v["support"] for v in scores["per_type"].values())),
        }

    def paired_rows(self, predictions):
        return self.part("evaluation").paired_rows(predictions)

    # analyze and export: the Task defaults, which run this package's analysis and export parts
    def describe(self, labels):
        types = sorted({t[2:] for t in labels if t[:2] in ("B-", "I-")})
        return f"a named-entity tagger (token classification, BIO tags over {len(types)} entity types: {', '.join(types)})"


TASK = TokenClassification()
