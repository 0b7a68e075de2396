"""Several search workers on one study in a real PostgreSQL: the search stage's own workers
(``search.workers``), a worker started apart (``lmpipe search-worker``, as on another machine), one
killed mid-trial, and one whose params differ. A tiny encoder keeps each trial to a few seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from lmpipe.params import write_params
from tests.conftest import BIN, TINY, copy_pipeline_repo, new_repo, pipeline_env, remove, run

pytestmark = [pytest.mark.extended, pytest.mark.services]

N_TRIALS = 10  # a worker process takes ~30 s to start on a busy 2-core CPU: trials enough for it to join
SEARCH = {
    "enabled": True,
    "strategy": "random",
    "pruner": "median",
    "n_trials": N_TRIALS,
    "timeout": None,
    "workers": 2,
    "heartbeat": 2,  # a killed worker's trial is FAIL after 6 s
    "trial": {"max_train_samples": 160, "max_length": 32, "epochs": 2},
    "space": {
        "learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
        "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
    },
}


def study_of(repo, storage) -> optuna.Study:
    best = json.loads((repo / "reports/search/best_params.json").read_text())
    return optuna.load_study(study_name=best["study_name"], storage=storage)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_encoder, postgres):
    """``dvc repro search`` with two workers on a PostgreSQL study."""
    storage = postgres.create_database("two_workers")
    overrides = {
        **TINY,
        "base": {"max_length": 32, "model": str(tiny_encoder)},
        "prepare": {"max_rows": 200},
        "search": {**SEARCH, "storage": storage},
    }
    repo = new_repo(tmp_path_factory.mktemp("workers"), {})
    write_params(repo / "params.yaml", overrides, replace=["search.space"])
    run(["git", "commit", "-qam", "search"], repo)
    result = run(["dvc", "repro", "search"], repo, timeout=600)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    yield repo, storage
    remove(repo)


def test_two_workers_run_exactly_n_trials(searched):
    repo, storage = searched
    trials = study_of(repo, storage).get_trials(deepcopy=False)
    assert len(trials) == N_TRIALS
    assert sorted(t.number for t in trials) == list(range(N_TRIALS))
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, workers  # both workers ran trials


def test_best_params_are_the_storage_best(searched):
    repo, storage = searched
    study = study_of(repo, storage)
    best = json.loads((repo / "reports/search/best_params.json").read_text())
    assert best["trial"] == study.best_trial.number
    assert best["params"] == pytest.approx(study.best_params)
    assert "@" in best["storage"] and "two_workers" in best["storage"]


def test_one_parent_run_and_one_child_per_trial(searched):
    repo, _ = searched
    best = json.loads((repo / "reports/search/best_params.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    parent = client.get_run(best["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["workers"] == "2"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == list(range(N_TRIALS))
    assert len({c.data.tags["worker"] for c in children}) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    stages = client.search_runs([parent.info.experiment_id], filter_string="tags.stage = 'search'")
    assert len(stages) == 1


def test_worker_with_other_params_does_not_join(searched, tmp_path):
    repo, storage = searched
    other = write_params(tmp_path / "params.yaml", {"search": {"n_trials": 9}}, source=repo / "params.yaml")
    result = run(
        [str(BIN / "lmpipe"), "search-worker", "--params", str(other)], repo, check=False, timeout=120
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "params differ" in lines[0], result.stderr
    assert f"search.n_trials 9 here, {N_TRIALS} there" in lines[0]


def test_killed_worker_leaves_a_failed_trial_and_the_study_finishes(searched, postgres, tmp_path):
    """The stage runs one worker, a second one joins from outside and is killed mid-trial. The second
    starts together with the stage (``--wait``), so that it is up before the stage's worker has run
    all the trials."""
    repo = copy_pipeline_repo(
        searched[0], tmp_path / "repo"
    )  # its params change: the others read the original
    storage = postgres.create_database("killed_worker")
    write_params(
        repo / "params.yaml",
        {"search": {"storage": storage, "workers": 1, "n_trials": 8}},
    )
    env = pipeline_env()
    stage = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "search"],
        cwd=repo,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    joined = subprocess.Popen(
        [str(BIN / "lmpipe"), "search-worker", "--wait", "300"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        study = wait_for_study(storage, stage)
        victim = wait_for_running_trial_of(study, joined.pid)
        os.kill(joined.pid, signal.SIGKILL)
        joined.wait()
        out, _ = stage.communicate(timeout=300)
    finally:
        for proc in (stage, joined):
            if proc.poll() is None:
                proc.kill()
    assert stage.returncode == 0, out
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert sorted(trials) == list(range(8))
    assert trials[victim].state.name == "FAIL"
    assert {t.state.name for t in trials.values()} <= {"COMPLETE", "PRUNED", "FAIL"}
    assert f"trial {victim}: FAIL (its worker stopped sending heartbeats" in out


def wait_for_study(storage, stage, timeout=180) -> optuna.Study:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert stage.poll() is None, stage.stdout.read()
        names = optuna.study.get_all_study_names(storage)
        if names:
            study = optuna.load_study(study_name=names[0], storage=storage)
            if "mlflow_run_id" in study.user_attrs:
                return study
        time.sleep(0.5)
    raise TimeoutError("the search stage opened no study")


def wait_for_running_trial_of(study, pid, timeout=180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.user_attrs.get("worker", "").endswith(f":{pid}"):
                return t.number
        time.sleep(0.2)
    raise TimeoutError(f"worker {pid} started no trial")
