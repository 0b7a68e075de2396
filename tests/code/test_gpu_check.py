"""``make gpu-check`` (benchmarks/gpu_check.py) on a machine without CUDA: one line, exit 0. On a CUDA
machine run ``make gpu-check`` itself: its checks are the test there."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine: run `make gpu-check`")
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device here"), result.stdout
    assert "the GPU path is untested on this machine" in lines[0]
