"""Run gpunet's CUDA kernels on the CPU, from the very same ``.cu`` files, so kernels are tested
in CI without a GPU.

The ``.cu`` files are compiled with the host C++ compiler (``$CXX``, default ``g++``) against
``cuda_emu.h``, a small CUDA-on-CPU header (read it for how threads, barriers, warp shuffles and
shared memory are emulated), into a shared library loaded with ctypes. Arrays stay NumPy arrays.

    mod = EmulatedModule([kernel_dir() / "batchnorm.cu"], ["bn_backward_dx<float>", ...])
    mod.launch("bn_backward_dx<float>", grid=(4,), block=(256,), args=(dy, x, ..., np.int32(c)))

* Kernel arguments follow the GPU rule: NumPy arrays (C-contiguous) become pointers, NumPy
  scalars pass by value with their own width, and a bare Python ``int``/``float`` is a
  ``TypeError``. Each argument is also checked against the kernel's C++ parameter types (an
  ``np.int64`` for an ``int`` parameter, or a float64 array for ``const float*``, is refused),
  which a GPU launch cannot check.
* Launch limits are those of current NVIDIA GPUs (:data:`MAX_BLOCK`, :data:`MAX_GRID`, 1024
  threads per block, 48 KiB of shared memory unless the launch opts in up to 227 KiB with
  ``max_shared_mem``); breaking one raises :class:`LaunchError`.
* ``order`` ("forward", "reverse" or "shuffled" with ``seed``) sets the order in which the
  threads of a block, and the blocks of the grid, take turns. Shared memory is filled with NaN
  bytes at each block start, and :func:`empty` gives NaN-filled arrays, so a missing
  ``__syncthreads()`` or a read of an unwritten value gives a wrong result in some order.
* Compiled libraries are cached by a hash of the sources (with the headers they include), the
  compiler and its flags and the name expressions, in ``$GPUNET_CACHE_DIR/emulator`` or else
  ``~/.cache/gpunet/emulator``. Nothing is compiled at import.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import KernelCompileError

__all__ = ["EmulatedModule", "LaunchError", "EmulatorError", "empty", "default_cache_dir",
           "HEADER", "MAX_THREADS", "MAX_BLOCK", "MAX_GRID", "DEFAULT_SHARED_MEM", "MAX_SHARED_MEM",
           "ORDERS"]

#: The CUDA-on-CPU header every emulated library is compiled against.
HEADER = Path(__file__).resolve().parent / "cuda_emu.h"

MAX_THREADS = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)
#: Shared memory (static + dynamic) a block may use without opting in, and the most it may
#: opt in to (H100: 227 KiB per block).
DEFAULT_SHARED_MEM = 48 * 1024
MAX_SHARED_MEM = 227 * 1024
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}

#: Compiler flags; -fvisibility=hidden keeps each library's kernels and state to itself.
FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-DGPUNET_EMULATOR", "-fvisibility=hidden")
_FORMAT = "1"  # bump when the generated wrapper changes, so old cached libraries are not used

# One launch at a time: a library's scheduler state is global, and ctypes drops the GIL.
_LOCK = threading.Lock()
_compiler_ids: dict[str, str] = {}


class LaunchError(ValueError):
    """A launch breaks a GPU limit (block or grid size, shared memory) or names no kernel."""


class EmulatorError(RuntimeError):
    """A kernel failed while running: a deadlock at a barrier or warp shuffle, ``__trap()``,
    a lane calling a warp function with a mask that leaves itself out."""


def empty(shape: int | Sequence[int], dtype: Any = np.float32) -> np.ndarray:
    """A new C-contiguous array whose bytes are all 0xFF (NaN for float32 and float64, -1 for
    signed integers), as output buffers are in emulated runs: a kernel that leaves an element
    unwritten is then caught by the test that reads it."""
    out = np.empty(shape, dtype=dtype)
    out.reshape(-1).view(np.uint8).fill(0xFF)
    return out


def default_cache_dir() -> Path:
    """Where compiled libraries are kept: ``$GPUNET_CACHE_DIR/emulator`` or
    ``~/.cache/gpunet/emulator``."""
    root = os.environ.get("GPUNET_CACHE_DIR")
    return Path(root) / "emulator" if root else Path.home() / ".cache" / "gpunet" / "emulator"


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _compiler_id(cxx: str) -> str:
    """Version and target of the compiler, part of the cache key."""
    if cxx not in _compiler_ids:
        if shutil.which(cxx) is None:
            raise KernelCompileError(f"the CUDA emulator needs a C++ compiler: {cxx!r} was not "
                                     f"found (install g++ or set CXX)")
        out = subprocess.run([cxx, "-dumpfullversion", "-dumpversion", "-dumpmachine"],
                             capture_output=True, text=True)
        _compiler_ids[cxx] = f"{shutil.which(cxx)} {out.stdout.strip()}"
    return _compiler_ids[cxx]


_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def _with_headers(path: Path, include_dirs: Sequence[Path], seen: dict[Path, bytes]) -> None:
    """Add ``path`` and, recursively, the files its ``#include "..."`` lines name to ``seen``."""
    if path in seen:
        return
    data = path.read_bytes()
    seen[path] = data
    for name in _INCLUDE.findall(data.decode(errors="replace")):
        for folder in (path.parent, *include_dirs):
            candidate = (folder / name).resolve()
            if candidate.is_file():
                _with_headers(candidate, include_dirs, seen)
                break


