"""Text classification's data (prepare, split): the built-in BBC News corpus, CSV/JSONL/parquet files and
``<label>/*.txt`` folders read as texts and labels; cleaning, de-duplication and label conflicts; the
seeded, stratified split.

Every frame that leaves this module has the columns ``id`` (where the row came from: a file name for
the built-in corpus, the 1-based row number for a user file), ``text`` and ``label`` (a string).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from lmpipe.data import (
    DESCRIPTOR_SUFFIXES,
    builtin_name,
    check_no_leakage,
    clean_text,
    deduplicate_and_sample,
    load_bbc_news,
    load_text_folder,
    title_of,
)
from lmpipe.errors import UserError
from lmpipe.params import PrepareParams, SplitParams
from lmpipe.tasks import CLASSIFICATION

# Built-in corpora, named by a descriptor file (``builtin: <name>``) that ``prepare.source`` points at, so
# that DVC has a real path to depend on: data/builtin/bbc_news.yaml for the BBC News corpus.
BUILTINS = {
    "bbc_news": "BBC News (built-in, 5 topics)",
    "bbc_titles": "BBC News titles only (built-in, 5 topics; a harder, short-text view of the same corpus)",
}


FILE_SUFFIXES = (".csv", ".jsonl", ".parquet")


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
        name = builtin_name(path, BUILTINS, CLASSIFICATION)
        frame = load_bbc_news()
        if name == "bbc_titles":
            frame["text"] = frame["text"].map(title_of)
        return frame, BUILTINS[name]
    return load_file(path, prep.text_column, prep.label_column, prep.encoding), f"`{prep.source}`"


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

    frame, removed = deduplicate_and_sample(frame, "label", prep.on_conflict, prep.max_rows, seed)

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
        **removed,
        "rows_out": len(frame),
        "classes": len(classes),
        "rows_per_class": {c: int(n) for c, n in frame["label"].value_counts().sort_index().items()},
    }
    return frame, report


def label_map(labels: pd.Series) -> dict[str, int]:
    """Labels sorted by name, so ids never depend on row order."""
    return {label: i for i, label in enumerate(sorted(labels.unique()))}


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


def split_report(parts: dict[str, pd.DataFrame]) -> dict:
    return {
        "sizes": {name: len(part) for name, part in parts.items()},
        "class_counts": {
            name: {c: int(n) for c, n in part["label"].value_counts().sort_index().items()}
            for name, part in parts.items()
        },
    }
