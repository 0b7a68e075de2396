"""Token attributions and their checks (lmpipe.analysis.explain), on a tiny random BERT and on a hand-built model whose
prediction depends on one word only, so that the right answers are known exactly."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertForSequenceClassification

from lmpipe import plots
from lmpipe.analysis import explain
from lmpipe.evaluation import fit_baseline
from lmpipe.modeling.models import load_tokenizer, resolve_model_dir
from lmpipe.params import BaselineParams
from tests.conftest import tiny_bert_config

TEXTS = [
    "The striker scored twice as the home side won the cup final on Saturday.",
    "Shares in the chip maker fell after it cut its sales forecast.",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread runs them fastest, and keeps them fast beside other CPU work
    (two threads on two busy cores wait on each other, up to tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def tiny_bert(tokenizer):
    torch.manual_seed(0)
    # wider initial weights than BERT's 0.02, so that tokens move the logits by more than rounding noise
    config = tiny_bert_config(tokenizer.vocab_size, num_labels=3, initializer_range=0.3)
    return BertForSequenceClassification(config).eval()


class OneWordModel(torch.nn.Module):
    """Class 1's logit is 3 x the number of ``word`` tokens, class 0's is 0: nothing else matters."""

    def __init__(self, vocab_size: int, word: int):
        super().__init__()
        self.config = SimpleNamespace(num_labels=2)
        self.embeddings = torch.nn.Embedding(vocab_size, 1)
        with torch.no_grad():
            self.embeddings.weight.zero_()
            self.embeddings.weight[word] = 3.0

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embeddings

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        score = (self.embeddings(input_ids)[..., 0] * attention_mask).sum(-1)
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(score), score], dim=-1))


def logits(model, ids: list[int]) -> torch.Tensor:
    """The model's logits for one encoded text, computed here rather than by the code under test."""
    with torch.no_grad():
        return model(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
        ).logits[0]


def test_attributions_are_complete_and_cover_the_tokens_the_model_read(tiny_bert, tokenizer):
    max_length = 16
    for target in (0, 2):
        (tokens, scores), (short_tokens, _) = explain.attribute(
            tiny_bert, tokenizer, TEXTS, [target, target], max_length, n_steps=50
        )
        assert tokens == tokenizer.tokenize(TEXTS[0])[: max_length - 2] and len(scores) == len(tokens)
        assert short_tokens == tokenizer.tokenize(TEXTS[1])[: max_length - 2]
        # IG's completeness: the scores add up to the target logit's change from the [PAD] baseline
        ids = tokenizer(TEXTS[0], truncation=True, max_length=max_length)["input_ids"]
        baseline = [ids[0]] + [tokenizer.pad_token_id] * (len(ids) - 2) + [ids[-1]]
        change = float(logits(tiny_bert, ids)[target] - logits(tiny_bert, baseline)[target])
        assert abs(change) > 0.05  # else the check below proves little
        assert scores.sum() == pytest.approx(change, rel=0.03, abs=1e-3)


def test_attributions_of_a_one_word_model_fall_on_that_word(tokenizer):
    dog = tokenizer.convert_tokens_to_ids("dog")
    model = OneWordModel(tokenizer.vocab_size, dog)
    [(tokens, toward_1), (_, toward_0)] = explain.attribute(
        model, tokenizer, ["the cat chased a dog"] * 2, [1, 0], max_length=32
    )
    assert tokens == ["the", "cat", "chased", "a", "dog"]
    # the model is linear in the embeddings: IG is exact, the whole logit change is the word's
    np.testing.assert_allclose(toward_1, [0, 0, 0, 0, 3], atol=1e-5)
    np.testing.assert_allclose(toward_0, 0, atol=1e-5)  # class 0's logit is constant


