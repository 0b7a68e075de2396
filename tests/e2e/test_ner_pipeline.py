"""Token classification through the real pipeline: ``dvc repro evaluate`` with ``base.task:
token_classification`` on a slice of the built-in WNUT 2016 data, with a tiny encoder (its scores are not
the point: the stages, their files, the metrics and the MLflow runs are), and a clear refusal from a
stage that does not carry the task yet."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lmpipe.params import write_params
from tests.conftest import git_commit, new_repo, remove, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ner_repo(tmp_path_factory, tiny_encoder):
    overrides = {
        "base": {"task": "token_classification", "max_length": 32, "model": str(tiny_encoder)},
        "prepare": {"source": "data/builtin/wnut16.yaml", "max_rows": 500},
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 1.0e-3, "logging_steps": 5},
        "search": {
            "enabled": True,
            "n_trials": 2,
            "timeout": None,
            "trial": {"max_train_samples": 120, "max_length": 32, "epochs": 1},
            "space": {"weight_decay": {"type": "float", "low": 0.0, "high": 0.1}},
        },
        "mlflow": {"experiment": "ner"},
    }
    repo = new_repo(tmp_path_factory.mktemp("ner"), {})
    write_params(repo / "params.yaml", overrides, replace=["search.space"])
    git_commit(repo, "ner params")
    result = run(["dvc", "repro", "evaluate"], repo, timeout=900)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    yield repo
    remove(repo)


def test_prepare_and_split_report_sentences_and_entities(ner_repo):
    prepared = json.loads((ner_repo / "reports/prepare/report.json").read_text())
    assert prepared["task"] == "token_classification" and prepared["rows_out"] == 500
    assert prepared["classes"] >= 5 and sum(prepared["entities_per_type"].values()) > 50
    tags = json.loads((ner_repo / "data/prepared/labels.json").read_text())
    assert "O" in tags and all(t == "O" or t[:2] in ("B-", "I-") for t in tags)
    split = json.loads((ner_repo / "reports/split/report.json").read_text())
    assert split["sizes"] == {"train": 400, "val": 50, "test": 50}
    assert set(split["entities_per_type"]) == {"train", "val", "test"}
    assert "split: warning: entity type" in (ner_repo / "repro.log").read_text()  # 50 tweets miss some types


def test_search_scores_trials_on_val_entity_f1(ner_repo):
    best = json.loads((ner_repo / "reports/search/best_params.json").read_text())
    assert set(best["params"]) == {"weight_decay"}
    trials = pd.read_csv(ner_repo / "reports/search/trials.csv")
    assert len(trials) == 2 and trials["value"].between(0, 1).all()


def test_train_selects_on_val_entity_f1_and_saves_a_token_classifier(ner_repo):
    history = pd.read_csv(ner_repo / "reports/train/history.csv")
    assert {"val_macro_f1", "val_f1", "val_accuracy"} <= set(history.columns) and len(history) >= 1
    assert (
        "train: warning: train.epochs 2 is few for token classification"
        in (ner_repo / "repro.log").read_text()
    )
    config = json.loads((ner_repo / "models/model/config.json").read_text())
    assert config["lmpipe_task"] == "token_classification"
    assert config["architectures"] == ["BertForTokenClassification"]


def test_evaluate_scores_entities_against_the_crf_baseline(ner_repo):
    metrics = json.loads((ner_repo / "reports/evaluate/metrics.json").read_text())
    assert set(metrics) == {"model", "baseline", "model_minus_baseline"}
    assert set(metrics["model"]) == {"f1", "macro_f1"}
    report = json.loads((ner_repo / "reports/evaluate/report.json").read_text())
    assert report["baseline"]["f1"] > 0  # the CRF finds some entities after 400 tweets
    diff = report["model_minus_baseline"]
    assert diff["f1_ci95_low"] <= diff["f1"] <= diff["f1_ci95_high"]
    assert 0 <= diff["mcnemar_p"] <= 1
    predictions = pd.read_csv(ner_repo / "reports/evaluate/predictions.csv", keep_default_na=False)
    test = pd.read_parquet(ner_repo / "data/split/test.parquet")
    assert len(predictions) == sum(len(t) for t in test["tokens"])  # one row per word
    wrong = pd.read_csv(ner_repo / "reports/evaluate/misclassified.csv")
    assert list(wrong.columns) == ["id", "errors", "actual", "predicted", "baseline", "text"]
    if len(wrong):  # the misclassified sentences come first in the predictions
        assert str(predictions["id"].iloc[0]) == str(wrong["id"].iloc[0])
    client = MlflowClient(tracking_uri=f"sqlite:///{ner_repo / 'mlflow.db'}")
    run_data = client.get_run(report["mlflow_run_id"]).data
    assert "test_f1" in run_data.metrics and "baseline_test_f1" in run_data.metrics


def test_compress_measures_each_variant_on_entity_f1(ner_repo):
    small = {
        "prune": {"grid": [0.2, 0.5]},
        "distill": {"epochs": 1},
        "latency": {"warmup": 1, "repeats": 3, "batch_size": 4, "batch_repeats": 2},
    }
    write_params(ner_repo / "params.yaml", {"compress": small})
    run(["dvc", "repro", "compress"], ner_repo, timeout=900)
    rows = json.loads((ner_repo / "reports/compress/report.json").read_text())["variants"]
    assert set(rows) == {"original", "int8", "pruned", "student"}
    evaluated = json.loads((ner_repo / "reports/evaluate/metrics.json").read_text())["model"]
    # the original is scored as evaluate scores it: entity macro-F1 over the test sentences
    assert rows["original"]["macro_f1"] == pytest.approx(evaluated["macro_f1"], abs=1e-9)
    for name, row in rows.items():
        assert 0 <= row["macro_f1"] <= 1 and 0 < row["accuracy"] <= 1, name
        assert row["latency_b1_p50_ms"] > 0 and isinstance(row.get("within_budget", True), bool), name
    assert rows["student"]["layers"] == 2 and rows["student"]["kept_layers"] == "1,3"
    for name in ("pruned", "student"):
        config = json.loads((ner_repo / f"models/compress/{name}/config.json").read_text())
        assert config["lmpipe_task"] == "token_classification", name
        assert config["architectures"] == ["BertForTokenClassification"], name
    assert rows["int8"]["size_mb"] < rows["original"]["size_mb"]


def test_a_stage_without_the_task_says_so_in_one_line(ner_repo):
    result = run(["dvc", "repro", "analyze"], ner_repo, check=False, timeout=300)
    assert result.returncode != 0
    assert "analyze: base.task token_classification is not supported by this stage yet" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
