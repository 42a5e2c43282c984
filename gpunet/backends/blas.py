"""The GEMM of the BLAS that NumPy itself loaded, called directly, for the two things
``np.matmul`` cannot say: accumulate into an existing output (``beta = 1``), and read a matrix
whose rows are a strided window into a bigger buffer (a leading dimension larger than its
width). The CPU device's convolutions need both (:meth:`CpuBackend.conv2d`): a 3x3 convolution
is nine GEMMs over shifted windows of one padded image, summed into one output.

Only the 64-bit-integer CBLAS symbols of the OpenBLAS builds that NumPy's wheels bundle are
used (``scipy_cblas_sgemm64_`` from NumPy 2, ``cblas_sgemm64_`` before): their integer width is
in their name, and a wrong guess would be memory corruption, not an error. Where none is found
(NumPy built against MKL, Accelerate or a system BLAS), :data:`BLAS` is None and the CPU device
takes its pure-NumPy path. A first call is checked against ``np.matmul`` before it is trusted.
``GPUNET_CPU_BLAS=numpy`` turns the direct calls off.
"""
from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
#: (single, double) precision GEMM names, 64-bit integers (ILP64) in every argument
_SYMBOLS = (("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_"), ("cblas_sgemm64_", "cblas_dgemm64_"))


class Blas:
    """``gemm(a, b, out, beta)``: ``out = a @ b + beta out`` through CBLAS, on 2-D float32 or
    float64 arrays (or views) whose last axis is contiguous."""

    def __init__(self, sgemm: Any, dgemm: Any, path: str, local: Any = None) -> None:
        self.path = path
        #: ``local_threads(n)``: OpenBLAS 0.3.27's openblas_set_num_threads_local, returning
        #: the previous count; None where the library has none. Despite its name it sets the
        #: count of the whole process in the OpenBLAS NumPy ships (measured: a thread's call
        #: made the main thread's GEMMs single-threaded), so gpunet calls it once, to 1, when
        #: its compiled pool starts (:mod:`.native`)
        self.local_threads = None
        if local is not None:
            local.argtypes, local.restype = [ctypes.c_int], ctypes.c_int
            self.local_threads = local
        self._fn = {np.dtype(np.float32): sgemm, np.dtype(np.float64): dgemm}
        self._address = {t: ctypes.cast(f, ctypes.c_void_p).value for t, f in self._fn.items()}
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        for fn, real in ((sgemm, ctypes.c_float), (dgemm, ctypes.c_double)):
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, real,
                           ptr, i64, ptr, i64, real, ptr, i64]
            fn.restype = None

    def pointer(self, dtype: Any) -> int:
        """The address of the GEMM for ``dtype`` (float32 or float64), for compiled code."""
        return self._address[np.dtype(dtype)]  # taken once: this runs for every GEMM

    def gemm(self, a: np.ndarray, b: np.ndarray, out: np.ndarray, beta: float = 0.0,
             trans_a: bool = False, trans_b: bool = False) -> np.ndarray:
        """``out = op(a) @ op(b) + beta out``, ``op`` an optional transpose; returns ``out``."""
        m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
        n = b.shape[0] if trans_b else b.shape[1]
        if (b.shape[1] if trans_b else b.shape[0]) != k or out.shape != (m, n):
            raise ValueError(f"blas.gemm: shapes {a.shape}{'^T' * trans_a} @ "
                             f"{b.shape}{'^T' * trans_b} -> {out.shape} do not fit")
        dtype = out.dtype
        if a.dtype != dtype or b.dtype != dtype or dtype not in self._fn:
            raise TypeError(f"blas.gemm: expected float32 or float64 arrays of one dtype, got "
                            f"{a.dtype}, {b.dtype} and {out.dtype}")
        size = dtype.itemsize
        for name, v in (("a", a), ("b", b), ("out", out)):
            if v.strides[1] != size and v.shape[1] > 1:
                raise ValueError(f"blas.gemm: {name} must be contiguous along its last axis, "
                                 f"got strides {v.strides}")
        if m == 0 or n == 0:
            return out
        self._fn[dtype](_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS,
                        _TRANS if trans_b else _NO_TRANS, m, n, k, 1.0,
                        a.ctypes.data, max(a.strides[0] // size, 1),
                        b.ctypes.data, max(b.strides[0] // size, 1), beta,
                        out.ctypes.data, max(out.strides[0] // size, 1))
        return out


def _numpy_blas_libraries() -> list[str]:
    """Paths of the shared libraries with "blas" in their name that this process has loaded
    (NumPy's wheels load their OpenBLAS on import)."""
    seen: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "blas" in os.path.basename(path).lower() and path not in seen:
                    seen.append(path)
    except OSError:
        pass
    return seen


def _find() -> Blas | None:
    if os.environ.get("GPUNET_CPU_BLAS", "").strip().lower() == "numpy":
        return None
    for path in _numpy_blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for s, d in _SYMBOLS:
            if hasattr(lib, s) and hasattr(lib, d):
                blas = Blas(getattr(lib, s), getattr(lib, d), path,
                            getattr(lib, "openblas_set_num_threads_local", None))
                if _agrees(blas):
                    return blas
    return None


def _agrees(blas: Blas) -> bool:
    """Whether ``blas`` computes what np.matmul does, strided views and beta = 1 included."""
    g = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        a, big = g.standard_normal((3, 5)).astype(dtype), g.standard_normal((5, 9)).astype(dtype)
        out = np.ones((3, 4), dtype)
        blas.gemm(a, big[:, 2:6], out, beta=1.0)
        if not np.allclose(out, a @ big[:, 2:6] + 1, rtol=1e-5, atol=1e-5):
            return False
        out_t = np.zeros((5, 3), dtype)
        blas.gemm(big[:, :5], a, out_t, trans_a=True, trans_b=True)
        if not np.allclose(out_t, big[:, :5].T @ a.T, rtol=1e-5, atol=1e-5):
            return False
    return True


#: NumPy's own BLAS, or None where it cannot be called directly (see the module's docstring)
BLAS: Blas | None = _find()
