"""Several training processes, the parts that need no second process: the launcher's command line,
the GPU check, and rank 0 as the only writer (real MLflow and files, the rank set by the environment
as torchrun sets it)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.distributed import DistError, TCPStore

from lmpipe import distributed, tracking
from lmpipe.errors import UserError
from lmpipe.modeling import checkpoints
from lmpipe.params import DistributedParams, load_params
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[2]


def cfg(**overrides) -> DistributedParams:
    values = {
        "processes": 2,
        "nnodes": 1,
        "node_rank": 0,
        "rdzv_endpoint": "localhost:29500",
        "rdzv_timeout": 600,
    }
    return DistributedParams(**{**values, **overrides})


def test_one_machine_is_standalone_and_several_use_a_static_rendezvous():
    one = distributed.torchrun_args(cfg(), ["stages/train.py", "--out", "m"])
    assert one[-3:] == ["stages/train.py", "--out", "m"] and "--standalone" in one
    assert one[one.index("--nproc-per-node") + 1] == "2" and one[one.index("--max-restarts") + 1] == "0"
    assert "--rdzv-conf" not in one
    two = distributed.torchrun_args(
        cfg(nnodes=3, node_rank=1, rdzv_endpoint="10.0.0.1:29400", rdzv_timeout=45), ["s.py"]
    )
    assert "--standalone" not in two
    for flag, value in {
        "--nnodes": "3",
        "--node-rank": "1",
        "--rdzv-backend": "static",
        "--rdzv-endpoint": "10.0.0.1:29400",
        "--rdzv-conf": "timeout=45",  # the static rendezvous's TCPStore timeout, on every machine
    }.items():
        assert two[two.index(flag) + 1] == value


def test_a_rendezvous_nobody_joins_is_one_line():
    """torchrun's static rendezvous is a TCPStore on machine 0: the real store's errors, on machine 0 when
    the others never connect and on another machine when machine 0 never listens, become one line each."""
    port = free_port()
    two = cfg(processes=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_timeout=1)
    with pytest.raises(DistError) as server:
        TCPStore("127.0.0.1", port, 2, True, timedelta(seconds=1))
    assert str(distributed.rendezvous_error(two, server.value)) == (
        f"train.distributed: 1 of 2 machines never joined the rendezvous at 127.0.0.1:{port} within 1 s "
        "(train.distributed.rdzv_timeout)"
    )
    with pytest.raises(DistError) as client:
        TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=1))
    assert str(distributed.rendezvous_error(replace(two, node_rank=1), client.value)) == (
        f"train.distributed: machine 0 never opened the rendezvous at 127.0.0.1:{port} within 1 s "
        "(train.distributed.rdzv_timeout); is node_rank 0 running, and reachable from this machine?"
    )


def test_one_process_or_a_worker_does_not_launch(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.launch(cfg(processes=1)) is None
    monkeypatch.setenv("LOCAL_RANK", "0")  # already under torchrun (or launched by hand)
    assert distributed.launch(cfg(processes=4)) is None


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError) as err:
        distributed.launch(cfg(processes=2))
    assert str(err.value) == (
        "train.distributed.processes: 2 processes need 2 GPUs, this machine has 1 visible (CUDA_VISIBLE_DEVICES)"
    )


def test_only_rank_0_opens_a_run_and_writes(tmp_path, monkeypatch):
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    params = load_params(ROOT / "params.yaml")
    with tracking.stage_run(params, "train") as run:
        tracking.log_metrics({"val_macro_f1": 0.5})
        tracking.set_tags({"a": "b"})
        checkpoints.write_run(tmp_path / "ckpt", {"mlflow_run_id": run.info.run_id})
    assert run.info.run_id == ""
    assert not store.exists() and not (tmp_path / "ckpt").exists()

    monkeypatch.setenv("RANK", "0")
    with tracking.stage_run(params, "train") as run:
        tracking.log_metrics({"val_macro_f1": 0.5})
        checkpoints.write_run(tmp_path / "ckpt", {"mlflow_run_id": run.info.run_id})
    assert run.info.run_id and store.is_file()
    assert checkpoints.read_run(tmp_path / "ckpt")["mlflow_run_id"] == run.info.run_id
