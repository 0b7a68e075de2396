"""Several training processes: the one place that knows about ranks and the PyTorch elastic launcher.

A stage that trains calls ``launch(cfg)`` first. With ``train.distributed`` asking for more than one
process in all (``processes`` x ``nnodes``) and no launcher around it yet (no ``LOCAL_RANK`` or
``WORLD_SIZE`` in the environment), it runs the same command line again under
``torch.distributed.run`` (torchrun), once per process, waits for them and returns their outcome; the
stage returns that and does nothing else. Each worker then runs the stage as usual: the transformers
``Trainer`` inside ``training.train_model`` sees the launcher's environment and trains with DDP (NCCL on
CUDA, one GPU per process; gloo on the CPU), a distributed sampler, and evaluation gathered across
ranks.

Only rank 0 writes: ``tracking`` does nothing on the other ranks (``main_only``: no MLflow run, no
logging), and a stage returns on them (``is_worker``) as soon as their share of the training is over,
before it writes anything. When one process dies, torchrun stops the others (no restarts): rank 0's MLflow
run ends FAILED (a collective that loses its peer raises) or KILLED (SIGTERM from the launcher), and the
launcher exits with the failed worker's code. Several machines meet at torchrun's static rendezvous on
machine 0 (``rdzv_endpoint``); one that is not there within ``rdzv_timeout`` fails the launch with one line
(``rendezvous_error``) before any worker starts.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lmpipe.errors import UserError
from lmpipe.params import DistributedParams

# the environment a launcher gives its workers; with any of them set, this process is a worker
LAUNCHER_ENV = ("LOCAL_RANK", "WORLD_SIZE")
MONITOR_INTERVAL = 0.5  # seconds between the launcher's checks that every worker is alive
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Launched:
    """What the launcher reports once every worker has finished."""

    processes: int
    message: str


def under_launcher() -> bool:
    return any(name in os.environ for name in LAUNCHER_ENV)


def local_rank() -> int:
    """This process's index on its machine (its GPU on CUDA): 0 when it runs alone."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank() -> int:
    """The global rank of this process: 0 when it runs alone."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes: the only one, or rank 0 of several."""
    return rank() == 0


def backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def check(cfg: DistributedParams) -> None:
    """What can only be checked on the machine: enough GPUs on CUDA for one per process."""
    import torch

    if torch.cuda.is_available() and cfg.processes > torch.cuda.device_count():
        raise UserError(
            f"train.distributed.processes: {cfg.processes} processes need {cfg.processes} GPUs, "
            f"this machine has {torch.cuda.device_count()} visible (CUDA_VISIBLE_DEVICES)"
        )


def torchrun_args(cfg: DistributedParams, command: list[str]) -> list[str]:
    """torchrun's command line for ``command`` (a script and its arguments) under ``cfg``."""
    args = ["--nproc-per-node", str(cfg.processes), "--max-restarts", "0"]
    args += ["--monitor-interval", str(MONITOR_INTERVAL)]
    if cfg.nnodes == 1:
        args.append("--standalone")  # a free local port, nothing to configure
    else:  # static rendezvous: node_rank 0 holds global rank 0, the one that writes
        args += ["--nnodes", str(cfg.nnodes), "--node-rank", str(cfg.node_rank)]
        args += ["--rdzv-backend", "static", "--rdzv-endpoint", cfg.rdzv_endpoint]
        # the static rendezvous's TCPStore: machine 0 waits this long for the others to connect, and the
        # others this long for machine 0 to listen
        args += ["--rdzv-conf", f"timeout={cfg.rdzv_timeout}"]
    return [*args, *command]


def rendezvous_error(cfg: DistributedParams, err: Exception) -> UserError:
    """One line for a rendezvous that failed (``torch.distributed.DistError`` from the TCPStore): who
    never came, where, and after how long."""
    where = f"the rendezvous at {cfg.rdzv_endpoint}"
    waited = f"within {cfg.rdzv_timeout} s (train.distributed.rdzv_timeout)"
    text = str(err).strip()
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:  # machine 0, whose TCPStore server counted the machines that connected
        missing = int(joined.group(2)) - int(joined.group(1))
        return UserError(
            f"train.distributed: {missing} of {cfg.nnodes} machines never joined {where} {waited}"
        )
    if "timed out" in text and "connect" in text:  # another machine, which never reached machine 0
        return UserError(
            f"train.distributed: machine 0 never opened {where} {waited}; "
            "is node_rank 0 running, and reachable from this machine?"
        )
    first = text.splitlines()[0] if text else type(err).__name__
    return UserError(f"train.distributed: {where} failed: {first}")


def launch(cfg: DistributedParams, command: list[str] | None = None) -> Launched | None:
    """Run ``command`` (default: this process's own command line) under torchrun with ``cfg``'s
    processes, unless one process is asked for or this process is already a worker: then None, and
    the caller goes on in this process. Exits with the failed worker's code if one fails."""
    if cfg.world_size == 1 or under_launcher():
        return None
    check(cfg)
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # one process per core share: torch's default of every core in every process oversubscribes the CPU
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.processes)))
    print(
        f"launching {cfg.processes} processes on this machine ({cfg.world_size} in all, node "
        f"{cfg.node_rank} of {cfg.nnodes}, {backend()})",
        flush=True,
    )
    try:
        run(parse_args(torchrun_args(cfg, command or sys.argv)))
    except ChildFailedError as err:
        global_rank, failure = err.get_first_failure()
        code = failure.exitcode
        if code != 2:  # 2: a UserError, which rank 0 has printed already
            reason = f"signal {failure.signal_name()}" if code < 0 else f"exit code {code}"
            print(
                f"error: process {global_rank} (local rank {failure.local_rank}) failed with {reason}; "
                "every process was stopped",
                file=sys.stderr,
            )
        raise SystemExit(code if code > 0 else 128 - code) from None
    except DistError as err:  # the machines never met: no worker started, nothing was written
        raise rendezvous_error(cfg, err) from None
    except SignalException as err:  # the launcher itself was stopped; it stopped the workers first
        raise SystemExit(128 + int(err.sigval)) from None
    return Launched(cfg.world_size, f"{cfg.world_size} processes finished")


def is_worker() -> bool:
    """A rank other than 0: it takes part in training (the collectives need every rank) and writes
    nothing. A stage returns on it as soon as its share of the training is over."""
    return not is_main()


def main_only(fn: F) -> F:
    """Run ``fn`` on rank 0 (or a single process) only; on the other ranks it does nothing and returns
    None. ``tracking``'s logging calls and the checkpoints' run file go through it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None

    return wrapper  # type: ignore[return-value]
