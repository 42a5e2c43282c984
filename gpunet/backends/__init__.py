"""Devices and the backends behind them.

A device *is* its backend: the object ``gpunet.device("cpu")`` returns owns the array module
(``xp``: NumPy or CuPy) and every heavy operation a layer needs. One file per device:

- ``base.py``: :class:`Backend`, the generic operations written once against ``self.xp``;
- ``cpu.py``: :class:`CpuBackend` (``cpu``);
- ``cuda.py``: :class:`CudaBackend` (``cuda:N``), with :class:`KernelOps` from ``kernel_ops.py``;
- ``emulated.py``: :class:`EmulatedBackend` (``emulated``), the same kernels on the CPU emulator;
- this file: choosing a device.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np

from ..errors import DeviceError
from .base import FLOAT_DTYPES, Array, Backend, is_device_array, to_numpy
from .cpu import CpuBackend
from .cuda import CudaBackend
from .emulated import EmulatedBackend
from .kernel_ops import KernelOps

__all__ = ["Array", "FLOAT_DTYPES", "Backend", "CpuBackend", "CudaBackend", "EmulatedBackend",
           "KernelOps", "asarray", "available_devices", "device_name", "device_of", "get_device",
           "is_device_array", "to_numpy"]


# -- choosing a device --------------------------------------------------------------------
_devices: dict[str, Backend] = {}


def device_name(a: Any) -> str:
    """The name of the device an array lives on, for messages: ``"cuda:N"`` or ``"cpu"``."""
    return f"cuda:{a.device.id}" if is_device_array(a) else "cpu"


def device_of(a: Any) -> Backend:
    """The device an array lives on."""
    return get_device(device_name(a))


def asarray(a: Any, device: str | Backend = "cpu", dtype: Any = None) -> Array:
    """``a`` as an array on ``device``."""
    return get_device(device).asarray(a, dtype=dtype)


def _import_cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise DeviceError(
            f"CUDA device requested, but CuPy is not importable ({e}); install it with "
            "pip install 'gpunet[cuda12]' (or cuda13)") from e
    return cupy


def _cuda_device_count(cupy: Any) -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, driver too old, no device
        raise DeviceError(f"CUDA device requested, but the CUDA runtime reports: {e}") from e


def _cuda_available() -> bool:
    try:
        return _cuda_device_count(_import_cupy()) > 0
    except DeviceError:
        return False


def get_device(spec: str | Backend | None = "auto") -> Backend:
    """The device for ``spec``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"emulated"`` (the CPU
    emulator of the CUDA kernels; ``"emulated:reverse"`` and ``"emulated:shuffled"`` resume
    threads in other orders) or ``"auto"``.

    ``"auto"`` (and ``None``) takes ``$GPUNET_DEVICE`` when it is set, else CUDA when CuPy
    imports and sees a GPU, else the CPU. Asking for CUDA where there is none raises
    :class:`~gpunet.DeviceError` saying why.
    """
    if isinstance(spec, Backend):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = os.environ.get("GPUNET_DEVICE", "").strip().lower() or (
            "cuda:0" if _cuda_available() else "cpu")
        if spec == "auto":
            raise DeviceError("GPUNET_DEVICE must name a device, got 'auto'")
    if spec == "cuda":
        spec = "cuda:0"
    if spec == "emulated:forward":
        spec = "emulated"
    if spec in _devices:
        return _devices[spec]
    if spec == "cpu":
        dev = CpuBackend(np, "cpu")
    elif spec == "emulated" or spec.startswith("emulated:"):
        dev = EmulatedBackend(spec.partition(":")[2] or "forward")
    elif spec.startswith("cuda:"):
        try:
            index = int(spec[5:])
        except ValueError:
            raise DeviceError(f"expected a device 'cuda:N' with N an integer, got {spec!r}") from None
        cupy = _import_cupy()
        count = _cuda_device_count(cupy)
        if not 0 <= index < count:
            raise DeviceError(f"CUDA device {index} requested, but {count} GPU(s) are visible")
        dev = CudaBackend(cupy, index)
    else:
        raise DeviceError(f"unknown device {spec!r}; expected 'cpu', 'cuda', 'cuda:N', "
                          "'emulated' or 'auto'")
    _devices[spec] = dev
    return dev


def available_devices() -> list[Backend]:
    """Every device this machine can run: the CPU, the emulator where a C++ compiler is
    installed, then each visible GPU."""
    devices = [get_device("cpu")]
    if shutil.which(os.environ.get("CXX", "g++")):
        devices.append(get_device("emulated"))
    if _cuda_available():
        devices += [get_device(f"cuda:{i}") for i in range(_cuda_device_count(_import_cupy()))]
    return devices
