"""``cupy.cuda.Device`` of the stand-in (CuPy: ``cupy/cuda/device.pyx``)."""
from __future__ import annotations

import threading
from typing import Any

from . import runtime, stream


class _DeviceStack(threading.local):
    """The devices ``with Device(...)`` replaced, per thread (CuPy's ``_ThreadLocalStack``,
    since CuPy 12: one Device object may be entered from several threads)."""

    def __init__(self) -> None:
        self.devices: list[int] = []


_stack = _DeviceStack()


def get_device_id() -> int:
    return runtime.getDevice()


class Device:
    """A CUDA device. ``Device()`` is the calling thread's current device; ``Device(i)`` is
    not checked until it is used (as in CuPy), then an invalid ``i`` raises
    ``CUDARuntimeError('cudaErrorInvalidDevice: invalid device ordinal')``. As a context it
    makes itself current and restores the previous device on exit (nesting works)."""

    def __init__(self, device: Any = None) -> None:
        self.id = runtime.getDevice() if device is None else int(device)

    def __int__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"

    def __enter__(self) -> Device:
        previous = runtime.getDevice()
        if self.id != previous:
            # checked before the push: CuPy pushes first, so a failed enter leaves a stale entry
            runtime.setDevice(self.id)
        _stack.devices.append(previous)
        return self

    def __exit__(self, *exc: Any) -> None:
        runtime.setDevice(_stack.devices.pop())

    def use(self) -> Device:
        runtime.setDevice(self.id)
        return self

    def synchronize(self) -> None:
        """Wait for all work on this device (every stream, as ``cudaDeviceSynchronize``)."""
        runtime._check_device(self.id)
        stream._wait(stream._device_dependencies(self.id), f"{self!r}.synchronize()")

    @property
    def compute_capability(self) -> str:
        props = runtime.getDeviceProperties(self.id)
        return f"{props['major']}{props['minor']}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and self.id == other.id

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __lt__(self, other: Device) -> bool:
        return self.id < other.id

    def __le__(self, other: Device) -> bool:
        return self.id <= other.id

    def __gt__(self, other: Device) -> bool:
        return self.id > other.id

    def __ge__(self, other: Device) -> bool:
        return self.id >= other.id

    def __hash__(self) -> int:
        return hash(self.id)
