"""Generation's data (prepare, split): the built-in BBC headlines (an article's body in, its title out),
and CSV/JSONL/parquet files with a prompt and a response column, or chat ``messages``; cleaning,
de-duplication and the seeded split.

Every frame that leaves this module has the columns ``id`` (a file name for the built-in corpus, the
1-based line or row number for a user file), ``text`` (the input: ``{text}`` of
``generation.prompt_template``), ``target`` (the response to learn) and ``context`` (a chat's earlier
turns as JSON, where the source gave ``messages``; else empty).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from lmpipe.data import (
    DESCRIPTOR_SUFFIXES,
    builtin_name,
    check_no_leakage,
    clean_text,
    deduplicate_and_sample,
    load_bbc_news,
)
from lmpipe.errors import UserError
from lmpipe.params import PrepareParams, SplitParams
from lmpipe.tasks import GENERATION

BUILTINS = {
    "bbc_headlines": "BBC News headlines (built-in): the article body in, its title out",
}
FILE_SUFFIXES = (".csv", ".jsonl", ".parquet")
COLUMNS = ["id", "text", "target", "context"]


def load_source(prep: PrepareParams) -> tuple[pd.DataFrame, str]:
    path = Path(prep.source)
    if not path.exists():
        raise UserError(f"prepare.source: {prep.source} not found")
    if path.suffix.lower() in DESCRIPTOR_SUFFIXES:
        builtin_name(path, BUILTINS, GENERATION)
        return bbc_headlines(), BUILTINS["bbc_headlines"]
    if path.is_dir() or path.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(
            f"prepare.source: {path} must be a .csv, .jsonl or .parquet file (prompt and response columns, "
            "or chat messages) or a built-in descriptor such as data/builtin/bbc_headlines.yaml"
        )
    return load_file(path, prep), f"`{prep.source}`"


def bbc_headlines() -> pd.DataFrame:
    """Each BBC article as its body (``text``) and its first line, the title (``target``)."""
    frame = load_bbc_news()
    parts = frame["text"].map(split_title)
    return pd.DataFrame(
        {
            "id": frame["id"],
            "text": [body for _, body in parts],
            "target": [title for title, _ in parts],
            "context": "",
        }
    )


def split_title(article: str) -> tuple[str, str]:
    lines = article.strip().splitlines()
    return (lines[0].strip() if lines else ""), "\n".join(lines[1:]).strip()


def load_file(path: Path, prep: PrepareParams) -> pd.DataFrame:
    """Prompt and response columns, or a ``messages`` column (a chat: the last turn is the assistant's
    target, the earlier ones its context, and the last user turn the ``text``)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            raw = pd.read_csv(
                path, encoding=prep.encoding, dtype=object, keep_default_na=False, na_values=[""]
            )
        elif suffix == ".jsonl":
            raw = pd.read_json(path, lines=True, encoding=prep.encoding, dtype=False)
        else:
            raw = pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise UserError(
            f"prepare.encoding: {path} is not valid {prep.encoding} (offset {err.start})"
        ) from None
    except (ValueError, pd.errors.ParserError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"prepare.source: cannot read {path}: {first}") from None
    line = 2 if suffix == ".csv" else 1  # a CSV's first line is its header
    ids = [str(i + line) for i in range(len(raw))]
    if "messages" in raw.columns:
        rows = [chat_row(m, path, i) for i, m in zip(ids, raw["messages"], strict=True)]
        return pd.DataFrame([(i, *r) for i, r in zip(ids, rows, strict=True)], columns=COLUMNS)
    for key, column in (
        ("prepare.prompt_column", prep.prompt_column),
        ("prepare.response_column", prep.response_column),
    ):
        if column not in raw.columns:
            known = ", ".join(map(str, raw.columns)) or "none"
            raise UserError(
                f"{key}: column '{column}' not found in {path} (columns: {known}; or give chat `messages`)"
            )
    return pd.DataFrame(
        {"id": ids, "text": raw[prep.prompt_column], "target": raw[prep.response_column], "context": ""}
    )


def chat_row(messages, path: Path, line: str) -> tuple[str, str, str]:
    """``(text, target, context)`` of one chat; a chat that does not end with the assistant's non-empty
    turn after a user turn is refused, naming its line."""
    where = f"prepare.source: {path} line {line}"
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise UserError(f"{where}: messages is not a JSON list of {{role, content}} turns") from None
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages
    ):
        raise UserError(f"{where}: messages must be a list of {{role, content}} turns")
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise UserError(f"{where}: messages must end with a user turn, then the assistant's (the target)")
    context = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages[:-1]]
    return str(messages[-2]["content"]), str(messages[-1]["content"]), json.dumps(context, ensure_ascii=False)


def prepare_frame(raw: pd.DataFrame, prep: PrepareParams, seed: int) -> tuple[pd.DataFrame, dict]:
    """Clean whitespace, refuse an empty target (naming its row), drop empty inputs and duplicate
    inputs (``prepare.on_conflict`` for one input with different targets), optionally subsample."""
    frame = raw.copy()
    frame["text"] = frame["text"].map(clean_text)
    frame["target"] = frame["target"].map(clean_text)
    empty_target = frame["target"] == ""
    if empty_target.any():
        first = frame.loc[empty_target, "id"].iloc[0]
        raise UserError(
            f"prepare.source: {prep.source} row {first} has an empty target ({int(empty_target.sum())} "
            "such rows): every row needs a response to learn"
        )
    empty = frame["text"] == ""
    frame = frame[~empty]
    frame, removed = deduplicate_and_sample(frame, "target", prep.on_conflict, prep.max_rows, seed)
    frame = frame.reset_index(drop=True)[COLUMNS]
    if len(frame) < 4:
        raise UserError(f"prepare.source: {prep.source} has {len(frame)} usable rows; need at least 4")
    words = frame["target"].str.split().str.len()
    report = {
        "rows_in": len(raw),
        "empty_dropped": int(empty.sum()),
        **removed,
        "rows_out": len(frame),
        "target_words": {
            "p50": float(words.median()),
            "p95": float(words.quantile(0.95)),
            "max": int(words.max()),
        },
    }
    return frame, report


def split_frame(frame: pd.DataFrame, split: SplitParams, seed: int) -> dict[str, pd.DataFrame]:
    """A seeded random train/val/test split (nothing to stratify on); an input in two parts fails."""
    if len(frame) < 10:
        raise UserError(f"split: {len(frame)} rows are too few for a train/val/test split (need 10)")
    rest, test = train_test_split(frame, test_size=split.test, random_state=seed)
    train, val = train_test_split(rest, test_size=split.val / (split.train + split.val), random_state=seed)
    parts = {"train": train, "val": val, "test": test}
    check_no_leakage(parts)
    return {name: part.sort_index().reset_index(drop=True) for name, part in parts.items()}


def split_report(parts: dict[str, pd.DataFrame]) -> dict:
    return {
        "sizes": {name: len(part) for name, part in parts.items()},
        "target_words_median": {
            name: float(part["target"].str.split().str.len().median()) for name, part in parts.items()
        },
    }
