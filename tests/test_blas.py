"""The direct GEMM calls of gpunet.backends.blas (NumPy's own OpenBLAS, through CBLAS): strided
windows, accumulation, transposes, refused shapes and dtypes, and the switch that turns them off."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gpunet.backends import blas

R = np.random.default_rng(3)
needs_blas = pytest.mark.skipif(blas.BLAS is None, reason="NumPy's BLAS has no 64-bit CBLAS "
                                "symbols gpunet can call here (MKL, Accelerate or system BLAS)")


@needs_blas
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True),
                                              (True, True)])
def test_gemm_on_strided_windows_accumulates(dtype, tol, trans_a, trans_b):
    big_a = R.normal(size=(9, 11)).astype(dtype)
    big_b = R.normal(size=(8, 13)).astype(dtype)
    a = big_a[1:6, 2:9] if not trans_a else big_a[1:8, 2:7]     # op(a): 5 x 7
    b = big_b[:7, 3:7] if not trans_b else big_b[:4, 1:8]       # op(b): 7 x 4
    opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
    out_big = R.normal(size=(6, 10)).astype(dtype)
    out = out_big[:5, 2:6]
    before = out.copy()
    blas.BLAS.gemm(a, b, out, beta=1.0, trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_allclose(out, opa @ opb + before, rtol=tol, atol=tol)
    blas.BLAS.gemm(a, b, out, trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_allclose(out, opa @ opb, rtol=tol, atol=tol)
    assert out_big[5].tolist() != [0.0] * 10  # nothing written outside the window


@needs_blas
def test_gemm_refuses_what_it_cannot_do():
    a, b = np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"blas.gemm: shapes \(2, 3\) @ \(3, 4\) -> \(2, 5\)"):
        blas.BLAS.gemm(a, b, np.empty((2, 5), np.float32))
    with pytest.raises(TypeError, match="float32 or float64 arrays of one dtype, got float32, "
                                        "float64"):
        blas.BLAS.gemm(a, b.astype(np.float64), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="b must be contiguous along its last axis"):
        blas.BLAS.gemm(a, np.ones((3, 8), np.float32)[:, ::2], np.empty((2, 4), np.float32))


def test_the_switch_turns_the_direct_calls_off():
    code = "from gpunet.backends import blas; print(blas.BLAS is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "GPUNET_CPU_BLAS": "numpy"})
    assert out.stdout.strip() == "True", out.stderr
