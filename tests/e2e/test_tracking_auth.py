"""The tracking server a team can expose, started as a team starts it (``scripts/tracking_server.sh``):
MLflow's basic auth in front of a PostgreSQL store and S3 artefacts (moto), on loopback, answering only
the host names it was given. Who may do what (401 anonymous or with a wrong password, 403 for a reader's
write, 200 for a writer's), the script's refusals, the tiny pipeline logging every stage as a user, a
stage refused in one line, and a queued DVC sweep whose workers take the credentials of `dvc queue start`.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from lmpipe import tracking
from tests.conftest import (
    ROOT,
    experiments_in,
    git_commit,
    new_repo,
    pipeline_env,
    remove,
    run,
    run_stage_in_process,
    stage_args,
    wait_for_queue,
)

pytestmark = [pytest.mark.extended, pytest.mark.services]

EXPERIMENT = "team-auth"
NAME = "team-auth-clf"
# MLflow wants passwords of 12 characters or more
WRITER = ("writer", "writer-password-1")
READER = ("reader", "reader-password-1")
N_TRIALS = 2
# none equal to the baseline's learning rate: DVC would restore that one from its run cache
LEARNING_RATES = ["5e-05", "0.0003"]
LOGGING_STAGES = ("search", "train", "evaluate", "analyze", "compress", "export")


def call(server, method: str, path: str, auth=None, host: str | None = None, **body) -> tuple[int, object]:
    """One request to the server's REST API (``path`` after ``/api/``): its status and its JSON body,
    or its text when it is not JSON."""
    response = requests.request(
        method,
        f"{server.uri}/api/{path}",
        auth=auth,
        headers={"Host": host} if host else None,
        params=body if method == "GET" else None,
        json=body if method != "GET" else None,
        timeout=30,
    )
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def as_user(server, user: tuple[str, str]) -> dict[str, str]:
    """A pipeline process's environment, logging to ``server`` as ``user``."""
    name, password = user
    return {
        **pipeline_env(),
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_TRACKING_USERNAME": name,
        "MLFLOW_TRACKING_PASSWORD": password,
    }


def get_run(server, run_id: str) -> dict:
    """A run, read by the reader (every user may read: ``DEFAULT_PERMISSION`` READ)."""
    status, body = call(server, "GET", "2.0/mlflow/runs/get", READER, run_id=run_id)
    assert status == 200, body
    return body["run"]


def tags(found: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in found["data"].get("tags", [])}


def search_runs(server, experiment_id: str, where: str) -> list[dict]:
    status, body = call(
        server, "POST", "2.0/mlflow/runs/search", READER, experiment_ids=[experiment_id], filter=where
    )
    assert status == 200, body
    return body.get("runs", [])


def experiment_id(server, name: str) -> str:
    status, body = call(server, "GET", "2.0/mlflow/experiments/get-by-name", READER, experiment_name=name)
    assert status == 200, body
    return body["experiment"]["experiment_id"]


@pytest.fixture(scope="module")
def server(auth_mlflow_server):
    """The auth server with two users that the admin created: a writer and a reader."""
    for name, password in (WRITER, READER):
        status, body = call(
            auth_mlflow_server, "POST", "2.0/mlflow/users/create", auth_mlflow_server.admin,
            username=name, password=password,
        )  # fmt: skip
        assert status == 200, body
    return auth_mlflow_server


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_encoder, server) -> Iterator[Path]:
    """The tiny pipeline, every stage that logs to MLflow included (search: two trials), run by the
    writer against the auth server."""
    overrides = {
        "base": {"model": str(tiny_encoder), "max_length": 32},
        "prepare": {"max_rows": 80},
        "search": {
            "enabled": True,
            "strategy": "random",
            "pruner": "none",
            "n_trials": N_TRIALS,
            "trial": {"max_train_samples": 32, "max_length": 32, "epochs": 1},
        },
        "train": {"epochs": 1, "batch_size": 8, "logging_steps": 4},
        # int8 alone: compress's runs reach the server all the same, without fine-tunes to wait for
        "compress": {
            "prune": {"enabled": False},
            "distill": {"enabled": False},
            "latency": {"warmup": 1, "repeats": 3, "batch_repeats": 2},
        },
        "mlflow": {"experiment": EXPERIMENT},
        "export": {
            "registered_model": NAME,
            "latency": {"batch_sizes": [1], "warmup": 1, "repeats": 3, "batch_repeats": 2, "threads": 1},
            "gate": {"baseline": "none", "min_macro_f1": None},  # a tiny model: exercise the aliases
        },
    }
    repo = new_repo(tmp_path_factory.mktemp("auth-repo"), overrides)
    result = run(["dvc", "repro"], repo, env=as_user(server, WRITER), timeout=900)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    yield repo
    remove(repo)


def report(repo: Path, stage: str) -> dict:
    return json.loads((repo / "reports" / stage / "report.json").read_text())


# ------------------------------------------------------------------ the script
def script(env: dict[str, str]):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return run(["bash", str(ROOT / "scripts/tracking_server.sh")], ROOT, check=False, env={**base, **env})


