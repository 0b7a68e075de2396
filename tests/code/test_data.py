import json
from pathlib import Path

import pandas as pd
import pytest

from lmpipe import data
from lmpipe.errors import UserError
from lmpipe.params import PrepareParams, SplitParams
from lmpipe.tasks.classification import data as text_data

ROOT = Path(__file__).resolve().parents[2]


def prep(**kw) -> PrepareParams:
    values = dict(
        source="x.csv",
        encoding="utf-8",
        text_column="text",
        label_column="label",
        prompt_column="prompt",
        response_column="response",
        on_conflict="drop",
        on_bad_bio="repair",
        max_rows=None,
    )
    values.update(kw)
    return PrepareParams(**values)


def frame(rows):
    return pd.DataFrame(rows, columns=["text", "label"]).assign(
        id=lambda f: [str(i + 1) for i in range(len(f))]
    )


def test_clean_text_nfc_and_whitespace():
    decomposed = "Cafe\u0301\t au\n\n  lait "
    assert text_data.clean_text(decomposed) == "Caf\u00e9 au lait"
    assert text_data.clean_text(None) == ""
    assert text_data.clean_text(float("nan")) == ""


def test_prepare_removes_empty_rows_and_duplicates():
    raw = frame([("a  b", "x"), ("a b", "x"), ("", "x"), ("c", ""), ("d", "y"), ("e", "y"), ("   ", "y")])
    out, report = text_data.prepare_frame(raw, prep(), seed=0)
    assert out["text"].tolist() == ["a b", "d", "e"]
    assert report["rows_in"] == 7
    assert report["empty_dropped"] == 3
    assert report["duplicates_removed"] == 1
    assert report["rows_out"] == 3
    assert report["rows_per_class"] == {"x": 1, "y": 2}


def test_conflicting_labels_drop_policy_removes_every_copy():
    raw = frame([("same", "x"), ("same", "y"), ("same", "x"), ("p", "x"), ("q", "y")])
    out, report = text_data.prepare_frame(raw, prep(on_conflict="drop"), seed=0)
    assert "same" not in set(out["text"])
    assert report["conflicting_texts"] == 1
    assert report["conflict_rows_dropped"] == 3
    assert report["duplicates_removed"] == 0


def test_conflicting_labels_first_policy_keeps_first_label():
    raw = frame([("same", "y"), ("same", "x"), ("p", "x"), ("q", "y")])
    out, report = text_data.prepare_frame(raw, prep(on_conflict="first"), seed=0)
    assert out.set_index("text").loc["same", "label"] == "y"
    assert report["conflicting_texts"] == 1
    assert report["conflict_rows_dropped"] == 1


def test_fewer_than_two_classes_is_a_user_error():
    with pytest.raises(UserError, match="at least 2 classes"):
        text_data.prepare_frame(frame([("a", "x"), ("b", "x")]), prep(), seed=0)


def test_max_rows_is_stratified_and_seeded():
    raw = frame([(f"text {i}", "x" if i % 4 else "y") for i in range(200)])
    a, _ = text_data.prepare_frame(raw, prep(max_rows=40), seed=1)
    b, _ = text_data.prepare_frame(raw, prep(max_rows=40), seed=1)
    c, _ = text_data.prepare_frame(raw, prep(max_rows=40), seed=2)
    assert len(a) == 40 and a.equals(b) and not a.equals(c)
    assert a["label"].value_counts().to_dict() == {"x": 30, "y": 10}


def test_label_map_is_sorted():
    assert text_data.label_map(pd.Series(["b", "a", "c", "a"])) == {"a": 0, "b": 1, "c": 2}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_load_file_formats_with_custom_columns(tmp_path, suffix):
    source = pd.DataFrame({"body": ["héllo world", "bye"], "topic": ["greet", "leave"], "other": [1, 2]})
    path = tmp_path / f"d{suffix}"
    if suffix == ".csv":
        source.to_csv(path, index=False, encoding="utf-8")
    elif suffix == ".jsonl":
        source.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        source.to_parquet(path)
    out = text_data.load_file(path, "body", "topic", "utf-8")
    assert out.columns.tolist() == ["id", "text", "label"]
    assert out["text"].tolist() == ["héllo world", "bye"]
    assert out["id"].tolist() == ["1", "2"]


