"""``cupy.random``: the part gpunet uses, ``default_rng(seed)`` and ``Generator.random``.

CuPy's ``Generator`` (cupy/random/_generator_api.pyx) draws on the device from an XORWOW bit
generator; the stand-in draws from NumPy's PCG64 with the same seed, so its numbers differ
from CuPy's (as CuPy's differ from NumPy's): only the placement is modelled. The result is a
new array on the current device; nothing is read back or uploaded (a device draw), so the
transfer counters do not move.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._core import _new, ndarray
from .cuda import runtime

__all__ = ["Generator", "default_rng"]


class Generator:
    """Draws on the current device (``cupy.random.Generator``)."""

    def __init__(self, seed: Any = None) -> None:
        self._numpy = np.random.default_rng(seed)

    def random(self, size: Any = None, dtype: Any = np.float64, out: ndarray | None = None
               ) -> ndarray:
        """Uniform values in [0, 1) of ``dtype`` (float32 or float64, as CuPy allows)."""
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"Unsupported dtype {dtype.name} for random")  # as CuPy
        values = self._numpy.random(size, dtype=dtype)
        if out is not None:
            out[...] = _new(np.asarray(values), runtime.getDevice())
            return out
        return _new(np.asarray(values), runtime.getDevice())


def default_rng(seed: Any = None) -> Generator:
    return Generator(seed)
