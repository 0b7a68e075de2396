"""A wrong service setting fails fast with one line naming the setting and the host: an unreachable or
silent server, rejected credentials, a missing database. "Silent" is a loopback socket that accepts the
connection and never answers, the case that hangs a client without a timeout."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time

import pytest

from lmpipe import tracking
from lmpipe.errors import ServiceError
from lmpipe.tuning import optuna_study
from tests.conftest import BIN, ROOT, run
from tests.services import free_port

pytestmark = pytest.mark.services


@pytest.fixture
def silent_port():
    """A port whose connections are accepted by the kernel and never answered."""
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.fixture
def rejecting_server():
    """An HTTP server that answers every request with 401, like a tracking server behind auth."""

    class Reject(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's name
            self.send_response(401)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Reject)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def fails_fast(call, *needles, within: float):
    start = time.monotonic()
    with pytest.raises(ServiceError) as err:
        call()
    seconds = time.monotonic() - start
    message = str(err.value)
    assert "\n" not in message and seconds < within, (seconds, message)
    for needle in needles:
        assert needle in message, message
    return message


def test_storage_refused_silent_wrong_user_missing_db(postgres, silent_port):
    port = free_port()
    with contextlib.suppress(ServiceError):  # the first call imports SQLAlchemy's dialect: not timed
        optuna_study.open_storage(f"postgresql://u@127.0.0.1:{port}/db", 10)
    fails_fast(
        lambda: optuna_study.open_storage(f"postgresql://u:secret@127.0.0.1:{port}/db", 10),
        "search.storage: cannot use postgresql://u:***@127.0.0.1",
        "Connection refused",
        within=5,
    )
    assert "secret" not in fails_fast(
        lambda: optuna_study.open_storage(f"postgresql://u:secret@127.0.0.1:{silent_port}/db", 10),
        f"127.0.0.1:{silent_port}",
        "timeout expired",
        within=optuna_study.CONNECT_TIMEOUT + 5,
    )
    fails_fast(
        lambda: optuna_study.open_storage(f"postgresql://nobody@127.0.0.1:{postgres.port}/postgres", 10),
        'role "nobody" does not exist',
        within=5,
    )
    fails_fast(
        lambda: optuna_study.open_storage(postgres.url("no_such_db"), 10),
        'database "no_such_db" does not exist',
        within=5,
    )


def test_tracking_uri_refused_silent_rejected(silent_port, rejecting_server, monkeypatch):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}/warm-up")
    with contextlib.suppress(ServiceError):  # the first call imports MLflow's client: not timed
        tracking.tracking_uri()
    for uri, needle, within in [
        (f"http://127.0.0.1:{port}", "Connection refused", 5),
        (f"http://127.0.0.1:{silent_port}", "timed out", tracking.PROBE_TIMEOUT + 5),
        (rejecting_server, "401", 5),
    ]:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        fails_fast(tracking.tracking_uri, f"MLFLOW_TRACKING_URI: cannot use {uri}", needle, within=within)


def test_the_command_line_says_it_in_one_line(tmp_path):
    port = free_port()
    result = run(
        [str(BIN / "lmpipe"), "search-worker", "--params", str(ROOT / "params.yaml")]
        + ["--storage", f"postgresql://u@127.0.0.1:{port}/db"],
        tmp_path,
        check=False,
        timeout=600,  # the imports (torch, transformers): minutes on a loaded 2-core CPU
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: search.storage: cannot use postgresql://u@127.0.0.1")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
