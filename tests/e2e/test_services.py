"""The test services themselves (tests/services.py): each is real and reachable over loopback."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.services


def test_postgres_takes_connections(postgres):
    url = postgres.create_database("smoke")
    with postgres.connect("smoke") as conn, conn.cursor() as cur:
        cur.execute("SELECT version()")
        assert "PostgreSQL" in cur.fetchone()[0]
    assert url.startswith("postgresql+psycopg2://") and url.endswith("/smoke")


def test_mlflow_server_stores_runs_in_postgres_and_artefacts_in_s3(mlflow_server, s3, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.create_experiment("smoke")
    run = client.create_run(experiment)
    (tmp_path / "hello.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "hello.txt"))
    client.set_terminated(run.info.run_id)
    keys = s3.keys("mlflow")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/hello.txt") for k in keys), keys
    with mlflow_server_db(mlflow_server) as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone()[0] == "FINISHED"


def mlflow_server_db(server):
    import contextlib

    import psycopg2

    @contextlib.contextmanager
    def cursor():
        conn = psycopg2.connect(server.backend_uri.replace("postgresql+psycopg2", "postgresql"))
        try:
            with conn.cursor() as cur:
                yield cur
        finally:
            conn.close()

    return cursor()
