"""``RawModule`` and ``RawKernel`` of the stand-in: CUDA C++ source run on gpunet's CPU
emulator (:class:`gpunet.emulator.EmulatedModule`), with CuPy's loading and launch rules.

- Loading (``cupy/_core/raw.pyx``): nothing is compiled at construction. A module is loaded
  per device, on the device current at ``get_function`` or at a kernel's first call there
  (``_get_raw_module`` is memoized ``for_each_device``, process-wide, keyed by the source,
  options and name expressions). ``get_function`` returns a RawKernel, which keeps one
  function per device: called under another device, it loads the module there too.
- A ``Function`` (``RawKernel.kernel``) belongs to the device it was loaded on; launching it
  with another device current fails as cuLaunchKernel does (CUDA_ERROR_INVALID_HANDLE).
- Arguments (``_pointer`` in ``cupy/cuda/function.pyx``): a device array passes its pointer
  (strides ignored; the emulator refuses a non-contiguous array instead of reading the wrong
  elements); a NumPy scalar passes by value with its own width; a Python bool/int/float/complex
  passes as np.bool_/int64 (uint64 from 2**63)/float64/complex128 (``CScalar``); a host NumPy
  array of size 1 passes by value, any other size raises TypeError. An array of another
  device raises CUDA_ERROR_ILLEGAL_ADDRESS (on a GPU without peer access, the kernel faults).
  The emulator then checks each argument against the kernel's C++ parameter type, which a GPU
  cannot: a Python int for an ``int`` parameter is refused rather than read as 8 bytes.
- Grid and block must be tuples (Cython-typed in CuPy), padded to 3 dimensions, each at least 1.

The source text is written to ``<emulator cache>/standin-sources/<sha256>.cu`` (the emulator
compiles files); the compiled library is cached by the emulator, as CuPy caches cubins.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _standin
from ._core import ndarray
from .cuda import runtime
from .cuda.driver import CUDADriverError


def _host_options(options: Sequence[str]) -> tuple[str, ...]:
    """The NVRTC options the host compiler understands: macros and include paths. The C++
    standard is the emulator's own (C++17); any other option is refused so that a new one
    is looked at rather than silently dropped."""
    host = []
    for opt in options:
        if opt.startswith(("-D", "-U", "-I")):
            host.append(opt)
        elif not opt.startswith(("-std=", "--std=")):
            raise ValueError(f"CuPy stand-in: NVRTC option {opt!r} has no counterpart for the "
                             f"CPU emulator (see _host_options in {__file__})")
    return tuple(host)


def _source_file(code: str) -> Path:
    from gpunet.emulator import default_cache_dir
    folder = default_cache_dir() / "standin-sources"
    path = folder / f"{hashlib.sha256(code.encode()).hexdigest()[:32]}.cu"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        # written and renamed into place: another process may write the same file
        fd, tmp = tempfile.mkstemp(suffix=".cu.tmp", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(code)
        os.replace(tmp, path)
    return path


def _check_tuple(value: Any, what: str) -> None:
    if not isinstance(value, tuple):
        raise TypeError(f"Argument '{what}' has incorrect type (expected tuple, got "
                        f"{type(value).__name__})")


class _Function:
    """One kernel of a module loaded on one device (CuPy's ``cupy.cuda.function.Function``)."""

    def __init__(self, library: Any, name: str, device: int) -> None:
        self._library, self.name, self.device = library, name, device

    def __call__(self, grid: tuple, block: tuple, args: Sequence[Any], shared_mem: int = 0,
                 stream: Any = None, enable_cooperative_groups: bool = False) -> None:
        _check_tuple(grid, "grid")
        _check_tuple(block, "block")
        device = runtime.getDevice()
        if device != self.device:
            raise CUDADriverError(400, f"kernel {self.name} was loaded on device {self.device} "
                                       f"and launched with device {device} current")
        grid = tuple(max(1, d) for d in (grid + (1, 1))[:3])
        block = tuple(max(1, d) for d in (block + (1, 1))[:3])
        values = [_argument(a, i, device) for i, a in enumerate(args)]
        _standin._count("launches")
        try:
            self._library.launch(self.name, grid, block, values, shared_mem=shared_mem)
        except TypeError as e:
            bare = [i for i, a in enumerate(args) if type(a) in (bool, int, float, complex)]
            if not bare:
                raise
            raise TypeError(f"{e} (arguments {bare} are Python scalars, which CuPy passes as "
                            f"np.bool_/np.int64/np.float64/np.complex128)") from e


def _argument(x: Any, index: int, device: int) -> Any:
    if isinstance(x, ndarray):
        if x._device != device:
            raise CUDADriverError(700, f"kernel argument {index} is an array on device "
                                       f"{x._device}, the kernel runs on device {device}")
        return x._a
    if isinstance(x, np.ndarray):
        if x.size == 1:
            return x.reshape(())[()]
        raise TypeError(f"You are trying to pass a numpy.ndarray of shape {x.shape} as a kernel "
                        f"parameter. Only numpy.ndarrays of size one can be passed by value. If "
                        f"you meant to pass a pointer to __global__ memory, you need to pass a "
                        f"cupy.ndarray instead.")
    if isinstance(x, np.generic):
        return x
    if type(x) is bool:
        return np.bool_(x)
    if type(x) is int:
        return np.uint64(x) if x >= 2**63 else np.int64(x)
    if type(x) is float:
        return np.float64(x)
    if type(x) is complex:
        return np.complex128(x)
    if x is None:  # a null pointer in CuPy
        raise TypeError(f"CuPy stand-in: kernel argument {index} is None (a null pointer), "
                        f"which the CPU emulator cannot pass")
    raise TypeError(f"Unsupported type {type(x)}")


class _Module:
    """A module loaded on one device: the emulator's library of its kernels. Without name
    expressions, each kernel (an ``extern "C"`` name) gets a library of its own."""

    def __init__(self, code: str, options: tuple[str, ...], name_expressions: tuple | None,
                 device: int) -> None:
        self.device = device
        self._source, self._options = _source_file(code), _host_options(options)
        self._names = name_expressions
        self._libraries: dict[tuple[str, ...], Any] = {}
        if name_expressions is not None:
            self._library(name_expressions)

    def _library(self, names: tuple[str, ...]) -> Any:
        if names not in self._libraries:
            from gpunet.emulator import EmulatedModule
            library = EmulatedModule([self._source], list(names), self._options)
            if library.compiled:
                _standin._count("compiles")
            self._libraries[names] = library
        return self._libraries[names]

    def get_function(self, name: str) -> _Function:
        if self._names is None:
            return _Function(self._library((name,)), name, self.device)
        if name not in self._names:
            raise CUDADriverError(500, f"{name!r} is not one of the module's name expressions "
                                       f"{list(self._names)}")
        return _Function(self._library(self._names), name, self.device)


_modules: dict[tuple, _Module] = {}
_modules_lock = threading.Lock()


def _load(code: str, options: tuple[str, ...], name_expressions: tuple | None) -> _Module:
    """The module on the current device, loaded on first use there (one module load)."""
    key = (code, options, name_expressions, runtime.getDevice())
    with _modules_lock:
        if key not in _modules:
            _modules[key] = _Module(*key)
            _standin._count("module_loads")
        return _modules[key]


class RawKernel:
    """One kernel of CUDA source, loaded per device on first call there."""

    def __init__(self, code: str, name: str, options: tuple = (), backend: str = "nvrtc", *,
                 translate_cucomplex: bool = False, enable_cooperative_groups: bool = False,
                 jitify: Any = None) -> None:
        if not isinstance(code, str) or not isinstance(name, str):
            raise TypeError("RawKernel takes the CUDA source and the kernel name as str")
        _check_tuple(options, "options")
        self.code, self.name, self.options, self.backend = code, name, options, backend
        self.name_expressions: tuple | None = None  # set when it comes from a RawModule
        self._kernels: dict[int, _Function] = {}

    @property
    def kernel(self) -> _Function:
        device = runtime.getDevice()
        if device not in self._kernels:
            module = _load(self.code, self.options, self.name_expressions)
            self._kernels[device] = module.get_function(self.name)
        return self._kernels[device]

    def __call__(self, grid: tuple, block: tuple, args: Sequence[Any], **kwargs: Any) -> None:
        self.kernel(grid, block, args, **kwargs)


class RawModule:
    """CUDA source with several kernels; ``get_function(name_expression)`` gives a
    RawKernel and loads the module on the current device."""

    def __init__(self, *, code: str | None = None, path: str | None = None, options: tuple = (),
                 backend: str = "nvrtc", translate_cucomplex: bool = False,
                 enable_cooperative_groups: bool = False, name_expressions: Any = None,
                 jitify: Any = None) -> None:
        if (code is None) == (path is None):
            raise TypeError("Exactly one of `code` and `path` keyword arguments must be given.")
        if path is not None:
            raise NotImplementedError("CuPy stand-in: RawModule(path=...) loads a cubin or PTX, "
                                      "which the CPU emulator cannot run; pass code=")
        if not isinstance(code, str):
            raise TypeError(f"Argument 'code' has incorrect type (expected str, got "
                            f"{type(code).__name__})")
        _check_tuple(options, "options")
        if name_expressions is not None and backend != "nvrtc":
            raise ValueError("only nvrtc supports retrieving the mangled names for the given "
                             "name expressions")
        self.code, self.options, self.backend = code, options, backend
        self.name_expressions = None if name_expressions is None else tuple(name_expressions)

    @property
    def module(self) -> _Module:
        return _load(self.code, self.options, self.name_expressions)

    def compile(self, log_stream: Any = None) -> None:
        _load(self.code, self.options, self.name_expressions)

    def get_function(self, name: str) -> RawKernel:
        _standin._count("get_function_calls")
        kernel = RawKernel(self.code, name, self.options, self.backend)
        kernel.name_expressions = self.name_expressions
        kernel.kernel  # CuPy loads the module and looks the kernel up now, on this device
        return kernel
