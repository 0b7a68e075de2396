"""A decoder through the whole classification pipeline: ``dvc repro`` on ``tiny_decoder`` (a 2-layer Llama
with SmolLM2's cased byte-level BPE tokenizer), the shared pipeline's tiny settings, ``train.strategy:
auto``. What differs from the encoder's run: LoRA on q_proj/v_proj by default, a Llama head pooling the
last real token, case perturbations that reach the model, no ONNX Runtime BERT fusions (one line from
``families``), and the plain ONNX graph holding parity with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import AutoConfig

from lmpipe.modeling import families
from lmpipe.serve.serving import OnnxTextClassifier
from tests.conftest import new_repo, remove, run, shared_params

pytestmark = pytest.mark.extended


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_decoder) -> Path:
    overrides = shared_params(tiny_decoder)
    overrides["export"]["registered_model"] = "tiny-decoder-clf"
    overrides["mlflow"] = {"experiment": "decoder"}
    repo = new_repo(tmp_path_factory.mktemp("decoder"), overrides, "tiny decoder")
    result = run(["dvc", "repro"], repo, timeout=600)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    yield repo
    remove(repo)


def report(repo: Path, stage: str) -> dict:
    return json.loads((repo / "reports" / stage / "report.json").read_text())


def test_train_chose_lora_on_the_attention_projections_and_saved_a_llama_classifier(repo):
    train = report(repo, "train")
    assert train["strategy"] == "lora"
    assert 0 < train["trainable_parameters"] < train["parameters"] / 100
    config = json.loads((repo / "models/model/config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 2
    assert not (repo / "models/model/adapter_config.json").exists()  # merged: a plain model folder


def test_evaluate_and_analyze_ran_on_the_decoder(repo):
    scores = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert 0 <= scores["model"]["macro_f1"] <= 1
    analyze = report(repo, "analyze")
    assert analyze["explain"]["samples"] >= 1 and np.isfinite(
        analyze["explain"]["faithfulness"]["comprehensiveness"]
    )
    assert analyze["attack"]["model"]["texts"] >= 1 and analyze["calibration"]["temperature"] > 0
    assert analyze["slices"]["length"]
    robustness = pd.read_csv(repo / "reports/analyze/robustness.csv")
    lower = robustness[(robustness["perturbation"] == "lowercase") & (robustness["strength"] > 0)]
    # SmolLM2's tokenizer is cased: lowering the texts changes what the model reads (MiniLM's would not)
    assert (lower["model_inputs_changed"] > 0).all() and len(lower) == 2
    attributions = pd.read_csv(repo / "reports/analyze/faithfulness.csv")
    assert len(attributions) == analyze["explain"]["samples"]


def test_compress_builds_every_variant_of_the_decoder(repo):
    rows = report(repo, "compress")["variants"]
    assert set(rows) == {"original", "int8", "pruned", "student"}
    for name, row in rows.items():
        assert 0 <= row["macro_f1"] <= 1 and row["latency_b1_p50_ms"] > 0, name
    assert rows["int8"]["size_mb"] < rows["original"]["size_mb"]
    assert rows["pruned"]["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rows["student"]["layers"] == 1 and rows["student"]["kept_layers"] == "1"
    config = json.loads((repo / "models/compress/student/config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_hidden_layers"] == 1


def test_export_serves_the_plain_graph_with_parity_and_says_why_not_the_fused_one(repo):
    export = report(repo, "export")
    fp32 = export["onnx_fp32"]
    assert fp32["ok"] is True and fp32["labels_differing"] == 0 and fp32["max_abs_logit_diff"] <= 1e-4
    assert export["onnx_int8"]["label_agreement"] >= 0
    config = AutoConfig.from_pretrained(str(repo / "models/model"))
    line = families.unsupported(config, "onnx_fusions", "export.optimize")
    assert export["optimize"] == {"skipped": line} and "fp32_opt" not in export["size_mb"]
    assert f"export: {line}" in (repo / "repro.log").read_text()
    assert export["student_onnx_int8"]["label_agreement"] >= 0  # export.compare's student, exported too
    assert not (repo / "models/export/model.opt.onnx").exists()

    # parity recomputed here: PyTorch against ONNX Runtime on the test texts in one right-padded batch
    import torch

    from lmpipe.modeling.models import load_model

    # the test texts fill max_length: two short ones make the batch padded
    texts = [*pd.read_parquet(repo / "data/split/test.parquet")["text"], "A short one", "Tiny"]
    onnx = OnnxTextClassifier(repo / "models/export")
    features = onnx.encode(texts)
    assert set(features) == {"input_ids", "attention_mask"} and (features["attention_mask"] == 0).any()
    with torch.no_grad():
        model = load_model(repo / "models/model").eval()
        expected = model(**{k: torch.from_numpy(v) for k, v in features.items()}).logits.numpy()
    assert np.abs(onnx.logits(features) - expected).max() <= 1e-4


def test_predict_serves_the_decoder_alike_from_onnx_and_pytorch(repo):
    (repo / "in.txt").write_text("Apple unveils a new phone\nThe team scored a late goal to win the match\n")
    run(["lmpipe", "predict", "in.txt", "-o", "onnx.csv"], repo)
    run(["lmpipe", "predict", "in.txt", "-o", "torch.csv", "--backend", "pytorch"], repo)
    onnx, torch_ = pd.read_csv(repo / "onnx.csv"), pd.read_csv(repo / "torch.csv")
    assert len(onnx) == 2 and list(onnx["label"]) == list(torch_["label"])
    proba = [c for c in onnx.columns if c.startswith("p_")]
    assert np.abs(onnx[proba].to_numpy() - torch_[proba].to_numpy()).max() < 1e-4
    refused = run(
        ["lmpipe", "predict", "in.txt", "-o", "opt.csv", "--variant", "fp32_opt"], repo, check=False
    )
    assert refused.returncode != 0 and "--variant: models/export has no fp32_opt model" in refused.stderr
