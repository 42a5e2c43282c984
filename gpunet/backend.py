"""Devices and the backends behind them.

A device *is* its backend: the object ``gpunet.device("cpu")`` returns owns the array module
(``xp``: NumPy or CuPy) and every heavy operation a layer needs. The generic implementation of
each operation is written once, against ``self.xp``, in :class:`Backend`; the CUDA backend
subclasses it and overrides only what its own kernels accelerate. Layers never call NumPy or
CuPy for computation; they call these methods, so the same layer code runs on every device.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Sequence

import numpy as np

from . import kernels, rng
from .errors import DeviceError
from .kernels import KernelOps

Array = Any  # numpy.ndarray or cupy.ndarray

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Backend:
    """Generic operations over an array module. With ``xp = numpy`` this is the CPU device
    and the reference every other device is tested against."""

    type = "cpu"

    def __init__(self, xp: Any = np, name: str = "cpu") -> None:
        self.xp = xp
        self.name = name

    def __repr__(self) -> str:
        return f"device({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Backend) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __deepcopy__(self, memo: dict[int, Any]) -> "Backend":
        return self  # a device is shared, never copied (copying a layer keeps its device)

    # -- arrays and transfers -------------------------------------------------------------
    def owns(self, a: Any) -> bool:
        """Whether ``a`` is an array that lives on this device."""
        return isinstance(a, np.ndarray)

    def asarray(self, a: Any, dtype: Any = None) -> Array:
        """``a`` as an array on this device (copied across devices, not within one)."""
        return self.xp.asarray(to_numpy(a) if is_device_array(a) else a, dtype=dtype)

    def zeros(self, shape: Sequence[int] | int, dtype: Any = np.float32) -> Array:
        return self.xp.zeros(shape, dtype=dtype)

    def zeros_like(self, a: Array) -> Array:
        return self.xp.zeros_like(a)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU)."""

    def activate(self) -> None:
        """Make this device current for the calling thread (a no-op on the CPU)."""

    # -- linear algebra and reductions ----------------------------------------------------
    def gemm(self, a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
        """``op(a) @ op(b)`` with ``op`` an optional transpose; one BLAS call, no copies."""
        return (a.T if trans_a else a) @ (b.T if trans_b else b)

    def sum(self, x: Array, axis: Any = None, keepdims: bool = False) -> Array:
        return x.sum(axis=axis, keepdims=keepdims)

    def mean(self, x: Array, axis: Any = None, keepdims: bool = False) -> Array:
        return x.mean(axis=axis, keepdims=keepdims)

    def concat(self, xs: Sequence[Array], axis: int) -> Array:
        return self.xp.concatenate(xs, axis=axis)

    def split(self, x: Array, sizes: Sequence[int], axis: int) -> list[Array]:
        """Cut ``x`` along ``axis`` into pieces of the given sizes (views)."""
        return self.xp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=axis)

    # -- elementwise math -----------------------------------------------------------------
    def exp(self, x: Array) -> Array:
        return self.xp.exp(x)

    def log(self, x: Array) -> Array:
        return self.xp.log(x)

    def log1p(self, x: Array) -> Array:
        return self.xp.log1p(x)

    def abs(self, x: Array) -> Array:
        return self.xp.abs(x)

    def sqrt(self, x: Array) -> Array:
        return self.xp.sqrt(x)

    def clip(self, x: Array, lo: float, hi: float) -> Array:
        return self.xp.clip(x, lo, hi)

    def where(self, cond: Array, a: Any, b: Any) -> Array:
        return self.xp.where(cond, a, b)

    def maximum(self, a: Any, b: Any) -> Array:
        return self.xp.maximum(a, b)

    def isfinite_all(self, x: Array) -> bool:
        return bool(self.xp.isfinite(x).all())

    # -- activations: forward, and backward from the upstream gradient --------------------
    def sigmoid(self, x: Array) -> Array:
        # Split by sign so exp never overflows: 1/(1+e^-x) for x >= 0, e^x/(1+e^x) below.
        e = self.xp.exp(-self.xp.abs(x))
        return self.xp.where(x >= 0, 1 / (1 + e), e / (1 + e))

    def backprop_sigmoid(self, dy: Array, y: Array) -> Array:
        return dy * y * (1 - y)

    def tanh(self, x: Array) -> Array:
        return self.xp.tanh(x)

    def backprop_tanh(self, dy: Array, y: Array) -> Array:
        return dy * (1 - y * y)

    def relu(self, x: Array) -> Array:
        return self.xp.maximum(x, 0)

    def backprop_relu(self, dy: Array, x: Array) -> Array:
        return dy * (x > 0)

    def leaky_relu(self, x: Array, slope: float) -> Array:
        return self.xp.where(x > 0, x, x * slope)

    def backprop_leaky_relu(self, dy: Array, x: Array, slope: float) -> Array:
        return self.xp.where(x > 0, dy, dy * slope)

    def elu(self, x: Array, alpha: float) -> Array:
        return self.xp.where(x > 0, x, alpha * self.xp.expm1(self.xp.minimum(x, 0)))

    def backprop_elu(self, dy: Array, x: Array, y: Array, alpha: float) -> Array:
        # for x <= 0: d/dx alpha*(e^x - 1) = alpha*e^x = y + alpha
        return self.xp.where(x > 0, dy, dy * (y + alpha))

    def softplus(self, x: Array) -> Array:
        # log(1 + e^x) = max(x, 0) + log1p(e^-|x|), exact and overflow-free
        return self.xp.maximum(x, 0) + self.xp.log1p(self.xp.exp(-self.xp.abs(x)))

    def backprop_softplus(self, dy: Array, x: Array) -> Array:
        return dy * self.sigmoid(x)

    def softmax(self, x: Array, axis: int = -1) -> Array:
        e = self.xp.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        shifted = x - x.max(axis=axis, keepdims=True)
        return shifted - self.xp.log(self.xp.exp(shifted).sum(axis=axis, keepdims=True))

    def backprop_softmax(self, dy: Array, y: Array, axis: int = -1) -> Array:
        # dx_i = y_i * (dy_i - sum_j dy_j y_j)
        return y * (dy - (dy * y).sum(axis=axis, keepdims=True))

    # -- batch normalisation -------------------------------------------------------------
    def batchnorm_backward(self, dy: Array, x: Array, mean: Array, invstd: Array,
                           gamma: Array) -> tuple[Array, Array, Array]:
        """``(dx, dgamma, dbeta)`` of training-mode batch normalisation of ``x`` with shape
        ``(N, C)`` or ``(N, C, H, W)``; ``mean``, ``invstd`` and ``gamma`` have shape ``(C,)``.
        With ``xhat = (x - mean) * invstd`` and ``M`` values per channel:
        ``dx = gamma * invstd * (dy - sum(dy)/M - xhat * sum(dy * xhat)/M)``."""
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        invstd_b = invstd.reshape(shape)
        xhat = (x - mean.reshape(shape)) * invstd_b
        dbeta = dy.sum(axis=axes)
        dgamma = (dy * xhat).sum(axis=axes)
        m = x.size // x.shape[1]
        dx = (gamma.reshape(shape) * invstd_b) * (
            dy - (dbeta.reshape(shape) + xhat * dgamma.reshape(shape)) / m)
        return dx, dgamma, dbeta

    # -- randomness (drawn on the host so every device sees the same numbers) -------------
    def dropout_mask(self, shape: Sequence[int], p: float, dtype: Any) -> Array:
        """Inverted-dropout mask: 0 with probability ``p``, else ``1/(1-p)``."""
        keep = rng.generator().random(shape) >= p
        return self.asarray((keep / (1 - p)).astype(dtype))


