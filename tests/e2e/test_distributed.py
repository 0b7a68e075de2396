"""Several training processes: the real train stage launching 2 processes on the CPU (gloo, DDP) on the
tiny encoder, against a real MLflow store; and two machines on one host, two launchers that meet at a
static rendezvous on a loopback port.

One temporary repo runs ``dvc repro train`` once (one process); each test then runs a stage script there
with its own params file and output folder, as ``test_strategies.py`` does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lmpipe.params import write_params
from tests.conftest import new_repo, pipeline_env, remove, run, train_cmd, train_until_checkpoint
from tests.services import free_port, stop_process

pytestmark = [pytest.mark.extended, pytest.mark.distributed]

ROWS = 64  # 80 rows sampled, 80% to train
TWO = {"processes": 2, "nnodes": 1, "node_rank": 0, "rdzv_endpoint": "localhost:29500", "rdzv_timeout": 600}
# the per-step train loss of two machines of one process each against one machine of two processes, at the
# same global batch: the same shards, seeds and gloo all-reduce of 2 ranks (a + b, the same sum on both
# ranks either way), each process on one thread. It came out identical (difference 0.0 at every logged
# step, docs/distributed.md); the tolerance only leaves room for a float32 sum that another torch or gloo
# build may order differently, and is far below the loss's own change between logged steps (~1e-2)
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_encoder) -> Iterator[Path]:
    repo = new_repo(
        tmp_path_factory.mktemp("distributed"),
        {
            "base": {"model": str(tiny_encoder), "max_length": 32},
            "prepare": {"max_rows": 80},
            "train": {"epochs": 2, "batch_size": 4, "logging_steps": 2, "patience": 0, "learning_rate": 1e-3},
            "compress": {
                # a fixed sparsity, always fine-tuned: the ranks' fine-tunes do not hang on a val score
                "prune": {"sparsity": 0.5, "recovery": "always", "recovery_epochs": 1, "learning_rate": 1e-3},
                "distill": {"epochs": 1},
                "latency": {"warmup": 1, "repeats": 3, "batch_size": 4, "batch_repeats": 2},
            },
            "mlflow": {"experiment": "distributed"},
        },
    )
    run(["dvc", "repro", "train"], repo, timeout=600)  # the data, and a model for compress
    yield repo
    remove(repo)


def write_train_params(repo: Path, name: str, **train_params) -> None:
    write_params(repo / f"params-{name}.yaml", {"train": train_params}, repo / "params.yaml")


def machine_cmd(name: str) -> list[str]:
    """``train_cmd(name)`` with its own checkpoints folder too, as on a machine of its own: every machine
    saves its copy of each checkpoint (``save_on_each_node``), and two on one host must not share one."""
    cmd = train_cmd(name)
    cmd[cmd.index("--checkpoints") + 1] = f"checkpoints/{name}"
    return cmd


def machine_env() -> dict[str, str]:
    """One thread per process, as each of the two processes on one 2-core machine gets: the machines'
    runs then sum in the same order as that machine's, and two launchers do not oversubscribe the CPU."""
    return {**pipeline_env(), "OMP_NUM_THREADS": "1"}


def start_machine(repo: Path, name: str, logs: Path) -> subprocess.Popen:
    """``machine_cmd(name)`` started in ``repo``, its stdout and stderr in ``logs/<name>.out|.err``."""
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        return subprocess.Popen(machine_cmd(name), cwd=repo, env=machine_env(), stdout=out, stderr=err)


def curve(repo: Path, run_id: str, metric: str) -> list[tuple[int, float]]:
    """A metric's history in an MLflow run, as (step, value) in step order."""
    return sorted((h.step, h.value) for h in client(repo).get_metric_history(run_id, metric))


