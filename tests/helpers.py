"""Helpers shared by several test files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np


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
    import pytest
    before = {k: p.data.copy() for k, p in layer.params().items()}
    with pytest.raises(error, match=match):
        layer.forward(x)
    for k, p in layer.params().items():
        np.testing.assert_array_equal(p.data, before[k])
