"""gpunet's CuPy stand-in: enough of CuPy's API, and of its rules, for gpunet's CUDA backend to
run in CI without a GPU. It is not CuPy and never pretends to be a GPU: ``GPUNET_STANDIN`` is
True, ``__version__`` carries ``+gpunet.standin``, the device name says so.

Modelled, after CuPy 13/14's source (each rule names its CuPy file where it is implemented):

- several devices (``GPUNET_STANDIN_GPUS``, default 2) without peer access, a current device
  per thread, new arrays on the current device and views on their base's device, and
  CuPy's ValueError when a kernel would read another device's array (:mod:`cupy._core`);
- CuPy's refusals: host NumPy arrays in device operations, implicit conversion to NumPy;
- counted transfers and launches (:data:`cupy._standin.counters`);
- ``RawModule``/``RawKernel`` running the CUDA source on gpunet's CPU emulator, loaded per
  device as CuPy does (:mod:`cupy._raw`);
- streams and events, synchronous except for a hook that hangs a stream, for the NCCL
  stand-in (:mod:`cupy.cuda.stream`).

Not modelled: CuPy's own kernels and numerics (results are NumPy's, with NumPy's type
promotion, which can differ from CuPy's in corner cases), speed, memory limits (the
default memory pool's accounting is modelled: :mod:`cupy.cuda.memory`),
asynchrony, peer access, CUDA graphs, ``cupyx``, ``cupy.random`` beyond ``default_rng(seed).random``
(:mod:`cupy.random`), ``linalg``/``fft``, and
CuPy's wrap-around of out-of-bounds integer indices (NumPy raises). NumPy's read-only views
(``broadcast_to``) stay read-only, where CuPy would let them be written.

Any NumPy function not defined here is wrapped on first use (module ``__getattr__``), under
the same rules.
"""
from __future__ import annotations

from typing import Any

import numpy as _np

from . import _standin, cuda, lib, random  # noqa: F401 (cupy._standin: the stand-in's controls)
from ._core import (array, asanyarray, asarray, asnumpy, copy, empty, empty_like, full_like,
                    get_array_module, ndarray, ones_like, ufunc, zeros_like)
from ._raw import RawKernel, RawModule

__version__ = "14.2.0+gpunet.standin"  # the CuPy whose rules it follows
GPUNET_STANDIN = True
newaxis = None

__all__ = ["GPUNET_STANDIN", "RawKernel", "RawModule", "array", "asanyarray", "asarray",
           "asnumpy", "copy", "cuda", "empty", "empty_like", "full_like", "get_array_module",
           "get_default_memory_pool", "lib", "ndarray", "newaxis", "ones_like", "ufunc",
           "zeros_like"]


def get_default_memory_pool() -> cuda.MemoryPool:
    """The memory pool every stand-in array is allocated from (CuPy's default allocator is
    this pool's ``malloc``); see :mod:`cupy.cuda.memory` for what it models."""
    return cuda.memory._default_pool


def __getattr__(name: str) -> Any:
    """``cupy.<name>`` for a NumPy name not defined above: ufuncs and functions wrapped under
    the stand-in's rules, NumPy's scalar types, ``dtype``, ``finfo``, ``iinfo`` and constants
    as they are (CuPy re-exports those). NumPy's submodules and other classes are not
    modelled."""
    from . import _core
    attr = getattr(_np, name, None)
    if name.startswith("_") or attr is None:
        raise AttributeError(f"module 'cupy' has no attribute {name!r}")
    if isinstance(attr, _np.ufunc):
        value: Any = _core.get_ufunc(name)
    elif isinstance(attr, type):
        if not (issubclass(attr, _np.generic) or attr in (_np.dtype, _np.finfo, _np.iinfo)):
            raise AttributeError(f"CuPy stand-in: cupy.{name} (a class) is not modelled")
        value = attr
    elif callable(attr):
        value = _core.wrap_function(attr, name)
    elif isinstance(attr, (int, float)):
        value = attr
    else:
        raise AttributeError(f"CuPy stand-in: cupy.{name} is not modelled")
    globals()[name] = value  # wrapped once
    return value