STORES = {"BACKEND_STORE_URI": "sqlite:///unused.db", "ARTIFACTS_DESTINATION": "/unused"}
GOOD_PASSWORD = {"MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-enough-password"}


@pytest.mark.parametrize(
    "env, message",
    [
        ({**GOOD_PASSWORD, "HOST": "0.0.0.0"}, "HOST=0.0.0.0 serves other machines: set ALLOWED_HOSTS"),
        ({**GOOD_PASSWORD, "HOST": "0.0.0.0", "ALLOWED_HOSTS": "*"}, "ALLOWED_HOSTS=*: name the hosts"),
        ({**GOOD_PASSWORD, "ALLOWED_HOSTS": "mlflow.lan,*"}, "ALLOWED_HOSTS=mlflow.lan,*: name the hosts"),
        ({}, "set MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or more)"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "short"}, "MLFLOW_AUTH_ADMIN_PASSWORD has 5 characters"),
        ({**GOOD_PASSWORD, "DEFAULT_PERMISSION": "ALL"}, "DEFAULT_PERMISSION=ALL: one of READ"),
        (
            {**GOOD_PASSWORD, "AUTH_DATABASE_URI": STORES["BACKEND_STORE_URI"]},
            "AUTH_DATABASE_URI is BACKEND_STORE_URI",
        ),
    ],
)
def test_the_script_refuses_in_one_line(env, message, tmp_path):
    result = script({**STORES, "STATE_DIR": str(tmp_path / "state"), **env})
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"error: tracking_server.sh: {message}"), result.stderr
    assert len(result.stderr.splitlines()) == 1 and not result.stdout, result
    assert not (tmp_path / "state").exists()  # refused before it wrote anything


def test_the_server_is_on_loopback_with_a_private_auth_config(server):
    # no HOST given: 127.0.0.1
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log.read_text()
    config = server.state / "basic_auth.ini"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.state.stat().st_mode) == 0o700
    lines = config.read_text().splitlines()
    assert "default_permission = READ" in lines
    assert f"database_uri = sqlite:///{server.state}/basic_auth.db" in lines
    assert (server.state / "basic_auth.db").is_file()


# ------------------------------------------------------------------ who may do what
def test_anonymous_and_wrong_passwords_get_401(server):
    for auth in (None, ("admin", "not-the-password"), (WRITER[0], READER[1]), ("nobody", WRITER[1])):
        status, body = call(server, "GET", "2.0/mlflow/experiments/search", auth, max_results=1)
        assert status == 401, (auth, status, body)
        assert "not authenticated" in str(body)
    assert call(server, "GET", "2.0/mlflow/experiments/search", WRITER, max_results=1)[0] == 200
    assert requests.get(f"{server.uri}/health", timeout=10).status_code == 200  # health needs no user


def test_only_named_hosts_are_answered(server):
    search = "2.0/mlflow/experiments/search"
    for host in ("mlflow.test", f"mlflow.test:{server.port}", f"localhost:{server.port}"):
        assert call(server, "GET", search, server.admin, host=host, max_results=1)[0] == 200, host
    status, body = call(server, "GET", search, server.admin, host="attacker.example", max_results=1)
    assert status == 403 and "DNS rebinding" in str(body), (status, body)


def test_a_reader_reads_and_a_writer_writes(server):
    admin = server.admin
    status, body = call(server, "POST", "2.0/mlflow/experiments/create", admin, name="matrix")
    assert status == 200, body
    exp = body["experiment_id"]
    # the reader and the writer both start with the default READ; the admin grants the writer EDIT
    status, body = call(server, "POST", "2.0/mlflow/runs/create", WRITER, experiment_id=exp)
    assert status == 403, (status, body)
    status, body = call(
        server, "POST", "3.0/mlflow/users/permissions/grant", admin,
        username=WRITER[0], resource_type="experiment", resource_id=exp, permission="EDIT",
    )  # fmt: skip
    assert status == 200, body
    status, body = call(server, "POST", "2.0/mlflow/runs/create", WRITER, experiment_id=exp)
    assert status == 200, body
    run_id = body["run"]["info"]["run_id"]
    metric = {"run_id": run_id, "key": "loss", "value": 0.5, "timestamp": 0, "step": 0}
    assert call(server, "POST", "2.0/mlflow/runs/log-metric", WRITER, **metric)[0] == 200

    assert call(server, "GET", "2.0/mlflow/experiments/get", READER, experiment_id=exp)[0] == 200
    found = get_run(server, run_id)
    assert [m["value"] for m in found["data"]["metrics"]] == [0.5]
    for path, payload in [
        ("2.0/mlflow/runs/create", {"experiment_id": exp}),
        ("2.0/mlflow/runs/log-metric", {**metric, "value": 9.0}),
        ("2.0/mlflow/runs/delete", {"run_id": run_id}),
        ("2.0/mlflow/experiments/delete", {"experiment_id": exp}),
    ]:
        status, body = call(server, "POST", path, READER, **payload)
        assert status == 403 and body == "Permission denied", (path, status, body)
    assert [m["value"] for m in get_run(server, run_id)["data"]["metrics"]] == [0.5]
    # EDIT is not MANAGE: the writer may not delete the experiment either
    assert call(server, "POST", "2.0/mlflow/experiments/delete", WRITER, experiment_id=exp)[0] == 403


