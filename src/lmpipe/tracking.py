"""Every MLflow call of the pipeline goes through here. Nothing happens at import time.

* Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else a SQLite store ``mlflow.db`` at the repo root,
  with artefacts in ``mlartifacts/`` beside it (what ``mlflow ui`` opens when started from the root).
  The repo root is the ORIGINAL repo's even when ``dvc exp run --queue`` runs a stage in a temporary
  copy under ``.dvc/tmp/exps/`` (DVC's ``DVC_ROOT``, else found by walking up), so that every queued
  experiment lands in the one store and nothing is lost when DVC deletes the copy.
* SQLite stores wait for each other instead of failing with "database is locked": a busy timeout in
  the URI, WAL journal mode, and a file lock around the store's creation (two queue workers may create
  it at once).
* Each run is tagged with the git commit, whether code, params or data differ from it (``git_dirty``:
  the pipeline's own outputs and ``dvc.lock`` do not count), a hash of the resolved params,
  the stage, and the DVC experiment name when DVC runs the stage as an experiment.
* A run that raises is ended as FAILED (KILLED on Ctrl-C or SIGTERM), never left RUNNING.
* A tracking server behind authentication (``scripts/tracking_server.sh``) gets the user and password
  that MLflow reads from ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``. Credentials it
  refuses (401) or an action it forbids (403) become a one-line ``ServiceError`` naming the user.
* Rank-aware: with several training processes (``lmpipe.distributed``) only rank 0 opens runs and logs;
  on the other ranks ``run`` yields a stand-in without a run id and every logging call does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import TrainerCallback

from lmpipe import distributed
from lmpipe.errors import ServiceError, Terminated, unreachable

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"


# seconds a writer waits for another process's lock on a SQLite store; two queue workers can hold
# it for a while (the store's creation, migrations), far longer than sqlite3's default of 5 s
SQLITE_BUSY_TIMEOUT = 60
EXPS_TMP = (".dvc", "tmp", "exps")  # where DVC puts the temporary workspaces of queued experiments


# what ``run`` yields on the ranks that do not log: ``.info.run_id`` is empty
NO_RUN = SimpleNamespace(info=SimpleNamespace(run_id=""))


def repo_root() -> Path:
    """The root of the repo the user works in, where the MLflow store lives.

    DVC runs every stage from the directory holding ``dvc.yaml``. For a queued (or ``--temp``)
    experiment that is a temporary copy under ``<repo>/.dvc/tmp/exps/``; DVC then sets ``DVC_ROOT``
    to the original repo, and failing that the original is found by walking up from the copy.
    """
    from_dvc = os.environ.get("DVC_ROOT")
    if from_dvc and (Path(from_dvc) / ".dvc").is_dir():
        return Path(from_dvc).resolve()
    return _outside_exps_tmp(Path.cwd().resolve())


def _outside_exps_tmp(path: Path) -> Path:
    parts = path.parts
    for i in range(len(parts) - len(EXPS_TMP), 0, -1):
        if parts[i : i + len(EXPS_TMP)] == EXPS_TMP:
            return Path(*parts[:i])
    return path


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the repo's SQLite store; SQLite URIs get a busy timeout, and a
    tracking server is checked once per process (``check_server``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / STORE_FILE}"
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    return with_busy_timeout(uri)


# the first request to a tracking server: one try, this many seconds (MLflow's defaults, 7 retries of
# up to 120 s with back-off, would leave a stage hanging for minutes on a wrong URL)
PROBE_TIMEOUT = 10


@functools.cache
def check_server(uri: str) -> None:
    """Ask the tracking server for one experiment, once, without retries: an unreachable or silent
    server, or rejected credentials, become a one-line ``ServiceError`` within ``PROBE_TIMEOUT`` s
    instead of minutes of retries. Later requests keep MLflow's retries (a server restarting mid-run)."""
    from mlflow.tracking import MlflowClient

    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT)}
    saved = {k: os.environ.get(k) for k in probe}
    os.environ.update(probe)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:
        if _status(err) == "UNAUTHENTICATED":
            raise ServiceError(f"MLFLOW_TRACKING_URI: cannot use {shown_uri(uri)}: {_refused()}") from None
        raise unreachable("MLFLOW_TRACKING_URI", shown_uri(uri), err) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _status(err: BaseException) -> str | None:
    """``UNAUTHENTICATED`` (HTTP 401) or ``PERMISSION_DENIED`` (403) for a tracking server's refusal,
    else None."""
    code = getattr(err, "error_code", None)
    return code if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") else None


