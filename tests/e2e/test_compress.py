"""The compress stage through the real ``dvc repro``, on the tiny 4-layer encoder: every variant is built,
saved, reloaded and measured, and the values in the table are checked against the saved models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from lmpipe.params import write_params
from tests.conftest import captured, run_stage_in_process, stage_args

VARIANTS = ("original", "int8", "pruned", "student")


@pytest.fixture(scope="module")
def repo(tiny_repo):
    """The shared tiny pipeline (tests/conftest.py, ``shared_params``: prune 0.5 with a recovery epoch, a
    one-epoch student, one thread for the latency figures). Read it only."""
    return tiny_repo


def table(repo) -> dict:
    return json.loads((repo / "reports/compress/report.json").read_text())


def texts(repo) -> list[str]:
    return pd.concat(pd.read_parquet(repo / f"data/split/{s}.parquet") for s in ("train", "val", "test"))[
        "text"
    ].tolist()


def test_table_has_every_variant_with_consistent_values(repo):
    metrics = table(repo)
    rows = metrics["variants"]
    assert list(rows) == list(VARIANTS)
    original = rows["original"]
    for name, row in rows.items():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1
        assert row["delta_macro_f1"] == pytest.approx(row["macro_f1"] - original["macro_f1"])
        assert row["delta_accuracy"] == pytest.approx(row["accuracy"] - original["accuracy"])
        assert row["latency_b1_p95_ms"] >= row["latency_b1_p50_ms"] > 0
        assert row["latency_b4_p95_ms"] >= row["latency_b4_p50_ms"] > 0
        assert row["throughput_b4_per_s"] == pytest.approx(4 / (row["latency_b4_p50_ms"] / 1000), rel=0.01)
        assert row["wall_speedup_b1"] == pytest.approx(
            original["latency_b1_p50_ms"] / row["latency_b1_p50_ms"], rel=0.01
        )
        assert row["cpu_speedup_b1"] == pytest.approx(original["cpu_b1_ms"] / row["cpu_b1_ms"], rel=0.01)
        # the speed-up shown is the one the busy check trusts (the tests' other worker may be busy)
        assert row["speedup_b1"] == row[f"{metrics['speedup_basis']}_speedup_b1"]
        assert 0 < row["nonzero_parameters"] <= row["parameters"], name
    assert original["delta_macro_f1"] == 0 and original["speedup_b1"] == 1
    assert metrics["latency_reliable"] == (metrics["other_load"] <= 0.25)
    assert metrics["speedup_basis"] == ("wall" if metrics["latency_reliable"] else "cpu")
    # the original's scores are the evaluate stage's scores for the same model and test split
    evaluated = json.loads((repo / "reports/evaluate/report.json").read_text())["model"]
    assert original["macro_f1"] == pytest.approx(evaluated["macro_f1"])
    assert original["accuracy"] == pytest.approx(evaluated["accuracy"])
    setup = metrics["latency_setup"]
    assert setup == {**setup, "device": "cpu", "threads": 1, "max_length": 32, "repeats_b1": 5}


def test_int8_is_stored_without_pickles_and_agrees_with_the_original(repo):
    from lmpipe.compress.compression import load_int8
    from lmpipe.modeling.inference import predict_proba, predict_proba_model
    from lmpipe.modeling.models import load_tokenizer

    folder = repo / "models/compress/int8"
    assert {p.name for p in folder.iterdir()} >= {"int8.safetensors", "quantization.json", "config.json"}
    assert not [p for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    tensors = load_file(folder / "int8.safetensors")
    int8 = [k for k, v in tensors.items() if v.dtype == torch.int8]
    # 4 layers x (q, k, v, attention out, intermediate, output) + pooler + classifier
    assert len(int8) == 4 * 6 + 2
    recipe = json.loads((folder / "quantization.json").read_text())
    assert recipe["quantized_linear_layers"] == 26 and "embeddings" in recipe["kept_fp32"]
    rows = table(repo)["variants"]
    assert rows["int8"]["size_mb"] < rows["original"]["size_mb"]
    assert rows["int8"]["parameters"] == rows["original"]["parameters"]

    every = texts(repo)
    original, _ = predict_proba(repo / "models/model", every, 32, 64)
    quantized, _ = predict_proba_model(load_int8(folder), load_tokenizer(folder), every, 32, 64)
    # the tiny model barely learns in one epoch, so its predictions may be nearly constant and their
    # agreement easy: the probabilities must also be close (tests/code checks a model with varied outputs)
    agreement = float((original.argmax(1) == quantized.argmax(1)).mean())
    assert agreement >= 0.9, agreement
    assert 0 < np.abs(original - quantized).max() < 0.05


def test_pruned_sparsity_is_measured_in_the_saved_weights(repo):
    row = table(repo)["variants"]["pruned"]
    weights = load_file(repo / "models/compress/pruned/model.safetensors")
    encoder = [
        v
        for k, v in weights.items()
        if k.startswith("bert.encoder.") and k.endswith(".weight") and v.ndim == 2
    ]
    assert len(encoder) == 4 * 6  # the encoder's layers; the pooler and the classifier (the head) stay dense
    assert int((weights["bert.pooler.dense.weight"] == 0).sum()) == 0
    zeros = sum(int((v == 0).sum()) for v in encoder) / sum(v.numel() for v in encoder)
    assert zeros == pytest.approx(0.5, abs=0.005)  # still 50% after the recovery fine-tune
    assert row["measured_sparsity"] == pytest.approx(zeros)
    assert row["target_sparsity"] == 0.5
    assert row["recovery_epochs_run"] == 1
    original = table(repo)["variants"]["original"]
    assert original["nonzero_parameters"] - row["nonzero_parameters"] == pytest.approx(
        sum(v.numel() for v in encoder) * 0.5, rel=0.02
    )


def test_student_keeps_every_other_layer(repo):
    folder = repo / "models/compress/student"
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["distilled_from_layers"] == [1, 3]
    weights = load_file(folder / "model.safetensors")
    layers = {k.split(".")[3] for k in weights if k.startswith("bert.encoder.layer.")}
    assert layers == {"0", "1"}
    rows = table(repo)["variants"]
    assert rows["student"]["layers"] == 2 and rows["original"]["layers"] == 4
    assert rows["student"]["parameters"] < rows["original"]["parameters"]
    # the embeddings come from the teacher unchanged in shape; the student is a loadable classifier
    teacher = load_file(repo / "models/model/model.safetensors")
    key = "bert.embeddings.word_embeddings.weight"
    assert weights[key].shape == teacher[key].shape


def test_mlflow_parent_with_a_child_per_variant(repo):
    metrics = table(repo)
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    parent = client.get_run(metrics["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["stage"] == "compress"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {c.data.tags["variant"]: c for c in children}
    assert set(by_name) == set(VARIANTS)
    for name, row in metrics["variants"].items():
        child = by_name[name]
        assert child.info.run_id == row["mlflow_run_id"] and child.info.status == "FINISHED"
        assert child.data.metrics["macro_f1"] == pytest.approx(row["macro_f1"])
        assert child.data.metrics["latency_b1_p50_ms"] == pytest.approx(row["latency_b1_p50_ms"])
        if name != "original":  # each variant's budget verdict is on its run, as a metric and a tag
            assert child.data.metrics["within_budget"] == int(row["within_budget"])
            assert child.data.tags["within_budget"] == str(row["within_budget"]).lower()
            assert child.data.metrics["val_f1_loss"] == pytest.approx(row["val_f1_loss"])
    student = by_name["student"]
    assert student.data.params["distill.temperature"] == "2.0"
    assert student.data.params["distill.alpha"] == "0.5"
    assert len(client.get_metric_history(student.info.run_id, "train_loss")) >= 2
    assert [m.step for m in client.get_metric_history(student.info.run_id, "val_macro_f1")] == [1]
    assert {a.path for a in client.list_artifacts(student.info.run_id, "model")} >= {
        "model/model.safetensors"
    }
    assert len(client.get_metric_history(by_name["pruned"].info.run_id, "train_loss")) >= 1


def test_pareto_plot_and_second_repro(repo):
    points = pd.read_csv(repo / "reports/compress/pareto.csv")
    rows = table(repo)["variants"]
    assert points["variant"].tolist() == list(VARIANTS)
    assert points["latency_b1_p50_ms"].tolist() == [rows[v]["latency_b1_p50_ms"] for v in VARIANTS]
    fastest = points["latency_b1_p50_ms"].idxmin()
    assert points.loc[fastest, "pareto"]
    assert table(repo)["pareto"] == points.loc[points["pareto"], "variant"].tolist()
    shown = json.loads(captured(repo, "plots_show.json"))["data"]
    assert "Compression trade-off (macro-F1 vs batch-1 CPU latency)" in shown
    assert "Stage 'compress' didn't change, skipping" in captured(repo, "noop_repro.log")


def test_bad_keep_layers_fail_in_one_line_before_any_work(repo, tmp_path):
    # in this process (the stage script through runpy): the check comes before any model is loaded
    params = write_params(
        tmp_path / "params.yaml", {"compress.distill.keep_layers": [1, 7]}, repo / "params.yaml"
    )
    outputs = {flag: str(tmp_path / name) for flag, name in
               [("--out", "out"), ("--metrics", "m.json"), ("--report", "r.json"), ("--plot", "p.csv"),
                ("--prune-curve", "c.csv")]}  # fmt: skip
    code, stderr = run_stage_in_process(
        repo, "compress", stage_args(repo, "compress", {"--params": str(params), **outputs})
    )
    assert code == 2
    lines = stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("error: compress.distill.keep_layers: [7]"), stderr
    assert not any(Path(path).exists() for path in outputs.values())
