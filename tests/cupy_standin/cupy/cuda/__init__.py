"""``cupy.cuda`` of the stand-in. As in CuPy, ``cupy.cuda.nccl`` is not imported here:
``from cupy.cuda import nccl`` imports it (and fails where NCCL is missing)."""
from __future__ import annotations

from . import device, driver, runtime, stream
from .device import Device, get_device_id
from .stream import Event, Stream, get_current_stream

__all__ = ["Device", "Event", "Stream", "device", "driver", "get_current_stream",
           "get_device_id", "is_available", "runtime", "stream"]


def is_available() -> bool:
    try:
        return runtime.getDeviceCount() > 0
    except runtime.CUDARuntimeError:
        return False
