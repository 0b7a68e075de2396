"""Checks of the shipped BBC News corpus as the prepare stage sees it."""

import pytest

from lmpipe.params import PrepareParams
from lmpipe.tasks.classification import data as text_data


@pytest.fixture(scope="module")
def bbc():
    return text_data.load_bbc_news()


def test_corpus_shape(bbc):
    assert len(bbc) == 2225
    assert sorted(bbc["label"].unique()) == ["business", "entertainment", "politics", "sports", "tech"]
    assert bbc["id"].is_unique


def test_corpus_duplicates_are_removed(bbc):
    assert bbc["text"].duplicated().sum() == 98  # exact duplicates as shipped
    prep = PrepareParams(
        "data/builtin/bbc_news.yaml", "utf-8", "text", "label", "prompt", "response", "drop", "repair", None
    )
    out, report = text_data.prepare_frame(bbc, prep, seed=0)
    # two more pairs differ only in whitespace, so cleaning finds 100
    assert report["duplicates_removed"] == 100
    assert report["conflicting_texts"] == 0
    assert out["text"].is_unique and len(out) == 2125
