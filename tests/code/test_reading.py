"""Reading long texts (``base.reading``): what each mode keeps, the windows' pooling, and that training,
evaluation, the exported ONNX model and ``lmpipe predict`` read a text identically."""

from __future__ import annotations

import numpy as np
import pytest

from lmpipe.errors import ParamsError
from lmpipe.modeling.encoding import TextDataset, model_reading, set_model_reading
from lmpipe.modeling.inference import predict_logits_model
from lmpipe.modeling.models import load_model, load_tokenizer, resolve_model_dir, write_model
from lmpipe.modeling.training import eval_metrics
from lmpipe.params import load_params
from lmpipe.serve.onnx_export import write_classifier_folder
from lmpipe.serve.serving import OnnxTextClassifier, pool_logits, read_texts
from tests.conftest import ROOT, tiny_bert_classifier

LABELS = ["a", "b", "c"]
MAX_LENGTH = 24
LONG = " ".join(f"w{i}" for i in range(200)) + " the very end"
TEXTS = ["a short one.", LONG, "medium " * 15 + "text", "another " * 60 + "closing words"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("all-MiniLM-L6-v2"))


def reading(mode: str = "head", **kw) -> dict:
    return {"mode": mode, "head_share": 0.5, "stride": 6, "pooling": "mean", **kw}


def decoded(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_head_is_the_tokenizers_truncation(tokenizer):
    features, owner = read_texts(tokenizer, TEXTS, MAX_LENGTH, reading("head"))
    assert features["input_ids"] == tokenizer(TEXTS, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    np.testing.assert_array_equal(owner, np.arange(len(TEXTS)))


@pytest.mark.parametrize("mode", ["tail", "head_tail", "windows"])
def test_a_text_that_fits_is_read_whole_by_every_mode(tokenizer, mode):
    head, _ = read_texts(tokenizer, TEXTS[:1], MAX_LENGTH, reading("head"))
    other, owner = read_texts(tokenizer, TEXTS[:1], MAX_LENGTH, reading(mode))
    assert other == head and list(owner) == [0]


def test_tail_and_head_tail_keep_the_ends_within_the_budget(tokenizer):
    bare = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    budget = MAX_LENGTH - 2  # [CLS] ... [SEP]
    tail, _ = read_texts(tokenizer, [LONG], MAX_LENGTH, reading("tail"))
    assert tail["input_ids"][0][1:-1] == bare[-budget:]
    for share, head in ((0.5, 11), (0.25, 6), (1.0, 22), (0.0, 0)):
        got, _ = read_texts(tokenizer, [LONG], MAX_LENGTH, reading("head_tail", head_share=share))
        ids = got["input_ids"][0]
        assert len(ids) == MAX_LENGTH and all(len(v[0]) == MAX_LENGTH for v in got.values())
        assert ids[1:-1] == bare[:head] + bare[len(bare) - (budget - head) :]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert decoded(tokenizer, got["input_ids"][0]).endswith("the very end")


def test_windows_cover_every_token_in_order_with_the_stride_shared(tokenizer):
    bare = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    features, owner = read_texts(tokenizer, TEXTS, MAX_LENGTH, reading("windows", stride=6))
    windows = [ids[1:-1] for ids, o in zip(features["input_ids"], owner, strict=True) if o == 1]
    assert len(windows) > 5 and all(len(w) <= MAX_LENGTH - 2 for w in windows)
    rebuilt = windows[0] + [t for w in windows[1:] for t in w[6:]]  # each later window repeats 6 tokens
    assert rebuilt == bare
    assert list(owner) == sorted(owner) and set(owner) == set(range(len(TEXTS)))


def test_pooling_means_or_maxes_each_texts_windows():
    logits = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 1.0], [0.0, 9.0]], dtype=np.float32)
    owner = np.array([0, 1, 1, 2])
    np.testing.assert_allclose(pool_logits(logits, owner, 3, "mean"), [[1, 0], [4, 1.5], [0, 9]])
    np.testing.assert_allclose(pool_logits(logits, owner, 3, "max"), [[1, 0], [5, 2], [0, 9]])
    assert pool_logits(logits, np.arange(4), 4) is logits  # one unit per text passes through


