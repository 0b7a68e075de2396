"""Hyperparameter search with Optuna, on top of the one training loop in ``training.py``.

Each trial lays its sampled values over the ``train`` params, trains on a cheap budget (a seeded,
stratified subsample of the train split, a shorter ``max_length``, fewer epochs) and scores val macro-F1,
or the mean over ``folds`` stratified folds of the (subsampled) train split. The val metric is reported
to the pruner after every epoch through a Trainer callback, so search needs no loop of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import pandas as pd
from sklearn.model_selection import StratifiedKFold
from transformers import TrainerCallback

from lmpipe import data, tasks, tracking
from lmpipe.errors import UserError, unreachable
from lmpipe.modeling import models
from lmpipe.modeling.training import SELECTION_METRIC, train_model
from lmpipe.params import Params, SearchParams, SpaceParam, TrainParams


def trial_seed(base_seed: int) -> int:
    """The seed of every trial, derived from the base seed, so the same params give the same study.

    All trials share it (common random numbers): the same train subsample, folds, head initialisation
    and data order, so two trials differ by their params alone. With a seed per trial, two trials of
    identical params on the default budget differed by ~2 pt of val macro-F1, more than most params do.
    """
    return (base_seed * 1_000_003 + 7919) % (2**31 - 1)


# search keys that say how a study runs, not what it is: workers with different values share one study
RUN_KEYS = ("storage", "workers", "heartbeat")


def study_params(params: Params) -> dict[str, Any]:
    """Everything that shapes the study: a changed space, budget, data seed or model is a new study."""
    return {
        "base": dataclasses.asdict(params.base),
        "train": dataclasses.asdict(params.train),
        "search": {k: v for k, v in dataclasses.asdict(params.search).items() if k not in RUN_KEYS},
    }


def study_hash(params: Params) -> str:
    blob = json.dumps(study_params(params), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def study_name(params: Params) -> str:
    """The configured name plus a hash of ``study_params``: a changed space, budget, data seed or model
    starts a new study, while identical params on several machines share one."""
    return f"{params.search.study_name}-{study_hash(params)}"


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def data_fingerprint(*frames: pd.DataFrame) -> str:
    """A hash of the rows a study trains and scores on, so that a worker with other data cannot join."""
    digest = hashlib.sha256()
    for frame in frames:
        # list columns (a sentence's tokens and tags) hash as their JSON text
        frame = frame.apply(lambda c: c.map(lambda v: json.dumps(list(v))) if c.map(_is_list).any() else c)
        digest.update(pd.util.hash_pandas_object(frame, index=False).values.tobytes())
    return digest.hexdigest()[:12]


def make_sampler(search: SearchParams, seed: int) -> optuna.samplers.BaseSampler:
    if search.strategy == "grid":
        return optuna.samplers.GridSampler({k: v.grid() for k, v in search.space.items()}, seed=seed)
    if search.strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # few trials: start modelling after 3 random ones rather than the default 10
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(3, search.n_trials))


def make_pruner(search: SearchParams, max_steps: int) -> optuna.pruners.BasePruner:
    if search.pruner in ("median", "percentile"):
        # one finished trial is enough to compare against; judge from the first epoch on
        percentile = 50.0 if search.pruner == "median" else search.percentile
        return optuna.pruners.PercentilePruner(percentile, n_startup_trials=1, n_warmup_steps=0)
    if search.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(max_steps, 2), reduction_factor=2
        )
    return optuna.pruners.NopPruner()


def max_trial_steps(params: Params) -> int:
    """The most pruner steps (epochs, over all folds) a trial can report: Hyperband's max resource."""
    search, train = params.search, params.train
    epochs = search.trial.epochs
    spec = search.space.get("epochs")
    if spec is not None:
        epochs = int(spec.high) if spec.type == "int" else max(int(x) for x in spec.choices or [epochs])
    searched = search.space.get("strategy")
    if "gradual_unfreezing" in ((searched.choices or []) if searched else [train.strategy]):
        epochs = max(epochs, sum(p.epochs for p in train.phases))  # the phases replace `epochs`
    return epochs * search.folds


