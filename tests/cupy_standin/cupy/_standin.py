"""Control and inspection of gpunet's CuPy stand-in (tests only; real CuPy has no such module).

Configuration, read once when the stand-in is imported:

- ``GPUNET_STANDIN_GPUS``: how many GPUs ``cupy.cuda.runtime.getDeviceCount()`` reports
  (default 2; 0 makes the runtime answer ``cudaErrorNoDevice`` as a machine without a GPU does).
- ``GPUNET_STANDIN_NCCL``: what ``cupy.cuda.nccl`` does, one of :data:`NCCL_MODES` (default
  ``ok``); that module (written separately) reads :data:`NCCL_MODE`.

Inspection: :data:`counters` (transfers, launches, module loads and compiles);
:func:`array_at` and :func:`device_at` (the memory behind a "device pointer", for the NCCL
stand-in); :func:`stream_from_ptr` (the stream object behind a stream handle).
"""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

NCCL_MODES = ("ok", "missing", "hang")


def _gpu_count() -> int:
    value = os.environ.get("GPUNET_STANDIN_GPUS", "2").strip()
    if not value.isdigit():
        raise ValueError(f"GPUNET_STANDIN_GPUS must be a count of GPUs (0 or more), got {value!r}")
    return int(value)


def _nccl_mode() -> str:
    value = os.environ.get("GPUNET_STANDIN_NCCL", "ok").strip()
    if value not in NCCL_MODES:
        raise ValueError(f"GPUNET_STANDIN_NCCL must be one of {', '.join(NCCL_MODES)}, "
                         f"got {value!r}")
    return value


#: GPUs the stand-in runtime reports.
GPU_COUNT: int = _gpu_count()
#: How the stand-in's ``cupy.cuda.nccl`` behaves.
NCCL_MODE: str = _nccl_mode()
#: Seconds a synchronisation waits on a blocked stream before it gives up with TimeoutError
#: (a real hang lasts forever; a test suite must not).
HANG_LIMIT_S: float = 3600.0


@dataclass
class Counters:
    """What the stand-in has done since the last :meth:`reset`. Each count is one call, not
    bytes: ``host_reads`` are device-to-host copies (``get``, ``asnumpy``, ``float``, ``int``,
    ``bool``, ``item``, ``tolist``, printing, and the count CuPy reads back for boolean-mask
    indexing and ``nonzero``); ``uploads`` are host-to-device copies (arrays made from host
    data, ``set``, host values in advanced indexing); ``launches`` are RawKernel launches;
    ``get_function_calls`` are ``RawModule.get_function`` calls; ``module_loads`` are kernel
    modules loaded onto a device (CuPy loads each module once per device); ``compiles`` are
    actual compilations (a module whose library is already in the emulator's on-disk cache,
    like CuPy's kernel cache, is loaded without one)."""

    host_reads: int = 0
    uploads: int = 0
    launches: int = 0
    get_function_calls: int = 0
    module_loads: int = 0
    compiles: int = 0

    def reset(self) -> None:
        with _lock:
            for f in fields(self):
                setattr(self, f.name, 0)

    def as_dict(self) -> dict[str, int]:
        with _lock:
            return {f.name: getattr(self, f.name) for f in fields(self)}


counters = Counters()
_lock = threading.Lock()  # counters and the allocation table are updated from many threads


def _count(name: str) -> None:
    with _lock:
        setattr(counters, name, getattr(counters, name) + 1)


# -- device memory: which host buffers back which device's arrays --------------------------
# Every array the stand-in allocates is a NumPy array whose buffer stands for device memory.
# The table maps each buffer's start address to (weak reference to the owning array, size in
# bytes, device), so a raw pointer (``ndarray.data.ptr``) can be turned back into memory.
# Each buffer also holds a block of the default memory pool of its device (``cupy.cuda.memory``)
# until the owning array is collected.
_allocations: dict[int, tuple[weakref.ref, int, int]] = {}


def _register(a: np.ndarray, device: int) -> np.ndarray:
    """Record the buffer behind the new array ``a`` as memory of ``device``; returns ``a``, or
    a copy of it when ``a`` borrows memory the table cannot track (a buffer that is not a
    NumPy array, or an owner that is not one contiguous block)."""
    owner = a
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    if owner.base is not None or not (owner.flags.c_contiguous or owner.flags.f_contiguous):
        a = owner = a.copy()
    if owner.nbytes == 0:
        return a
    start = owner.ctypes.data
    with _lock:
        known = _allocations.get(start)
    if known is not None and known[0]() is owner:
        return a  # already device memory: taken from the pool once
    from .cuda import memory
    block = memory._allocate(device, owner.nbytes)  # the default memory pool's accounting

    def forget(ref: weakref.ref, start: int = start, block: Any = block) -> None:
        memory._release(block)
        with _lock:
            if _allocations.get(start, (None,))[0] is ref:
                del _allocations[start]

    with _lock:
        _allocations[start] = (weakref.ref(owner, forget), owner.nbytes, device)
    return a


def _find(ptr: int, nbytes: int) -> tuple[np.ndarray, int, int]:
    """``(owner, offset, device)`` of the allocation holding ``nbytes`` bytes at ``ptr``."""
    with _lock:
        entries = list(_allocations.items())
    for start, (ref, size, device) in entries:
        owner = ref()
        if owner is not None and start <= ptr and ptr + nbytes <= start + size:
            return owner, ptr - start, device
    raise ValueError(f"CuPy stand-in: no live device allocation holds {nbytes} bytes at "
                     f"{ptr:#x} (an illegal address on a GPU)")


def array_at(ptr: int, count: int, dtype: Any) -> np.ndarray:
    """A writable 1-D NumPy view of ``count`` elements of ``dtype`` at device pointer ``ptr``
    (``ndarray.data.ptr`` of a stand-in array, plus an offset): what the NCCL stand-in reads
    and writes. Raises ValueError when no live stand-in array holds that memory."""
    dtype = np.dtype(dtype)
    if count == 0:
        return np.empty(0, dtype=dtype)
    owner, offset, _ = _find(ptr, count * dtype.itemsize)
    raw = owner.reshape(-1, order="A").view(np.uint8)  # the buffer in memory order, no copy
    return raw[offset:offset + count * dtype.itemsize].view(dtype)


def device_at(ptr: int) -> int:
    """The device whose memory holds address ``ptr`` (ValueError if none does)."""
    return _find(ptr, 1)[2]


def stream_from_ptr(ptr: int) -> Any:
    """The stream object with handle ``ptr``: ``cupy.cuda.Stream.null`` for 0, ``Stream.ptds``
    for the per-thread default stream, else a live ``cupy.cuda.Stream`` (ValueError if none
    has that handle)."""
    from .cuda import stream
    return stream._from_ptr(ptr)
