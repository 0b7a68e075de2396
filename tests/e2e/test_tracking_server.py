"""The pipeline against a shared tracking server: ``mlflow server`` with a PostgreSQL store and its
artefacts in S3 (moto over HTTP). The tiny pipeline runs with ``MLFLOW_TRACKING_URI=http://...`` and no
S3 credentials of its own (the server proxies the artefacts); then the runs, the objects in the bucket,
the registry's aliases, ``lmpipe compare`` and ``mlflow models serve -m models:/NAME@alias``."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, new_repo, pipeline_env, remove, run
from tests.services import serve_model

pytestmark = [pytest.mark.extended, pytest.mark.services]

NAME = "team-clf"


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_encoder, mlflow_server) -> Iterator[Path]:
    overrides = {
        "base": {"model": str(tiny_encoder), "max_length": 32},
        "prepare": {"max_rows": 80},
        "train": {"epochs": 1, "batch_size": 8, "logging_steps": 4},
        # int8 alone: compress's runs reach the server all the same, without fine-tunes to wait for
        "compress": {
            "prune": {"enabled": False},
            "distill": {"enabled": False},
            "latency": {"warmup": 1, "repeats": 3, "batch_repeats": 2},
        },
        "mlflow": {"experiment": "team"},
        "export": {
            "registered_model": NAME,
            "latency": {"batch_sizes": [1, 8], "warmup": 1, "repeats": 3, "batch_repeats": 3, "threads": 1},
            "gate": {"baseline": "none", "min_macro_f1": None},  # a tiny model: exercise aliases
        },
    }
    repo = new_repo(tmp_path_factory.mktemp("team-repo"), overrides)
    result = run(["dvc", "repro"], repo, env=server_env(mlflow_server), timeout=900)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    yield repo
    remove(repo)


def server_env(server) -> dict[str, str]:
    return {**pipeline_env(), "MLFLOW_TRACKING_URI": server.uri}


def report(repo: Path, stage: str) -> dict:
    """A stage's full report (with its MLflow run id; ``metrics.json`` holds only the headline)."""
    return json.loads((repo / "reports" / stage / "report.json").read_text())


def test_every_stage_run_is_on_the_server(repo, mlflow_server):
    assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    for stage in ("train", "evaluate", "compress", "export"):
        run_id = report(repo, stage)["mlflow_run_id"]
        found = client.get_run(run_id)
        assert found.info.status == "FINISHED" and found.data.tags["stage"] == stage
    train = client.get_run(report(repo, "train")["mlflow_run_id"])
    assert len(client.get_metric_history(train.info.run_id, "val_macro_f1")) == 1


def test_artefacts_are_in_the_bucket(repo, mlflow_server, s3):
    keys = s3.keys("mlflow")
    for stage in ("evaluate", "export"):
        run_id = report(repo, stage)["mlflow_run_id"]
        assert any(f"/{run_id}/artifacts/" in k for k in keys), (stage, keys[:20])
    assert any(k.endswith("/MLmodel") for k in keys)  # the logged pyfunc model
    assert any(k.endswith("evaluation/predictions.csv") for k in keys)


def test_registered_model_and_alias(repo, mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    version = client.get_model_version_by_alias(NAME, "champion")
    assert version.version == "1"
    assert version.run_id == report(repo, "export")["mlflow_run_id"]


def test_compare_reads_predictions_from_the_server(repo, mlflow_server, tmp_path):
    evaluate_run = report(repo, "evaluate")["mlflow_run_id"]
    out = tmp_path / "compare"
    run(
        [str(BIN / "lmpipe"), "compare", "workspace", evaluate_run, "--out", str(out), "--resamples", "200"],
        repo,
        env=server_env(mlflow_server),
    )
    runs = json.loads((out / "comparison.json").read_text())["runs"]
    # the same predictions, read from the workspace and through the server from the bucket
    assert runs[1]["run_id"] == evaluate_run
    assert runs[0]["accuracy"]["value"] == runs[1]["accuracy"]["value"]


def test_models_serve_by_alias(repo, mlflow_server):
    texts = pd.read_parquet(repo / "data/split/test.parquet")["text"].tolist()[:3]
    with serve_model(f"models:/{NAME}@champion", repo, server_env(mlflow_server), repo / "serve.log") as url:
        body = json.dumps({"inputs": texts}).encode()
        request = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    assert len(answer["predictions"]) == 3
