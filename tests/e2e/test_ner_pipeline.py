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
from tests.conftest import check_report_shape, git_commit, new_repo, remove, run, stage_args

pytestmark = pytest.mark.extended


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
        "compress": {
            "prune": {"grid": [0.2, 0.5]},
            "distill": {"epochs": 1},
            "latency": {"warmup": 1, "repeats": 3, "batch_size": 4, "batch_repeats": 2},
        },
        "mlflow": {"experiment": "ner"},
    }
    repo = new_repo(tmp_path_factory.mktemp("ner"), {})
    write_params(repo / "params.yaml", overrides, replace=["search.space"])
    git_commit(repo, "ner params")
    # every stage once, here: each test reads what it needs, so any one of them runs alone
    result = run(["dvc", "repro"], repo, timeout=1200)
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
    # the tiny tagger gets some of the 50 test sentences wrong; those come first in the predictions
    assert len(wrong) > 0 and str(predictions["id"].iloc[0]) == str(wrong["id"].iloc[0])
    client = MlflowClient(tracking_uri=f"sqlite:///{ner_repo / 'mlflow.db'}")
    run_data = client.get_run(report["mlflow_run_id"]).data
    assert "test_f1" in run_data.metrics and "baseline_test_f1" in run_data.metrics


def test_compress_measures_each_variant_on_entity_f1(ner_repo):
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


def test_analyze_calibrates_words_and_perturbs_them_in_place(ner_repo):
    report = json.loads((ner_repo / "reports/analyze/report.json").read_text())
    cal = report["calibration"]
    assert cal["temperature"] > 0 and cal["words"] > 100
    assert {"model", "model_scaled", "baseline"} <= set(cal) and 0 <= cal["baseline"]["ece"] <= 1
    calibration = json.loads((ner_repo / "models/calibration.json").read_text())
    assert calibration["temperature"] == cal["temperature"] and calibration["fitted_on"] == "val"
    # the test params perturb with char_noise, lowercase and window_shift: the last changes the words
    assert set(report["robustness"]["perturbations"]) == {"char_noise@0.1", "lowercase@1"}
    assert set(report["robustness"]["skipped"]) == {"window_shift"}
    robust = pd.read_csv(ner_repo / "reports/analyze/robustness.csv")
    assert set(robust["predictor"]) == {"model", "baseline"} and robust["macro_f1"].between(0, 1).all()
    lowered = robust[(robust["perturbation"] == "lowercase") & (robust["strength"] == 1.0)]
    # MiniLM's tokenizer is uncased: lower-casing changes no input, so no entity of the model's
    assert lowered.set_index("predictor").loc["model", "flip_rate"] == 0.0
    by_type = pd.read_csv(ner_repo / "reports/analyze/slices_class.csv")
    assert (by_type["f1_ci95_low"] <= by_type["f1"]).all() and (
        by_type["f1"] <= by_type["f1_ci95_high"]
    ).all()
    attack = pd.read_csv(ner_repo / "reports/analyze/attack.csv")
    assert attack["note"].iloc[0].startswith("not for token classification")


