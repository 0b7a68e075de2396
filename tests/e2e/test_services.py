"""The test services themselves (tests/services.py): each is real and reachable over loopback."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.services


def test_postgres_takes_connections(postgres):
    url = postgres.create_database("smoke")
    with postgres.connect("smoke") as conn:
        assert "PostgreSQL" in conn.execute("SELECT version()").fetchone()[0]
    assert url.startswith("postgresql://") and url.endswith("/smoke")


def test_mlflow_server_stores_runs_in_postgres_and_artefacts_in_s3(mlflow_server, postgres, s3, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.create_experiment("smoke")
    run = client.create_run(experiment)
    (tmp_path / "hello.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "hello.txt"))
    client.set_terminated(run.info.run_id)
    keys = s3.keys("mlflow")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/hello.txt") for k in keys), keys
    with postgres.connect("mlflow") as conn:
        status = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchone()
    assert status == ("FINISHED",)
