"""The ``cuda:N`` devices: CuPy on one NVIDIA GPU each, with gpunet's kernels."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .. import kernels, rng
from .base import Array, Backend, on_device
from .kernel_ops import KernelOps


class CudaBackend(KernelOps, Backend):
    """CuPy on one NVIDIA GPU: the generic operations, with :class:`KernelOps` overriding
    those gpunet's kernels accelerate.

    Every public operation runs with this GPU current (:func:`~gpunet.backends.base.on_device`,
    applied to the whole class below), so what it allocates, and the kernel modules it loads,
    land on GPU ``index`` whichever device the calling thread has current.
    """

    type = "cuda"

    def __init__(self, cupy: Any, index: int) -> None:
        super().__init__(cupy, f"cuda:{index}")
        self.index = index
        self._device = cupy.cuda.Device(index)
        self._modules: dict[str, Any] = {}  # one RawModule per kernel file, loaded on this GPU
        self._functions: dict[tuple[str, np.dtype], Any] = {}
        # The test suite's CuPy stand-in (tests/cupy_standin) marks itself; whatever runs on it
        # is labelled so and never reported as a GPU result.
        self.standin = bool(getattr(cupy, "GPUNET_STANDIN", False))

    def __repr__(self) -> str:
        return f"device({self.name!r}, CuPy stand-in)" if self.standin else super().__repr__()

    @property
    def on_host(self) -> bool:
        return False

    @property
    def label(self) -> str:
        return f"{self.name} (CuPy stand-in)" if self.standin else self.name

    def scope(self) -> Any:
        return self._device  # CuPy keeps the devices a context replaced per thread (since 12)

    def launch(self, kernel: str, dtype: Any, grid: tuple[int, ...], block: tuple[int, ...],
               args: Sequence[Any], shared_mem: int = 0) -> None:
        key = (kernel, np.dtype(dtype))
        fn = self._functions.get(key)
        if fn is None:  # once per kernel and dtype on this GPU: get_function looks it up anew
            file = kernels.file_of(kernel)
            if file not in self._modules:  # compiled on first use; CuPy 14 caches it on disk
                self._modules[file] = self.xp.RawModule(
                    code=kernels.expanded_source(file), options=("-std=c++17",),
                    name_expressions=kernels.name_expressions(file))
            fn = self._functions[key] = self._modules[file].get_function(
                kernels.name_expression(kernel, dtype))
        fn(grid, block, tuple(args), shared_mem=shared_mem)

    def owns(self, a: Any) -> bool:
        return isinstance(a, self.xp.ndarray) and a.device.id == self.index

    def asarray(self, a: Any, dtype: Any = None) -> Array:
        if isinstance(a, self.xp.ndarray) and a.device.id != self.index:
            a = a.get()  # through the host: GPUs need not have peer access to each other
        return self.xp.asarray(a, dtype=dtype)

    def synchronize(self) -> None:
        self._device.synchronize()

    def dropout_mask(self, shape: Sequence[int], p: float, dtype: Any) -> Array:
        """As :meth:`Backend.dropout_mask`, drawn on the GPU by its own generator (nothing is
        uploaded), unless :func:`gpunet.rng.host_draws` asks for the host stream."""
        if rng.draws_on_host():
            return super().dropout_mask(shape, p, dtype)
        dtype = np.dtype(dtype)
        keep = rng.device_generator(self).random(tuple(shape), dtype=dtype) >= p
        return keep.astype(dtype) * dtype.type(1 / (1 - p))


# Not wrapped: what makes the device current, and what only reads an array's metadata.
_UNSCOPED = {"scope", "owns", "synchronize"}
for _name in dir(CudaBackend):
    _attr = getattr(CudaBackend, _name)
    if not _name.startswith("_") and callable(_attr) and _name not in _UNSCOPED:
        setattr(CudaBackend, _name, on_device(_attr))
