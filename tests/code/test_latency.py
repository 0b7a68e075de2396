"""The latency timer must not let one backend's leftover work into another's figure: ONNX Runtime's
spinning threads once tripled the PyTorch latency timed right after an ONNX call. On a tiny model, each
backend timed in turns with the others must agree with it timed alone, whichever goes first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmpipe import latency
from lmpipe.modeling.models import load_tokenizer, resolve_model_dir, write_model
from lmpipe.serve import onnx_export
from lmpipe.serve.serving import INT8_FILE, OnnxTextClassifier
from tests.conftest import tiny_bert_config

TOLERANCE = 1.5  # interleaved / alone medians, either way; the bug this guards against was 2.4-3x
ATTEMPTS = 5  # the smallest median of 5: machine noise slows some attempts, a real coupling all of them


def build_backends(tmp_path_factory, hidden_size: int):
    tokenizer = load_tokenizer(resolve_model_dir("all-MiniLM-L6-v2"))
    config = tiny_bert_config(
        tokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=2,
        num_labels=3,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("latency")
    from transformers import BertForSequenceClassification

    write_model(BertForSequenceClassification(config), tokenizer, folder / "model")
    onnx_export.write_classifier_folder(folder / "model", folder / "onnx", 64, 18)
    onnx_export.quantize_onnx_int8(folder / "onnx")
    return folder


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    return build_backends(tmp_path_factory, 128)


@pytest.fixture(scope="module")
def minilm_wide(tmp_path_factory):
    """Two layers as wide as MiniLM's (384): ops long enough that, as in the real model, PyTorch's thread
    pool loses its cores to another process (at 128 wide the barriers between µs-long ops dominate)."""
    return build_backends(tmp_path_factory, 384)


def calls(folder, order, allow_spinning=False):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    int8 = OnnxTextClassifier(folder / "onnx", INT8_FILE, threads=2, allow_spinning=allow_spinning)
    features = int8.encode(["the quick brown fox jumps over the lazy dog " * 6])
    pytorch = onnx_export.torch_runner(folder / "model")
    runners = {"pytorch_fp32": lambda: pytorch(features), "onnx_int8": lambda: int8.logits(features)}
    return {name: runners[name] for name in order}, previous


@pytest.mark.timing
@pytest.mark.parametrize("order", [("pytorch_fp32", "onnx_int8"), ("onnx_int8", "pytorch_fp32")])
def test_interleaved_timer_agrees_with_each_backend_alone(backends, order):
    cases, previous = calls(backends, order)
    try:
        result = latency.agreement(cases, warmup=3, repeats=40, attempts=ATTEMPTS)
    finally:
        torch.set_num_threads(previous)
    assert all(1 / TOLERANCE <= r["ratio"] <= TOLERANCE for r in result.values()), result


@pytest.mark.timing
def test_the_speedup_does_not_depend_on_the_order(backends):
    def speedup(order):
        cases, previous = calls(backends, order)
        try:
            medians = {name: np.inf for name in cases}
            for _ in range(ATTEMPTS):
                for name, seconds in latency.time_interleaved(cases, 3, 40).wall.items():
                    medians[name] = min(medians[name], float(np.median(seconds)))
        finally:
            torch.set_num_threads(previous)
        return medians["pytorch_fp32"] / medians["onnx_int8"]

    forward, backward = speedup(("pytorch_fp32", "onnx_int8")), speedup(("onnx_int8", "pytorch_fp32"))
    assert 1 / TOLERANCE <= forward / backward <= TOLERANCE, (forward, backward)


def test_classifier_sessions_do_not_spin_unless_asked(backends):
    import json

    info = json.loads((backends / "onnx/classifier.json").read_text())
    assert info["allow_spinning"] is False  # what export.allow_spinning: false writes, served as is
    default = OnnxTextClassifier(backends / "onnx", INT8_FILE)
    spinning = OnnxTextClassifier(backends / "onnx", INT8_FILE, allow_spinning=True)
    get = lambda c, key: c.session.get_session_options().get_session_config_entry(key)  # noqa: E731
    assert get(default, "session.intra_op.allow_spinning") == "0"
    assert get(spinning, "session.intra_op.allow_spinning") == "1"


def busy_after(call, window: float = 0.05, samples: int = 10) -> float:
    """Cores this process keeps busy during ``window`` seconds of sleep right after ``call`` returns
    (median over ``samples``): work a backend leaves running, which the next one timed would pay for."""
    import time

    shares = []
    for _ in range(samples):
        call()
        start = time.process_time()
        time.sleep(window)
        shares.append((time.process_time() - start) / window)
    return float(np.median(shares))


@pytest.mark.timing
def test_timed_onnx_sessions_leave_no_work_behind(backends):
    (cases, previous), (spinning, _) = calls(backends, ["onnx_int8"]), calls(backends, ["onnx_int8"], True)
    try:
        assert busy_after(cases["onnx_int8"]) < 0.1  # spinning off: the threads sleep at once
        # the measurement sees the old default: spinning threads burn about half a core to a core after
        # every call (0.48 on a quiet 2-core machine once: the bound is 3x the one above, not "a core")
        assert busy_after(spinning["onnx_int8"]) > 0.3
    finally:
        torch.set_num_threads(previous)


def hold_the_cores(count: int):
    """``count`` processes that spin on a core each until killed: another job on the machine."""
    import subprocess
    import sys

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def benchmark_twice(folder, busy: bool) -> dict:
    """``onnx_export.latency_benchmark`` as export runs it (2 threads, ONNX Runtime not spinning) on
    PyTorch fp32 and ONNX int8, on a quiet machine or beside a process spinning on every core."""
    import os

    from lmpipe.params import ExportLatencyParams

    cfg = ExportLatencyParams(
        batch_sizes=[1], warmup=3, repeats=40, batch_repeats=2, threads=2, max_other_load=0.25
    )
    int8 = OnnxTextClassifier(folder / "onnx", INT8_FILE, threads=2, allow_spinning=False)
    pytorch = onnx_export.torch_runner(folder / "model")

    def runners(threads=None):
        return {
            "pytorch_fp32": pytorch,
            "onnx_int8": (int8 if threads is None else int8.threaded(threads)).logits,
        }

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    spinners = hold_the_cores(os.cpu_count() or 2) if busy else []
    try:
        texts = ["the quick brown fox jumps over the lazy dog " * 6]
        return onnx_export.latency_benchmark(runners(), int8, texts, cfg, lambda: runners(1))
    finally:
        for p in spinners:
            p.kill()
            p.wait()
        torch.set_num_threads(previous)


@pytest.mark.timing
def test_a_busy_machine_is_flagged_and_the_cpu_cost_speedup_holds(minilm_wide):
    """Export's timing of PyTorch fp32 and ONNX int8, once on a quiet machine and once beside a process
    spinning on every core: the busy run is flagged and the quiet one not, and the speed-up from CPU cost
    per call holds within 1.5x (the busy one measured on one thread: PyTorch's pool spin-waits)."""
    quiet, busy = benchmark_twice(minilm_wide, busy=False), benchmark_twice(minilm_wide, busy=True)
    assert quiet["latency_reliable"] is True and quiet["speedup_basis"] == "wall", quiet
    assert quiet["cpu_threads"] == 2 and quiet["speedup"] == quiet["speedup_wall"]
    assert busy["latency_reliable"] is False and busy["speedup_basis"] == "cpu", busy
    assert busy["cpu_threads"] == 1 and busy["speedup"] == busy["speedup_cpu"]
    assert busy["other_load"] > 0.5  # a spinning process on every core
    key = "onnx_int8_vs_pytorch_b1"
    ratio = busy["speedup_cpu"][key] / quiet["speedup_cpu"][key]
    assert 1 / TOLERANCE <= ratio <= TOLERANCE, (quiet, busy)