class CudaBackend(KernelOps, Backend):
    """CuPy on one NVIDIA GPU: the generic operations, with :class:`KernelOps` overriding
    those gpunet's kernels accelerate."""

    type = "cuda"

    def __init__(self, cupy: Any, index: int) -> None:
        super().__init__(cupy, f"cuda:{index}")
        self.index = index
        self._modules: dict[str, Any] = {}

    def launch(self, kernel: str, dtype: Any, grid: tuple[int, ...], block: tuple[int, ...],
               args: Sequence[Any], shared_mem: int = 0) -> None:
        file = kernels.file_of(kernel)
        if file not in self._modules:  # compiled on first use; CuPy caches it on disk
            with self.xp.cuda.Device(self.index):
                self._modules[file] = self.xp.RawModule(
                    code=kernels.expanded_source(file), options=("-std=c++17",),
                    name_expressions=kernels.name_expressions(file))
        fn = self._modules[file].get_function(kernels.name_expression(kernel, dtype))
        with self.xp.cuda.Device(self.index):
            fn(grid, block, tuple(args), shared_mem=shared_mem)

    def owns(self, a: Any) -> bool:
        return isinstance(a, self.xp.ndarray) and a.device.id == self.index

    def asarray(self, a: Any, dtype: Any = None) -> Array:
        with self.xp.cuda.Device(self.index):
            if isinstance(a, self.xp.ndarray) and a.device.id != self.index:
                a = a.get()
            return self.xp.asarray(a, dtype=dtype)

    def zeros(self, shape: Sequence[int] | int, dtype: Any = np.float32) -> Array:
        with self.xp.cuda.Device(self.index):
            return self.xp.zeros(shape, dtype=dtype)

    def zeros_like(self, a: Array) -> Array:
        with self.xp.cuda.Device(self.index):
            return self.xp.zeros_like(a)

    def synchronize(self) -> None:
        self.xp.cuda.Device(self.index).synchronize()

    def activate(self) -> None:
        self.xp.cuda.Device(self.index).use()


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

    def empty(self, shape: Sequence[int], dtype: Any) -> Array:
        return np.full(shape, np.nan, dtype=dtype)

    def launch(self, kernel: str, dtype: Any, grid: tuple[int, ...], block: tuple[int, ...],
               args: Sequence[Any], shared_mem: int = 0) -> None:
        from .emulator import EmulatedModule
        file = kernels.file_of(kernel)
        if file not in self._modules:
            self._modules[file] = EmulatedModule([kernels.kernel_dir() / file],
                                                 kernels.name_expressions(file))
        self._modules[file].launch(kernels.name_expression(kernel, dtype), grid, block,
                                   tuple(args), shared_mem=shared_mem, order=self.order,
                                   seed=self.seed)


# -- choosing a device --------------------------------------------------------------------
_devices: dict[str, Backend] = {}


def is_device_array(a: Any) -> bool:
    """True for a CuPy array; tells without importing CuPy."""
    return type(a).__module__.split(".")[0] == "cupy"


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy copy (or view) of ``a``, wherever it lives."""
    return a.get() if is_device_array(a) else np.asarray(a)


def device_of(a: Any) -> Backend:
    """The device an array lives on."""
    return get_device(f"cuda:{a.device.id}" if is_device_array(a) else "cpu")


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
        dev = Backend(np, "cpu")
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