def test_faithfulness_of_a_one_word_model(tokenizer):
    model = OneWordModel(tokenizer.vocab_size, tokenizer.convert_tokens_to_ids("dog"))
    texts = ["the cat chased a dog", "a dog and another dog ran"]
    targets = [1, 1]
    attributions = explain.attribute(model, tokenizer, texts, targets, max_length=32)
    frame = explain.faithfulness(model, tokenizer, texts, targets, attributions, 0.2, seed=0, random_draws=4)
    assert list(frame.columns) == [
        "k",
        "p_full",
        "comprehensiveness",
        "sufficiency",
        "random_comprehensiveness",
        "random_sufficiency",
    ]
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    first, second = frame.iloc[0], frame.iloc[1]
    assert first["k"] == 1 and first["p_full"] == pytest.approx(sigmoid(3))
    # without its one dog the first text has logit 0; the dog alone keeps all of it
    gain = sigmoid(3) - 0.5
    assert first["comprehensiveness"] == pytest.approx(gain, abs=1e-6)
    assert first["sufficiency"] == pytest.approx(0, abs=1e-6)
    # a random token is the dog (removing it costs `gain`, keeping it alone costs 0) or not (the reverse)
    assert first["random_comprehensiveness"] + first["random_sufficiency"] == pytest.approx(gain, abs=1e-6)
    assert (first["random_comprehensiveness"] / gain * 4) == pytest.approx(
        round(first["random_comprehensiveness"] / gain * 4), abs=1e-4
    )
    # six tokens, k = round(1.2) = 1: removing one of two dogs halves the logit, one dog alone keeps 3 of 6
    assert second["k"] == 1 and second["p_full"] == pytest.approx(sigmoid(6))
    assert second["comprehensiveness"] == pytest.approx(sigmoid(6) - sigmoid(3), abs=1e-6)
    assert second["sufficiency"] == pytest.approx(sigmoid(6) - sigmoid(3), abs=1e-6)
    again = explain.faithfulness(model, tokenizer, texts, targets, attributions, 0.2, seed=0, random_draws=4)
    pd.testing.assert_frame_equal(frame, again)  # seeded


def test_faithfulness_with_every_token_removed_leaves_only_the_specials(tiny_bert, tokenizer):
    targets = [1, 2]
    attributions = explain.attribute(tiny_bert, tokenizer, TEXTS, targets, max_length=12, n_steps=4)
    frame = explain.faithfulness(tiny_bert, tokenizer, TEXTS, targets, attributions, 1.0, seed=0)
    empty = torch.softmax(logits(tiny_bert, tokenizer("")["input_ids"]), dim=-1)
    for i, row in frame.iterrows():
        ids = tokenizer(TEXTS[i], truncation=True, max_length=12)["input_ids"]
        p_full = float(torch.softmax(logits(tiny_bert, ids), dim=-1)[targets[i]])
        assert row["k"] == 10 and row["p_full"] == pytest.approx(p_full, abs=1e-5)
        assert row["comprehensiveness"] == pytest.approx(p_full - float(empty[targets[i]]), abs=1e-5)
        assert row["sufficiency"] == pytest.approx(0, abs=1e-5)
        assert row["random_comprehensiveness"] == pytest.approx(row["comprehensiveness"], abs=1e-5)
    with pytest.raises(ValueError, match="not the tokens"):
        explain.faithfulness(tiny_bert, tokenizer, TEXTS[::-1], targets, attributions, 1.0, seed=0)


def test_faithfulness_summary_is_positive_when_better_than_random():
    frame = pd.DataFrame(
        {
            "comprehensiveness": [0.6, 0.4],
            "sufficiency": [0.0, 0.2],
            "random_comprehensiveness": [0.1, 0.1],
            "random_sufficiency": [0.3, 0.3],
        }
    )
    summary = explain.faithfulness_summary(frame)
    assert summary["comprehensiveness"] == pytest.approx(0.5)
    assert summary["comprehensiveness_minus_random"] == pytest.approx(0.4)
    assert summary["sufficiency_minus_random"] == pytest.approx(0.2)