def _refused() -> str:
    """Why a 401: no user given, or this user's password refused."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not user:
        return "401 not authenticated: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    return f"401 not authenticated: user {user!r} or its MLFLOW_TRACKING_PASSWORD refused"


def denied(err: BaseException, experiment: str) -> ServiceError | None:
    """A tracking server's 401 or 403 met while a stage logs to ``experiment``, as one line naming the
    user and the request; None for any other error."""
    status = _status(err)
    if status is None:
        return None
    where = shown_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))
    if status == "UNAUTHENTICATED":
        return ServiceError(f"MLFLOW_TRACKING_URI: {where}: {_refused()}")
    found = re.search(r"endpoint (\S+)", str(err))
    request = found.group(1) if found else ""
    on = "the registered model" if ("registered-models" in request or "model-versions" in request) else "it"
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    return ServiceError(
        f"MLFLOW_TRACKING_URI: {where}: 403 permission denied{f' ({request})' if request else ''} to user "
        f"{user!r} in experiment {experiment!r}: its owner or the server's admin can grant EDIT on {on} "
        "(docs/team.md)"
    )


def shown_uri(uri: str) -> str:
    """The URI without a password (``http://user:secret@host`` -> ``http://user:***@host``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def with_busy_timeout(uri: str) -> str:
    """Add ``timeout=`` (SQLAlchemy passes it to sqlite3) to a SQLite URI that has none."""
    if not uri.startswith("sqlite:") or "timeout=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_BUSY_TIMEOUT}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for other stores (or in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def prepare_store(uri: str) -> None:
    """Create a SQLite store once, under a file lock, and switch it to WAL journal mode.

    MLflow creates the tables (and runs migrations) the first time a process opens a new store; two
    queue workers doing so at the same moment would race. WAL lets readers and one writer work at
    the same time, and it persists in the file, so this is cheap after the first call.
    """
    path = sqlite_path(uri)
    if path is None:
        return
    import fcntl
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates the tables
            with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT)) as db:
                if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def pipeline_outputs(root: Path) -> set[str]:
    """What the pipeline itself writes, as dvc.yaml declares it: every stage's outs, metrics and plots,
    and ``dvc.lock``."""
    import yaml

    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return {"dvc.lock"}
    paths = {"dvc.lock"}
    for stage in stages.values():
        for section in ("outs", "metrics", "plots"):
            for entry in stage.get(section) or []:
                paths.update(entry if isinstance(entry, dict) else [entry])
    return {str(p).rstrip("/") for p in paths}


def changed_inputs(root: Path | None = None) -> list[str]:
    """Files that differ from the commit (``git status``: changed, staged, deleted or untracked, not
    ignored), other than the pipeline's own outputs and ``dvc.lock``: the code, params or data a run used
    that the commit does not hold. ``dvc repro`` rewrites its outputs, so counting them would call every
    run of a fresh clone dirty."""
    root = Path.cwd() if root is None else root
    outputs = pipeline_outputs(root)
    entries = _git("-C", str(root), "status", "--porcelain=v1", "-z", "--untracked-files=all").split("\0")
    changed, skip = [], False
    for entry in entries:
        if skip or not entry:  # the second path of a rename, or the end
            skip = False
            continue
        status, path = entry[:2], entry[3:]
        skip = "R" in status or "C" in status
        if not any(path == o or path.startswith(f"{o}/") for o in outputs):
            changed.append(path)
    return changed


