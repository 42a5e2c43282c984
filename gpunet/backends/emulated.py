"""The ``emulated`` device: NumPy arrays, with gpunet's ``.cu`` kernels run on the CPU
emulator (:mod:`gpunet.emulator`)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .. import kernels
from ..errors import DeviceError
from .base import Array, Backend
from .kernel_ops import KernelOps


class EmulatedBackend(KernelOps, Backend):
    """NumPy arrays, with gpunet's kernels compiled by the host C++ compiler and run on the
    CPU emulator (:mod:`gpunet.emulator`): the same ``.cu`` source, grid and block sizes as on
    a GPU. ``order`` (``"forward"``, ``"reverse"`` or ``"shuffled"``) is the order in which the
    threads of a block resume between barriers. Fresh outputs are filled with NaN so a value
    a kernel forgot to write shows up."""

    type = "emulated"
    ORDERS = ("forward", "reverse", "shuffled")

    def __init__(self, order: str = "forward", seed: int = 0) -> None:
        if order not in self.ORDERS:
            raise DeviceError(f"emulated device: expected a thread order in {self.ORDERS}, "
                              f"got {order!r}")
        super().__init__(np, "emulated" if order == "forward" else f"emulated:{order}")
        self.order, self.seed = order, seed
        self._modules: dict[str, Any] = {}

    def empty(self, shape: Sequence[int] | int, dtype: Any = np.float32) -> Array:
        from ..emulator import empty
        return empty(shape, dtype)  # all bytes 0xFF: NaN for floats, -1 for integers

    def launch(self, kernel: str, dtype: Any, grid: tuple[int, ...], block: tuple[int, ...],
               args: Sequence[Any], shared_mem: int = 0) -> None:
        from ..emulator import EmulatedModule
        file = kernels.file_of(kernel)
        if file not in self._modules:
            self._modules[file] = EmulatedModule([kernels.kernel_dir() / file],
                                                 kernels.name_expressions(file))
        self._modules[file].launch(kernels.name_expression(kernel, dtype), grid, block,
                                   tuple(args), shared_mem=shared_mem, order=self.order,
                                   seed=self.seed)
