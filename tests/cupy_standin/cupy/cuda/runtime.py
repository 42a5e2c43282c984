"""``cupy.cuda.runtime`` of the stand-in: the device count, the per-thread current device, and
the runtime's error type (CuPy: ``cupy_backends/cuda/api/runtime.pyx``)."""
from __future__ import annotations

import threading
from typing import Any

from .. import _standin

is_hip = False

# CUDA's status codes and texts (cudaGetErrorName / cudaGetErrorString)
_ERRORS = {
    100: ("cudaErrorNoDevice", "no CUDA-capable device is detected"),
    101: ("cudaErrorInvalidDevice", "invalid device ordinal"),
    400: ("cudaErrorInvalidResourceHandle", "invalid resource handle"),
    600: ("cudaErrorNotReady", "device not ready"),
}


class CUDARuntimeError(RuntimeError):
    """As CuPy's: ``status`` is the CUDA error code; the message is ``"<name>: <text>"``."""

    def __init__(self, status: int) -> None:
        self.status = status
        name, text = _ERRORS[status]
        super().__init__(f"{name}: {text}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.status,)


# The CUDA runtime's current device is per host thread and starts at 0 in every thread.
_local = threading.local()


def getDeviceCount() -> int:
    if _standin.GPU_COUNT == 0:
        raise CUDARuntimeError(100)
    return _standin.GPU_COUNT


def _check_device(device: int) -> int:
    if not 0 <= device < getDeviceCount():
        raise CUDARuntimeError(101)
    return device


def getDevice() -> int:
    getDeviceCount()  # with no GPU, cudaGetDevice fails too
    return getattr(_local, "device", 0)


def setDevice(device: int) -> None:
    _local.device = _check_device(int(device))


def deviceSynchronize() -> None:
    """Wait for every stream of the current device (see :mod:`cupy.cuda.stream`)."""
    from . import stream
    stream._wait(stream._device_dependencies(getDevice()), f"device {getDevice()}")


def deviceCanAccessPeer(device: int, peerDevice: int) -> int:
    """0: the stand-in models GPUs without peer access, where CuPy refuses to let a kernel
    read another device's array (see ``_check_peer_access`` in ``cupy/_core/_kernel.pyx``)."""
    _check_device(device)
    _check_device(peerDevice)
    return 0


def getDeviceProperties(device: int) -> dict[str, Any]:
    """The keys gpunet and common tools read, with an H100's values (compute capability 9.0,
    132 SMs); the name says it is no GPU."""
    _check_device(device)
    return {
        "name": b"gpunet CuPy stand-in (not a GPU)",
        "totalGlobalMem": 80 * 1024**3,
        "sharedMemPerBlock": 48 * 1024,
        "sharedMemPerBlockOptin": 227 * 1024,
        "regsPerBlock": 65536,
        "warpSize": 32,
        "maxThreadsPerBlock": 1024,
        "maxThreadsDim": (1024, 1024, 64),
        "maxGridSize": (2**31 - 1, 65535, 65535),
        "totalConstMem": 64 * 1024,
        "major": 9,
        "minor": 0,
        "multiProcessorCount": 132,
        "pciBusID": device + 1,
        "pciDeviceID": 0,
        "pciDomainID": 0,
    }


def runtimeGetVersion() -> int:
    return 12080  # CUDA 12.8


def driverGetVersion() -> int:
    return 12080
