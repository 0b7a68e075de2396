"""Benchmark: does the export stage's latency table time each backend fairly? Times PyTorch fp32, ONNX fp32
and ONNX Runtime int8 on the trained model (export's settings: its threads, `base.max_length`, the first
test texts), three ways per batch size:

* alone: each backend by itself, one after the other (no interference, but no drift control either);
* fixed timer: `lmpipe.latency.time_interleaved` with ONNX Runtime's spinning off, as the stage runs it;
* old timer: one call per backend in rotating turns with spinning on, as the stage ran before (issue 19).

and prints p50 per backend, each interleaved figure's ratio to the backend alone, and the int8 speed-up.

    python benchmarks/latency_timer.py [--model models/model] [--data data/split] [--repeats 40]

About 3 minutes on a 2-core CPU at the defaults (the ONNX export included).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmpipe import data, latency
from lmpipe.params import load_params
from lmpipe.serve import onnx_export
from lmpipe.serve.serving import FP32_FILE, INT8_FILE, OnnxTextClassifier

TOLERANCE = 1.5  # the stated agreement: interleaved / alone p50 within [1/1.5, 1.5], as in the test


def old_timer(calls, warmup: int, repeats: int) -> dict[str, np.ndarray]:
    """The timer this replaced: one call per case per round, order rotated, nothing in between."""
    names = list(calls)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {n: np.asarray(t) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model", help="a save_pretrained classifier folder")
    parser.add_argument("--data", default="data/split", help="folder with test.parquet")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--texts", type=int, default=40, help="test texts the batches are drawn from")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per backend and way")
    args = parser.parse_args()

    params = load_params(args.params)
    cfg = params.export.latency
    texts = data.read_split(args.data, "test")["text"].tolist()[: args.texts]
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        onnx_export.write_classifier_folder(args.model, folder, params.base.max_length, params.export.opset)
        onnx_export.quantize_onnx_int8(folder)
        pytorch = onnx_export.torch_runner(args.model)

        def backends(spinning: bool):
            fp32 = OnnxTextClassifier(folder, FP32_FILE, threads=cfg.threads, allow_spinning=spinning)
            int8 = OnnxTextClassifier(folder, INT8_FILE, threads=cfg.threads, allow_spinning=spinning)
            return fp32, {"pytorch_fp32": pytorch, "onnx_fp32": fp32.logits, "onnx_int8": int8.logits}

        print(
            f"model {args.model}, {cfg.threads} threads, max_length {params.base.max_length}, "
            f"{args.repeats} timed calls per backend; p50 ms (ratio to the backend alone)\n"
        )
        print("| batch | way | pytorch_fp32 | onnx_fp32 | onnx_int8 | int8 speed-up |")
        print("|---|---|---|---|---|---|")
        agree = True
        for n in cfg.batch_sizes:
            encoder, runners = backends(spinning=False)
            features = encoder.encode([texts[i % len(texts)] for i in range(n)])
            calls = {name: (lambda r=run, f=features: r(f)) for name, run in runners.items()}
            alone = {name: latency.time_alone(fn, cfg.warmup, args.repeats) for name, fn in calls.items()}
            fixed = latency.time_interleaved(calls, cfg.warmup, args.repeats, desc=f"fixed b{n}").wall
            _, spinning = backends(spinning=True)
            old = old_timer(
                {k: (lambda r=run, f=features: r(f)) for k, run in spinning.items()}, cfg.warmup, args.repeats
            )
            base = {name: float(np.median(s)) for name, s in alone.items()}
            for way, seconds in (("alone", alone), ("fixed timer", fixed), ("old timer (spinning)", old)):
                p50 = {name: float(np.median(s)) for name, s in seconds.items()}
                cells = [
                    f"{1000 * p50[b]:.1f}" + ("" if way == "alone" else f" ({p50[b] / base[b]:.2f})")
                    for b in calls
                ]
                print(
                    f"| {n} | {way} | "
                    + " | ".join(cells)
                    + f" | {p50['pytorch_fp32'] / p50['onnx_int8']:.2f}x |"
                )
                if way == "fixed timer":
                    agree &= all(1 / TOLERANCE <= p50[b] / base[b] <= TOLERANCE for b in calls)
        print(f"\nfixed timer within {TOLERANCE}x of each backend alone: {'yes' if agree else 'NO'}")


if __name__ == "__main__":
    main()
