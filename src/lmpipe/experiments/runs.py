"""The experiment workflow around ``dvc exp run --queue``: what ``lmpipe compare`` reads, and the checks
``lmpipe queue-check`` makes before experiments are queued.

A compare input is one of:

* a DVC experiment name (``dvc exp show`` lists them; its git ref is ``refs/exps/../<name>``),
  or any git revision (branch, tag, commit): its predictions, params and metrics are read with
  ``git show`` because reports are tracked by git, not cached by DVC;
* ``workspace``: the files in the working tree;
* an MLflow run id (32 hex digits) of a train or evaluate run in the current store (see
  ``lmpipe.tracking``): the predictions come from the evaluate run's ``evaluation/`` artefacts.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from lmpipe import tasks
from lmpipe.errors import ParamsError, UserError
from lmpipe.experiments.compare import Candidate

# where the evaluate stage writes them (dvc.yaml); a flag of `lmpipe compare` can point elsewhere
PREDICTIONS = "reports/evaluate/predictions.csv"
BASELINE_PREDICTIONS = "reports/evaluate/baseline_predictions.csv"  # evaluate's baseline, same split
EVAL_REPORT = "reports/evaluate/report.json"
SEARCH_BEST = "reports/search/best_params.json"
PARAMS_FILE = "params.yaml"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
WORKSPACE = "workspace"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)


def experiment_refs(root: Path) -> dict[str, list[str]]:
    """DVC experiment name -> its git refs (``refs/exps/<2 hex>/<38 hex>/<name>``; one per baseline)."""
    out = _git(root, "for-each-ref", "--format=%(refname)", "refs/exps")
    refs: dict[str, list[str]] = {}
    for ref in out.stdout.split():
        parts = ref.split("/")
        if len(parts) == 5 and len(parts[2]) == 2 and len(parts[3]) == 38:
            refs.setdefault(parts[4], []).append(ref)
    return refs


def flat_params(params: dict) -> dict[str, str]:
    """Resolved params flattened to dotted keys with MLflow's string form of each value."""
    from lmpipe.tracking import flatten

    return {k: "null" if v is None else str(v) for k, v in flatten(params).items()}


def _params_from_text(text: str, search_best: dict | None, where: str) -> dict[str, str]:
    """Load a params.yaml text with the one loader, with the search's best values laid over train as
    the train stage does. {} when the loader rejects it (e.g. a revision older than a params key)."""
    from lmpipe.params import load_params

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PARAMS_FILE
        path.write_text(text, encoding="utf-8")
        overrides = {"train": (search_best or {}).get("params") or {}}
        try:
            return flat_params(load_params(path, overrides=overrides).to_dict())
        except ParamsError as err:
            print(
                f"warning: {where}: params not readable ({err}); it is left out of seed groups",
                file=sys.stderr,
            )
            return {}