@pytest.mark.parametrize("labels", [["sport", "tech", "politics"], ["sport", "tech"]])
def test_baseline_terms_name_the_word_that_decides(labels):
    words = {"sport": "goal", "tech": "software", "politics": "election"}
    fillers = ["the report said", "on monday it was", "people were told that", "a new week and"]
    train = pd.DataFrame(
        [(f"{filler} {words[label]} news", label) for label in labels for filler in fillers],
        columns=["text", "label"],
    )
    pipeline = fit_baseline(train, BaselineParams(C=10.0, max_features=1000, ngram_max=1), seed=0)
    # the model's class order need not be the baseline's (sorted) one
    texts = [f"the {words[label]} news on monday" for label in labels]
    terms = explain.baseline_terms(pipeline, texts, labels[::-1], top=2)
    for label, text_terms in zip(labels, terms, strict=True):
        assert text_terms[0][0] == words[label] and text_terms[0][1] > 0
        assert len(text_terms) <= 2 and all(value > 0 for _, value in text_terms)


def test_merge_words_and_top_tokens():
    assert explain.merge_words(["zebra", "##s", ",", "run"], [1.0, 0.5, 2.0, -1.0]) == [
        ("zebra" + "s", 1.5),
        (",", 2.0),
        ("run", -1.0),
    ]
    assert explain.merge_words(["Hello", "Ġwor", "ld", "Ġ!"], [1, 2, 3, 4]) == [
        ("Hello", 1.0),
        ("world", 5.0),
        ("!", 4.0),
    ]
    explanations = [
        explain.Explanation(
            "1", "", "a", "animals", 0.9, ["Zebra", "##s", ",", "run"], np.array([1, 1, 9, 0.5])
        ),
        explain.Explanation("2", "", "a", "animals", 0.8, ["zebras", "eat"], np.array([0.5, 3.0])),
        explain.Explanation("3", "", "a", "other", 0.7, ["zebras", "eat"], np.array([-1.0, 0.2])),
    ]
    frame = explain.top_tokens(explanations, top_n=2)
    assert list(frame.columns) == ["class", "token", "total_attribution", "count"]
    assert frame.values.tolist() == [
        ["animals", "eat", 3.0, 1],
        ["animals", "zebras", 2.5, 2],
        ["other", "eat", 0.2, 1],
        ["other", "zebras", -1.0, 1],
    ]
    fig = plots.top_tokens_figure(frame)
    assert [ax.get_title() for ax in fig.axes if ax.axison] == ["animals", "other"]
    plots.close(fig)


def test_html_report_escapes_text_and_marks_misclassified_rows():
    explanations = [
        explain.Explanation(
            "tech/007.txt",
            "<script>alert(1)</script> wins",
            "tech",
            "sport",
            0.91,
            ["<", "script", ">", "wins"],
            np.array([0.1, -0.4, 0.0, 0.8]),
            [("wins", 0.5), ("a&b", 0.2)],
        ),
        explain.Explanation("8", "fine text", "sport", "sport", 0.6, ["fine", "text"], np.array([0.2, 0.1])),
    ]
    page = explain.html_report(explanations, "Explanations <test>")
    assert "<script" not in page.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Explanations &lt;test&gt;" in page and "a&amp;b" in page
    assert page.count("MISCLASSIFIED") == 1
    assert page.index("#tech/007.txt") < page.index("MISCLASSIFIED") < page.index("#8")
    assert "no baseline terms" in page[page.index("#8") :]
    assert "p = 0.910" in page
    # shaded by the text's largest |score|: "wins" full red, "script" half blue
    assert 'rgba(220,38,38,1.000)" title="+0.8000">wins<' in page
    assert 'rgba(37,99,235,0.500)" title="-0.4000">script<' in page
    assert not re.search(r"(src|href)=|url\(|@import", page)
