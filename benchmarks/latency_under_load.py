"""Benchmark: do export's latency figures survive a busy machine? Times the exported model's backends as
the export stage does (`onnx_export.latency_benchmark`: PyTorch fp32 and every ONNX file in the export
folder, `export.latency`'s threads and batch sizes, ONNX Runtime not spinning), twice:

* quiet: nothing else running;
* busy: beside a training-like job (forward and backward matmuls on every core, started first).

and prints, per backend and batch size, the wall-clock p50, the CPU cost per call and both speed-ups over
PyTorch fp32, with the busy check's verdict (`other_load`, `latency_reliable`, which CPU threads).

    python benchmarks/latency_under_load.py [--export models/export] [--model models/model] [--data data/split]

About 3 minutes on a 2-core CPU for the default model (issue 34; docs/figures.md, "Latency on a busy machine").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmpipe import data
from lmpipe.params import load_params
from lmpipe.serve import onnx_export
from lmpipe.serve.serving import VARIANT_FILES, OnnxTextClassifier

# a training job's shape: matmuls forward and backward on every core, as long as it is left running
JOB = """
import torch
a, w = torch.randn(768, 768), torch.randn(768, 768, requires_grad=True)
while True:
    (a @ w).relu().sum().backward()
"""


def measure(args, cfg, busy: bool) -> dict:
    folder = Path(args.export)
    files = {v: f for v, f in VARIANT_FILES.items() if (folder / f).is_file()}
    sessions = {
        v: OnnxTextClassifier(folder, f, threads=cfg.threads, allow_spinning=False) for v, f in files.items()
    }
    pytorch = onnx_export.torch_runner(args.model)

    def runners(threads=None):
        out = {"pytorch_fp32": pytorch}
        out |= {
            f"onnx_{v}": (s if threads is None else s.threaded(threads)).logits for v, s in sessions.items()
        }
        return out

    texts = data.read_split(args.data, "test")["text"].tolist()
    job = None
    if busy:
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 2)}
        job = subprocess.Popen([sys.executable, "-c", JOB], env=env)
        time.sleep(3)  # let it start its work
    torch.set_num_threads(cfg.threads)
    try:
        return onnx_export.latency_benchmark(runners(), sessions["fp32"], texts, cfg, lambda: runners(1))
    finally:
        if job is not None:
            job.kill()
            job.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default="models/export", help="the export stage's classifier folder")
    parser.add_argument("--model", default="models/model", help="the trained model (PyTorch fp32)")
    parser.add_argument("--data", default="data/split", help="folder with test.parquet")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    cfg = load_params(args.params).export.latency
    results = {way: measure(args, cfg, way == "busy") for way in ("quiet", "busy")}
    print(
        f"\n{cfg.threads} threads, {cfg.repeats} timed calls at batch 1 and {cfg.batch_repeats} at larger "
        "batches per backend\n"
    )
    for way, r in results.items():
        print(
            f"{way}: other processes used {100 * r['other_load']:.0f}% of the cores, latency_reliable "
            f"{r['latency_reliable']}, CPU cost on {r['cpu_threads']} thread(s), speed-ups from {r['speedup_basis']}"
        )
    print("\n| batch | backend | p50 ms quiet | p50 ms busy | CPU ms quiet | CPU ms busy "
          "| wall speed-up quiet | wall busy | CPU speed-up quiet | CPU busy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    quiet, busy = results["quiet"], results["busy"]
    for n in cfg.batch_sizes:
        for name in quiet["latency"]:
            q, b = quiet["latency"][name], busy["latency"][name]
            key = f"{name}_vs_pytorch_b{n}"
            ratios = [r[f"speedup_{basis}"].get(key, 1.0) for basis in ("wall", "cpu") for r in (quiet, busy)]
            print(
                f"| {n} | {name} | {q[f'latency_b{n}_p50_ms']:.1f} | {b[f'latency_b{n}_p50_ms']:.1f} "
                f"| {q[f'cpu_b{n}_ms']:.1f} | {b[f'cpu_b{n}_ms']:.1f} | "
                + " | ".join(f"{x:.2f}x" for x in ratios)
                + " |"
            )


if __name__ == "__main__":
    main()
