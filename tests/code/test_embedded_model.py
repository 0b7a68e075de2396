"""The real embedded MiniLM (the default ``base.model``), in one forward pass: the pipeline's e2e tests run on
a tiny random encoder, so this is the quick tier's check that the shipped weights load and mean something.
The extended tier trains it (tests/e2e/test_compress_budget.py, test_experiments.py, ...)."""

from __future__ import annotations

import torch

from lmpipe.modeling.models import load_model, load_tokenizer, resolve_model_dir
from lmpipe.params import EMBEDDED_MODEL, load_params
from tests.conftest import ROOT

TEXTS = [
    "Shares in the bank fell sharply after its profits dropped.",
    "The bank's stock slid as its earnings declined.",
    "The striker scored twice in the cup final.",
]


def test_the_default_model_is_the_embedded_minilm_and_reads_text():
    assert load_params(ROOT / "params.yaml").base.model == EMBEDDED_MODEL
    folder = resolve_model_dir(EMBEDDED_MODEL)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, {"business": 0, "sport": 1}).eval()
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216  # all-MiniLM-L6-v2's 22.7M
    assert tokenizer("The BANK")["input_ids"] == tokenizer("the bank")["input_ids"]  # uncased

    features = tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.inference_mode():
        out = model(**features, output_hidden_states=True)
    assert out.logits.shape == (3, 2) and torch.isfinite(out.logits).all()
    # pretrained weights, not a random init: mean-pooled sentence vectors put the paraphrase nearer
    mask = features["attention_mask"].unsqueeze(-1)
    vectors = (out.hidden_states[-1] * mask).sum(1) / mask.sum(1)
    similarity = torch.nn.functional.cosine_similarity(vectors[0:1], vectors[1:], dim=-1)
    assert similarity[0] > 0.6 and similarity[0] > similarity[1] + 0.3, similarity