def grid_size(search: SearchParams) -> int:
    return math.prod(len(spec.grid()) for spec in search.space.values())


def space_size(search: SearchParams) -> int | None:
    """How many distinct points the space has, or None when a float without a step makes it infinite."""
    try:
        return grid_size(search)
    except ValueError:
        return None


class Budget:
    """How many trials a study runs, over every worker that shares its storage: ``n_trials`` trials
    that train, in any state (a FAIL counts: it was run). Duplicates (``completed_twin``) cost no
    training and do not count; the study also stops when every point of a finite space has trained, or
    after ``4 * n_trials`` trials in all."""

    def __init__(self, n_trials: int, space_points: int | None = None):
        self.trained_needed = min(n_trials, space_points) if space_points else n_trials
        self.max_total = 4 * n_trials

    def is_open(self, study: optuna.Study) -> bool:
        trials = study.get_trials(deepcopy=False)
        trained = sum("duplicate_of" not in t.user_attrs for t in trials)
        return trained < self.trained_needed and len(trials) < self.max_total


# ------------------------------------------------------------------ the storage and the workers
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which worker ran a trial (trials.csv, MLflow tag)
# seconds a PostgreSQL or MySQL connection attempt may take before the stage says the server is unreachable
CONNECT_TIMEOUT = 5
SQLITE_BUSY_TIMEOUT = 60  # local workers share the default SQLite file: wait for each other's writes