def test_export_serves_entities_with_character_offsets(ner_repo):
    import mlflow

    report = json.loads((ner_repo / "reports/export/report.json").read_text())
    assert report["task"] == "token_classification"
    assert report["onnx_fp32"]["ok"] and report["onnx_fp32"]["labels_differing"] == 0
    assert report["onnx_fp32"]["max_abs_logit_diff"] < 1e-3
    # ONNX fp32 tags every test word as PyTorch does: the same entity scores as evaluate's
    evaluated = json.loads((ner_repo / "reports/evaluate/metrics.json").read_text())["model"]
    assert report["onnx_fp32"]["macro_f1"] == pytest.approx(evaluated["macro_f1"], abs=1e-9)
    assert 0 < report["onnx_int8"]["label_agreement"] <= 1
    assert set(report["latency"]) == {"pytorch_fp32", "onnx_fp32", "onnx_int8"}
    card = (ner_repo / "models/export/MODEL_CARD.md").read_text()
    assert "named-entity tagger" in card and "CRF baseline" in card
    assert "export: ONNX fp32 max |dlogit|" in (ner_repo / "repro.log").read_text()

    # the registered model: texts in, entities with character offsets out
    mlflow.set_tracking_uri(f"sqlite:///{ner_repo / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(report["registry"]["model_uri"])
    test = pd.read_parquet(ner_repo / "data/split/test.parquet")
    texts = test["text"].tolist()
    output = served.predict(texts)
    assert len(output) == len(texts)
    # what the served model finds is, entity for entity, what the exported folder's tagger finds
    from lmpipe.serve.serving import OnnxEntityTagger

    tagger = OnnxEntityTagger(ner_repo / "models/export")
    fields = ("type", "start", "end", "text")
    assert [[tuple(getattr(e, f) for f in fields) for e in tagged.entities] for tagged in output] == [
        [tuple(e[f] for f in fields) for e in found] for found in tagger.entities(texts)
    ]
    example = report["served"]["example"]
    assert example["entities"] == tagger.entities([example["text"]])[0]

    # the tiny tagger may find no entity at all: the character offsets are checked on the same tagger
    # with its B-<first type> logit raised, so that every word it reads is an entity of its own
    class EveryWord(OnnxEntityTagger):
        def logits(self, features):
            out = super().logits(features).copy()
            out[..., self.labels.index(first_b)] += 1e3
            return out

    first_b = next(t for t in tagger.labels if t.startswith("B-"))
    eager = EveryWord(ner_repo / "models/export")
    found = eager.entities(texts)
    assert sum(map(len, found)) >= len(texts)
    for text, entities in zip(texts, found, strict=True):
        words = text.split()
        assert 1 <= len(entities) <= len(words)
        for entity in entities:
            assert text[entity["start"] : entity["end"]] == entity["text"] and entity["type"] == first_b[2:]
            assert entity["text"].strip() == entity["text"] and 0 < entity["score"] <= 1
        assert [e["text"] for e in entities] == words[: len(entities)]  # word after word, in order
    # the registered model and its version name the task
    client = MlflowClient(tracking_uri=f"sqlite:///{ner_repo / 'mlflow.db'}")
    name, version = report["registry"]["name"], report["registry"]["version"]
    assert client.get_registered_model(name).tags["task"] == "token_classification"
    assert client.get_model_version(name, version).tags["task"] == "token_classification"


def test_export_refuses_a_registered_name_that_holds_another_task(ner_repo, tmp_path):
    uri = f"sqlite:///{ner_repo / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).create_registered_model(
        "news-topics", tags={"task": "classification"}
    )
    params = write_params(
        tmp_path / "params.yaml", {"export.registered_model": "news-topics"}, ner_repo / "params.yaml"
    )
    out = {"--out": tmp_path / "export", "--metrics": tmp_path / "m.json", "--report": tmp_path / "r.json"}
    replace = {"--params": str(params), **{flag: str(path) for flag, path in out.items()}}
    cmd = ["python", "stages/export.py", *stage_args(ner_repo, "export", replace)]  # a real process
    result = run(cmd, ner_repo, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: export.registered_model: 'news-topics' holds classification models, and this is a "
        "token_classification model; give it a registered model name of its own"
    ]
    assert not any(p.exists() for p in out.values())


def test_predict_writes_entities(ner_repo, tmp_path):
    from tests.conftest import BIN

    texts = tmp_path / "tweets.txt"
    texts.write_text("Going to New York with Barack Obama tomorrow\nnothing here\n")
    out = tmp_path / "entities.jsonl"
    run(
        [str(BIN / "lmpipe"), "predict", str(texts), "--model", "models/export", "--output", str(out)],
        ner_repo,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == [1, 2]
    lines = texts.read_text().splitlines()
    assert all(set(row) == {"row", "entities", "truncated"} for row in rows)
    # the exported folder's own tagging, entity for entity (offsets: test_export_serves_entities_...)
    from lmpipe.serve.serving import OnnxEntityTagger

    expected = OnnxEntityTagger(ner_repo / "models/export").entities(lines)
    assert [
        [{k: e[k] for k in ("type", "start", "end", "text")} for e in row["entities"]] for row in rows
    ] == [[{k: e[k] for k in ("type", "start", "end", "text")} for e in found] for found in expected]


def test_report_keys_are_pinned(ner_repo):
    """Every report, metrics and record file keeps its keys and columns (tests/golden/token_classification.json)."""
    check_report_shape(ner_repo, "token_classification.json")