def client(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def runs_of(repo: Path, stage: str) -> list:
    mlflow = client(repo)
    experiment = mlflow.get_experiment_by_name("distributed")
    return mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.stage = '{stage}'")


def metrics_of(out: Path) -> dict:
    """The full report of a train or compress run below (its ``metrics.json`` holds the headline)."""
    return json.loads((out / "report.json").read_text())


def worker_pids(launcher: int) -> dict[int, int]:
    """The global rank of each worker process under the launcher with pid ``launcher``."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(
                item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item
            )
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and "RANK" in env:
            ranks[int(env["RANK"])] = int(proc.name)
    return ranks


def test_two_processes_stop_together_resume_and_write_once(repo):
    """2 processes of batch 4 (a global batch of 8): rank 1 is killed after the first checkpoint, which
    stops rank 0 too and fails the run with nothing written; the re-run resumes both from the checkpoint,
    and rank 0 alone writes the outputs and the one MLflow run, with val scored on all of val."""
    val_rows = len(pd.read_parquet(repo / "data/split/val.parquet"))
    steps = 3 * ROWS // 8  # 3 epochs of 64 rows at a global batch of 8
    write_train_params(repo, "two", epochs=3, distributed=TWO)
    before = {r.info.run_id for r in runs_of(repo, "train")}
    root = repo / "checkpoints/train"
    proc = train_until_checkpoint(repo, "two")
    workers = worker_pids(proc.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGKILL)  # rank 1 dies: an OOM kill, a crash in native code
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 128 + signal.SIGKILL, stderr
    assert "error: process 1 (local rank 1) failed with signal SIGKILL; every process was stopped" in stderr
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers.values())  # rank 0 stopped too
    assert not (repo / "runs/two").exists()  # no outputs, not even half-written ones
    (folder,) = root.iterdir()  # the dvc repro run left none
    killed_run = json.loads((folder / "run.json").read_text())["mlflow_run_id"]
    assert client(repo).get_run(killed_run).info.status in {"FAILED", "KILLED"}
    done = sorted(int(p.parent.name.split("-")[1]) for p in folder.glob("checkpoint-*/trainer_state.json"))
    assert done and done[-1] < steps

    result = run(train_cmd("two"), repo, timeout=600)  # both processes resume from rank 0's checkpoint
    assert "launching 2 processes on this machine (2 in all, node 0 of 1, gloo)" in result.stdout
    assert f"resuming from the checkpoint at step {done[-1]}" in result.stdout
    # rank 0 alone went on to write and report; rank 1 stopped after training
    (summary,) = [line for line in result.stdout.splitlines() if line.startswith("train: full")]
    assert "2 process(es), global batch 8" in summary
    out = repo / "runs/two"
    m = metrics_of(out)
    assert m["processes"] == 2 and m["global_batch_size"] == 8
    assert m["resumed_from_step"] == done[-1] and m["global_steps"] == steps and m["epochs_run"] == 3
    assert (out / "model/model.safetensors").is_file()
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3]
    assert not folder.exists()  # cleaned up by rank 0 once the outputs are written

    runs = {r.info.run_id: r for r in runs_of(repo, "train") if r.info.run_id not in before}
    assert set(runs) == {killed_run, m["mlflow_run_id"]}  # one run per stage run, not one per process
    new = runs[m["mlflow_run_id"]]
    assert new.info.status == "FINISHED" and new.data.tags["resumed_from_run_id"] == killed_run
    assert new.data.metrics["processes"] == 2 and new.data.metrics["global_batch_size"] == 8
    assert new.data.params["train.distributed.processes"] == "2"
    # the val metrics of every epoch the new run trained were computed on all of val, gathered from the
    # two processes' shards (each holds half of it)
    history = client(repo).get_metric_history(new.info.run_id, "val_rows")
    assert history and all(h.value == val_rows for h in history)


def test_compress_fine_tunes_with_two_processes(repo):
    """Pruning recovery and distillation train with DDP; rank 0 alone measures, times and writes, with one
    parent run and one child run per variant."""
    write_train_params(repo, "compress", distributed=TWO)
    out = repo / "runs/compress"
    before = {r.info.run_id for r in runs_of(repo, "compress") + runs_of(repo, "compress-variant")}
    cmd = ["python", "stages/compress.py", "--params", "params-compress.yaml", "--data", "data/split"]
    cmd += ["--model", "models/model", "--out", f"{out}/models", "--metrics", f"{out}/metrics.json"]
    cmd += ["--report", f"{out}/report.json"]
    cmd += ["--plot", f"{out}/pareto.csv", "--prune-curve", f"{out}/prune_curve.csv"]
    result = run(cmd, repo, timeout=600)
    assert "launching 2 processes on this machine" in result.stdout
    assert result.stdout.count("compress: variant") == 1  # one table, from rank 0
    m = metrics_of(out)
    assert set(m["variants"]) == {"original", "int8", "pruned", "student"}
    assert m["variants"]["pruned"]["recovery_epochs_run"] == 1
    assert (out / "models/student/model.safetensors").is_file()
    (parent,) = [r for r in runs_of(repo, "compress") if r.info.run_id not in before]
    children = [r for r in runs_of(repo, "compress-variant") if r.info.run_id not in before]
    assert parent.info.run_id == m["mlflow_run_id"] and parent.info.status == "FINISHED"
    assert sorted(r.data.tags["variant"] for r in children) == ["int8", "original", "pruned", "student"]
    for name in ("pruned", "student"):  # each fine-tune scored all of val (both processes' shards)
        (child,) = [r for r in children if r.data.tags["variant"] == name]
        assert child.data.metrics["global_batch_size"] == 8 and child.data.metrics["processes"] == 2
        assert child.data.metrics["val_rows"] == len(pd.read_parquet(repo / "data/split/val.parquet"))


def test_two_machines_meet_and_train_as_one_machine_of_two_processes(repo, tmp_path):
    """Two launchers of one process each (``nnodes: 2``, node_rank 0 and 1), started together on this host
    as two machines (each with its own outputs and checkpoints, the same data and params), meet at a static
    rendezvous on a loopback port and train one model with a world of 2: node 0 alone writes the outputs
    and the one MLflow run, and its per-step loss is that of one machine with 2 processes at the same
    global batch of 8."""
    val_rows = len(pd.read_parquet(repo / "data/split/val.parquet"))
    endpoint = f"127.0.0.1:{free_port()}"
    machine = {"processes": 1, "nnodes": 2, "rdzv_endpoint": endpoint, "rdzv_timeout": 120}
    for node in (0, 1):
        write_train_params(repo, f"node{node}", epochs=1, distributed={**machine, "node_rank": node})
    write_train_params(repo, "pair", epochs=1, distributed=TWO)
    before = {r.info.run_id for r in runs_of(repo, "train")}

    procs = [start_machine(repo, f"node{node}", tmp_path) for node in (0, 1)]
    try:
        for proc in procs:
            proc.wait(timeout=600)
    finally:  # a machine that hangs is not left behind
        for proc in procs:
            stop_process(proc)
    out = {n: (tmp_path / f"node{n}.out").read_text() for n in (0, 1)}
    err = {n: (tmp_path / f"node{n}.err").read_text() for n in (0, 1)}
    assert [p.returncode for p in procs] == [0, 0], err

    for node in (0, 1):
        assert f"launching 1 processes on this machine (2 in all, node {node} of 2, gloo)" in out[node]
    (summary,) = [line for line in out[0].splitlines() if line.startswith("train: full")]
    assert "2 process(es), global batch 8" in summary  # the world both machines' processes formed
    assert "train: full" not in out[1]
    m = metrics_of(repo / "runs/node0")
    assert m["processes"] == 2 and m["global_batch_size"] == 8 and m["global_steps"] == ROWS // 8
    assert (repo / "runs/node0/model/model.safetensors").is_file()
    assert not (repo / "runs/node1").exists()  # node 1 trained its share and wrote nothing
    assert not list((repo / "checkpoints/node0").iterdir())  # rank 0 removes its machine's checkpoints
    # node 1 keeps checkpoints/node1 (without the weights, which transformers saves on global rank 0 only):
    # docs/distributed.md, "Several machines"

    (new,) = [r for r in runs_of(repo, "train") if r.info.run_id not in before]  # one run, not one per node
    assert new.info.run_id == m["mlflow_run_id"] and new.info.status == "FINISHED"
    assert new.data.params["train.distributed.nnodes"] == "2" and new.data.metrics["processes"] == 2
    # val scored on all of val: each machine's process scored its half, gathered over the rendezvous
    assert [v for _, v in curve(repo, new.info.run_id, "val_rows")] == [val_rows]

    pair = run(machine_cmd("pair"), repo, env=machine_env(), timeout=600)
    assert "launching 2 processes on this machine (2 in all, node 0 of 1, gloo)" in pair.stdout
    p = metrics_of(repo / "runs/pair")
    assert p["processes"] == 2 and p["global_batch_size"] == 8 and p["global_steps"] == m["global_steps"]
    machines, one = curve(repo, new.info.run_id, "train_loss"), curve(repo, p["mlflow_run_id"], "train_loss")
    assert [s for s, _ in machines] == [s for s, _ in one] == [1, 2, 4, 6, 8]  # logging_steps 2, and step 1
    assert [v for _, v in machines] == pytest.approx([v for _, v in one], rel=LOSS_RTOL)
    (val_machines,), (val_one,) = (
        curve(repo, new.info.run_id, "val_loss"),
        curve(repo, p["mlflow_run_id"], "val_loss"),
    )
    assert val_machines == pytest.approx(val_one, rel=LOSS_RTOL)
    print(
        "loss (step, two machines, one machine):",
        [(s, a, b) for (s, a), (_, b) in zip(machines, one, strict=True)],
    )
    print("val_loss:", val_machines, val_one)


def test_a_machine_that_never_joins_fails_in_one_line(repo):
    """Node 0 of 2 alone: it waits ``rdzv_timeout`` at the rendezvous, then fails with one line naming the
    endpoint and the missing machine, no traceback, no outputs, no checkpoints and no MLflow run."""
    endpoint = f"127.0.0.1:{free_port()}"
    timeout = 5
    write_train_params(
        repo,
        "alone",
        epochs=1,
        distributed={
            "processes": 1,
            "nnodes": 2,
            "node_rank": 0,
            "rdzv_endpoint": endpoint,
            "rdzv_timeout": timeout,
        },
    )
    before = {r.info.run_id for r in runs_of(repo, "train")}
    start = time.monotonic()
    result = run(machine_cmd("alone"), repo, check=False, env=machine_env(), timeout=120)
    seconds = time.monotonic() - start

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: train.distributed: 1 of 2 machines never joined the rendezvous at {endpoint} within {timeout} s "
        "(train.distributed.rdzv_timeout)"
    ]
    assert timeout <= seconds < timeout + 60, seconds  # it waited the timeout, then stopped (start-up aside)
    assert not (repo / "runs/alone").exists() and not (repo / "checkpoints/alone").exists()
    assert {r.info.run_id for r in runs_of(repo, "train")} == before
    print(f"failed after {seconds:.1f} s: {result.stderr.strip()}")
