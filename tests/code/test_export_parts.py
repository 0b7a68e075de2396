"""Fast checks of the export pieces: params, the promotion gate, parity and timing maths, input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmpipe.errors import ParamsError, UserError
from lmpipe.latency import BLOCK, summary, time_interleaved
from lmpipe.params import GateParams, load_params, write_params
from lmpipe.serve.onnx_export import parity_report
from lmpipe.serve.predict import read_text_file
from lmpipe.serve.promotion import decide
from lmpipe.serve.serving import InputError, softmax, texts_from_input

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ params
def test_export_params_load():
    cfg = load_params(ROOT / "params.yaml").export
    assert cfg.source == "model" and cfg.registered_variant in {"fp32", "int8", "fp32_opt", "int8_opt"}
    assert cfg.optimize is True and cfg.compare == ["student"]
    assert cfg.max_logit_diff == pytest.approx(1e-4) and cfg.min_int8_agreement == pytest.approx(0.99)
    assert 1 in cfg.latency.batch_sizes and 32 in cfg.latency.batch_sizes
    assert cfg.gate.baseline == "ci" and cfg.gate.min_macro_f1 is None  # relative by default
    assert cfg.allow_over_budget == []


@pytest.mark.parametrize(
    ("export", "key", "fragment"),
    [
        ({"source": "int8"}, "export.source", "must be one of model, pruned, student"),
        ({"registered_variant": "fp16"}, "export.registered_variant", "must be one of"),
        ({"opset": 11}, "export.opset", "between 18 and 23"),
        ({"max_logit_diff": 0}, "export.max_logit_diff", "must be > 0"),
        ({"min_int8_agreement": 1.5}, "export.min_int8_agreement", "between 0 and 1"),
        ({"registered_model": "a/b"}, "export.registered_model", "without '/'"),
        ({"latency.repeats": 1}, "export.latency.repeats", "must be >= 2"),
        ({"latency.batch_sizes": [1, 0]}, "export.latency.batch_sizes", ">= 1"),
        ({"gate.min_macro_f1": 2}, "export.gate.min_macro_f1", "between 0 and 1"),
        ({"gate.baseline": "yes"}, "export.gate.baseline", "must be one of ci, point, none"),
        ({"allow_over_budget": ["prunned"]}, "export.allow_over_budget", "['prunned'] not compress variants"),
        ({"compare": ["int8"]}, "export.compare", "['int8'] not compress variants"),
        (
            {"optimize": False, "registered_variant": "int8_opt"},
            "export.registered_variant",
            "needs export.optimize",
        ),
        ({"gate.min_f1": 0.5}, "export.gate.min_f1", "unknown key"),
    ],
)
def test_bad_export_params_are_named(tmp_path, export, key, fragment):
    adds = fragment == "unknown key"  # that case adds a key on purpose
    path = write_params(tmp_path / "params.yaml", {"export": export}, ROOT / "params.yaml", allow_new=adds)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert err.value.key == key and fragment in str(err.value)


# ------------------------------------------------------------------------------------------------ gate
GATE = GateParams(baseline="ci", min_macro_f1=None)  # the default: relative criteria only


def versus(diff: float, low: float, high: float, baseline: float = 0.80) -> dict:
    return {
        "macro_f1": diff,
        "macro_f1_ci95_low": low,
        "macro_f1_ci95_high": high,
        "baseline_macro_f1": baseline,
    }


def test_default_gate_needs_the_ci_above_zero_not_an_absolute_score():
    # the user data: +10.8 pt over the baseline, CI [+7.1, +14.6], test macro-F1 0.762 (< BBC's 0.9)
    d = decide(0.762, versus(0.108, 0.071, 0.146, 0.654), GATE)
    assert d.passed and d.aliases == ["challenger", "champion"]
    assert "beats the baseline beyond test noise: +10.80 pt" in d.reasons[0]
    # a higher point estimate whose CI crosses 0 is test noise: not promoted, and the reason says why
    d = decide(0.95, versus(0.01, -0.01, 0.03, 0.94), GATE)
    assert not d.passed and d.aliases == []
    assert d.reasons[0].startswith("FAIL: does not beat the baseline beyond test noise (CI low <= 0)")


def test_point_gate_and_opt_in_absolute_floor():
    point = GateParams(baseline="point", min_macro_f1=None)
    assert decide(0.95, versus(0.01, -0.01, 0.03), point).passed
    d = decide(0.95, versus(0.0, -0.02, 0.02), point)
    assert not d.passed and d.reasons[0].startswith("FAIL: does not beat the baseline: +0.00 pt")
    floor = GateParams(baseline="none", min_macro_f1=0.9)
    d = decide(0.85, versus(-0.1, -0.2, 0.0), floor)
    assert not d.passed and d.reasons == ["FAIL: macro-F1 0.8500 < min_macro_f1 0.9000"]
    assert decide(0.1, versus(-0.8, -0.9, -0.7), GateParams(baseline="none", min_macro_f1=None)).passed


WIN = versus(0.05, 0.02, 0.08)


@pytest.mark.parametrize(
    ("champion_f1", "aliases"),
    [(0.96, ["challenger"]), (0.95, ["challenger"]), (0.94, ["challenger", "champion"])],
)
def test_champion_only_when_strictly_better_on_the_same_split(champion_f1, aliases):
    d = decide(0.95, WIN, GATE, champion_macro_f1=champion_f1, champion_version="3")
    assert d.passed and d.aliases == aliases
    assert "champion v3" in d.reasons[-1]


def test_unscorable_champion_keeps_the_candidate_challenger():
    d = decide(0.95, WIN, GATE, champion_macro_f1=None, champion_version="2")
    assert d.aliases == ["challenger"] and "cannot be scored" in d.reasons[-1]


def test_extra_checks_can_fail_the_gate():
    d = decide(0.95, WIN, GATE, checks=[(False, "int8 label agreement 0.9800 vs min_int8_agreement 0.99")])
    assert not d.passed and d.reasons[-1].startswith("FAIL: int8 label agreement")


# ------------------------------------------------------------------------------------- parity and timing
def test_parity_report_measures_difference_and_agreement():
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 3.0, 0.0], [0.5, 0.4, 0.0]])
    cand = ref.copy()
    cand[3] = [0.3, 0.45, 0.0]  # flips the last label, largest difference 0.2
    report = parity_report(ref, cand, y_true=np.array([0, 2, 1, 0]))
    assert report["max_abs_logit_diff"] == pytest.approx(0.2)
    assert report["label_agreement"] == pytest.approx(0.75) and report["labels_differing"] == 1
    assert report["accuracy"] == pytest.approx(0.75)


def test_time_interleaved_warms_up_then_rotates_blocks_of_the_cases(monkeypatch):
    from lmpipe import latency

    monkeypatch.setattr(latency, "SETTLE_S", 0.0)  # one settling call per block (they last >= SETTLE_S)
    calls = []
    timed = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, 7)
    assert BLOCK == 5
    # warm-up, then per round each case's settling call and its block (5, then the 2 left), rotated
    assert calls == ["a", "a", "b", "b"] + ["a"] * 6 + ["b"] * 6 + ["b"] * 3 + ["a"] * 3
    for measured in (timed.wall, timed.cpu):
        assert set(measured) == {"a", "b"} and all(len(s) == 7 and (s >= 0).all() for s in measured.values())
    assert timed.returned == {"a": [None] * 7, "b": [None] * 7}  # what each timed call returned
    assert all(0 <= share <= 1 for share in timed.other_load.values())  # /proc/stat exists here
    ms = summary(np.array([0.010, 0.020, 0.030, 0.040, 0.050]), 1, cpu=np.array([0.02, 0.04]))
    assert ms == {
        "latency_b1_p50_ms": 30.0,
        "latency_b1_p95_ms": 48.0,
        "throughput_b1_per_s": 33.33,
        "cpu_b1_ms": 30.0,  # the mean CPU time per call
    }


def test_softmax_rows_sum_to_one():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    assert np.allclose(p.sum(axis=1), 1) and p[0, 0] == pytest.approx(1.0) and p[1, 0] == pytest.approx(0.5)


# -------------------------------------------------------------------------------------- model inputs
def test_model_input_shapes():
    assert texts_from_input(["a", "b"]) == ["a", "b"]
    assert texts_from_input(pd.DataFrame({"text": ["a"], "other": [1]})) == ["a"]
    assert texts_from_input(pd.DataFrame({"body": ["x", "y"]})) == ["x", "y"]
    assert texts_from_input(np.array(["q"])) == ["q"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["ok", ""], "row 2: text is empty"),
        (["ok", "  "], "row 2: text is empty"),
        ([5], "row 1: text must be a string, got int 5"),
        (["a", None], "row 2: text is missing"),
        ([], "input holds no texts"),
        (pd.DataFrame({"a": ["x"], "b": ["y"]}), "needs a 'text' column"),
        (3.0, "must be a list of texts"),
    ],
)
def test_bad_model_input_names_the_row(value, message):
    with pytest.raises(InputError, match=message):
        texts_from_input(value)


# --------------------------------------------------------------------------------------- predict files
def test_read_texts_csv_jsonl_txt(tmp_path):
    (tmp_path / "a.csv").write_text('id,text\n1,first text\n2,"second, quoted"\n')
    assert read_text_file(tmp_path / "a.csv") == ([1, 2], ["first text", "second, quoted"])
    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n')
    assert read_text_file(tmp_path / "a.jsonl", "body") == ([1, 3], ["one", "two"])
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert read_text_file(tmp_path / "a.txt") == ([1, 2], ["line one", "line two"])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.csv", 'text\nok\n""\n', "e.csv: row 2: text is empty"),
        ("e.txt", "ok\n\nmore\n", "e.txt: line 2: text is empty"),
        ("n.jsonl", '{"text": "ok"}\n{"text": 7}\n', "n.jsonl: line 2: text must be a string, got int 7"),
        ("m.jsonl", '{"text": null}\n', "m.jsonl: line 1: text is missing"),
        ("c.csv", "body\nok\n", "c.csv: column 'text' not found (columns: body)"),
        ("k.jsonl", '{"body": "x"}\n', "k.jsonl: line 1: key 'text' not found (keys: body)"),
        ("j.jsonl", '{"text": "x"\n', "j.jsonl: line 1: not valid JSON"),
        ("l.jsonl", '["x"]\n', "l.jsonl: line 1: expected a JSON object, got list"),
        ("x.parquet", "", "unsupported input type '.parquet'"),
        ("empty.txt", "", "empty.txt: no texts to score"),
    ],
)
def test_bad_predict_input_names_file_and_row(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError) as err:
        read_text_file(tmp_path / name)
    assert message in str(err.value)


def test_unreadable_predict_input(tmp_path):
    with pytest.raises(UserError, match="missing.csv: file not found"):
        read_text_file(tmp_path / "missing.csv")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(UserError, match="dir.csv: is a directory"):
        read_text_file(tmp_path / "dir.csv")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.txt: not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        read_text_file(tmp_path / "latin.txt")


# ------------------------------------------------------------------------ ONNX Runtime's transformer fusions
@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A tiny BERT classifier built from a config (random weights, seeded) with MiniLM's tokenizer."""
    import torch
    from transformers import BertForSequenceClassification

    from lmpipe.modeling.models import load_tokenizer, resolve_model_dir
    from tests.conftest import tiny_bert_config

    tokenizer = load_tokenizer(resolve_model_dir("all-MiniLM-L6-v2"))
    config = tiny_bert_config(tokenizer.vocab_size, max_position_embeddings=512)
    config.num_labels, config.id2label = 3, {0: "a", 1: "b", 2: "c"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-classifier")
    BertForSequenceClassification(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_optimized_graph_is_fused_and_holds_parity(tiny_classifier, tmp_path):
    import onnx
    import torch

    from lmpipe.modeling.models import load_model
    from lmpipe.serve.onnx_export import (
        fused_ops,
        nodes_of_modules,
        optimize_onnx,
        quantize_onnx_int8,
        write_classifier_folder,
    )
    from lmpipe.serve.serving import FP32_FILE, OPT_FILE, OPT_INT8_FILE, OnnxTextClassifier

    write_classifier_folder(tiny_classifier, tmp_path, max_length=32, opset=18)
    stats = optimize_onnx(tiny_classifier, tmp_path, max_length=32, opset=18)
    layers = load_model(tiny_classifier).config.num_hidden_layers
    # one fused Attention per layer, and a SkipLayerNormalization after attention and feed-forward
    assert stats["Attention"] == layers and stats["SkipLayerNormalization"] == 2 * layers
    assert stats == fused_ops(tmp_path / OPT_FILE) and fused_ops(tmp_path / FP32_FILE) == {}
    # the same inputs as model.onnx, and PyTorch's logits at other batch sizes and lengths than traced
    texts = ["a much longer text than the one traced, " * 3, "short", "a middling one here"]
    plain, fused = OnnxTextClassifier(tmp_path), OnnxTextClassifier(tmp_path, OPT_FILE)
    assert fused.input_names == plain.input_names
    model = load_model(tiny_classifier).eval()
    for batch in ([texts[0]], texts):
        features = fused.encode(batch)
        with torch.inference_mode():
            ref = model(**{k: torch.from_numpy(v) for k, v in features.items()}).logits.numpy()
        assert np.abs(fused.logits(features) - ref).max() <= 1e-4
    # int8 from the fused graph: a classifier file like the others
    quantize_onnx_int8(tmp_path, source=OPT_FILE, target=OPT_INT8_FILE)
    int8 = OnnxTextClassifier(tmp_path, OPT_INT8_FILE)
    assert int8.predict_proba(texts).shape == (3, 3)
    # layers compress kept fp32 stay fp32 there too, though the optimiser rebuilt their nodes without
    # module scopes: found by their weights (a MatMul; a query inside a fused Attention)
    keep = ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.attention.self.query"]
    with pytest.raises(ValueError, match="no MatMul/Gemm node"):
        nodes_of_modules(tmp_path / OPT_FILE, keep)  # no scopes without the plain graph beside it
    nodes = nodes_of_modules(tmp_path / OPT_FILE, keep, tmp_path / FP32_FILE)
    assert len(nodes) == 2 and nodes[1].startswith("Attention"), nodes
    quantize_onnx_int8(tmp_path, keep, OPT_FILE, OPT_INT8_FILE)
    graph = onnx.load(str(tmp_path / OPT_INT8_FILE)).graph
    kept = {n.name: n.op_type for n in graph.node if n.name in nodes}
    assert kept == {nodes[0]: "MatMul", nodes[1]: "Attention"}, kept  # not MatMulInteger, QAttention
    assert any(n.op_type == "QAttention" for n in graph.node)  # the other layer's attention is int8
    assert OnnxTextClassifier(tmp_path, OPT_INT8_FILE).predict_proba(texts).shape == (3, 3)


def test_optimize_skips_other_model_types(tmp_path):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from lmpipe.serve.onnx_export import optimize_onnx

    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    assert "distilbert" in optimize_onnx(tmp_path, tmp_path / "out", max_length=8, opset=18)["skipped"]