def _include_dirs(options: Sequence[str]) -> list[Path]:
    dirs, it = [], iter(options)
    for opt in it:
        if opt == "-I":
            dirs.append(Path(next(it, ".")).resolve())
        elif opt.startswith("-I"):
            dirs.append(Path(opt[2:]).resolve())
    return dirs


def _code(dtype: np.dtype) -> str:
    """A dtype as the header's signature codes write it: f4, i8, u4, b1, ..."""
    return f"{dtype.kind}{dtype.itemsize}" if dtype.kind in "fiub" else f"?{dtype.itemsize}"


def _describe(code: str) -> str:
    if code == "*v":
        return "an array of any dtype"
    if code.startswith("*?"):
        return "a pointer the emulator cannot pass"
    if code.startswith("*"):
        return f"a {np.dtype(code[1:]).name} array"
    if code.startswith("?"):
        return f"a {code[1:]}-byte value the emulator cannot pass"
    return f"np.{np.dtype(code).name}"


def _dims(value: Any, what: str, kernel: str) -> tuple[int, int, int]:
    dims = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer))
                                          and not isinstance(d, bool) for d in dims):
        raise LaunchError(f"{kernel}: {what} must be an int or a tuple of 1 to 3 ints, "
                          f"got {value!r}")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if min(dims) < 1:
        raise LaunchError(f"{kernel}: {what} {dims} has a dimension below 1")
    return dims  # type: ignore[return-value]