def git_info() -> dict[str, str]:
    """The commit, and ``git_dirty``: whether code, params or data differ from it (``changed_inputs``).
    When dirty, ``git_changed`` names the first few changed files."""
    commit = _git("rev-parse", "HEAD").strip() or "unknown"
    changed = changed_inputs()
    info = {"git_commit": commit, "git_dirty": str(bool(changed)).lower()}
    if changed:
        info["git_changed"] = ", ".join(changed[:10]) + (
            f" (+{len(changed) - 10} more)" if len(changed) > 10 else ""
        )
    return info


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def run(
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    params_hash: str,
    stage: str,
    tags: Mapping[str, str] | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
) -> Iterator[Any]:
    """Start a tagged MLflow run with the full resolved params logged, and end it honestly.

    ``nested=True`` starts a child of the active run (search trials under their study's run), or of
    ``parent_run_id`` when given (a trial run by a search worker in another process). On a rank other
    than 0 it yields ``NO_RUN`` and logs nothing: one run per stage, not one per process.
    """
    if not distributed.is_main():
        yield NO_RUN
        return
    import mlflow

    all_tags = {
        **git_info(),
        "params_hash": params_hash,
        "stage": stage,
        **({"dvc_exp_name": os.environ["DVC_EXP_NAME"]} if os.environ.get("DVC_EXP_NAME") else {}),
        **(
            {"dvc_exp_baseline_rev": os.environ["DVC_EXP_BASELINE_REV"]}
            if os.environ.get("DVC_EXP_BASELINE_REV")
            else {}
        ),
        **(tags or {}),
    }
    try:
        if not nested or parent_run_id:
            uri = tracking_uri()
            prepare_store(uri)
            mlflow.set_tracking_uri(uri)
            _ensure_experiment(mlflow, experiment)
        active = mlflow.start_run(
            run_name=run_name, tags=all_tags, nested=nested, parent_run_id=parent_run_id
        )
    except Exception as err:
        refused = denied(err, experiment)
        if refused is None:
            raise
        raise refused from None
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        mlflow.log_params({k: _param_value(v) for k, v in flatten(params).items()})
        mlflow.log_dict(dict(params), "params.json")
        yield active
    except (KeyboardInterrupt, Terminated) as err:
        mlflow.set_tag("error", str(err) or type(err).__name__)
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as err:
        mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
        mlflow.end_run(status="FAILED")
        refused = denied(err, experiment)  # registering a model someone else owns, say
        if refused is None:
            raise
        raise refused from None
    else:
        mlflow.end_run(status="FINISHED")
    finally:
        signal.signal(signal.SIGTERM, previous)


def stage_run(params: Any, stage: str, run_name: str | None = None, tags: Mapping[str, str] | None = None):
    """The MLflow run of a stage: in ``mlflow.experiment``, with every resolved param and their hash, and
    tags naming the base model and its resolved revision (``model_tags``)."""
    tags = {**model_tags(params), **(tags or {})}
    return run(params.mlflow.experiment, run_name or stage, params.to_dict(), params.digest(), stage, tags)


def model_tags(params: Any) -> dict[str, str]:
    """``base_model``, ``base_model_revision`` (a hub model's resolved commit) and ``base_model_source``:
    on every run a stage starts, its children included."""
    from lmpipe.modeling import hub

    return hub.tags_of(params.base)


def child_run(
    params: Any,
    run_name: str,
    section: Mapping[str, Any],
    stage: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
):
    """A child of the active stage run (a search trial, a compressed variant), or of ``parent_run_id``,
    with its own params ``section``, tagged with the stage's params hash and the base model."""
    tags = {**model_tags(params), **(tags or {})}
    return run(params.mlflow.experiment, run_name, section, params.digest(), stage, tags, True, parent_run_id)


def default_store_uri() -> str:
    """The repo's own store: ``<repo root>/mlflow.db``, artefacts in ``<repo root>/mlartifacts``."""
    return with_busy_timeout(f"sqlite:///{repo_root() / STORE_FILE}")


def _ensure_experiment(mlflow: Any, name: str) -> None:
    if mlflow.get_experiment_by_name(name) is None:
        location = None
        # Compared with the URI, not with MLFLOW_TRACKING_URI being unset: mlflow.set_tracking_uri
        # exports that variable, and MLflow's own default (./mlruns under the cwd) would put a queued
        # experiment's artefacts in its temporary workspace, deleted when the experiment ends.
        if mlflow.get_tracking_uri() == default_store_uri():
            location = (repo_root() / ARTIFACT_DIR).as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except Exception:  # another process created it first
            if mlflow.get_experiment_by_name(name) is None:
                raise
    mlflow.set_experiment(name)


def _param_value(value: Any) -> Any:
    return "null" if value is None else value