def shown_url(url: str) -> str:
    """The URL with its password hidden, fit for logs, reports and error messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: say it as it was written
        return url


def open_storage(url: str, heartbeat: int) -> optuna.storages.RDBStorage:
    """The study's storage, with a bounded connect time and worker heartbeats.

    A worker that dies mid-trial stops beating; after ``3 * heartbeat`` seconds the next worker to start
    a trial (or the stage waiting for the last ones) marks its trial FAIL, so no trial stays RUNNING.
    An unreachable server, wrong credentials or a missing database raise a one-line ``UserError``
    naming ``search.storage`` and the host, within ``CONNECT_TIMEOUT`` seconds.
    """
    from sqlalchemy.engine import make_url

    try:
        backend = make_url(url).get_backend_name()
    except Exception as err:
        raise UserError(f"search.storage: {url!r} is not a database URL ({err})") from None
    if backend == "sqlite":
        connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT}
    elif "connect_timeout" in url:
        connect_args = {}
    else:
        connect_args = {"connect_timeout": CONNECT_TIMEOUT}
    # Optuna 4.9 renamed the callback; heartbeats are "experimental" since 2.9 and stable in use
    stale = "heartbeat_stale_trial_callback"
    if stale not in inspect.signature(optuna.storages.RDBStorage).parameters:
        stale = "failed_trial_callback"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs={"connect_args": connect_args, "pool_pre_ping": backend != "sqlite"},
                heartbeat_interval=heartbeat,
                grace_period=3 * heartbeat,
                **{stale: _report_stale},
            )
    except ImportError:
        raise UserError(
            f"search.storage: no driver for {backend} URLs here: pip install -e '.[team]' "
            "(psycopg for postgresql://)"
        ) from None
    except Exception as err:  # unreachable, refused, bad credentials, no such database
        raise unreachable("search.storage", shown_url(url), err) from None


def _report_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    print(f"trial {trial.number}: FAIL (its worker stopped sending heartbeats: killed or cut off)")


@contextlib.contextmanager
def claimed(storage: optuna.storages.RDBStorage, name: str):
    """Held while a worker counts the study's trials and queues the next one, so that two workers
    never both take the last slot: a PostgreSQL advisory lock, a MySQL named lock, or a file lock
    beside a SQLite file. (Other databases get no lock and may run up to workers - 1 extra trials.)"""
    from sqlalchemy import text

    key = int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)
    dialect = storage.engine.dialect.name
    if dialect == "sqlite":
        import fcntl

        path = storage.engine.url.database
        with open(f"{path}.claim", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    if dialect not in ("postgresql", "mysql"):
        yield
        return
    lock, unlock = (
        ("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)")
        if dialect == "postgresql"
        else ("SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)")
    )
    with storage.engine.connect() as conn:
        conn.execute(text(lock), {"k": key if dialect == "postgresql" else str(key)})
        try:
            yield
        finally:
            conn.execute(text(unlock), {"k": key if dialect == "postgresql" else str(key)})


def work(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    objective: Callable[[optuna.Trial], float],
    budget: Budget,
    timeout: float | None,
) -> int:
    """One worker's loop: while the study's budget is open (counted over every worker), claim the next
    trial and run it. Returns how many this worker ran. ``timeout``: no new trial after that many s."""
    from optuna.trial import TrialState, create_trial

    deadline = None if timeout is None else time.monotonic() + timeout
    ran = 0
    while deadline is None or time.monotonic() < deadline:
        with claimed(storage, study.study_name):
            if not budget.is_open(study):
                break
            # a queued (WAITING) trial counts at once; optimize() below takes one queued trial, this
            # one or another worker's, and runs it with the heartbeat and failure handling of Optuna
            study.add_trial(create_trial(state=TrialState.WAITING))
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        ran += 1
    return ran


def wait_for_others(study: optuna.Study, heartbeat: int, say: Callable[[str], None] = print) -> None:
    """Wait until no trial is running or queued (other workers' trials, a killed worker's trial until
    its heartbeat is stale), so that the results read from the storage are final."""
    from optuna.trial import TrialState

    said = False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        pending = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        if not pending:
            return
        if not said:
            say(f"search: waiting for {len(pending)} trial(s) still running on other workers")
            said = True
        time.sleep(min(heartbeat, 5))


def mark_study(study: optuna.Study, params: Params, fingerprint: str, parent_run_id: str) -> None:
    """Record what a joining worker must match (the params that shape the study, the data) and the
    MLflow run its trials go under."""
    study.set_user_attr("params_hash", study_hash(params))
    study.set_user_attr("params", study_params(params))
    study.set_user_attr("data_fingerprint", fingerprint)
    study.set_user_attr("mlflow_run_id", parent_run_id)


def join_study(
    params: Params, storage: optuna.storages.RDBStorage, fingerprint: str, seed: int, wait: float = 0
) -> optuna.Study:
    """The study this worker's params belong to, if the search stage has opened it and its data is the
    same; otherwise a one-line ``UserError`` saying what differs. ``wait``: seconds to wait for the
    stage to open the study (workers started together with the stage)."""
    name = study_name(params)
    deadline = time.monotonic() + wait
    while not _opened(storage, name) and time.monotonic() < deadline:
        time.sleep(1.0)
    names = optuna.study.get_all_study_names(storage)
    if name not in names:
        prefix = f"{params.search.study_name}-"
        others = [n for n in names if n.startswith(prefix)]
        if not others:
            raise UserError(
                f"search-worker: no study {name} in the storage: start the search stage first "
                "(dvc repro search), then the workers"
            )
        theirs = optuna.load_study(study_name=others[-1], storage=storage).user_attrs.get("params", {})
        diff = _differences(study_params(params), theirs)
        raise UserError(
            f"search-worker: params differ from study {others[-1]}'s, not joining: {'; '.join(diff[:5])}"
        )
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(params.search, seed),
        pruner=make_pruner(params.search, max_trial_steps(params)),
    )
    theirs = study.user_attrs.get("data_fingerprint")
    if theirs is not None and theirs != fingerprint:
        raise UserError(
            f"search-worker: train/val data differ from study {name}'s (fingerprint {fingerprint} here, "
            f"{theirs} there), not joining: check out the same commit and `dvc pull`"
        )
    return study


def _opened(storage: optuna.storages.RDBStorage, name: str) -> bool:
    """The stage has created the study and marked it (``mark_study``), so a worker can join it."""
    if name not in optuna.study.get_all_study_names(storage):
        return False
    return "mlflow_run_id" in optuna.load_study(study_name=name, storage=storage).user_attrs


def _differences(mine: dict, theirs: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {json.dumps(a)} here, {json.dumps(b)} there")
    return out


def worker_threads(workers: int) -> int:
    """Torch threads per local worker: an equal share of the cores (OMP_NUM_THREADS wins when set), so
    that N workers do not oversubscribe the CPU."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // workers)


