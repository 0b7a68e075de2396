"""Where runs land, and SQLite under concurrent writers: real MLflow, no mocks."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmpipe import tracking


def test_repo_root_is_dvc_root_when_dvc_sets_it(tmp_path, monkeypatch):
    original = tmp_path / "repo"
    (original / ".dvc").mkdir(parents=True)
    copy = original / ".dvc/tmp/exps/tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(original))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.repo_root() == original.resolve()
    assert tracking.tracking_uri() == f"sqlite:///{original.resolve() / 'mlflow.db'}?timeout=60"


def test_repo_root_walks_up_out_of_a_queued_workspace(tmp_path, monkeypatch):
    original = tmp_path / "repo"
    copy = original / ".dvc/tmp/exps/tmpabc123/sub"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking.repo_root() == original.resolve()
    # a DVC_ROOT that is not a DVC repo is ignored rather than trusted
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "nowhere"))
    assert tracking.repo_root() == original.resolve()


def test_repo_root_is_cwd_outside_experiments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking.repo_root() == tmp_path.resolve()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:////x/mlflow.db", "sqlite:////x/mlflow.db?timeout=60"),
        ("sqlite:///m.db?mode=ro", "sqlite:///m.db?mode=ro&timeout=60"),
        ("sqlite:////x/m.db?timeout=5", "sqlite:////x/m.db?timeout=5"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_busy_timeout_only_for_sqlite(uri, expected):
    assert tracking.with_busy_timeout(uri) == expected


def test_env_uri_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/other.db?timeout=60"
    assert tracking.sqlite_path(tracking.tracking_uri()) == Path(f"{tmp_path}/other.db")


WRITER = textwrap.dedent(
    """
    import sys
    from lmpipe import tracking
    worker, n = sys.argv[1], int(sys.argv[2])
    for i in range(n):
        with tracking.run("race", f"{worker}-{i}", {"w": worker, "i": i}, "h", "train") as r:
            tracking.log_metrics({"loss": [0.5, 0.4][i % 2] + i, "step": i})
            tracking.set_tags({"worker": worker})
    """
)


def test_two_writers_on_a_fresh_store_lose_nothing(tmp_path):
    """Two processes create the store and log runs at the same time: every run is FINISHED, no error."""
    (tmp_path / ".dvc").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, name, "12"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert "database is locked" not in err
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = con.execute("SELECT name, status FROM runs").fetchall()
    assert sorted(rows) == sorted((f"{w}-{i}", "FINISHED") for w in "ab" for i in range(12))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id], max_results=100)
    assert len(runs) == 24
    assert {r.data.metrics["step"] for r in runs} == set(range(12))
    assert all(r.info.artifact_uri.startswith((tmp_path / "mlartifacts").resolve().as_uri()) for r in runs)


def test_log_metrics_to_skips_a_run_from_another_store(tmp_path, monkeypatch):
    """A clone whose train outputs came from ``dvc pull`` has the train run id, not the run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with tracking.run("exp", "train", {"lr": 1e-4}, "h", "train") as train:
        pass
    assert tracking.log_metrics_to(train.info.run_id, {"macro_f1": 0.9, "ok": True}, prefix="test_")
    assert tracking.get_run(train.info.run_id).data.metrics == {"test_macro_f1": 0.9}
    assert not tracking.log_metrics_to("0" * 32, {"macro_f1": 0.9}, prefix="test_")