@distributed.main_only
def log_metrics(metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
    """Log the numeric leaves of a (nested) metrics dict, keys joined with dots."""
    import mlflow

    numeric = {
        f"{prefix}{k}": float(v)
        for k, v in flatten(metrics).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    if numeric:
        mlflow.log_metrics(numeric, step=step)


@distributed.main_only
def set_tags(tags: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


@distributed.main_only
def log_dict(obj: Any, name: str) -> None:
    import mlflow

    mlflow.log_dict(obj, name)


@distributed.main_only
def log_metrics_to(run_id: str, metrics: Mapping[str, Any], prefix: str = "") -> bool:
    """Log numeric metrics to another (finished) run, e.g. test scores onto the train run.

    Returns False, logging nothing, when that run is not in this store: a clone whose train outputs
    came from ``dvc pull`` or a committed ``dvc.lock`` has the train run id but not the run.
    """
    from mlflow.tracking import MlflowClient

    if get_run(run_id) is None:
        return False
    client = MlflowClient(tracking_uri=tracking_uri())
    for key, value in flatten(metrics).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            client.log_metric(run_id, f"{prefix}{key}", float(value))
    return True


@distributed.main_only
def mark_resumed(run_id: str, by_run_id: str, from_step: int) -> None:
    """Tag an interrupted run with the run that took over from its checkpoint. A run that a hard kill
    (SIGKILL, power loss) left RUNNING is ended as KILLED here, so none stays RUNNING."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri())
    try:
        status = client.get_run(run_id).info.status
    except MlflowException:  # the run lives in another store: nothing to mark
        return
    client.set_tag(run_id, "resumed_by_run_id", by_run_id)
    client.set_tag(run_id, "resumed_by_from_step", str(from_step))
    if status == "RUNNING":
        client.set_tag(run_id, "error", "interrupted without a clean shutdown")
        client.set_terminated(run_id, status="KILLED")


@distributed.main_only
def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


@distributed.main_only
def log_figure(figure: Any, name: str) -> None:
    import mlflow

    mlflow.log_figure(figure, name)


class MlflowTrainingLogger(TrainerCallback):
    """Logs per-step loss and learning rate, and per-epoch val metrics, to the active MLflow run.

    Used instead of transformers' own MLflow callback, which uploads every checkpoint and can leave
    crashed runs RUNNING.
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        step_logs = {k: v for k, v in logs.items() if k in {"loss", "learning_rate", "grad_norm"}}
        if step_logs:
            log_metrics(
                {f"train_{k}" if k != "learning_rate" else k: v for k, v in step_logs.items()},
                step=state.global_step,
                prefix=self.prefix,
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics:
            epoch = round(state.epoch or 0)
            vals = {
                k.replace("eval_", "val_"): v
                for k, v in metrics.items()
                if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))
            }
            log_metrics(vals, step=epoch, prefix=self.prefix)


# ------------------------------------------------------------------------------ models and the registry
def _client() -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


@distributed.main_only
def log_pyfunc_model(
    code_path: str | Path,
    artifacts: Mapping[str, str | Path],
    input_example: Any,
    pip_requirements: list[str],
    model_config: Mapping[str, Any] | None = None,
) -> str:
    """Log a "models from code" pyfunc model (no pickled object) under ``model`` in the active run;
    its signature comes from the ``predict`` type hints, checked on ``input_example``; ``model_config``
    is what the code reads at load (``mlflow.models.ModelConfig``). Returns its ``models:/`` URI."""
    import mlflow

    mlflow.set_registry_uri(tracking_uri())
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(code_path),
        artifacts={k: str(v) for k, v in artifacts.items()},
        input_example=input_example,
        pip_requirements=pip_requirements,
        model_config=dict(model_config or {}),
    )
    return info.model_uri


@distributed.main_only
def register_model_version(model_uri: str, name: str, tags: Mapping[str, Any], description: str) -> str:
    """A new version of registered model ``name`` (created if needed), tagged and described."""
    import mlflow

    mlflow.set_registry_uri(tracking_uri())
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    _client().update_model_version(name, version.version, description=description)
    return str(version.version)


def registered_model_tag(name: str, key: str) -> str | None:
    """Tag ``key`` of registered model ``name``, or None (no such model, or no such tag)."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_registered_model(name).tags.get(key)
    except MlflowException:
        return None


def set_registered_model_tag(name: str, key: str, value: str) -> None:
    _client().set_registered_model_tag(name, key, value)


def alias_version(name: str, alias: str) -> str | None:
    """The version that ``alias`` points at, or None (no such alias or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def get_run(run_id: str) -> Any | None:
    """The run with this id in the current store, or None if there is none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    path = sqlite_path(tracking_uri())
    if path is not None and not path.is_file():
        return None  # reading must not create an empty store
    try:
        return MlflowClient(tracking_uri=tracking_uri()).get_run(run_id)
    except MlflowException:
        return None


@distributed.main_only
def set_alias(name: str, alias: str, version: str) -> None:
    _client().set_registered_model_alias(name, alias, version)


def download_model(uri: str, dest: str | Path) -> Path:
    """Download a logged or registered model's folder (``models:/name@alias``) into ``dest``."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def evaluate_run_of(train_run_id: str) -> Any | None:
    """The latest FINISHED evaluate run that scored the model of this train run, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri())
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"tags.stage = 'evaluate' and tags.train_run_id = '{train_run_id}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def download_artifact(run_id: str, artifact_path: str, dest: str | Path) -> Path | None:
    """Download one artefact of a run into ``dest``; None if the run has no such artefact."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        local = download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dest), tracking_uri=tracking_uri()
        )
    except (MlflowException, OSError):
        return None
    return Path(local) if Path(local).is_file() else None