class EmulatedModule:
    """The kernels ``name_expressions`` (such as ``"bn_reduce_nc<float>"``, as CuPy's
    ``RawModule(name_expressions=...)`` takes them) of the ``.cu`` files ``sources``, compiled
    for the CPU. ``options`` are extra compiler flags (``-DNAME=1``, ``-I/path``). Compiling
    happens here, or not at all when the cache holds the library: ``compiled`` says which."""

    def __init__(self, sources: Iterable[str | os.PathLike], name_expressions: Sequence[str],
                 options: Sequence[str] = (), *, cache_dir: str | os.PathLike | None = None):
        self.sources = [Path(s).resolve() for s in sources]
        self.name_expressions = list(name_expressions)
        self.options = tuple(options)
        if not self.sources or not self.name_expressions:
            raise ValueError("EmulatedModule needs at least one source file and one name "
                             "expression")
        for src in self.sources:
            if not src.is_file():
                raise FileNotFoundError(f"kernel source {src} does not exist")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.library_path, self.compiled = self._build()
        self._lib = ctypes.CDLL(str(self.library_path))
        self._lib.gpunet_emu_last_error.restype = ctypes.c_char_p
        self._kernels: dict[str, tuple[Any, list[str]]] = {}
        for i, expr in enumerate(self.name_expressions):
            fn = getattr(self._lib, f"gpunet_emu_launch_{i}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_int,
                           ctypes.c_ulonglong]
            sig = getattr(self._lib, f"gpunet_emu_signature_{i}")
            sig.restype = ctypes.c_char_p
            text = sig().decode()
            self._kernels[self._key(expr)] = (fn, text.split(",") if text else [])
        self.static_shared = self._static_shared()

    # --- compiling -------------------------------------------------------------------------

    @staticmethod
    def _key(expr: str) -> str:
        return re.sub(r"\s+", "", expr)

    def _build(self) -> tuple[Path, bool]:
        cxx = _compiler()
        files: dict[Path, bytes] = {}
        _with_headers(HEADER, (), files)
        for src in self.sources:
            _with_headers(src, _include_dirs(self.options), files)
        h = hashlib.sha256()
        for part in (_FORMAT, _compiler_id(cxx), *FLAGS, "|", *self.options, "|",
                     *self.name_expressions, "|", *map(str, self.sources)):
            h.update(part.encode() + b"\0")
        for path in sorted(files):
            h.update(str(path).encode() + b"\0" + files[path] + b"\0")
        key = h.hexdigest()[:32]
        library = self.cache_dir / f"{key}.so"
        if library.is_file():
            return library, False
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Written and renamed into place, like the library: another process may be building
        # the same key at the same time.
        wrapper = self.cache_dir / f"{key}.cpp"
        fd, tmp = tempfile.mkstemp(suffix=".cpp.tmp", dir=self.cache_dir)
        with os.fdopen(fd, "w") as f:
            f.write(self._wrapper())
        os.replace(tmp, wrapper)
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=self.cache_dir)
        os.close(fd)
        try:
            done = subprocess.run([cxx, *FLAGS, *self.options, "-o", tmp, str(wrapper)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                names = ", ".join(str(s) for s in self.sources)
                raise KernelCompileError(f"{names} did not compile for the CUDA emulator "
                                         f"({cxx}):\n{done.stderr.strip()}")
            os.replace(tmp, library)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return library, True

    def _wrapper(self) -> str:
        lines = ["// Written by gpunet.emulator: the kernel sources, then one entry point per",
                 "// name expression.", f'#include "{HEADER}"']
        lines += [f'#include "{src}"' for src in self.sources]
        for i, expr in enumerate(self.name_expressions):
            # Errors in an entry point (a name that is no kernel) then name the expression.
            lines += [f'#line 1 "<name expression {expr}>"', f"GPUNET_EMU_ENTRY({i}, {expr})"]
        return "\n".join(lines) + "\n"

    def _static_shared(self) -> dict[str, int]:
        """Bytes of static ``__shared__`` memory of each kernel. They all live in the library's
        TLS block; the symbol table says which function declares each one. A kernel is charged
        its own variables and those of helper functions (which it may call), not those of the
        other kernels. Without readelf, each kernel is charged the whole block."""
        total = None
        owned: list[tuple[str, int]] = []
        readelf = shutil.which("readelf")
        if readelf:
            out = subprocess.run([readelf, "-sW", "-C", str(self.library_path)],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                total = 0
                for line in out.stdout.splitlines():
                    cols = line.split(None, 7)
                    if len(cols) == 8 and cols[3] == "TLS" and cols[7] != "gpunet_emu::tls_anchor":
                        total += int(cols[2], 0)
                        owned.append((re.sub(r"\s+", "", cols[7]), int(cols[2], 0)))
        if total is None:
            self._lib.gpunet_emu_static_shared_bytes.restype = ctypes.c_ulonglong
            total = int(self._lib.gpunet_emu_static_shared_bytes())
            return {key: total for key in self._kernels}
        result = {}
        for key in self._kernels:
            others = 0
            for name, size in owned:
                for other in self._kernels:
                    if other != key and (name.startswith(other + "(")
                                         or name.startswith("void" + other + "(")):
                        others += size
                        break
            result[key] = total - others
        return result

    # --- launching -------------------------------------------------------------------------

    def launch(self, name: str, grid: int | Sequence[int], block: int | Sequence[int],
               args: Sequence[Any], shared_mem: int = 0, order: str = "forward",
               seed: int = 0, max_shared_mem: int | None = None) -> None:
        """Run kernel ``name`` (one of the name expressions) on a ``grid`` of blocks of
        ``block`` threads, with ``shared_mem`` bytes of dynamic shared memory. Returns when
        the kernel is done (emulated launches are synchronous). ``max_shared_mem`` opts in to
        more than 48 KiB of shared memory per block, as ``cudaFuncSetAttribute`` does."""
        key = self._key(name)
        if key not in self._kernels:
            raise LaunchError(f"no kernel {name!r} in this module; it has "
                              f"{', '.join(self.name_expressions)}")
        fn, signature = self._kernels[key]
        g, b = _dims(grid, "grid", name), _dims(block, "block", name)
        if b[0] * b[1] * b[2] > MAX_THREADS:
            raise LaunchError(f"{name}: block {b} has {b[0] * b[1] * b[2]} threads; a block "
                              f"has at most {MAX_THREADS}")
        if any(d > m for d, m in zip(b, MAX_BLOCK)):
            raise LaunchError(f"{name}: block {b} is larger than the limit {MAX_BLOCK}")
        if any(d > m for d, m in zip(g, MAX_GRID)):
            raise LaunchError(f"{name}: grid {g} is larger than the limit {MAX_GRID}")
        self._check_shared(name, key, shared_mem, max_shared_mem)
        if order not in ORDERS:
            raise ValueError(f"{name}: order must be one of {', '.join(ORDERS)}, got {order!r}")
        argv, keep = self._pack(name, signature, args)  # keep: the slots argv points into
        dims = np.array(g + b, dtype=np.uint32)
        with _LOCK:
            rc = fn(argv, dims.ctypes.data, int(shared_mem), ORDERS[order],
                    int(seed) % 2**64)
            if rc != 0:
                raise EmulatorError(f"{name}: {self._lib.gpunet_emu_last_error().decode()}")

    def _check_shared(self, name: str, key: str, shared_mem: Any, opt_in: int | None) -> None:
        if not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise LaunchError(f"{name}: shared_mem must be a byte count >= 0, got "
                              f"{shared_mem!r}")
        if opt_in is not None and not 0 <= opt_in <= MAX_SHARED_MEM:
            raise LaunchError(f"{name}: max_shared_mem={opt_in} is above the {MAX_SHARED_MEM} "
                              f"bytes a block can opt in to")
        static = self.static_shared[key]
        limit = DEFAULT_SHARED_MEM if opt_in is None else max(opt_in, DEFAULT_SHARED_MEM)
        if static > DEFAULT_SHARED_MEM or static + shared_mem > limit:
            hint = (f"; pass max_shared_mem (up to {MAX_SHARED_MEM}) to opt in to more"
                    if opt_in is None and static + shared_mem <= MAX_SHARED_MEM else "")
            raise LaunchError(f"{name}: {static} bytes of static and {shared_mem} bytes of "
                              f"dynamic shared memory exceed the limit of {limit} bytes per "
                              f"block{hint}")

    @staticmethod
    def _pack(name: str, signature: list[str], args: Sequence[Any]) -> tuple[Any, list]:
        """The ``void*`` array the entry point reads: one pointer per argument, to a slot
        holding an array's address or to a scalar's bytes."""
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{name}: args must be a tuple or list, got {type(args).__name__}")
        if len(args) != len(signature):
            raise TypeError(f"{name} takes {len(signature)} arguments "
                            f"({', '.join(map(_describe, signature))}), got {len(args)}")
        keep, addresses = [], []
        for i, (arg, want) in enumerate(zip(args, signature)):
            where = f"{name}: argument {i}"
            if isinstance(arg, np.ndarray):
                if not want.startswith("*"):
                    raise TypeError(f"{where} is an array, but the kernel takes "
                                    f"{_describe(want)} there")
                got = "*" + _code(arg.dtype)
                if want != "*v" and got != want:
                    raise TypeError(f"{where} is {_describe(got)}, but the kernel takes "
                                    f"{_describe(want)}")
                if not arg.flags.c_contiguous:
                    raise ValueError(f"{where} is not C-contiguous (strides {arg.strides}); "
                                     f"pass np.ascontiguousarray(...)")
                slot = np.array([arg.ctypes.data], dtype=np.uintp)
            elif isinstance(arg, np.generic):
                got = _code(arg.dtype)
                if got != want:
                    raise TypeError(f"{where} is np.{arg.dtype.name}, but the kernel takes "
                                    f"{_describe(want)}")
                slot = np.array(arg)
            elif isinstance(arg, (bool, int, float, complex)):
                hint = (f", such as {_describe(want)}({arg!r})"
                        if not want.startswith(("*", "?")) else "")
                raise TypeError(f"{where} is a bare Python {type(arg).__name__} ({arg!r}); "
                                f"pass a NumPy scalar of the kernel parameter's width{hint}")
            else:
                raise TypeError(f"{where} is a {type(arg).__name__}; kernels take NumPy arrays "
                                f"and NumPy scalars")
            keep.append(slot)
            addresses.append(slot.ctypes.data)
        argv = (ctypes.c_void_p * max(1, len(addresses)))(*addresses)
        keep.append(argv)
        return argv, keep

    def __repr__(self) -> str:
        return (f"EmulatedModule({[str(s) for s in self.sources]}, {self.name_expressions}, "
                f"library={self.library_path})")
