"""gpunet's CUDA kernels: where their sources live, what each file defines, and the
operations built on them.

The ``.cu`` files are kept in the repository's top-level ``kernels/`` folder; the wheel ships
them as ``gpunet/_kernels``. Each kernel is a template over the element type, looked up by
``(name, dtype)`` as the name expression ``name<float>`` or ``name<double>``. Nothing is
compiled at import: a backend compiles a file the first time one of its kernels is launched.

:class:`KernelOps` holds the operations that launch kernels. The CUDA backend and the emulated
backend both inherit it and differ only in ``launch``, so the argument order, grid and block
sizes and output allocation below run unchanged on the GPU and on the CPU emulator.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: Each kernel file and the templated kernels it defines.
KERNELS: dict[str, tuple[str, ...]] = {
    "batchnorm.cu": ("bn_reduce_nchw", "bn_reduce_nc", "bn_backward_dx"),
    "conv.cu": ("conv_im2col", "conv_col2im", "conv_bias_grad"),
    "pooling.cu": ("maxpool_forward", "maxpool_backward"),
    "lstm.cu": ("lstm_forward", "lstm_backward"),
}

#: Element types the kernels are instantiated for, with their C++ names.
CTYPES: dict[np.dtype, str] = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def kernel_dir() -> Path:
    """The folder holding the ``.cu`` and ``.cuh`` files."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_kernels", here.parent / "kernels"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"gpunet's CUDA kernel sources are missing: looked in "
                            f"{here / '_kernels'} and {here.parent / 'kernels'}")


def kernel_files() -> list[Path]:
    """Every kernel source file, sorted by name."""
    d = kernel_dir()
    return sorted([*d.glob("*.cu"), *d.glob("*.cuh")])


def read_kernel(name: str) -> str:
    """The source text of ``kernels/<name>``."""
    path = kernel_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"no kernel source {name!r} in {kernel_dir()}")
    return path.read_text()


def expanded_source(file: str, _seen: set[str] | None = None) -> str:
    """The source of ``file`` with its local ``#include "..."`` lines replaced by the files'
    text, each header once (``#line`` keeps compiler messages pointing at the real file and
    line). Compilers that cache by source text (CuPy) then see a change to a header."""
    seen = set() if _seen is None else _seen
    lines = []
    path = kernel_dir() / file
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith('#include "') and stripped.endswith('"'):
            header = stripped[len('#include "'):-1]
            if header not in seen:
                seen.add(header)
                lines += [f'#line 1 "{kernel_dir() / header}"', expanded_source(header, seen)]
            lines.append(f'#line {number + 1} "{path}"')
        else:
            lines.append(line)
    return "\n".join(lines)


def file_of(kernel: str) -> str:
    for file, names in KERNELS.items():
        if kernel in names:
            return file
    raise KeyError(f"no kernel named {kernel!r} in gpunet's kernels")


def name_expressions(file: str) -> list[str]:
    """Every instantiation of the kernels in ``file``, e.g. ``bn_backward_dx<float>``."""
    return [f"{k}<{t}>" for k in KERNELS[file] for t in CTYPES.values()]


def name_expression(kernel: str, dtype: Any) -> str:
    try:
        return f"{kernel}<{CTYPES[np.dtype(dtype)]}>"
    except KeyError:
        raise TypeError(f"kernel {kernel}: expected float32 or float64 data, got {dtype}") from None


