"""Decoder models (``tiny_decoder``: a 2-layer Llama with SmolLM2's byte-level BPE tokenizer) under the two
tasks: what ``families`` decides for each family, what ``strategies.resolve`` makes of ``auto``, words
encoded as running text reads them, and a LoRA step of the shared training loop for each task."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from transformers import AutoConfig, BertConfig

from lmpipe import tasks
from lmpipe.errors import UserError
from lmpipe.modeling import families, models, strategies
from lmpipe.modeling.encoding import encode_words
from lmpipe.modeling.training import train_model
from lmpipe.params import load_params
from lmpipe.serve import onnx_export
from lmpipe.tasks import token_classification as ner
from tests.conftest import ROOT

PARAMS = load_params(ROOT / "params.yaml")
# one quick epoch (no early stopping to wait for), LoRA on the family's targets by `auto`
QUICK = dataclasses.replace(
    PARAMS.train, epochs=1, batch_size=4, eval_batch_size=8, logging_steps=1, patience=0, learning_rate=1e-3
)


@pytest.fixture(scope="module")
def decoder_config(tiny_decoder):
    return AutoConfig.from_pretrained(str(tiny_decoder))


@pytest.fixture(scope="module")
def decoder_tokenizer(tiny_decoder):
    return models.load_tokenizer(tiny_decoder)


def test_families_decide_encoder_and_decoder(decoder_config):
    encoder = BertConfig()
    assert families.family(encoder) == families.ENCODER and not families.is_decoder(encoder)
    assert families.family(decoder_config) == families.DECODER and families.is_decoder(decoder_config)
    assert families.strategy(encoder, "auto") == "full"
    assert families.strategy(decoder_config, "auto") == "lora"
    assert families.strategy(decoder_config, "auto", task_default="full") == "full"
    assert families.strategy(decoder_config, "linear_probe") == "linear_probe"
    assert families.lora_targets(encoder, "auto") == ["query", "value"]
    assert families.lora_targets(decoder_config, "auto") == ["q_proj", "v_proj"]
    assert families.lora_targets(decoder_config, ["o_proj"]) == ["o_proj"]


def test_what_a_decoder_cannot_do_is_one_line_from_families(decoder_config):
    encoder = BertConfig()
    for what in families.UNSUPPORTED[families.DECODER]:
        assert families.supports(encoder, what) and families.unsupported(encoder, what, "k") is None
        assert not families.supports(decoder_config, what)
    line = families.unsupported(decoder_config, "onnx_fusions", "export.optimize")
    assert line == (
        "export.optimize: not available for a decoder model (llama): ONNX Runtime's transformer fusions "
        "here are the BERT ones; the plain graph is served"
    )
    with pytest.raises(UserError, match=r"^train.strategy: not available for a decoder model \(llama\)"):
        families.require(decoder_config, "prompt_tuning", "train.strategy")
    families.require(encoder, "prompt_tuning", "train.strategy")  # no error
    # what works for a decoder is not listed as what it cannot do
    assert {"prune_heads", "distill_layers"}.isdisjoint(families.UNSUPPORTED[families.DECODER])


@pytest.mark.parametrize("task", [tasks.CLASSIFICATION, tasks.TOKEN_CLASSIFICATION])
def test_resolve_gives_lora_on_q_v_for_a_decoder_and_full_for_an_encoder(tiny_decoder, tiny_encoder, task):
    cfg = dataclasses.replace(
        PARAMS.train, strategy="auto", lora=dataclasses.replace(PARAMS.train.lora, target_modules="auto")
    )
    decoder = models.load_model(tiny_decoder, {"a": 0, "b": 1}, task=task)
    assert type(decoder).__name__ in ("LlamaForSequenceClassification", "LlamaForTokenClassification")
    resolved = strategies.resolve(cfg, decoder)
    assert (resolved.strategy, resolved.lora.target_modules) == ("lora", ["q_proj", "v_proj"])
    strategies.validate(decoder, cfg)  # the targets exist in the model
    encoder = models.load_model(tiny_encoder, {"a": 0, "b": 1}, task=task)
    resolved = strategies.resolve(cfg, encoder)
    assert (resolved.strategy, resolved.lora.target_modules) == ("full", ["query", "value"])


def test_prompt_tuning_a_decoder_is_refused_by_families(tiny_decoder):
    decoder = models.load_model(tiny_decoder, {"a": 0, "b": 1})
    cfg = dataclasses.replace(PARAMS.train, strategy="prompt_tuning")
    with pytest.raises(UserError, match=r"^train.strategy: not available for a decoder model"):
        strategies.validate(decoder, cfg, max_length=32)


def test_words_are_encoded_with_the_space_running_text_has(decoder_tokenizer, tiny_encoder):
    words = ["Hello", "world", "from", "Paris", "!"]
    enc = encode_words(decoder_tokenizer, [words])
    tokens = decoder_tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens == ["Hello", "Ġworld", "Ġfrom", "ĠParis", "Ġ!"]
    assert enc["input_ids"][0] == decoder_tokenizer(" ".join(words))["input_ids"]  # as the text reads
    assert enc.word_ids(0) == [0, 1, 2, 3, 4]
    # a word of several subwords: every subword maps to it, the first one carries the space
    enc = encode_words(decoder_tokenizer, [["I", "like", "tokenization"]])
    tokens = decoder_tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    ids = enc.word_ids(0)
    assert ids[0] == 0 and ids[1] == 1 and set(ids[2:]) == {2} and len(ids) > 3
    assert tokens[1] == "Ġlike" and tokens[2].startswith("Ġ") and not tokens[3].startswith("Ġ")
    # WordPiece ignores the space: the encoder's ids and word ids are exactly what they were
    bert = models.load_tokenizer(tiny_encoder)
    plain = bert([words], is_split_into_words=True)
    fixed = encode_words(bert, [words])
    assert fixed["input_ids"] == plain["input_ids"] and fixed.word_ids(0) == plain.word_ids(0)


def test_token_dataset_on_a_decoder_labels_each_word_s_first_subword(decoder_tokenizer):
    words = ["Visit", "Paris", "tomorrow"]
    data = ner.TokenDataset(decoder_tokenizer, [words], [[0, 1, 0]], max_length=16)
    tokens = decoder_tokenizer.convert_ids_to_tokens(data.encodings["input_ids"][0])
    assert tokens[:3] == ["Visit", "ĠParis", "Ġtomorrow"]  # the decoder's tokenizer adds no special token
    assert data.labels[0][:3] == [0, 1, 0]
    frame = pd.DataFrame({"tokens": [words]})
    assert ner.token_lengths(decoder_tokenizer, frame).tolist() == [len(tokens)]


def _clf_frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    words = {"sport": ["match", "goal", "team"], "tech": ["chip", "code", "phone"]}
    labels = ["sport", "tech"] * (n // 2)
    texts = [" ".join(rng.choice(words[y], size=5)).capitalize() for y in labels]
    return pd.DataFrame({"text": texts, "label": labels})


def _ner_frame(n: int) -> pd.DataFrame:
    rows = [(["Anna", "visited", "Paris", "today"], ["B-PER", "O", "B-LOC", "O"])] * (n // 2)
    rows += [(["We", "met", "Bob", "in", "Rome"], ["O", "O", "B-PER", "O", "B-LOC"])] * (n - n // 2)
    return pd.DataFrame(
        {"id": [str(i) for i in range(n)], "tokens": [r[0] for r in rows], "tags": [r[1] for r in rows]}
    )


@pytest.mark.parametrize(
    ("task", "frame", "labels"),
    [
        (tasks.CLASSIFICATION, _clf_frame(8), {"sport": 0, "tech": 1}),
        (tasks.TOKEN_CLASSIFICATION, _ner_frame(8), {"B-LOC": 0, "B-PER": 1, "O": 2}),
    ],
)
def test_a_lora_step_trains_the_adapter_and_the_head_of_a_decoder(
    tiny_decoder, decoder_tokenizer, tmp_path, task, frame, labels
):
    model = models.load_model(tiny_decoder, labels, task=task)
    dataset = tasks.get(task).dataset(decoder_tokenizer, frame, labels, 16)
    result = train_model(model, decoder_tokenizer, dataset, dataset, QUICK, seed=0, show_progress=False)
    assert result.epochs_run == 1 and result.global_steps == 2
    assert 0 < result.trainable_parameters < models.count_parameters(result.model)["parameters"] / 10
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in n for n in trained) and any("v_proj.lora_B" in n for n in trained)
    assert any(".score." in n or n.endswith("score.weight") or ".classifier." in n for n in trained)
    assert not any("k_proj" in n or "embed_tokens" in n for n in trained)
    assert 0 <= result.best_val_macro_f1 <= 1
    # the merged model saves as a plain Llama head that loads back with the same logits
    plain = strategies.finalize_model(result.model)
    models.write_model(plain, decoder_tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"][0] == type(model).__name__ and config["pad_token_id"] == 2
    reloaded = models.load_model(tmp_path)
    batch = dataset.collator(decoder_tokenizer)([dataset[i] for i in range(3)])
    batch.pop("labels")
    import torch

    with torch.no_grad():
        assert torch.allclose(plain.eval()(**batch).logits, reloaded.eval()(**batch).logits, atol=1e-5)


def test_the_decoder_classifier_pools_the_last_real_token(tiny_decoder, decoder_tokenizer):
    """Right padding with the EOS as pad: a text padded in a batch scores as it does alone."""
    import torch

    model = models.load_model(tiny_decoder, {"a": 0, "b": 1}).eval()
    texts = ["A short one", "A much longer text that needs no padding at all here"]
    batch = decoder_tokenizer(texts, padding=True, return_tensors="pt")
    assert "token_type_ids" not in batch
    with torch.no_grad():
        together = model(**batch).logits
        alone = model(**decoder_tokenizer(texts[:1], return_tensors="pt")).logits
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_export_skips_the_bert_fusions_for_a_decoder_with_families_line(tiny_decoder, tmp_path):
    config = AutoConfig.from_pretrained(str(tiny_decoder))
    model = models.load_model(tiny_decoder, {"a": 0, "b": 1})
    models.write_model(model, models.load_tokenizer(tiny_decoder), tmp_path / "model")
    found = onnx_export.optimize_onnx(tmp_path / "model", tmp_path, max_length=16, opset=18)
    assert found == {"skipped": families.unsupported(config, "onnx_fusions", "export.optimize")}


@pytest.mark.parametrize("task", [tasks.CLASSIFICATION, tasks.TOKEN_CLASSIFICATION])
def test_onnx_export_of_a_decoder_head_matches_pytorch(tiny_decoder, decoder_tokenizer, tmp_path, task):
    """The Llama classifier and tagger exported as served (dynamic batch and length, right padding) give
    PyTorch's logits on a padded batch: the last real token pooled, each word's first subword tagged."""
    import torch

    from lmpipe.serve import serving

    labels = {"B-LOC": 0, "O": 1} if task == tasks.TOKEN_CLASSIFICATION else {"a": 0, "b": 1, "c": 2}
    torch.manual_seed(0)
    model = models.load_model(tiny_decoder, labels, task=task)
    models.write_model(model, decoder_tokenizer, tmp_path / "model")
    onnx_export.write_classifier_folder(tmp_path / "model", tmp_path / "export", max_length=16, opset=18)
    sentences = [["Rome", "is", "lovely"], ["We", "flew", "to", "New", "York", "yesterday", "evening"]]
    if task == tasks.TOKEN_CLASSIFICATION:
        folder = serving.OnnxEntityTagger(tmp_path / "export")
        features, word_ids = folder.read_words(sentences)
        assert decoder_tokenizer.convert_ids_to_tokens(features["input_ids"][0][:3]) == [
            "Rome",
            "Ġis",
            "Ġlovely",
        ]
    else:
        folder = serving.OnnxTextClassifier(tmp_path / "export")
        features = folder.encode([" ".join(s) for s in sentences])
    assert set(features) == {"input_ids", "attention_mask"} and features["attention_mask"][0, -1] == 0
    with torch.no_grad():
        expected = model.eval()(**{k: torch.from_numpy(v) for k, v in features.items()}).logits.numpy()
    got = folder.logits(features)
    real = features["attention_mask"].astype(bool) if got.ndim == 3 else slice(None)
    assert np.abs(got[real] - expected[real]).max() < 1e-4


def test_lora_at_full_fine_tuning_s_rate_is_warned_about():
    cfg = load_params(ROOT / "params.yaml").train
    lora = dataclasses.replace(cfg, strategy="lora")
    assert "is low for LoRA" in strategies.advice(lora)[0]
    assert strategies.advice(dataclasses.replace(lora, learning_rate=5e-4)) == []
    assert strategies.advice(dataclasses.replace(cfg, strategy="full")) == []