def suggest(trial: optuna.Trial, name: str, spec: SpaceParam) -> Any:
    if spec.type == "categorical":
        return trial.suggest_categorical(name, spec.choices)
    if spec.type == "int":
        return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)


class PruningReporter(TrainerCallback):
    """Reports val macro-F1 to Optuna after every epoch and stops the trial when the pruner says so.

    The trial's last step (``last_step``) is reported but never pruned: its training is already paid
    for, and pruning it would only throw its value away.
    """

    def __init__(
        self,
        trial: optuna.Trial,
        step_offset: int = 0,
        last_step: int | None = None,
        metric: str = SELECTION_METRIC,
    ):
        self.trial, self.metric = trial, metric
        self.step_offset = step_offset
        self.last_step = last_step

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(f"eval_{self.metric}")
        if value is None:
            return
        step = self.step_offset + round(state.epoch or 0)
        self.trial.report(float(value), step)
        if (self.last_step is None or step < self.last_step) and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with val {self.metric} {value:.4f}")


def folds_of(
    train: pd.DataFrame, val: pd.DataFrame, folds: int, seed: int
) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """``folds == 1``: train on ``train``, score on the val split. Otherwise stratified k-fold inside ``train``."""
    if folds == 1:
        return [(train, val)]
    smallest = int(train["label"].value_counts().min())
    if smallest < folds:
        raise UserError(
            f"search.folds: {folds} folds need at least {folds} rows per class in the trial's "
            f"train sample, the rarest class has {smallest} (raise search.trial.max_train_samples)"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(train.iloc[a], train.iloc[b]) for a, b in splitter.split(train, train["label"])]


