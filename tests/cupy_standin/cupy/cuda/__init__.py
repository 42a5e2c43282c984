"""``cupy.cuda`` of the stand-in. As in CuPy, ``cupy.cuda.nccl`` is not imported here:
``from cupy.cuda import nccl`` imports it (and fails where NCCL is missing)."""
from __future__ import annotations

from . import device, driver, memory, runtime, stream
from .device import Device, get_device_id
from .memory import MemoryPool
from .stream import Event, Stream, get_current_stream, get_elapsed_time

__all__ = ["Device", "Event", "MemoryPool", "Stream", "device", "driver", "get_current_stream",
           "get_device_id", "get_elapsed_time", "is_available", "memory", "runtime", "stream"]


def is_available() -> bool:
    try:
        return runtime.getDeviceCount() > 0
    except runtime.CUDARuntimeError:
        return False