def test_load_file_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        text_data.load_file(tmp_path / "missing.csv", "text", "label", "utf-8")
    path = tmp_path / "d.csv"
    pd.DataFrame({"body": ["a"], "label": ["x"]}).to_csv(path, index=False)
    with pytest.raises(
        UserError, match=r"prepare.text_column: column 'text' not found .*columns: body, label"
    ):
        text_data.load_file(path, "text", "label", "utf-8")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(UserError, match="prepare.encoding: .* is not valid utf-8"):
        text_data.load_file(latin, "text", "label", "utf-8")
    assert text_data.load_file(latin, "text", "label", "latin-1")["text"].tolist() == ["café"]


def balanced(n_per_class=30, classes=("a", "b", "c")):
    rows = [(f"{c} text {i}", c) for c in classes for i in range(n_per_class)]
    return frame(rows)


def test_split_is_stratified_seeded_and_disjoint():
    df = balanced()
    parts = text_data.split_frame(df, SplitParams(0.8, 0.1, 0.1), seed=3)
    assert {k: len(v) for k, v in parts.items()} == {"train": 72, "val": 9, "test": 9}
    for part in parts.values():
        assert part["label"].value_counts().nunique() == 1  # equal counts per class in every split
    texts = [set(p["text"]) for p in parts.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    again = text_data.split_frame(df, SplitParams(0.8, 0.1, 0.1), seed=3)
    assert all(parts[k].equals(again[k]) for k in parts)
    other = text_data.split_frame(df, SplitParams(0.8, 0.1, 0.1), seed=4)
    assert not parts["test"].equals(other["test"])


def test_split_rejects_too_rare_class():
    df = pd.concat([balanced(), frame([("lonely", "z")])])
    with pytest.raises(UserError, match="class 'z' has 1 row"):
        text_data.split_frame(df, SplitParams(0.8, 0.1, 0.1), seed=0)


def test_leakage_check_names_the_row():
    parts = {"train": frame([("t", "x")]), "test": frame([("t", "x")]).assign(id=["9"])}
    with pytest.raises(UserError, match="row 9 .* also in the train split"):
        data.check_no_leakage(parts)


def test_split_report_counts(tmp_path):
    parts = text_data.split_frame(balanced(), SplitParams(0.8, 0.1, 0.1), seed=0)
    report = text_data.split_report(parts)
    assert report["sizes"]["test"] == 9
    assert report["class_counts"]["train"] == {"a": 24, "b": 24, "c": 24}
    json.dumps(report)  # plain JSON types only


def test_builtin_descriptor_and_bad_sources(tmp_path):
    from lmpipe.data import builtin_name
    from lmpipe.tasks.classification.data import BUILTINS, load_source

    assert builtin_name(ROOT / "data/builtin/bbc_news.yaml", BUILTINS, "classification") == "bbc_news"
    bad = tmp_path / "other.yaml"
    bad.write_text("builtin: imdb\n")
    with pytest.raises(UserError, match=r"prepare.source: .*other.yaml must be a built-in descriptor"):
        builtin_name(bad, BUILTINS, "classification")
    text = tmp_path / "data.tsv"
    text.write_text("a\tb\n")
    prep = PrepareParams(str(text), "utf-8", "text", "label", "prompt", "response", "drop", "repair", None)
    with pytest.raises(
        UserError, match=r"prepare.source: .*data.tsv must be a .csv, .jsonl or .parquet file"
    ):
        load_source(prep)


def test_a_folder_source_reads_label_subfolders(tmp_path):
    from lmpipe.tasks.classification.data import load_source

    for label, names in {"b": ["2.txt", "1.txt"], "a": ["x.txt"]}.items():
        (tmp_path / label).mkdir()
        for name in names:
            (tmp_path / label / name).write_text(f" {label} {name} ", encoding="utf-8")
    (tmp_path / "a" / "notes.md").write_text("ignored")
    frame, description = load_source(
        PrepareParams(str(tmp_path), "utf-8", "text", "label", "prompt", "response", "drop", "repair", None)
    )
    assert frame["id"].tolist() == ["a/x.txt", "b/1.txt", "b/2.txt"]
    assert frame["label"].tolist() == ["a", "b", "b"] and frame["text"].iloc[0] == " a x.txt "
    assert "folder" in description
    (tmp_path / "b" / "3.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match=r"prepare.encoding: b/3.txt .* is not valid utf-8"):
        load_source(
            PrepareParams(
                str(tmp_path), "utf-8", "text", "label", "prompt", "response", "drop", "repair", None
            )
        )