@dataclass
class Objective:
    """The Optuna objective: one MLflow child run per trial, under the study's parent run."""

    params: Params
    train: pd.DataFrame
    val: pd.DataFrame
    label2id: dict[str, int]
    model_dir: Any
    on_trial: Callable[[str], None] = print
    parent_run_id: str | None = None  # a worker process's trials go under the stage's run by its id

    def __call__(self, trial: optuna.Trial) -> float:
        search, budget = self.params.search, self.params.search.trial
        start = time.perf_counter()
        values = {name: suggest(trial, name, spec) for name, spec in search.space.items()}
        cfg: TrainParams = dataclasses.replace(self.params.train, **{"epochs": budget.epochs, **values})
        seed = trial_seed(self.params.base.seed)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("worker", WORKER)
        # same params, same seed, same score: a sampler that proposes a finished point again gets its
        # value back without training (TPE does this on small categorical spaces)
        twin = completed_twin(trial, values)
        tags = {"trial_number": str(trial.number), "trial_seed": str(seed), "worker": WORKER}
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin.number)
            tags["duplicate_of"] = str(twin.number)
        state, outcome = "COMPLETE", None
        with tracking.child_run(
            self.params,
            f"trial-{trial.number}",
            dataclasses.asdict(cfg),
            "search-trial",
            tags,
            parent_run_id=self.parent_run_id,
        ) as child:
            trial.set_user_attr("mlflow_run_id", child.info.run_id)
            try:
                scores = twin.user_attrs["fold_values"] if twin is not None else self._score(trial, cfg, seed)
            except optuna.TrialPruned as pruned:
                state, outcome = "PRUNED", pruned
            except Exception as err:
                trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}"[:500])
                tracking.set_tags({"trial_state": "FAIL"})
                self.on_trial(f"trial {trial.number}: FAIL ({type(err).__name__}: {err})")
                raise
            duration = time.perf_counter() - start
            tracking.set_tags({"trial_state": state})
            tracking.log_metrics({"duration_s": duration})
            if state == "COMPLETE":
                # the std across folds; undefined (None) when there is a single val split
                mean, std = float(np.mean(scores)), (float(np.std(scores)) if len(scores) > 1 else None)
                trial.set_user_attr("value_std", std)
                trial.set_user_attr("fold_values", scores)
                tracking.log_metrics({"value": mean, **({"value_std": std} if std is not None else {})})
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        if outcome is not None:
            self.on_trial(f"trial {trial.number}: PRUNED ({shown}) after {duration:.0f} s")
            raise outcome
        spread = f" ± {std:.4f}" if std is not None else ""
        again = f", as trial {twin.number}" if twin is not None else ""
        self.on_trial(f"trial {trial.number}: {mean:.4f}{spread} ({shown}) in {duration:.0f} s{again}")
        return mean

    def _score(self, trial: optuna.Trial, cfg: TrainParams, seed: int) -> list[float]:
        budget = self.params.search.trial
        sample = data.stratified_sample(self.train, budget.max_train_samples, seed)
        tokenizer = models.load_tokenizer(self.model_dir)
        scores, epochs = [], cfg.planned_epochs
        reading = self.params.base.reading.as_dict()
        task = tasks.get(self.params.base.task)
        for fold, (fold_train, fold_val) in enumerate(
            folds_of(sample, self.val, self.params.search.folds, seed)
        ):
            models.seed_everything(seed)
            model = models.load_model(self.model_dir, self.label2id, task=self.params.base.task)
            prefix = f"fold{fold}_" if self.params.search.folds > 1 else ""
            result = train_model(
                model,
                tokenizer,
                task.dataset(
                    tokenizer,
                    fold_train,
                    self.label2id,
                    budget.max_length,
                    reading,
                    True,
                    seed,
                    params=self.params,
                ),
                task.dataset(
                    tokenizer, fold_val, self.label2id, budget.max_length, reading, params=self.params
                ),
                cfg,
                seed,
                callbacks=[
                    tracking.MlflowTrainingLogger(prefix=prefix),
                    PruningReporter(
                        trial, fold * epochs, self.params.search.folds * epochs, task.selection_metric
                    ),
                ],
                show_progress=False,
            )
            scores.append(result.best_val_score)
        return scores


def completed_twin(trial: optuna.Trial, values: dict[str, Any]) -> optuna.trial.FrozenTrial | None:
    """The first completed trial of the study with exactly these params, if any."""
    for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if other.params == values and "fold_values" in other.user_attrs:
            return other
    return None


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, std, duration, seed, params and a failure reason."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "value_std": t.user_attrs.get("value_std"),
                "duration_s": None if duration is None else round(duration, 1),
                "seed": t.user_attrs.get("seed"),
                "duplicate_of": t.user_attrs.get("duplicate_of"),
                "worker": t.user_attrs.get("worker", ""),
                **{f"params_{k}": v for k, v in t.params.items()},
                "fail_reason": t.user_attrs.get("fail_reason")
                or ("its worker stopped (no heartbeat)" if t.state.name == "FAIL" else ""),
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""),
            }
        )
    return pd.DataFrame(rows)


def history_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """Value per completed trial and the best so far (the optimisation history plot)."""
    done = trials[trials["state"] == "COMPLETE"][["number", "value"]].sort_values("number")
    done = done.assign(best_so_far=done["value"].cummax())
    return done.rename(columns={"number": "trial"}).reset_index(drop=True)


def importance_frame(study: optuna.Study) -> pd.DataFrame:
    """Param importances (Optuna's default evaluator); empty when fewer than two trials completed or
    no param varied."""
    try:
        scores = optuna.importance.get_param_importances(study)
    except Exception as err:  # too few trials, or nothing varied: the plot is optional, the study is not
        print(f"search: no param importances ({type(err).__name__}: {err})")
        scores = {}
    return pd.DataFrame({"param": list(scores), "importance": [round(v, 6) for v in scores.values()]})