def _read_predictions(text: str, where: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{where}: predictions are not a readable CSV ({err})") from None
    return frame


def from_git(ref: str, root: Path, predictions: str = PREDICTIONS) -> Candidate | None:
    """A DVC experiment or a git revision; None if ``ref`` is neither. Ambiguous names are errors."""
    if ref.startswith("-"):  # never let an input become a git option
        return None
    refs = experiment_refs(root).get(ref, [])
    if len(refs) > 1:
        baselines = ", ".join(r.split("/")[2] + r.split("/")[3][:5] for r in refs)
        raise UserError(
            f"experiment name '{ref}' exists on several baselines ({baselines}); give its ref or commit"
        )
    rev = refs[0] if refs else ref
    parsed = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if parsed.returncode != 0:
        return None
    commit = parsed.stdout.strip()

    def show(path: str) -> str | None:
        out = _git(root, "show", f"{commit}:{path}")
        return out.stdout if out.returncode == 0 else None

    text = show(predictions)
    if text is None:
        raise UserError(
            f"{ref}: no {predictions} at {commit[:7]} (did its evaluate stage run and get committed?)"
        )
    metrics = json.loads(show(EVAL_REPORT) or "{}")
    search = json.loads(show(SEARCH_BEST) or "{}")
    params_text = show(PARAMS_FILE)
    kind = "DVC experiment" if refs else "git revision"
    return Candidate(
        label=ref,
        source=f"{kind} {commit[:7]}",
        predictions=_read_predictions(text, ref),
        params=_params_from_text(params_text, search, ref) if params_text else {},
        run_id=str(metrics.get("mlflow_run_id", "")),
        task=metrics.get("task", tasks.CLASSIFICATION),
    )


def from_workspace(root: Path, predictions: str = PREDICTIONS) -> Candidate:
    path = root / predictions
    if not path.is_file():
        raise UserError(f"workspace: {predictions} not found (run `dvc repro` first)")
    report_path, search_path = root / EVAL_REPORT, root / SEARCH_BEST
    metrics = json.loads(report_path.read_text()) if report_path.is_file() else {}
    search = json.loads(search_path.read_text()) if search_path.is_file() else {}
    params_path = root / PARAMS_FILE
    return Candidate(
        label=WORKSPACE,
        source="working tree",
        predictions=_read_predictions(path.read_text(encoding="utf-8"), WORKSPACE),
        params=_params_from_text(params_path.read_text(), search, WORKSPACE) if params_path.is_file() else {},
        run_id=str(metrics.get("mlflow_run_id", "")),
        task=metrics.get("task", tasks.CLASSIFICATION),
    )


def from_mlflow(run_id: str) -> Candidate | None:
    """A train or evaluate run in the current MLflow store; None if there is no such run."""
    from lmpipe import tracking

    run = tracking.get_run(run_id)
    if run is None:
        return None
    stage = run.data.tags.get("stage", "")
    if stage == "train":
        evaluation = tracking.evaluate_run_of(run_id)
        if evaluation is None:
            raise UserError(f"MLflow run {run_id} is a train run with no FINISHED evaluate run")
        train = run
    elif stage == "evaluate":
        evaluation = run
        train = tracking.get_run(run.data.tags.get("train_run_id", "")) or run
    else:
        raise UserError(f"MLflow run {run_id} is a '{stage or 'untagged'}' run; give a train or evaluate run")
    with tempfile.TemporaryDirectory() as tmp:
        local = tracking.download_artifact(evaluation.info.run_id, "evaluation/predictions.csv", tmp)
        if local is None:
            raise UserError(f"MLflow run {evaluation.info.run_id} has no evaluation/predictions.csv artefact")
        frame = _read_predictions(local.read_text(encoding="utf-8"), run_id)
    name = run.data.tags.get("dvc_exp_name", "")
    return Candidate(
        label=f"{name}@{run_id[:8]}" if name else f"run:{run_id[:8]}",
        source=f"MLflow run {evaluation.info.run_id[:8]}" + (f" (DVC experiment {name})" if name else ""),
        predictions=frame,
        params=dict(train.data.params),  # the resolved params the model was trained with
        run_id=evaluation.info.run_id,
        task=train.data.params.get("base.task", tasks.CLASSIFICATION),
    )


def resolve(ref: str, root: Path, predictions: str = PREDICTIONS) -> Candidate:
    """Turn one command-line input into a Candidate, or raise a one-line ``UserError``."""
    if ref == WORKSPACE:
        return from_workspace(root, predictions)
    if RUN_ID.match(ref):
        found = from_mlflow(ref)
        if found is not None:
            return found
    found = from_git(ref, root, predictions)
    if found is not None:
        return found
    from lmpipe import tracking

    where = tracking.sqlite_path(tracking.tracking_uri()) or tracking.tracking_uri()
    raise UserError(
        f"unknown experiment or run '{ref}': not a DVC experiment (see `dvc exp show`), a git revision, "
        f"or an MLflow run id in {where}"
    )


# --- before `dvc exp run --queue` -------------------------------------------------------------------


def queue_problems(root: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) about queueing experiments from ``root`` right now.

    Errors: files a queued run would not see (untracked by git, or deps tracked by neither git nor
    DVC). Warnings: environment that the queue workers would not have.
    """
    errors: list[str] = []
    warnings: list[str] = []
    if _git(root, "rev-parse", "--verify", "--quiet", "HEAD").returncode != 0:
        return ["the repo has no commit yet: commit it before queueing experiments"], []
    untracked = [p for p in _git(root, "ls-files", "--others", "--exclude-standard").stdout.splitlines() if p]
    if untracked:
        shown = ", ".join(untracked[:5]) + (f" and {len(untracked) - 5} more" if len(untracked) > 5 else "")
        errors.append(
            f"{len(untracked)} untracked file(s) would be silently left out of queued experiments: {shown}. "
            "`git add` them (queued runs see committed and staged files and your uncommitted edits "
            "to tracked files), `dvc add` large data, or list them in .gitignore"
        )
    errors += _untracked_deps(root)
    python, dvc = shutil.which("python"), shutil.which("dvc")
    if python is None or Path(python).parent.absolute() != Path(sys.executable).parent.absolute():
        warnings.append(
            f"`python` on PATH is {python or 'missing'}, not this environment's ({sys.executable}): the "
            "queue workers run the stages with `python` from the PATH of the shell that runs "
            "`dvc queue start`; activate .venv (or use `make queue-start`) first"
        )
    if dvc is None:
        warnings.append("`dvc` is not on PATH: activate .venv (or use `make queue-start`)")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        warnings.append(
            f"MLFLOW_TRACKING_URI={uri} is set here: queued experiments get the environment of the shell "
            "that runs `dvc queue start` (not of `dvc exp run --queue`); start the workers from a shell "
            "where it is set, or unset it to use the repo's own store"
        )
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        warnings.append(
            "HF_HUB_OFFLINE is not 1 here: export it before `dvc queue start` (as `make queue-start` does) "
            "so that no queued run tries to reach a model hub"
        )
    return errors, warnings


def _untracked_deps(root: Path) -> list[str]:
    """Stage deps (the prepare source among them) that neither git nor DVC tracks: a queued run would miss them."""
    from dvc.repo import Repo

    git_files = set(_git(root, "ls-files").stdout.splitlines())
    paths: set[str] = set()
    dvc_outs: set[str] = set()
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                dvc_outs.add(Path(os.path.relpath(out.fs_path, root)).as_posix())
            for dep in stage.deps:
                if getattr(dep, "def_repo", None):  # imported from another repo: DVC fetches it
                    continue
                paths.add(Path(os.path.relpath(dep.fs_path, root)).as_posix())

    def tracked(path: str) -> bool:
        if path in git_files or any(f.startswith(path.rstrip("/") + "/") for f in git_files):
            return True
        return any(path == o or path.startswith(o + "/") for o in dvc_outs)

    missing = sorted(p for p in paths if not tracked(p) and not p.startswith(".."))
    if not missing:
        return []
    return [
        f"{', '.join(missing)}: used by the pipeline but tracked by neither git nor DVC, so queued "
        "experiments would not have it; `git add` it, or `dvc add` it and commit the .dvc file"
    ]
