"""The benchmark scripts' own contracts (their figures are measured by running them, never in a test)."""

import os
import subprocess
import sys

import pytest
import torch

from clitools import OFFLINE, ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is present")
def test_gpu_bench_refuses_in_one_line_without_a_gpu(tmp_path):
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(tmp_path / "out")], capture_output=True,
                         text=True, env=dict(OFFLINE, PYTHON=sys.executable), timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], out.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_bench_needs_an_output_directory():
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage: bash bench/gpu.sh OUT_DIR" in out.stderr
