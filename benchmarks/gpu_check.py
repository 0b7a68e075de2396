"""GPU check (`make gpu-check`): does the pipeline's CUDA path work on this machine, and what does it give?

On a machine with CUDA, in a temporary copy of this project (nothing here changes):

1. **device**: the GPU's name, capability and memory; a matmul on it agrees with the CPU's;
2. **pipeline**: `dvc repro evaluate` (prepare, split, train, evaluate) on the default data and model, a
   short run (`--rows`, one epoch), on the GPU; it must exit 0;
3. **precision**: `train.precision: auto` must have trained in bf16 (or fp16 where the GPU lacks bf16);
4. **speed**: training examples per second on the GPU against the same train stage on the CPU
   (`CUDA_VISIBLE_DEVICES=`); the GPU must be faster;
5. **memory**: the train stage's peak GPU memory (`peak_gpu_memory_mb` in its report), within the card's;
6. **NCCL**: a 1-process `torch.distributed` group on the NCCL backend, one all-reduce on the GPU.

Prints one line per check (PASS/FAIL and its figures) and exits 1 if any failed. Without CUDA it says so in
one line and exits 0: the GPU path is then untested here (docs/development.md, "The GPU check").

    python benchmarks/gpu_check.py [--rows 1000] [--keep]

About 2-4 minutes on a GPU machine (most of it the CPU comparison and the stage start-ups).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<10} {self.detail}"


def copy_project(dest: Path) -> Path:
    """This project's tracked and untracked-but-not-ignored files in ``dest``, a fresh git repo (DVC needs
    one): what a clone would hold, without its outputs."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, files):
        if (ROOT / rel).is_file() and not rel.startswith(("reports/", "data/prepared", "data/split")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "gpu-check"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "gpu-check", "GIT_AUTHOR_EMAIL": "gpu@check",
                            "GIT_COMMITTER_NAME": "gpu-check", "GIT_COMMITTER_EMAIL": "gpu@check"})  # fmt: skip
    return dest


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, float]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr, time.perf_counter() - start


def examples_per_s(report: dict) -> float:
    """Training examples a second over the train stage's epochs (their val passes included)."""
    return report["train_rows"] * report["epochs_run"] / max(report["train_seconds"], 1e-9)


def device_check(torch) -> Check:
    props = torch.cuda.get_device_properties(0)
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    on_gpu = (a.cuda() @ a.cuda()).float().cpu()
    error = float((on_gpu - a @ a).abs().max() / (a @ a).abs().max())
    return Check(
        "device",
        error < 1e-2,
        f"{props.name}, capability {props.major}.{props.minor}, {props.total_memory / 2**30:.1f} GiB, "
        f"CUDA {torch.version.cuda}, torch {torch.__version__}; matmul vs CPU max rel. error {error:.1e}",
    )


def nccl_check(torch) -> Check:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not dist.is_nccl_available():
        return Check("nccl", False, "this torch build has no NCCL backend")
    start = time.perf_counter()
    try:
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        value = torch.arange(4, dtype=torch.float32, device="cuda")
        dist.all_reduce(value)
        torch.cuda.synchronize()
        ok = value.cpu().tolist() == [0.0, 1.0, 2.0, 3.0]
        version = ".".join(map(str, torch.cuda.nccl.version()))
        dist.destroy_process_group()
    except Exception as err:  # what failed, in one line, is the check's result
        return Check("nccl", False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return Check(
        "nccl", ok, f"NCCL {version}, 1-process group, all-reduce in {time.perf_counter() - start:.2f} s"
    )


def pipeline_checks(torch, rows: int, repo: Path) -> list[Check]:
    from lmpipe.params import write_params

    write_params(
        repo / "params.yaml",
        {
            "prepare.max_rows": rows,
            "train.epochs": 1,
            "train.patience": 0,
            "train.precision": "auto",
            "mlflow.experiment": "gpu-check",
        },
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    code, log, seconds = run(["dvc", "repro", "evaluate"], repo, env)
    (repo / "gpu_repro.log").write_text(log)
    if code != 0:
        tail = " | ".join(log.strip().splitlines()[-3:])
        return [Check("pipeline", False, f"dvc repro evaluate exited {code} after {seconds:.0f} s: {tail}")]
    gpu = json.loads((repo / "reports/train/report.json").read_text())
    scores = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    macro = scores.get("model", {}).get("macro_f1")
    checks = [
        Check(
            "pipeline",
            gpu["device"].startswith("cuda"),
            f"dvc repro evaluate in {seconds:.0f} s on {gpu['device']}: {gpu['train_rows']} train rows, "
            f"test macro-F1 {macro if macro is None else f'{macro:.4f}'}",
        )
    ]
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    checks.append(
        Check(
            "precision",
            gpu["precision"] == expected,
            f"auto trained in {gpu['precision']} (expected {expected})",
        )
    )
    cpu_env = {**env, "CUDA_VISIBLE_DEVICES": ""}
    code, log, _ = run(["dvc", "repro", "-f", "-s", "train"], repo, cpu_env)
    (repo / "cpu_repro.log").write_text(log)
    if code != 0:
        checks.append(Check("speed", False, f"the train stage on the CPU exited {code}"))
    else:
        cpu = json.loads((repo / "reports/train/report.json").read_text())
        fast, slow = examples_per_s(gpu), examples_per_s(cpu)
        checks.append(
            Check(
                "speed",
                fast > slow and cpu["device"] == "cpu",
                f"{fast:.0f} train examples/s on the GPU, {slow:.0f} on the CPU ({os.cpu_count()} cores): "
                f"{fast / slow:.1f}x",
            )
        )
    total = torch.cuda.get_device_properties(0).total_memory / 2**20
    peak = gpu.get("peak_gpu_memory_mb")
    checks.append(
        Check(
            "memory",
            peak is not None and 0 < peak < total,
            f"train stage peak {peak} MiB of {total:.0f} MiB (batch {gpu.get('global_batch_size')})",
        )
    )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=1000, help="rows the short pipeline samples (default: 1000)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary project copy and its logs")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        hint = ""
        if torch.version.cuda is None and shutil.which("nvidia-smi"):
            hint = (
                "; this machine has an NVIDIA driver but torch is a CPU build: "
                'make clean-venv setup TORCH="torch==2.13.0 --index-url <CUDA wheel index>"'
            )
        print(
            f"gpu-check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
            f"nothing to check, the GPU path is untested on this machine{hint}"
        )
        return 0
    checks = [device_check(torch)]
    work = Path(tempfile.mkdtemp(prefix="lmpipe-gpu-check-"))
    try:
        repo = copy_project(work / "repo")
        checks += pipeline_checks(torch, args.rows, repo)
        checks.append(nccl_check(torch))
    finally:
        if args.keep:
            print(f"gpu-check: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for check in checks:
        print(check.line())
    failed = [c.name for c in checks if not c.passed]
    print(
        f"gpu-check: {len(checks) - len(failed)}/{len(checks)} passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
