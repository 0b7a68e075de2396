"""The experiment workflow for real: a queue of tiny experiments run by two DVC queue workers against one
MLflow SQLite store, a failing experiment, `lmpipe compare` on the results, and push/pull through the
default local DVC remote into a fresh clone."""

from __future__ import annotations

import csv
import io
import json
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lmpipe.experiments.runs import experiment_refs
from lmpipe.reports import MAX_COLUMNS
from lmpipe.tracking import flatten
from tests.conftest import (
    BIN,
    ROOT,
    TINY,
    experiments_in,
    git_commit,
    new_repo,
    pipeline_env,
    remove,
    run,
    wait_for_queue,
)

pytestmark = pytest.mark.extended

# none equal to params.yaml's 1e-4: DVC would restore that one from its run cache and log no new run
LEARNING_RATES = ["5e-05", "0.0003"]
FAILING = "bad-fp16"  # train.precision=fp16 has no GPU here: the train stage fails inside its MLflow run


def tiny(encoder) -> dict:
    return {
        "base": {"model": str(encoder), "max_length": 32},
        "prepare": {"max_rows": 60},
        "train": {"epochs": 1, "batch_size": 8, "logging_steps": 2},
        # every experiment runs the whole pipeline: keep its tail cheap (int8 alone: no fine-tunes)
        "compress": {**TINY["compress"], "prune": {"enabled": False}, "distill": {"enabled": False}},
        "export": TINY["export"],
        "mlflow": {"experiment": "queue"},
    }


