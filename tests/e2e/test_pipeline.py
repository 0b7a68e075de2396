"""The real pipeline: ``dvc repro`` on tiny settings in a temporary copy of the repo, a real MLflow store.

The tests that only read what that run left take the shared ``tiny_repo`` (and the DVC commands' output its
build captured); those that change the repo (re-run a stage, write params, commit, log a run) take
``tiny_repo_copy``, so any order gives the same results."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lmpipe import reports, tracking
from lmpipe.params import write_params
from tests.conftest import captured, check_report_shape, git_commit, run


def report(repo, stage):
    """A stage's full report (its DVC metrics file holds only the headline figures)."""
    return json.loads((repo / "reports" / stage / "report.json").read_text())


def client(repo) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def test_all_stages_ran(tiny_repo):
    log = captured(tiny_repo, "first_repro.log")
    for stage in ("prepare", "split", "search", "train", "evaluate", "analyze", "compress", "export"):
        assert f"Running stage '{stage}'" in log
    assert (tiny_repo / "dvc.lock").is_file()
    # search is off by default: it hands train nothing, and says so
    assert json.loads((tiny_repo / "reports/search/best_params.json").read_text()) == {
        "enabled": False,
        "params": {},
    }
    assert "search: disabled" in log


def test_prepare_and_split_metrics(tiny_repo):
    prep = report(tiny_repo, "prepare")
    assert prep["rows_in"] == 2225 and prep["rows_out"] == 80 and prep["duplicates_removed"] == 100
    assert sum(prep["rows_per_class"].values()) == 80
    assert prep["token_length"]["p50"] > 32 and prep["token_length"]["truncated_fraction"] == 1.0
    sizes = report(tiny_repo, "split")["sizes"]
    assert sizes == {"train": 64, "val": 8, "test": 8}


def test_evaluate_metrics_match_predictions(tiny_repo):
    m = report(tiny_repo, "evaluate")
    assert set(m) >= {"model", "baseline", "mlflow_run_id"}
    for who in ("model", "baseline"):
        assert set(m[who]) == {
            "accuracy",
            "macro_precision",
            "macro_recall",
            "macro_f1",
            "weighted_precision",
            "weighted_recall",
            "weighted_f1",
        }
        assert all(0.0 <= v <= 1.0 for v in m[who].values())
    predictions = pd.read_csv(tiny_repo / "reports/evaluate/predictions.csv")
    assert len(predictions) == 8
    assert m["model"]["accuracy"] == pytest.approx((predictions["actual"] == predictions["predicted"]).mean())
    gap = m["model_minus_baseline"]
    assert gap["macro_f1"] == pytest.approx(m["model"]["macro_f1"] - m["baseline"]["macro_f1"])
    assert gap["macro_f1_ci95_low"] <= gap["macro_f1"] <= gap["macro_f1_ci95_high"]
    assert gap["model_only_right"] + gap["baseline_only_right"] <= len(predictions)
    assert 0 <= gap["mcnemar_p"] <= 1
    prob_cols = [c for c in predictions if c.startswith("p_")]
    assert predictions[prob_cols].sum(axis=1).round(3).eq(1.0).all()
    wrong = pd.read_csv(tiny_repo / "reports/evaluate/misclassified.csv")
    assert len(wrong) == int((~predictions["correct"]).sum())
    assert (wrong["actual"] != wrong["predicted"]).all()
    roc_files = sorted(p.stem for p in (tiny_repo / "reports/evaluate/plots/roc").glob("*.csv"))
    assert roc_files == sorted(json.loads((tiny_repo / "data/prepared/labels.json").read_text()))


def test_model_folder_is_a_complete_save_pretrained(tiny_repo):
    folder = tiny_repo / "models/model"
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()
    config = json.loads((folder / "config.json").read_text())
    labels = json.loads((tiny_repo / "data/prepared/labels.json").read_text())
    assert config["label2id"] == labels
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))


