"""search: an Optuna study over the train params, each trial run through the shared training loop
(``lmpipe.tuning.optuna_study`` holds the study's parts: sampler, pruner, objective, result tables).

Optuna, torch and the training code are imported where a study runs: search is off by default, and the
stage then only writes its "disabled" outputs, without ~10 s of imports on every ``dvc repro``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lmpipe import io, reports, tasks
from lmpipe.errors import UserError
from lmpipe.modeling import hub
from lmpipe.params import Params

# the modules of the task's package this stage uses (dvc.yaml: src/lmpipe/tasks/${base.task}/<part>.py)
TASK_PARTS = ("model",)


@dataclass(frozen=True)
class Paths:
    data: str  # folder with train.parquet and val.parquet
    labels: str  # labels.json from prepare
    out: str  # folder for the search reports
    db: str  # folder for the study storage
    params: str = "params.yaml"  # the params file, handed to the local worker processes


@dataclass(frozen=True)
class WorkerPaths:
    data: str  # folder with train.parquet and val.parquet
    labels: str  # labels.json from prepare


def run(params: Params, paths: Paths) -> str:
    cfg = params.search
    tasks.for_stage(params.base.task, "search", TASK_PARTS)  # the trials build the task's datasets
    if not cfg.enabled:
        return disabled(paths, hub.record_of(params.base))

    import optuna
    import torch

    from lmpipe import data, tracking
    from lmpipe.modeling import models
    from lmpipe.tuning import optuna_study

    name = optuna_study.study_name(params)
    label2id = data.read_label_map(paths.labels)
    model_dir = models.resolve_model_dir(params.base.model, params.base.revision)
    train, val = data.read_split(paths.data, "train"), data.read_split(paths.data, "val")
    n_trials = optuna_study.grid_size(cfg) if cfg.strategy == "grid" else cfg.n_trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with io.atomic_dir(paths.db) as db, io.staged_outputs(paths.out) as out:
        # the default file moves into place with the rest of the outputs: record where it will be
        storage_url = cfg.storage or f"sqlite:///{Path(db).resolve() / 'optuna.db'}"
        shown_storage = (
            optuna_study.shown_url(cfg.storage)
            if cfg.storage
            else f"sqlite:///{Path(paths.db) / 'optuna.db'}"
        )
        storage = optuna_study.open_storage(storage_url, cfg.heartbeat)
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction="maximize",
            load_if_exists=True,
            sampler=optuna_study.make_sampler(cfg, params.base.seed),
            pruner=optuna_study.make_pruner(cfg, optuna_study.max_trial_steps(params)),
        )
        space = {k: dataclasses.asdict(v) for k, v in cfg.space.items()}
        with tracking.stage_run(
            params,
            "search",
            f"search-{name}",
            tags={
                "study_name": name,
                "strategy": cfg.strategy,
                "pruner": cfg.pruner,
                "folds": str(cfg.folds),
                "workers": str(cfg.workers),
            },
        ) as parent:
            tracking.log_dict(space, "search_space.json")
            optuna_study.mark_study(
                study, params, optuna_study.data_fingerprint(train, val), parent.info.run_id
            )
            start = time.perf_counter()
            objective = optuna_study.Objective(params, train, val, label2id, model_dir)
            budget = optuna_study.Budget(n_trials, optuna_study.space_size(cfg))
            threads = optuna_study.worker_threads(cfg.workers)
            with local_workers(cfg.workers - 1, threads, paths, storage_url):
                if cfg.workers > 1:
                    torch.set_num_threads(threads)
                optuna_study.work(study, storage, objective, budget, cfg.timeout)
            optuna_study.wait_for_others(study, cfg.heartbeat)
            seconds = time.perf_counter() - start
            trials = optuna_study.trials_frame(study)
            metrics, best_params = results(
                study, trials, name, cfg, seconds, shown_storage, parent.info.run_id
            )
            record(study, trials, metrics, best_params, out, db, hub.record_of(params.base))
    best = study.best_trial
    return (
        f"search: best val macro-F1 {best.value:.4f} (trial {best.number}: {best.params}); "
        f"{metrics['complete']} complete, {metrics['pruned']} pruned, {metrics['failed']} failed "
        f"in {seconds:.0f} s"
    )


@contextlib.contextmanager
def local_workers(count: int, threads: int, paths: Paths, storage_url: str) -> Iterator[None]:
    """``count`` more workers on the study, as processes of ``lmpipe search-worker`` (the command that
    other machines run too), each with its share of the cores. They are waited for on the way out,
    and stopped if the stage fails or is interrupted."""
    if count < 1:
        yield
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lmpipe.cli", "search-worker", "--params", paths.params]
            + ["--data", paths.data, "--labels", paths.labels, "--storage", storage_url]
            + ["--worker", str(i)],
            env=env,
        )
        for i in range(1, count + 1)
    ]
    try:
        yield
    except BaseException:
        for proc in procs:
            proc.terminate()
        raise
    finally:
        for i, proc in enumerate(procs, 1):
            if proc.wait() != 0:
                print(f"search: worker {i} exited with code {proc.returncode}; its trials are in the study")


def worker(
    params: Params,
    paths: WorkerPaths,
    storage: str | None = None,
    index: int | None = None,
    wait: float = 0,
) -> str:
    """``lmpipe search-worker``: join the study that the search stage opened on the shared storage (same
    params and data, else a one-line error) and run trials until the study has its ``n_trials``."""
    cfg = params.search
    url = storage or cfg.storage
    if url is None:
        raise UserError(
            "search.storage: null (a local SQLite file of the search stage): a worker on another machine "
            "needs the shared RDB URL, e.g. postgresql://user@host/optuna"
        )
    import optuna

    from lmpipe import data
    from lmpipe.modeling import models
    from lmpipe.tuning import optuna_study

    rdb = optuna_study.open_storage(url, cfg.heartbeat)
    train, val = data.read_split(paths.data, "train"), data.read_split(paths.data, "val")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # each worker samples with a seed of its own: one seed everywhere would propose the same points
    index = index if index is not None else os.getpid()
    study = optuna_study.join_study(
        params, rdb, optuna_study.data_fingerprint(train, val), params.base.seed + index, wait=wait
    )
    objective = optuna_study.Objective(
        params,
        train,
        val,
        data.read_label_map(paths.labels),
        models.resolve_model_dir(params.base.model, params.base.revision),
        parent_run_id=study.user_attrs.get("mlflow_run_id"),
    )
    n_trials = optuna_study.grid_size(cfg) if cfg.strategy == "grid" else cfg.n_trials
    ran = optuna_study.work(
        study, rdb, objective, optuna_study.Budget(n_trials, optuna_study.space_size(cfg)), cfg.timeout
    )
    return f"search-worker: ran {ran} trial(s) of study {study.study_name} on {optuna_study.shown_url(url)}"


def disabled(paths: Paths, model: dict) -> str:
    """What a disabled search writes: its declared outputs, empty, saying so (train uses its own params)."""
    with io.staged_outputs(paths.out) as out:
        io.write_json(out / "best_params.json", {"enabled": False, "params": {}})
        reports.write("search", {"enabled": False}, out / "metrics.json", out / "report.json", model=model)
        pd.DataFrame(columns=["number", "state", "value"]).to_csv(out / "trials.csv", index=False)
        pd.DataFrame(columns=["trial", "value", "best_so_far"]).to_csv(out / "history.csv", index=False)
        pd.DataFrame(columns=["param", "importance"]).to_csv(out / "importance.csv", index=False)
    with io.atomic_dir(paths.db) as db:
        io.write_json(db / "study.json", {"enabled": False})
    return "search: disabled (search.enabled: false); train uses its own params"


def results(
    study, trials: pd.DataFrame, name: str, cfg, seconds: float, storage: str, run_id: str
) -> tuple[dict, dict]:
    """The study's report (its headline: trials by state, the best value) and what train reads
    (``best_params.json``); a one-line error when no trial completed."""
    counts = trials["state"].value_counts().to_dict()
    if not counts.get("COMPLETE"):
        reasons = trials.loc[trials["state"] == "FAIL", "fail_reason"].tolist()
        first = reasons[0] if reasons else "every trial was pruned or none started"
        raise UserError(f"search: no trial of {len(trials)} completed ({counts}); first failure: {first}")
    best = study.best_trial
    metrics = {
        "enabled": True,
        "study_name": name,
        "strategy": cfg.strategy,
        "pruner": cfg.pruner,
        "trials": len(trials),
        "complete": int(counts.get("COMPLETE", 0)),
        "pruned": int(counts.get("PRUNED", 0)),
        "failed": int(counts.get("FAIL", 0)),
        "best_trial": best.number,
        "best_value": best.value,
        "best_value_std": best.user_attrs.get("value_std"),
        "seconds": round(seconds, 1),
        "mlflow_run_id": run_id,
    }
    best_params = {
        "enabled": True,
        "params": dict(best.params),
        "value": best.value,
        "value_std": best.user_attrs.get("value_std"),
        "trial": best.number,
        "study_name": name,
        "storage": storage,
        "mlflow_run_id": run_id,
    }
    return metrics, best_params


def record(
    study, trials: pd.DataFrame, metrics: dict, best_params: dict, out: Path, db: Path, model: dict
) -> None:
    """The tables, the report and its DVC metrics, ``best_params.json`` and ``study.json``; the same in
    the active MLflow run, with the optimisation history and the params' importance as figures."""
    from lmpipe import plots, tracking
    from lmpipe.tuning import optuna_study

    history, importance = optuna_study.history_frame(trials), optuna_study.importance_frame(study)
    trials.to_csv(out / "trials.csv", index=False)
    history.to_csv(out / "history.csv", index=False)
    importance.to_csv(out / "importance.csv", index=False)
    reports.write("search", metrics, out / "metrics.json", out / "report.json", model=model)
    tracking.log_dict(metrics, "search_report.json")
    io.write_json(out / "best_params.json", best_params)
    storage = best_params["storage"]
    io.write_json(
        db / "study.json", {"enabled": True, "study_name": metrics["study_name"], "storage": storage}
    )
    tracking.log_metrics({k: v for k, v in metrics.items() if k not in ("best_trial",)})
    tracking.set_tags({f"best.{k}": v for k, v in study.best_trial.params.items()})
    tracking.log_artifact(out / "trials.csv")
    fig = plots.search_history_figure(history)
    tracking.log_figure(fig, "plots/optimisation_history.png")
    plots.close(fig)
    if len(importance):
        fig = plots.importance_figure(importance)
        tracking.log_figure(fig, "plots/param_importance.png")
        plots.close(fig)