def _blocks(total: int, threads: int, cap: int = 1024) -> int:
    """Blocks for a grid-stride loop over ``total`` items: enough to fill a GPU, no more."""
    return max(1, min(-(-total // threads), cap))


class KernelOps:
    """Operations that run gpunet's own kernels. A backend mixing this in provides
    ``xp``, ``empty(shape, dtype)`` (from :class:`gpunet.backend.Backend`) and
    ``launch(kernel, dtype, grid, block, args, shared_mem)``."""

    xp: Any

    def launch(self, kernel: str, dtype: Any, grid: tuple[int, ...], block: tuple[int, ...],
               args: Sequence[Any], shared_mem: int = 0) -> None:
        raise NotImplementedError

    def batchnorm_backward(self, dy: Any, x: Any, mean: Any, invstd: Any,
                           gamma: Any, across: Any = None) -> tuple[Any, Any, Any]:
        """Kernel version of :meth:`gpunet.backend.Backend.batchnorm_backward`: one pass of
        per-channel reductions, then one fused elementwise pass for ``dx``."""
        t = x.dtype
        n, c = x.shape[0], x.shape[1]
        hw = x.size // (n * c)
        dy, x = self.xp.ascontiguousarray(dy), self.xp.ascontiguousarray(x)
        sum_dy, sum_dy_xhat = self.empty((c,), t), self.empty((c,), t)
        if hw == 1:
            self.launch("bn_reduce_nc", t, (-(-c // 32),), (32, 8),
                        (dy, x, mean, invstd, np.int32(n), np.int32(c), sum_dy, sum_dy_xhat))
        else:
            self.launch("bn_reduce_nchw", t, (c,), (256,),
                        (dy, x, mean, invstd, np.int32(n), np.int32(c), np.int32(hw),
                         sum_dy, sum_dy_xhat))
        dgamma, dbeta, count = sum_dy_xhat, sum_dy, n * hw
        if across is not None:  # synchronised statistics: dx takes every process's sums
            sum_dy, sum_dy_xhat = sum_dy.copy(), sum_dy_xhat.copy()
            count = across([sum_dy, sum_dy_xhat], count)
        dx = self.empty(x.shape, t)
        total = x.size
        self.launch("bn_backward_dx", t, (_blocks(total, 256),), (256,),
                    (dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, np.int32(c),
                     np.int32(hw), np.int64(total), t.type(1.0 / count), dx))
        return dx, dgamma, dbeta

    # -- convolution and max pooling (kernels/conv.cu, kernels/pooling.cu) -----------------
    # Shapes and argument order are those of the generic methods in gpunet.backend.Backend;
    # the sizes reach the kernels as np.int32 (element counts as np.int64).
    def _conv_geometry(self, x_shape: Sequence[int], kernel: Sequence[int],
                       stride: Sequence[int], padding: Sequence[int]) -> tuple[Any, ...]:
        n, c, h, w = x_shape
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        return tuple(np.int32(v) for v in (h, w, kh, kw, sh, sw, ph, pw, ho, wo))

    def im2col(self, x: Any, kernel: Sequence[int], stride: Sequence[int],
               padding: Sequence[int]) -> Any:
        """Kernel version of :meth:`gpunet.backend.Backend.im2col` (``conv_im2col``, one
        thread per column entry); the GEMM that follows is cuBLAS through CuPy."""
        n, c = x.shape[:2]
        geo = self._conv_geometry(x.shape, kernel, stride, padding)
        rows, cols_n = c * kernel[0] * kernel[1], n * int(geo[8]) * int(geo[9])
        x = self.xp.ascontiguousarray(x)
        cols = self.empty((rows, cols_n), x.dtype)
        total = rows * cols_n
        self.launch("conv_im2col", x.dtype, (_blocks(total, 256),), (256,),
                    (x, np.int32(n), np.int32(c), *geo, np.int64(total), cols))
        return cols

    def col2im(self, dcols: Any, x_shape: Sequence[int], kernel: Sequence[int],
               stride: Sequence[int], padding: Sequence[int]) -> Any:
        """Kernel version of :meth:`gpunet.backend.Backend.col2im`: the input gradient as a
        gather (``conv_col2im``, one thread per input element, no atomics)."""
        n, c = x_shape[:2]
        geo = self._conv_geometry(x_shape, kernel, stride, padding)
        dcols = self.xp.ascontiguousarray(dcols)
        dx = self.empty(tuple(x_shape), dcols.dtype)
        total = dx.size
        self.launch("conv_col2im", dcols.dtype, (_blocks(total, 256),), (256,),
                    (dcols, np.int32(n), np.int32(c), *geo, np.int64(total), dx))
        return dx

    def conv_bias_grad(self, dy: Any) -> Any:
        """Kernel version of :meth:`gpunet.backend.Backend.conv_bias_grad`: one block of 256
        threads per output channel (``conv_bias_grad``)."""
        n, o = dy.shape[:2]
        dy = self.xp.ascontiguousarray(dy)
        dbias = self.empty((o,), dy.dtype)
        self.launch("conv_bias_grad", dy.dtype, (o,), (256,),
                    (dy, np.int32(n), np.int32(o), np.int32(dy.size // (n * o)), dbias))
        return dbias

    def maxpool2d(self, x: Any, kernel: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int]) -> tuple[Any, Any]:
        """Kernel version of :meth:`gpunet.backend.Backend.maxpool2d` (``maxpool_forward``,
        one thread per output element); ``index`` has the generic method's meaning."""
        n, c = x.shape[:2]
        geo = self._conv_geometry(x.shape, kernel, stride, padding)
        x = self.xp.ascontiguousarray(x)
        shape = (n, c, int(geo[8]), int(geo[9]))
        # index starts at -1 (a NaN fill is no int): the kernel overwrites every entry
        y, index = self.empty(shape, x.dtype), self.xp.full(shape, -1, dtype=np.int32)
        total = y.size
        self.launch("maxpool_forward", x.dtype, (_blocks(total, 256),), (256,),
                    (x, np.int32(n * c), *geo, np.int64(total), y, index))
        return y, index

    def backprop_maxpool2d(self, dy: Any, index: Any, x_shape: Sequence[int],
                           kernel: Sequence[int], stride: Sequence[int],
                           padding: Sequence[int]) -> Any:
        """Kernel version of :meth:`gpunet.backend.Backend.backprop_maxpool2d`: a gather
        (``maxpool_backward``, one thread per input element, no atomics)."""
        n, c = x_shape[:2]
        geo = self._conv_geometry(x_shape, kernel, stride, padding)
        dy, index = self.xp.ascontiguousarray(dy), self.xp.ascontiguousarray(index)
        dx = self.empty(tuple(x_shape), dy.dtype)
        total = dx.size
        self.launch("maxpool_backward", dy.dtype, (_blocks(total, 256),), (256,),
                    (dy, index, np.int32(n * c), *geo, np.int64(total), dx))
        return dx

    def lstm_cell_forward(self, xg: Any, hg: Any, c_prev: Any, acts: Any, c: Any,
                          h: Any) -> None:
        """Kernel version of :meth:`gpunet.backend.Backend.lstm_cell_forward`: the gates, ``c``
        and ``h`` of one step in one fused pass (``lstm_forward``, one thread per unit)."""
        n, hidden = c.shape
        _check_outputs("lstm_cell_forward", acts=acts, c=c, h=h)
        xg, hg, c_prev = (self.xp.ascontiguousarray(a) for a in (xg, hg, c_prev))
        self.launch("lstm_forward", c.dtype, (_blocks(n * hidden, 256),), (256,),
                    (xg, hg, c_prev, np.int32(n), np.int32(hidden), acts, c, h))

    def lstm_cell_backward(self, dy: Any, dh_rec: Any, dc_next: Any, acts: Any, c_prev: Any,
                           c: Any, dz: Any, dc_prev: Any) -> None:
        """Kernel version of :meth:`gpunet.backend.Backend.lstm_cell_backward`: from ``dh``
        and ``dc`` to the gate gradients and ``dc_prev`` in one pass (``lstm_backward``)."""
        n, hidden = c.shape
        _check_outputs("lstm_cell_backward", dz=dz, dc_prev=dc_prev)
        dy, dh_rec, dc_next, acts, c_prev, c = (
            self.xp.ascontiguousarray(a) for a in (dy, dh_rec, dc_next, acts, c_prev, c))
        self.launch("lstm_backward", c.dtype, (_blocks(n * hidden, 256),), (256,),
                    (dy, dh_rec, dc_next, acts, c_prev, c, np.int32(n), np.int32(hidden),
                     dz, dc_prev))


def _check_outputs(op: str, **outputs: Any) -> None:
    """Kernels write through a raw pointer: an output must be one C-contiguous block."""
    for name, a in outputs.items():
        if not a.flags.c_contiguous:
            raise ValueError(f"{op}: expected output {name} to be C-contiguous, "
                             f"got strides {a.strides}")