def test_mlflow_runs_are_tagged_and_complete(tiny_repo):
    train_m, eval_m = report(tiny_repo, "train"), report(tiny_repo, "evaluate")
    mlflow = client(tiny_repo)
    commit = run(["git", "rev-parse", "HEAD"], tiny_repo).stdout.strip()

    train_run = mlflow.get_run(train_m["mlflow_run_id"])
    assert train_run.info.status == "FINISHED"
    assert train_run.data.tags["git_commit"] == commit
    assert re.fullmatch(r"[0-9a-f]{12}", train_run.data.tags["params_hash"])
    assert train_run.data.params["train.learning_rate"] == "0.0001"
    assert train_run.data.params["base.max_length"] == "32"
    assert train_run.data.metrics["best_val_macro_f1"] == pytest.approx(train_m["best_val_macro_f1"])
    # per-step loss/learning rate, per-epoch val metrics, and the test scores added by evaluate
    assert len(mlflow.get_metric_history(train_run.info.run_id, "train_loss")) >= 2
    assert len(mlflow.get_metric_history(train_run.info.run_id, "learning_rate")) >= 2
    assert [m.step for m in mlflow.get_metric_history(train_run.info.run_id, "val_macro_f1")] == [1, 2][
        : train_m["epochs_run"]
    ]
    assert train_run.data.metrics["test_macro_f1"] == pytest.approx(eval_m["model"]["macro_f1"])
    artefacts = {a.path for a in mlflow.list_artifacts(train_run.info.run_id, "model")}
    assert "model/model.safetensors" in artefacts
    assert not [a for a in mlflow.list_artifacts(train_run.info.run_id) if "checkpoint" in a.path]

    eval_run = mlflow.get_run(eval_m["mlflow_run_id"])
    assert eval_run.info.status == "FINISHED"
    assert eval_run.data.tags["train_run_id"] == train_run.info.run_id
    assert eval_run.data.tags["params_hash"] == train_run.data.tags["params_hash"]
    assert eval_run.data.metrics["test_macro_f1"] == pytest.approx(eval_m["model"]["macro_f1"])
    assert eval_run.data.metrics["baseline_test_macro_f1"] == pytest.approx(eval_m["baseline"]["macro_f1"])
    plots = {a.path for a in mlflow.list_artifacts(eval_run.info.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/roc.png", "plots/pr.png"} <= plots


def test_dvc_metrics_are_the_headline_of_each_report(tiny_repo):
    shown = json.loads(captured(tiny_repo, "metrics_show.json"))
    (files,) = [entry["data"] for entry in shown.values()]
    stages = ("prepare", "split", "search", "train", "evaluate", "analyze", "compress", "export")
    assert set(files) == {f"reports/{stage}/metrics.json" for stage in stages}
    columns = 0
    for stage in stages:
        shown_metrics = files[f"reports/{stage}/metrics.json"]["data"]
        assert shown_metrics == reports.headline(stage, report(tiny_repo, stage)), stage
        columns += len(tracking.flatten(shown_metrics))
    assert 20 <= columns <= reports.MAX_COLUMNS
    headline = files["reports/evaluate/metrics.json"]["data"]
    assert set(headline) == {"model", "baseline", "model_minus_baseline"} and "mlflow_run_id" not in headline
    assert set(files["reports/compress/metrics.json"]["data"]["variants"]) == {
        "original",
        "int8",
        "pruned",
        "student",
    }
    # export reads the scores alone, without the run ids that change on every evaluate run
    scores = json.loads((tiny_repo / "reports/evaluate/scores.json").read_text())
    evaluated = report(tiny_repo, "evaluate")
    assert scores == {
        k: evaluated[k] for k in ("task", "model", "baseline", "model_minus_baseline", "test_rows")
    }
    # no file is both a params file and a metrics file (dvc exp show then crashes on its filters)
    params = json.loads(captured(tiny_repo, "params_diff.json"))
    assert set(params) == {"params.yaml"}


def test_dvc_plots_render(tiny_repo):
    shown = json.loads(captured(tiny_repo, "plots_show.json"))["data"]
    assert {"Training history", "Test confusion matrix"} <= set(shown)
    classes = json.loads((tiny_repo / "data/prepared/labels.json").read_text())
    for kind in ("roc", "pr"):
        assert {f"reports/evaluate/plots/{kind}/{c}.csv" for c in classes} <= set(shown)
    confusion = shown["Test confusion matrix"][0]["content"]["data"]["values"]
    assert len(confusion) == 8 and {"actual", "predicted"} <= set(confusion[0])


def test_second_repro_is_a_noop(tiny_repo):
    # run by the shared pipeline's build, right after the first
    log = captured(tiny_repo, "noop_repro.log")
    assert "Running stage" not in log and "didn't change, skipping" in log
    assert captured(tiny_repo, "status.txt").strip().endswith("up to date.")


def test_evaluate_param_reruns_only_evaluate(tiny_repo_copy):
    repo = tiny_repo_copy
    write_params(repo / "params.yaml", {"evaluate.batch_size": 3})
    status = run(["dvc", "status"], repo).stdout
    assert "evaluate:" in status and "train:" not in status and "prepare:" not in status
    before = report(repo, "evaluate")
    result = run(["dvc", "repro"], repo)
    ran = re.findall(r"Running stage '(\w+)'", result.stdout)
    after = report(repo, "evaluate")
    assert after["mlflow_run_id"] != before["mlflow_run_id"]
    scores = ("model", "baseline", "model_minus_baseline", "test_rows")
    # export depends on evaluate's scores.json, not on its run id: same scores, same bytes, no export
    assert [before[k] for k in scores] == [after[k] for k in scores]  # batch size changes no prediction
    assert ran == ["evaluate"]
    git_commit(repo, "evaluate batch size")
    # the new run's artefacts are in the copy's own store, not in tiny_repo's
    artifacts = repo / "mlartifacts" / after["mlflow_run_id"] / "artifacts"
    assert client(repo).get_run(after["mlflow_run_id"]).info.artifact_uri == artifacts.as_uri()
    assert (artifacts / "evaluation/predictions.csv").is_file()


def test_same_seed_same_numbers(tiny_repo_copy):
    repo = tiny_repo_copy
    before = report(repo, "evaluate")
    run(["dvc", "repro", "--force", "train", "evaluate"], repo, timeout=600)
    after = report(repo, "evaluate")
    assert after["mlflow_run_id"] != before["mlflow_run_id"]
    assert after["model"] == before["model"]
    assert after["baseline"] == before["baseline"]


def test_failed_stage_marks_run_failed_and_writes_nothing(tiny_repo_copy, tmp_path):
    repo = tiny_repo_copy  # the failed run goes to its store
    broken = tmp_path / "broken-model"
    shutil.copytree(repo / "models/model", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "eval-out"
    result = run(
        [
            "python",
            "stages/evaluate.py",
            "--data",
            "data/split",
            "--model",
            str(broken),
            "--train-report",
            "reports/train/report.json",
            "--out",
            str(out),
        ],
        repo,
        check=False,
    )
    assert result.returncode != 0
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))
    runs = client(repo).search_runs(
        [client(repo).get_experiment_by_name("tiny").experiment_id],
        filter_string="tags.stage = 'evaluate'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    assert runs[0].info.status == "FAILED"
    assert "error" in runs[0].data.tags


def test_runs_of_a_clean_checkout_are_not_dirty(tiny_repo):
    """git_dirty means "the code or params differ from the commit": the pipeline's own outputs, which
    dvc repro rewrites in every fresh clone, do not count."""
    store = client(tiny_repo)
    train_id = report(tiny_repo, "train")["mlflow_run_id"]
    train = store.get_run(train_id)
    assert train.data.tags["git_dirty"] == "false" and "git_changed" not in train.data.tags
    changed = run(["git", "status", "--porcelain"], tiny_repo).stdout
    assert "reports/" in changed or "dvc.lock" in changed  # outputs did change, and were not counted


def test_report_keys_are_pinned(tiny_repo):
    """Every report, metrics and record file keeps its keys and columns (tests/golden/classification.json):
    a refactor that drops or renames one fails here, naming the file and the key."""
    check_report_shape(tiny_repo, "classification.json")
