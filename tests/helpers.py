"""Helpers shared by several test files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gpunet
from gpunet import backends
from standin import standin_cupy


def numeric_grad(loss, pred: np.ndarray, target, h: float = 1e-6) -> np.ndarray:
    """Central differences of ``loss.forward`` with respect to each entry of float64 ``pred``."""
    grad = np.zeros_like(pred)
    for i in np.ndindex(pred.shape):
        up, down = pred.copy(), pred.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (loss.forward(up, target) - loss.forward(down, target)) / (2 * h)
    return grad


def analytic_grad(loss, pred: np.ndarray, target) -> np.ndarray:
    loss.forward(pred, target)
    return loss.backward()


def train_command(args: list[str], tmp_path) -> dict:
    """Run ``gpunet train ARGS --metrics-out FILE`` in a fresh process
    with one BLAS thread, and return the metrics. On a loaded 2-core machine OpenBLAS's
    worker threads spin-wait for a core: these small convolution GEMMs then ran 20x slower
    (150 s for the U-Net instead of 7 s), so the run pins the thread count."""
    out = tmp_path / "metrics.json"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "gpunet", "train", *args, "--device", "cpu",
                           "--no-progress", "--metrics-out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def assert_refused(layer, x, error, match) -> None:
    """``layer.forward(x)`` raises ``error`` matching ``match`` and leaves the weights alone."""
    before = {k: p.data.copy() for k, p in layer.params().items()}
    with pytest.raises(error, match=match):
        layer.forward(x)
    for k, p in layer.params().items():
        np.testing.assert_array_equal(p.data, before[k])


# CUDA entries are always listed, and skipped with a reason where no GPU is visible, so the
# report shows what did not run. "standin-cuda:N" is the real CudaBackend on GPU N of the CuPy
# stand-in (tests/cupy_standin: two GPUs under CuPy's device and host rules, kernels on the CPU
# emulator), which runs everywhere; its results are never GPU results.
STANDIN_SPECS = ["standin-cuda:0", "standin-cuda:1"]
DEVICE_SPECS = ["cpu", "emulated", "cuda", *STANDIN_SPECS]


def open_device(spec: str):
    """A generator yielding the device ``spec`` names, with the stand-in installed for as long
    as it runs when ``spec`` names a stand-in GPU."""
    if spec.startswith("standin-"):
        with standin_cupy():
            yield gpunet.device(spec[len("standin-"):])
        return
    if spec == "cuda" and not backends._cuda_available():
        pytest.skip("no CUDA device visible (CuPy missing or no GPU)")
    yield gpunet.device(spec)


def recorded_launches(dev, run=True):
    """Wrap ``dev.launch`` to record (kernel, grid, block) of every launch; with ``run=False``
    nothing runs (the grids of big tensors, asserted without emulating them)."""
    launches, real = [], dev.launch

    def launch(kernel, dtype, grid, block, args, shared_mem=0):
        launches.append((kernel, tuple(grid), tuple(block)))
        if run:
            real(kernel, dtype, grid, block, args, shared_mem)
    dev.launch = launch
    return launches
