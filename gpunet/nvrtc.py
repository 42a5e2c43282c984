"""Compile CUDA source to PTX with NVRTC, the compiler CuPy uses, through ctypes.

This needs no GPU and no CuPy, only the NVRTC library (the ``nvrtc`` extra:
``nvidia-cuda-nvrtc-cu12``), so every kernel can be compile-checked on any machine.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from pathlib import Path
from typing import Sequence

from .errors import KernelCompileError

_lib: ctypes.CDLL | None = None


def _candidates() -> list[str]:
    found = []
    try:
        import nvidia.cuda_nvrtc as pkg  # the PyPI wheel's layout: nvidia/cuda_nvrtc/lib
        for base in pkg.__path__:
            found += sorted(glob.glob(os.path.join(base, "lib", "libnvrtc.so.*")))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    name = ctypes.util.find_library("nvrtc")
    return found + ([name] if name else [])


def library() -> ctypes.CDLL:
    """The NVRTC shared library; raises :class:`KernelCompileError` saying how to get it."""
    global _lib
    if _lib is None:
        for path in _candidates():
            if "alt" in Path(path).name:
                continue
            try:
                lib = ctypes.CDLL(path)
                break
            except OSError:
                continue
        else:
            raise KernelCompileError("NVRTC is not installed: pip install -e '.[nvrtc]' "
                                     "(nvidia-cuda-nvrtc-cu12)")
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        _lib = lib
    return _lib


def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def _strings(items: Sequence[str]) -> ctypes.Array:
    return (ctypes.c_char_p * len(items))(*[s.encode() for s in items])


def compile_ptx(source: str, filename: str, arch: str = "compute_80",
                include_paths: Sequence[str | os.PathLike] = (),
                name_expressions: Sequence[str] = (),
                options: Sequence[str] = ("-std=c++17",)) -> tuple[str, dict[str, str]]:
    """Compile ``source`` for virtual architecture ``arch``; return the PTX and the mangled
    name of each name expression (such as ``"bn_backward_dx<float>"``). A failure raises
    :class:`KernelCompileError` with NVRTC's log, which names ``filename`` and the line."""
    lib = library()
    prog = ctypes.c_void_p()

    def check(status: int, what: str) -> None:
        if status != 0:
            raise KernelCompileError(f"{filename}: {what} failed: "
                                     f"{lib.nvrtcGetErrorString(status).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), filename.encode(),
                                 0, None, None), "nvrtcCreateProgram")
    try:
        for expr in name_expressions:
            check(lib.nvrtcAddNameExpression(prog, expr.encode()), f"adding {expr!r}")
        opts = [f"--gpu-architecture={arch}", *options,
                *(f"--include-path={p}" for p in include_paths)]
        status = lib.nvrtcCompileProgram(prog, len(opts), _strings(opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if status != 0:
            raise KernelCompileError(f"NVRTC could not compile {filename} for {arch}:\n"
                                     f"{log.value.decode(errors='replace')}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        lowered = {}
        for expr in name_expressions:
            name = ctypes.c_char_p()
            check(lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(name)),
                  f"looking up {expr!r}")
            lowered[expr] = name.value.decode()
        return ptx.value.decode(), lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