def test_training_samples_one_window_per_text_and_visits_them_all(tokenizer):
    labels = [0, 1, 2, 1]
    train = TextDataset(tokenizer, TEXTS, labels, MAX_LENGTH, reading("windows"), sample_windows=True, seed=3)
    val = TextDataset(tokenizer, TEXTS, labels, MAX_LENGTH, reading("windows"))
    assert len(train) == len(TEXTS) < len(val) and val.windowed and not train.windowed
    n_windows = int((val.owner == 1).sum())
    seen = [train[1]["input_ids"] for _ in range(n_windows)]
    assert sorted(map(tuple, seen)) == sorted(
        tuple(ids) for ids, o in zip(val.encodings["input_ids"], val.owner, strict=True) if o == 1
    )  # one epoch per visit: each window once per cycle, in a seeded order
    assert all(train[i]["labels"] == labels[i] for i in range(len(TEXTS)))
    assert [val[i]["labels"] for i in range(len(val))] == [labels[o] for o in val.owner]
    again = TextDataset(tokenizer, TEXTS, labels, MAX_LENGTH, reading("windows"), sample_windows=True, seed=3)
    assert [again[1]["input_ids"] for _ in range(n_windows)] == seen


def test_validation_scores_the_pooled_texts_not_the_windows(tokenizer):
    labels = [0, 1, 2, 1]
    val = TextDataset(tokenizer, TEXTS, labels, MAX_LENGTH, reading("windows"))
    # every window of text 1 but one votes for class 1: pooled, text 1 is right
    logits = np.zeros((len(val.owner), 3), dtype=np.float32)
    for row, text in enumerate(val.owner):
        logits[row, labels[text]] = 1.0
    first_of_1 = int(np.flatnonzero(val.owner == 1)[0])
    logits[first_of_1] = [2.0, 0.0, 0.0]
    prediction = type("P", (), {"predictions": logits, "label_ids": np.array([labels[o] for o in val.owner])})
    scores = eval_metrics(prediction, val)
    assert scores["rows"] == len(TEXTS) and scores["accuracy"] == 1.0


@pytest.mark.parametrize("mode", ["head_tail", "windows"])
def test_training_evaluation_onnx_and_predict_read_alike(tokenizer, tmp_path, mode):
    """The one tokenisation path: the trained model's config carries its reading; the dataset training
    and evaluation use, the PyTorch inference loop and the exported ONNX classifier give the same token
    ids, and the same text-level logits."""
    model = tiny_bert_classifier(tokenizer, LABELS)
    wanted = reading(mode, head_share=0.25, pooling="max")
    set_model_reading(model, wanted)
    write_model(model, tokenizer, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert model_reading(loaded) == wanted  # saved in config.json

    dataset = TextDataset(tokenizer, TEXTS, None, MAX_LENGTH, model_reading(loaded))
    write_classifier_folder(tmp_path / "model", tmp_path / "export", MAX_LENGTH, opset=18)
    onnx = OnnxTextClassifier(tmp_path / "export")
    assert onnx.reading == wanted
    served, owner = onnx.read(TEXTS)
    np.testing.assert_array_equal(owner, dataset.owner)
    for i, ids in enumerate(dataset.encodings["input_ids"]):
        assert served["input_ids"][i][: len(ids)].tolist() == ids  # padding apart, the same ids

    torch_logits, _ = predict_logits_model(loaded, tokenizer, TEXTS, MAX_LENGTH, 2, desc=None)
    onnx_logits = np.concatenate([onnx.text_logits(TEXTS[i : i + 2]) for i in range(0, len(TEXTS), 2)])
    assert torch_logits.shape == (len(TEXTS), len(LABELS))
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    if mode == "windows":  # the long texts' windows were pooled, not their first window taken
        head = TextDataset(tokenizer, TEXTS, None, MAX_LENGTH)
        first = predict_logits_model(model_from(loaded, "head"), tokenizer, TEXTS, MAX_LENGTH, 4, None)[0]
        assert len(head.owner) == len(TEXTS)
        assert not np.allclose(first[1], torch_logits[1])


def model_from(model, mode: str):
    set_model_reading(model, reading(mode))
    return model


def test_bad_reading_params_are_named():
    def load(max_length: int = 128, **kw):
        return load_params(
            ROOT / "params.yaml", {"base": {"max_length": max_length, "reading": reading(**kw)}}
        )

    assert load(mode="windows").base.reading.as_dict() == reading("windows")
    with pytest.raises(ParamsError, match=r"base\.reading\.mode"):
        load(mode="middle")
    with pytest.raises(ParamsError, match=r"base\.reading\.stride.*at most half"):
        load(max_length=32, mode="windows", stride=20)
    with pytest.raises(ParamsError, match=r"base\.reading\.head_share"):
        load(mode="head_tail", head_share=1.5)


def test_the_served_model_spells_the_task_names_as_the_registry():
    """serving.py is logged with the MLflow model and imports nothing of lmpipe: its copy of the task
    names must be lmpipe.tasks' own, or a served tagger would be loaded as a classifier."""
    from lmpipe import tasks
    from lmpipe.serve import serving

    assert (serving.TEXT_TASK, serving.TOKEN_TASK, serving.GENERATION_TASK) == (
        tasks.CLASSIFICATION,
        tasks.TOKEN_CLASSIFICATION,
        tasks.GENERATION,
    )
