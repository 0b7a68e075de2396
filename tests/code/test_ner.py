"""Token classification's own parts (``lmpipe.ner``): reading CoNLL and JSONL, the BIO policy, the split,
the subword alignment, entity scores against seqeval, the CRF baseline, the paired comparison and the
decoding of tags into character offsets."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from seqeval.metrics import classification_report, f1_score
from seqeval.scheme import IOB2

from lmpipe.errors import UserError
from lmpipe.modeling.models import load_tokenizer, resolve_model_dir
from lmpipe.params import load_params
from lmpipe.serve import serving
from lmpipe.tasks import token_classification as ner
from lmpipe.tasks.token_classification import data as ner_data
from lmpipe.tasks.token_classification import evaluation as ner_eval
from lmpipe.tasks.token_classification import export as ner_export
from tests.conftest import ROOT

PARAMS = load_params(ROOT / "params.yaml")


def prep(source, **changes):
    return replace(PARAMS.prepare, source=str(source), **changes)


def test_conll_layouts_blank_lines_and_docstart(tmp_path):
    lines = [
        "-DOCSTART- -X- O O",
        "",
        "EU NNP B-NP B-ORG",
        "rejects VBZ B-VP O",
        "\t",  # WNUT writes a lone tab between tweets
        "Peter NNP B-NP B-PER",
        "Blackburn NNP I-NP I-PER",
    ]
    frame = ner_data.parse_conll(lines, "f.conll")
    assert frame["tokens"].tolist() == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert frame["tags"].tolist() == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    assert frame["id"].tolist() == ["3", "6"]
    tabbed = ner_data.parse_conll(["New\tB-loc", "York\tI-loc", "", "hi\tO"], "t.tsv")
    assert tabbed["tags"].tolist() == [["B-loc", "I-loc"], ["O"]]


def test_a_bad_conll_line_is_one_error_naming_file_and_line():
    with pytest.raises(UserError, match=r"^f.conll:3: 3 columns, but the file's first token line has 2$"):
        ner_data.parse_conll(["a O", "b O", "c X O"], "f.conll")
    with pytest.raises(UserError, match=r"^f.conll:2: 1 column"):
        ner_data.parse_conll(["a O", "lonely"], "f.conll")


def test_bio_policy_repairs_or_rejects_naming_the_line(tmp_path):
    source = tmp_path / "d.conll"
    source.write_text("I\tO\nlove\tO\nNew\tI-loc\nYork\tI-loc\n\nParis\tB-loc\nHilton\tI-person\n")
    raw, _ = ner_data.load_source(prep(source))
    frame, report = ner_data.prepare_frame(raw, prep(source), 0)
    assert frame["tags"].tolist() == [["O", "O", "B-loc", "I-loc"], ["B-loc", "B-person"]]
    assert report["bio_repaired"] == 2
    with pytest.raises(UserError, match=rf"^{source}:3: I-loc follows O, but an entity starts with B-"):
        ner_data.prepare_frame(raw, prep(source, on_bad_bio="reject"), 0)
    source.write_text("a\tB-loc\nb\tX-loc\n")
    raw, _ = ner_data.load_source(prep(source))
    with pytest.raises(UserError, match=rf"^{source}:2: tag 'X-loc' is not BIO"):
        ner_data.prepare_frame(raw, prep(source), 0)


def test_cleaning_drops_empty_tokens_sentences_and_duplicates(tmp_path):
    source = tmp_path / "d.jsonl"
    rows = [
        {"tokens": ["Hi", " ", "Bob"], "tags": ["O", "O", "B-per"]},
        {"tokens": ["Hi", "Bob"], "tags": ["O", "B-per"]},  # the first, once its empty token is gone
        {"tokens": [" "], "tags": ["O"]},
        {"tokens": ["Ann", "sings"], "tags": ["B-per", "O"]},
    ]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    raw, _ = ner_data.load_source(prep(source))
    frame, report = ner_data.prepare_frame(raw, prep(source), 0)
    assert frame["text"].tolist() == ["Hi Bob", "Ann sings"]
    assert (report["empty_tokens_dropped"], report["empty_dropped"], report["duplicates_removed"]) == (
        2,
        1,
        1,
    )
    assert report["entities_per_type"] == {"per": 2}


def test_jsonl_rows_with_unequal_lists_are_named(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_text('{"tokens": ["a", "b"], "tags": ["O", "O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n')
    with pytest.raises(UserError, match=rf"^{source}:2: tokens has 2 items but tags has 1$"):
        ner_data.load_source(prep(source))


def test_builtin_wnut16_reads_and_cleans():
    raw, description = ner_data.load_source(prep(ROOT / "data/builtin/wnut16.yaml"))
    assert len(raw) == 2394 and "WNUT 2016" in description
    frame, report = ner_data.prepare_frame(raw, prep(ROOT / "data/builtin/wnut16.yaml"), 0)
    assert report["classes"] == 10 and report["rows_out"] == len(frame) > 2200
    assert set(ner.tag_map(frame["tags"])) >= {"O", "B-person", "I-person", "B-tvshow"}


def test_split_by_sentence_reports_entities_and_refuses_unseen_tags():
    sentences = [(["Ann", "sings"], ["B-per", "O"])] * 1 + [
        ([f"w{i}", "x"], ["B-loc", "O"]) for i in range(19)
    ]
    frame = pd.DataFrame(
        {
            "id": [str(i) for i in range(20)],
            "tokens": [s for s, _ in sentences],
            "tags": [t for _, t in sentences],
            "text": [" ".join(s) for s, _ in sentences],
        }
    )
    split = replace(PARAMS.split, train=0.8, val=0.1, test=0.1)
    for seed in range(50):  # a seed that puts the only person outside train
        order = np.random.default_rng(seed).permutation(20)
        if 0 in order[:4]:
            break
    with pytest.raises(
        UserError, match=r"^split: (val|test) sentence 0 has tag\(s\) \['B-per'\] that no train"
    ):
        ner_data.split_frame(frame, split, seed)
    frame.loc[0, "tags"] = ["B-loc", "O"]
    parts = ner_data.split_frame(frame, split, seed)
    assert {k: len(v) for k, v in parts.items()} == {"train": 16, "val": 2, "test": 2}
    assert ner_data.split_report(parts)["entities_per_type"]["train"] == {"loc": 16}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("all-MiniLM-L6-v2"))


def test_labels_sit_on_each_words_first_subword_and_words_past_max_length_are_o(tokenizer):
    words = ["Empire", "Statebuildingxyz", "rocks", "tonight", "and", "more", "words", "follow", "here"]
    tags = [0, 1, 2, 2, 2, 2, 2, 2, 2]
    data = ner.TokenDataset(tokenizer, [words], [tags], max_length=8)
    labels, word_ids = data.labels[0], data.word_ids[0]
    assert len(labels) == 8 and labels[0] == labels[-1] == ner.IGNORE_INDEX  # [CLS], [SEP]
    read = sorted({w for w in word_ids if w is not None})
    for word in read:
        positions = [p for p, w in enumerate(word_ids) if w == word]
        assert labels[positions[0]] == tags[word]
        assert all(labels[p] == ner.IGNORE_INDEX for p in positions[1:])
    assert len(positions) == 1 or word_ids.count(1) > 1  # the long word was split
    names = ["B-x", "I-x", "O"]
    logits = np.zeros((8, 3), dtype=np.float32)
    logits[:, 0] = 5.0  # every read word B-x
    pred, proba = ner.word_tags(data, [logits], names)
    assert pred[0][: len(read)] == ["B-x"] * len(read)
    assert pred[0][len(read) :] == ["O"] * (len(words) - len(read)) and np.isnan(proba[0][-1])


def random_tags(rng, n, types=("per", "loc", "org")):
    out = []
    for _ in range(n):
        choice = rng.integers(0, 4)
        out.append("O" if choice == 0 else f"{'BI'[rng.integers(0, 2)]}-{types[rng.integers(0, len(types))]}")
    return out


def test_entity_scores_are_seqevals_strict_iob2():
    rng = np.random.default_rng(0)
    true = [ner_data.check_bio(random_tags(rng, 12), ["x"] * 12, "repair")[0] for _ in range(60)]
    pred = [random_tags(rng, 12) for _ in range(60)]  # stray I- tags too: strict mode ignores them
    scores = ner.entity_scores(true, pred)
    assert scores["metrics"]["f1"] == pytest.approx(f1_score(true, pred, mode="strict", scheme=IOB2))
    assert scores["metrics"]["macro_f1"] == pytest.approx(
        f1_score(true, pred, mode="strict", scheme=IOB2, average="macro")
    )
    report = classification_report(true, pred, mode="strict", scheme=IOB2, output_dict=True)
    for kind, row in scores["per_type"].items():
        assert row["f1-score"] == pytest.approx(report[kind]["f1-score"])
        assert row["support"] == report[kind]["support"]


def test_paired_comparison_over_sentences():
    rng = np.random.default_rng(1)
    true = [ner_data.check_bio(random_tags(rng, 10), ["x"] * 10, "repair")[0] for _ in range(40)]
    same = ner_eval.versus_baseline(true, true, true, seed=0, resamples=200)
    assert same["f1"] == same["f1_ci95_low"] == same["f1_ci95_high"] == 0.0 and same["mcnemar_p"] == 1.0
    blank = [["O"] * len(t) for t in true]
    ahead = ner_eval.versus_baseline(true, true, blank, seed=0, resamples=200)
    assert ahead["f1"] == 1.0 and ahead["f1_ci95_low"] > 0.9 and ahead["f1_significant"]
    assert ahead["model_only_right"] > 0 and ahead["baseline_only_right"] == 0


def test_crf_baseline_learns_the_training_sentences():
    raw, _ = ner_data.load_source(prep(ROOT / "data/builtin/wnut16.yaml"))
    frame, _ = ner_data.prepare_frame(raw, prep(ROOT / "data/builtin/wnut16.yaml", max_rows=300), 0)
    crf = ner_eval.fit_crf(frame, PARAMS.evaluate.crf)
    tags, proba = ner_eval.crf_tags(crf, frame)
    assert ner.entity_scores(list(frame["tags"]), tags)["metrics"]["f1"] > 0.5  # its own training data
    assert all(((p > 0) & (p <= 1)).all() for p in proba)


def test_entities_decode_to_character_offsets():
    # words are whitespace-separated: CoNLL tokens joined by spaces, here with a double space
    text = "Saw  Empire State Building , then ESB !"
    words = serving.words_of(text)
    assert [w for w, _, _ in words] == ["Saw", "Empire", "State", "Building", ",", "then", "ESB", "!"]
    tags = ["O", "B-facility", "I-facility", "I-facility", "O", "O", "B-facility", "O"]
    found = serving.entities_of(text, words, tags, [0.9, 0.8, 0.6, 0.7, 0.9, 0.9, 0.5, 0.9])
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in found] == [
        ("facility", "Empire State Building", 5, 26),
        ("facility", "ESB", 34, 37),
    ]
    assert found[0]["score"] == pytest.approx(0.7)


def test_served_spans_are_seqevals_strict_iob2_spans():
    rng = np.random.default_rng(0)
    vocabulary = ["O", "B-a", "I-a", "B-b", "I-b"]
    for _ in range(2000):
        tags = list(rng.choice(vocabulary, size=int(rng.integers(0, 9))))
        assert serving.bio_spans(tags) == ner.entity_spans(tags), tags


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"base": {"reading": {"mode": "windows"}}}, "base.reading.mode"),
        ({"train": {"augment": {"copies": 1}}}, "train.augment.copies"),
        ({"train": {"strategy": "prompt_tuning"}}, "train.strategy"),
        ({"search": {"folds": 3}}, "search.folds"),
    ],
)
def test_params_that_make_no_sense_for_the_task_are_named(tmp_path, changes, key):
    from lmpipe.errors import ParamsError
    from lmpipe.params import write_params

    path = write_params(
        tmp_path / "params.yaml", {"base": {"task": "token_classification"}}, source=ROOT / "params.yaml"
    )
    load_params(path)  # the defaults hold for the task
    write_params(path, changes)
    with pytest.raises(ParamsError, match=rf"{key}: .*token_classification"):
        load_params(path)


def test_word_perturbations_keep_one_word_per_tag():
    from lmpipe.analysis import robustness

    sentences = [["Barack", "Obama", "visits", "New", "York"], ["ok"], ["@user", "#tag", "http://t.co/x"]]
    for name in robustness.WORD_PERTURBATIONS:
        noisy = robustness.perturb_sentences(sentences, name, 1.0, seed=3)
        assert [len(s) for s in noisy] == [len(s) for s in sentences], name
        assert all(w and not any(c.isspace() for c in w) for s in noisy for w in s), name
        assert noisy == robustness.perturb_sentences(sentences, name, 1.0, seed=3)  # seeded
    assert robustness.perturb_sentences(sentences, "lowercase", 1.0, 0)[0][:2] == ["barack", "obama"]


def test_word_parity_and_predictions_back_to_sentences():
    names = ["B-x", "I-x", "O"]
    ref = [np.array([[3.0, 0.0, 1.0], [0.0, 0.0, 2.0]]), np.array([[np.nan] * 3])]
    close = [ref[0] + 1e-6, ref[1]]
    assert ner_export.word_parity(ref, close, names) == {
        "max_abs_logit_diff": pytest.approx(1e-6),
        "label_agreement": 1.0,
        "labels_differing": 0,
        "words": 2,  # the word not read (nan) is not compared
    }
    flipped = [np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0]]), ref[1]]
    assert ner_export.word_parity(ref, flipped, names)["labels_differing"] == 1
    frame = pd.DataFrame({"id": ["a", "b"], "tokens": [["x", "y"], ["z"]]})
    predictions = pd.DataFrame(
        {"id": ["b", "a", "a"], "position": [0, 1, 0], "predicted": ["O", "I-x", "B-x"]}
    )
    assert ner_eval.tags_from_predictions(predictions, frame) == [["B-x", "I-x"], ["O"]]
    with pytest.raises(UserError, match="no rows for sentence id c"):
        ner_eval.tags_from_predictions(predictions, pd.DataFrame({"id": ["c"], "tokens": [["q"]]}))
