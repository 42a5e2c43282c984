"""Operations that launch gpunet's own kernels (``kernels/*.cu``), shared by the devices that
run them: ``cuda`` (on the GPU) and ``emulated`` (on the CPU emulator). Both inherit
:class:`KernelOps` and differ only in ``launch``, so the argument order, grid and block sizes and
output allocation below run unchanged on either."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np



def _blocks(total: int, threads: int, cap: int = 1024) -> int:
    """Blocks for a grid-stride loop over ``total`` items: enough to fill a GPU, no more."""
    return max(1, min(-(-total // threads), cap))


class KernelOps:
    """Operations that run gpunet's own kernels. A backend mixing this in provides
    ``xp``, ``empty(shape, dtype)`` (from :class:`gpunet.backends.Backend`) and
    ``launch(kernel, dtype, grid, block, args, shared_mem)``."""

    xp: Any

    def launch(self, kernel: str, dtype: Any, grid: tuple[int, ...], block: tuple[int, ...],
               args: Sequence[Any], shared_mem: int = 0) -> None:
        raise NotImplementedError

    def batchnorm_backward(self, dy: Any, x: Any, mean: Any, invstd: Any,
                           gamma: Any, across: Any = None) -> tuple[Any, Any, Any]:
        """Kernel version of :meth:`gpunet.backends.Backend.batchnorm_backward`: one pass of
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
    # Shapes and argument order are those of the generic methods in gpunet.backends.Backend;
    # the sizes reach the kernels as np.int32 (element counts as np.int64).
    def _conv_geometry(self, x_shape: Sequence[int], kernel: Sequence[int],
                       stride: Sequence[int], padding: Sequence[int]) -> tuple[Any, ...]:
        n, c, h, w = x_shape
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        return tuple(np.int32(v) for v in (h, w, kh, kw, sh, sw, ph, pw, ho, wo))

    def im2col(self, x: Any, kernel: Sequence[int], stride: Sequence[int],
               padding: Sequence[int]) -> Any:
        """Kernel version of :meth:`gpunet.backends.Backend.im2col` (``conv_im2col``, one
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
        """Kernel version of :meth:`gpunet.backends.Backend.col2im`: the input gradient as a
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
        """Kernel version of :meth:`gpunet.backends.Backend.conv_bias_grad`: one block of 256
        threads per output channel (``conv_bias_grad``)."""
        n, o = dy.shape[:2]
        dy = self.xp.ascontiguousarray(dy)
        dbias = self.empty((o,), dy.dtype)
        self.launch("conv_bias_grad", dy.dtype, (o,), (256,),
                    (dy, np.int32(n), np.int32(o), np.int32(dy.size // (n * o)), dbias))
        return dbias

    def maxpool2d(self, x: Any, kernel: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int]) -> tuple[Any, Any]:
        """Kernel version of :meth:`gpunet.backends.Backend.maxpool2d` (``maxpool_forward``,
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
        """Kernel version of :meth:`gpunet.backends.Backend.backprop_maxpool2d`: a gather
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
        """Kernel version of :meth:`gpunet.backends.Backend.lstm_cell_forward`: the gates, ``c``
        and ``h`` of one step in one fused pass (``lstm_forward``, one thread per unit)."""
        n, hidden = c.shape
        _check_outputs("lstm_cell_forward", acts=acts, c=c, h=h)
        xg, hg, c_prev = (self.xp.ascontiguousarray(a) for a in (xg, hg, c_prev))
        self.launch("lstm_forward", c.dtype, (_blocks(n * hidden, 256),), (256,),
                    (xg, hg, c_prev, np.int32(n), np.int32(hidden), acts, c, h))

    def lstm_cell_backward(self, dy: Any, dh_rec: Any, dc_next: Any, acts: Any, c_prev: Any,
                           c: Any, dz: Any, dc_prev: Any) -> None:
        """Kernel version of :meth:`gpunet.backends.Backend.lstm_cell_backward`: from ``dh``
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