@pytest.fixture(scope="module")
def queued(tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    repo = new_repo(root / "repo", tiny(tiny_encoder))
    run(["dvc", "repro"], repo, timeout=900)
    git_commit(repo, "baseline run")
    baseline = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()

    # the untracked-file trap is caught before queueing, then the check passes
    (repo / "notes.txt").write_text("not in git")
    trapped = run([str(BIN / "lmpipe"), "queue-check"], repo, check=False)
    (repo / "notes.txt").unlink()
    ok = run([str(BIN / "lmpipe"), "queue-check"], repo, check=False)

    run(["dvc", "exp", "run", "--queue", "-S", f"train.learning_rate={','.join(LEARNING_RATES)}"], repo)
    run(["dvc", "exp", "run", "--queue", "-n", FAILING, "-S", "train.precision=fp16"], repo)
    started = time.monotonic()
    # one thread per worker, as `make queue-start` sets on 2 cores: 2 x 2 threads would oversubscribe them
    run(["dvc", "queue", "start", "--jobs", "2"], repo, env={**pipeline_env(), "OMP_NUM_THREADS": "1"})
    try:
        status = wait_for_queue(repo)
    finally:
        run(["dvc", "queue", "stop"], repo, check=False)
    seconds = time.monotonic() - started
    show = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    yield {
        "repo": repo,
        "root": root,
        "baseline": baseline,
        "trapped": trapped,
        "ok": ok,
        "status": status,
        "seconds": seconds,
        "show": show,
        "exps": experiments_in(show),
    }
    remove(root)


def report_of(repo, name: str, stage: str) -> dict:
    """An experiment's full report of ``stage`` (reports are git-tracked: read from its ref)."""
    (ref,) = experiment_refs(repo)[name]
    return json.loads(run(["git", "show", f"{ref}:reports/{stage}/report.json"], repo).stdout)


def headline(data: dict, stage: str) -> dict:
    return data["metrics"][f"reports/{stage}/metrics.json"]["data"]


def runs_of(repo, stage: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("queue")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.stage = '{stage}'", max_results=100)


def test_queue_check_catches_untracked_files(queued):
    trapped = queued["trapped"]
    assert trapped.returncode == 2
    assert "error: 1 untracked file(s) would be silently left out of queued experiments: notes.txt" in (
        trapped.stderr
    )
    assert "Traceback" not in trapped.stderr
    assert queued["ok"].returncode == 0, queued["ok"].stderr
    assert f"queued runs will log to {queued['repo'] / 'mlflow.db'}" in queued["ok"].stdout


def test_exp_show_lists_every_experiment_with_metrics(queued):
    exps = {n: d for n, d in queued["exps"].items() if n != FAILING}
    assert len(exps) == len(LEARNING_RATES), queued["status"]
    rates = []
    for name, data in exps.items():
        assert 0 <= headline(data, "evaluate")["model"]["accuracy"] <= 1
        assert 0 <= headline(data, "train")["best_val_macro_f1"] <= 1
        assert len(report_of(queued["repo"], name, "train")["mlflow_run_id"]) == 32
        rates.append(data["params"]["params.yaml"]["data"]["train"]["learning_rate"])
    assert sorted(map(float, rates)) == sorted(map(float, LEARNING_RATES))


def readme_sweep_view() -> list[str]:
    """The commands of the README's sweep view (the code block after its `sweep-view` marker)."""
    block = (ROOT / "README.md").read_text().split("<!-- sweep-view -->")[1].split("```")[1]
    lines = [line.split("  #")[0].strip() for line in block.splitlines()[1:]]
    return [line for line in lines if line]


def test_the_sweep_table_is_headline_metrics_and_its_views_run(queued):
    repo, exps = queued["repo"], {n: d for n, d in queued["exps"].items() if n != FAILING}
    for data in [*exps.values(), queued["show"][0]["data"]]:  # every experiment and the baseline
        columns = [c for m in data["metrics"].values() for c in flatten(m["data"])]
        assert len(columns) <= MAX_COLUMNS, columns
        assert not set(data["metrics"]) & set(data["params"])  # no file is both: DVC's filters crash
        assert 0 <= headline(data, "evaluate")["model"]["macro_f1"] <= 1
    # the README's commands, as a user types them, in a 120-column terminal
    env = {**pipeline_env(), "COLUMNS": "120"}
    commands = readme_sweep_view()
    assert any("--only-changed" in c for c in commands) and any("--csv" in c for c in commands)
    for command in commands:
        result = run(["bash", "-c", command.replace("<exp>", sorted(exps)[0])], repo, check=False, env=env)
        assert result.returncode == 0 and "ERROR" not in result.stderr, (command, result.stderr)
        assert len(result.stdout.splitlines()) <= MAX_COLUMNS + 10, (command, result.stdout)
    # DVC's own filter on one headline metric (it crashed while a file was both params and metrics)
    kept = run(["dvc", "exp", "show", "--csv", "--drop", ".*", "--keep", "model.macro_f1"], repo).stdout
    rows = list(csv.DictReader(io.StringIO(kept)))
    assert [c for c in rows[0] if c not in ("Experiment", "rev", "typ", "Created", "parent")] == [
        "model.macro_f1"
    ]
    # (the filter drops the Experiment column too): a value for every experiment and the baseline
    values = [float(row["model.macro_f1"]) for row in rows if row["model.macro_f1"]]
    assert len(values) >= len(exps) + 1 and all(0 <= v <= 1 for v in values), kept
    # --only-changed: the swept param and the headline scores are there, each experiment's a number (the
    # columns are looked up, not looped over: a loop over missing columns would pass on nothing)
    changed = list(
        csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv", "--only-changed"], repo).stdout))
    )
    assert {"train.learning_rate", "model.macro_f1", "best_val_macro_f1"} <= set(changed[0]), list(changed[0])
    for name in exps:
        (row,) = [r for r in changed if r["Experiment"] == name]
        assert 0 <= float(row["model.macro_f1"]) <= 1 and 0 <= float(row["best_val_macro_f1"]) <= 1, row
    assert sorted(float(r["train.learning_rate"]) for r in changed if r["Experiment"] in exps) == sorted(
        float(lr) for lr in LEARNING_RATES
    )


def test_each_experiment_has_one_finished_train_and_evaluate_run(queued):
    repo = queued["repo"]
    exps = {n: d for n, d in queued["exps"].items() if n != FAILING}
    trains, evals = runs_of(repo, "train"), runs_of(repo, "evaluate")
    assert not [r for r in trains + evals if r.info.status == "RUNNING"]
    hashes = set()
    for name, data in exps.items():
        train = [r for r in trains if r.data.tags.get("dvc_exp_name") == name]
        evaluate = [r for r in evals if r.data.tags.get("dvc_exp_name") == name]
        assert [r.info.status for r in train] == ["FINISHED"], name
        assert [r.info.status for r in evaluate] == ["FINISHED"], name
        (train,), (evaluate,) = train, evaluate
        assert train.info.run_id == report_of(repo, name, "train")["mlflow_run_id"]
        assert evaluate.info.run_id == report_of(repo, name, "evaluate")["mlflow_run_id"]
        assert train.data.tags["dvc_exp_baseline_rev"] == queued["baseline"]
        assert train.data.tags["params_hash"] == evaluate.data.tags["params_hash"]
        hashes.add(train.data.tags["params_hash"])
        lr = data["params"]["params.yaml"]["data"]["train"]["learning_rate"]
        assert float(train.data.params["train.learning_rate"]) == float(lr)
        assert train.data.metrics["test_accuracy"] == pytest.approx(
            headline(data, "evaluate")["model"]["accuracy"]
        )
    assert len(hashes) == len(LEARNING_RATES)


def test_nothing_is_tracked_inside_temporary_workspaces(queued):
    repo = queued["repo"]
    artefacts = (repo / "mlartifacts").resolve().as_uri()
    for r in runs_of(repo, "train") + runs_of(repo, "evaluate"):
        assert r.info.artifact_uri.startswith(artefacts), r.info.artifact_uri
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    for r in runs_of(repo, "train"):
        if (
            r.data.tags.get("dvc_exp_name") and r.info.status == "FINISHED"
        ):  # the model outlived its workspace
            assert "model/model.safetensors" in {
                a.path for a in client.list_artifacts(r.info.run_id, "model")
            }
    stray = [p for pattern in ("mlflow.db", "mlruns", "mlartifacts") for p in (repo / ".dvc").rglob(pattern)]
    assert stray == []
    assert not (repo / "mlruns").exists()


def test_a_failed_experiment_leaves_its_log_and_a_failed_run(queued):
    repo = queued["repo"]
    assert any(FAILING in line and "Failed" in line for line in queued["status"].splitlines()), queued[
        "status"
    ]
    logs = run(["dvc", "queue", "logs", FAILING], repo, check=False)
    assert "error: train.precision: fp16 needs a CUDA GPU" in logs.stdout + logs.stderr
    failed = [r for r in runs_of(repo, "train") if r.data.tags.get("dvc_exp_name") == FAILING]
    assert [r.info.status for r in failed] == ["FAILED"]
    assert "fp16 needs a CUDA GPU" in failed[0].data.tags["error"]


def test_compare_experiments_and_runs(queued):
    repo = queued["repo"]
    names = sorted(n for n in queued["exps"] if n != FAILING)
    result = run([str(BIN / "lmpipe"), "compare", *names, "--resamples", "300"], repo)
    report = (repo / "reports/compare/report.md").read_text()
    data = json.loads((repo / "reports/compare/comparison.json").read_text())
    assert [r["label"] for r in data["runs"]] == names
    assert all(r["source"].startswith("DVC experiment") for r in data["runs"])
    assert data["differing_params"] == ["train.learning_rate"]
    pairs = len(names) * (len(names) - 1) // 2  # every two of them
    assert len(data["pairs"]) == pairs and data["test_examples"] == 6
    for r in data["runs"]:
        evaluated = report_of(repo, r["label"], "evaluate")
        assert r["accuracy"]["value"] == pytest.approx(evaluated["model"]["accuracy"])
        assert r["run_id"] == evaluated["mlflow_run_id"]
    assert "## Verdict" in report and result.stdout.count(" pt [") == pairs
    # the same two models named by MLflow run ids (a train run, an evaluate run) give the same numbers
    ids = [
        report_of(repo, names[0], "train")["mlflow_run_id"],
        report_of(repo, names[1], "evaluate")["mlflow_run_id"],
    ]
    run([str(BIN / "lmpipe"), "compare", *ids, "--resamples", "300", "--out", "by-run"], repo)
    by_run = json.loads((repo / "by-run/comparison.json").read_text())
    assert [r["accuracy"]["value"] for r in by_run["runs"]] == [
        r["accuracy"]["value"] for r in data["runs"][:2]
    ]
    assert by_run["runs"][0]["label"] == f"{names[0]}@{ids[0][:8]}"
    assert by_run["pairs"][0]["accuracy"] == data["pairs"][0]["accuracy"]  # same seed, same CIs


def test_push_then_pull_into_a_fresh_clone(queued):
    repo, root = queued["repo"], queued["root"]
    pushed = run(["dvc", "push"], repo)
    storage = root / "lmpipe-dvc-storage"  # the default remote: ../../lmpipe-dvc-storage from .dvc/
    assert storage.is_dir() and any(storage.rglob("*")), pushed.stdout
    clone = root / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], root)
    assert not (clone / "models/model").exists()
    run(["dvc", "pull"], clone)
    assert (clone / "models/model/model.safetensors").read_bytes() == (
        repo / "models/model/model.safetensors"
    ).read_bytes()
    pd.testing.assert_frame_equal(
        pd.read_parquet(clone / "data/split/test.parquet"), pd.read_parquet(repo / "data/split/test.parquet")
    )
    assert "up to date" in run(["dvc", "status"], clone).stdout
    assert "Running stage" not in run(["dvc", "repro"], clone).stdout