# ------------------------------------------------------------------ the pipeline as a user
def test_every_stage_logs_to_the_server_as_the_writer(repo, server, s3):
    assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()
    exp = experiment_id(server, EXPERIMENT)
    for stage in LOGGING_STAGES:
        found = get_run(server, report(repo, stage)["mlflow_run_id"])
        assert found["info"]["status"] == "FINISHED", stage
        assert found["info"]["experiment_id"] == exp and tags(found)["stage"] == stage
    search_id = report(repo, "search")["mlflow_run_id"]
    trials = search_runs(server, exp, f"tags.mlflow.parentRunId = '{search_id}'")
    assert len(trials) == N_TRIALS and {t["info"]["status"] for t in trials} == {"FINISHED"}
    # the writer created the experiment and the registered model: it manages both
    status, body = call(server, "GET", "3.0/mlflow/users/current/permissions", WRITER)
    assert status == 200, body
    held = {(p["resource_type"], p["resource_pattern"]): p["permission"] for p in body["permissions"]}
    assert held[("experiment", exp)] == "MANAGE", held
    status, body = call(
        server, "GET", "2.0/mlflow/registered-models/alias", READER, name=NAME, alias="champion"
    )
    assert status == 200 and body["model_version"]["run_id"] == report(repo, "export")["mlflow_run_id"], body
    keys = s3.keys("mlflow-auth")
    assert any(f"/{report(repo, 'evaluate')['mlflow_run_id']}/artifacts/evaluation/" in k for k in keys)


@pytest.mark.parametrize(
    "user, message",
    [
        ((WRITER[0], "wrong-password-1"), "401 not authenticated: user 'writer' or its MLFLOW_TRACKING_PASSWORD refused"),
        (None, "401 not authenticated: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        (READER, "403 permission denied (/api/2.0/mlflow/runs/create) to user 'reader' in experiment 'team-auth'"),
    ],
)  # fmt: skip
def test_a_stage_refused_by_the_server_says_so_in_one_line(
    user, message, repo, server, tmp_path, monkeypatch
):
    exp = experiment_id(server, EXPERIMENT)
    before = search_runs(server, exp, "tags.stage = 'evaluate'")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    for key, value in zip(keys, user or (None, None), strict=True):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    tracking.check_server.cache_clear()  # probe again: an earlier test's success is cached per URI
    out = tmp_path / "evaluate"
    code, stderr = run_stage_in_process(repo, "evaluate", stage_args(repo, "evaluate", {"--out": str(out)}))
    assert code == 2, stderr
    assert stderr.startswith("error: MLFLOW_TRACKING_URI: ") and server.uri in stderr, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr and not out.exists()
    assert len(search_runs(server, exp, "tags.stage = 'evaluate'")) == len(before)  # no run left behind


# ------------------------------------------------------------------ a queued sweep
@pytest.fixture(scope="module")
def sweep(repo, server) -> dict:
    """Two queued experiments up to ``train``, run by `dvc queue start` with the writer's credentials
    (queued without them: the workers must take them from the process that starts them). Search off in
    the sweep: it depends on the train params, and would run its study again in every experiment."""
    git_commit(repo, "baseline run")
    baseline = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    rates = ",".join(LEARNING_RATES)
    run(["dvc", "exp", "run", "--queue", "-S", "search.enabled=false", "-S", f"train.learning_rate={rates}", "train"], repo)  # fmt: skip
    # one thread per worker, as `make queue-start` sets on 2 cores
    run(
        ["dvc", "queue", "start", "--jobs", "2"],
        repo,
        env={**as_user(server, WRITER), "OMP_NUM_THREADS": "1"},
    )
    try:
        status = wait_for_queue(repo)
    finally:
        run(["dvc", "queue", "stop"], repo, check=False)
    show = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    return {"status": status, "exps": experiments_in(show), "baseline": baseline}


def test_a_queued_sweep_lands_on_the_server(sweep, server):
    exps = sweep["exps"]
    assert len(exps) == len(LEARNING_RATES), sweep["status"]
    exp = experiment_id(server, EXPERIMENT)
    rates = []
    for name in exps:
        (found,) = search_runs(server, exp, f"tags.stage = 'train' and tags.dvc_exp_name = '{name}'")
        assert found["info"]["status"] == "FINISHED", name
        assert tags(found)["dvc_exp_baseline_rev"] == sweep["baseline"]
        params = {p["key"]: p["value"] for p in found["data"]["params"]}
        rates.append(float(params["train.learning_rate"]))
        assert params["search.enabled"] == "False", params
    assert sorted(rates) == sorted(map(float, LEARNING_RATES))
