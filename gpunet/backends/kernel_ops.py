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


#: Streaming multiprocessors of the GPU the reduction grids are sized for (H100, H200: 132).
#: A constant, not the current GPU's count: the grid, and so the summation order and the bits
#: of every sum, then depend on the tensor's shape alone, on any GPU and on the emulator.
REDUCTION_SMS = 132
#: Blocks a large reduction is split into: 8 blocks of 256 threads per SM, a full SM (2048
#: threads) on every SM at once.
REDUCTION_BLOCKS = 8 * REDUCTION_SMS
#: Values per block below which splitting a channel further costs more (one more block's
#: start, its shuffle tree, one more partial) than it gains.
REDUCTION_MIN_VALUES = 2048


def reduction_grid(n: int, c: int, hw: int) -> tuple[int, int]:
    """``(chunks, threads)`` for a per-channel reduction of ``(n, c, hw)`` data (common.cuh):
    the stage-1 grid is (channel blocks) x ``chunks``, each block reducing one of ``chunks``
    equal pieces of its channel(s)' values into one partial sum per channel, and a second
    launch adds each channel's partials when ``chunks > 1``.

    * ``hw > 1``: one channel per block, ``c`` channel blocks of ``threads`` threads (256, or
      fewer warps when a channel has fewer than 256 values); a chunk is a range of the
      channel's ``n * hw`` values.
    * ``hw == 1`` ((N, C) data): 32 x 8 blocks of 32 neighbouring channels, ``ceil(c / 32)``
      channel blocks; a chunk is a range of the ``n`` rows. ``threads`` is 256.

    ``chunks`` is the smaller of
    ``ceil(REDUCTION_BLOCKS / channel blocks)`` (no more blocks than it takes to fill the GPU)
    and ``ceil(values per channel block / REDUCTION_MIN_VALUES)`` (the blocks of a split
    channel average more than ``REDUCTION_MIN_VALUES / 2`` values each), and at least 1.
    So every tensor of at least 2**20 elements gets at least 512 blocks (two per SM on a 132-SM
    GPU is 264), whatever ``c`` is: the blocks number at least ``REDUCTION_BLOCKS`` (1056) or
    at least ``n * c * hw / REDUCTION_MIN_VALUES``. Small tensors stay one launch of
    one block per channel block."""
    if min(n, c, hw) < 1:
        raise ValueError(f"reduction_grid: expected n, c, hw >= 1, got {(n, c, hw)}")
    if hw > 1:
        across, values = c, n * hw
        threads = min(256, 32 * -(-values // 32))
    else:
        across, values = -(-c // 32), n * min(c, 32)
        threads = 256
    chunks = max(1, min(-(-REDUCTION_BLOCKS // across), -(-values // REDUCTION_MIN_VALUES)))
    return chunks, threads


class KernelOps:
    """Operations that run gpunet's own kernels. A backend mixing this in provides
    ``xp``, ``empty(shape, dtype)`` (from :class:`gpunet.backends.Backend`) and
    ``launch(kernel, dtype, grid, block, args, shared_mem)``."""

    xp: Any

    def launch(self, kernel: str, dtype: Any, grid: tuple[int, ...], block: tuple[int, ...],
               args: Sequence[Any], shared_mem: int = 0) -> None:
        raise NotImplementedError

    # -- per-channel reductions (kernels/batchnorm.cu, common.cuh) --------------------------
    def _reduction_grid(self, n: int, c: int, hw: int) -> tuple[int, int]:
        """:func:`reduction_grid`; a test may replace it on an instance to force a grid."""
        return reduction_grid(n, c, hw)

    def _channel_sums(self, kernel: str, finish: str, k: int, data: Sequence[Any],
                      per_channel: Sequence[Any]) -> Any:
        """``k`` per-channel sums of ``(N, C, ...)`` arrays ``data`` as a ``(k, C)`` array:
        stage 1 is ``<kernel>_nchw`` or ``<kernel>_nc`` with arguments
        ``(*data, *per_channel, N, C[, HW], partials)``, stage 2 ``finish`` when the grid has
        more than one chunk (see :func:`reduction_grid`)."""
        x = data[0]
        n, c = x.shape[0], x.shape[1]
        hw = x.size // (n * c) if x.size else 0
        t = x.dtype
        data = [self.xp.ascontiguousarray(a) for a in data]
        out = self.empty((k, c), t)
        if x.size == 0:
            out[...] = 0
            return out
        if hw == 1 and c == 1:  # (N, 1): one contiguous channel, read as (1, 1, N)
            n, hw = 1, n
        chunks, threads = self._reduction_grid(n, c, hw)
        partials = out if chunks == 1 else self.empty((k, c, chunks), t)
        if hw == 1:
            self.launch(f"{kernel}_nc", t, (-(-c // 32), chunks), (32, 8),
                        (*data, *per_channel, np.int32(n), np.int32(c), partials))
        else:
            self.launch(f"{kernel}_nchw", t, (c, chunks), (threads,),
                        (*data, *per_channel, np.int32(n), np.int32(c), np.int32(hw), partials))
        if chunks > 1:
            self.launch(finish, t, (-(-(k * c) // 8),), (32, 8),
                        (partials, np.int32(k * c), np.int32(chunks), out))
        return out

    def channel_sum(self, x: Any) -> Any:
        """Kernel version of :meth:`gpunet.backends.Backend.channel_sum` (``bn_sum_*``, then
        ``bn_finish``): BatchNorm's first statistics pass, ``mean = channel_sum(x) / M``."""
        return self._channel_sums("bn_sum", "bn_finish", 1, (x,), ())[0]

    def channel_sq_dev(self, x: Any, mean: Any) -> Any:
        """Kernel version of :meth:`gpunet.backends.Backend.channel_sq_dev`
        (``bn_sq_dev_*``): BatchNorm's second pass, ``var = channel_sq_dev(x, mean) / M``.
        Two passes over x rather than one of sum and sum of squares, whose difference loses
        every digit when the mean is large against the spread."""
        mean = self.xp.ascontiguousarray(mean, dtype=x.dtype)
        return self._channel_sums("bn_sq_dev", "bn_finish", 1, (x,), (mean,))[0]

    def batchnorm_backward(self, dy: Any, x: Any, mean: Any, invstd: Any,
                           gamma: Any, across: Any = None) -> tuple[Any, Any, Any]:
        """Kernel version of :meth:`gpunet.backends.Backend.batchnorm_backward`: both
        per-channel sums in one reduction (``bn_reduce_*``, then ``bn_finish``), then one
        fused elementwise pass for ``dx`` (``bn_backward_dx``)."""
        t = x.dtype
        n, c = x.shape[0], x.shape[1]
        hw = x.size // (n * c)
        dy, x = self.xp.ascontiguousarray(dy), self.xp.ascontiguousarray(x)
        sums = self._channel_sums("bn_reduce", "bn_finish", 2, (dy, x), (mean, invstd))
        sum_dy, sum_dy_xhat = sums[0], sums[1]
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
        """Kernel version of :meth:`gpunet.backends.Backend.conv_bias_grad`: the per-channel
        reduction of common.cuh (``conv_bias_grad`` on a (O, chunks) grid, then
        ``conv_bias_grad_finish`` when chunks > 1; see :func:`reduction_grid`). A 1 x 1 output
        is (N, O) data, summed by :meth:`channel_sum`'s row-wise kernel."""
        n, o = dy.shape[:2]
        if dy.size == 0:
            return self.xp.zeros((o,), dy.dtype)
        hw = dy.size // (n * o)
        if hw == 1:
            return self.channel_sum(dy.reshape(n, o))
        dy = self.xp.ascontiguousarray(dy)
        chunks, threads = self._reduction_grid(n, o, hw)
        dbias = self.empty((o,), dy.dtype)
        partials = dbias if chunks == 1 else self.empty((o, chunks), dy.dtype)
        self.launch("conv_bias_grad", dy.dtype, (o, chunks), (threads,),
                    (dy, np.int32(n), np.int32(o), np.int32(hw), partials))
        if chunks > 1:
            self.launch("conv_bias_grad_finish", dy.dtype, (-(-o // 8),), (32, 8),
                        (partials, np.int32(o), np.int32(chunks), dbias))
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

    # -- layer normalisation (kernels/layernorm.cu) -----------------------------------------
    # Rows of (R, M) data; the row kernels run on the path layernorm_grid chooses from M.
    def _layernorm_grid(self, rows: int, m: int) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
        """:func:`layernorm_grid`; a test may replace it on an instance to force a path."""
        return layernorm_grid(rows, m)

    def _row_vector(self, v: Any, m: int, fill: float, dtype: Any) -> Any:
        """``v`` as a contiguous ``(m,)`` array of ``dtype``, or ``fill`` repeated where None:
        the kernels always scale and shift (by 1 and 0 without parameters, which is exact)."""
        if v is None:
            return self.xp.full((m,), fill, dtype=dtype)
        return self.xp.ascontiguousarray(v.reshape(m), dtype=dtype)

    def layernorm_forward(self, x: Any, weight: Any, bias: Any,
                          eps: float) -> tuple[Any, Any, Any]:
        """Kernel version of :meth:`gpunet.backends.Backend.layernorm_forward`: each row's
        statistics and its normalised values in one launch (``ln_forward_warp`` or
        ``ln_forward_block``)."""
        rows, m = x.shape
        t = x.dtype
        y, mean, rstd = self.empty((rows, m), t), self.empty((rows,), t), self.empty((rows,), t)
        if rows == 0:
            return y, mean, rstd
        x = self.xp.ascontiguousarray(x)
        weight, bias = self._row_vector(weight, m, 1, t), self._row_vector(bias, m, 0, t)
        path, grid, block = self._layernorm_grid(rows, m)
        self.launch(f"ln_forward_{path}", t, grid, block,
                    (x, weight, bias, np.int32(rows), np.int32(m), t.type(eps), y, mean, rstd))
        return y, mean, rstd

    def layernorm_backward(self, dy: Any, x: Any, mean: Any, rstd: Any,
                           weight: Any) -> tuple[Any, Any, Any]:
        """Kernel version of :meth:`gpunet.backends.Backend.layernorm_backward`: ``dx`` row by
        row (``ln_backward_warp`` or ``ln_backward_block``), then, with a weight, ``dweight``
        and ``dbias`` in one column reduction over the rows (``ln_param_grads``, then
        ``ln_finish`` when the rows are split into chunks: :func:`reduction_grid` of
        ``(R, M, 1)`` data, as BatchNorm's (N, C) sums)."""
        rows, m = x.shape
        t = x.dtype
        dx = self.empty((rows, m), t)
        if rows == 0:
            if weight is None:
                return dx, None, None
            return dx, self.xp.zeros((m,), t), self.xp.zeros((m,), t)
        dy, x = self.xp.ascontiguousarray(dy), self.xp.ascontiguousarray(x)
        mean, rstd = self.xp.ascontiguousarray(mean), self.xp.ascontiguousarray(rstd)
        path, grid, block = self._layernorm_grid(rows, m)
        self.launch(f"ln_backward_{path}", t, grid, block,
                    (dy, x, mean, rstd, self._row_vector(weight, m, 1, t), np.int32(rows),
                     np.int32(m), dx))
        if weight is None:
            return dx, None, None
        chunks, _ = self._reduction_grid(rows, m, 1)
        sums = self.empty((2, m), t)
        partials = sums if chunks == 1 else self.empty((2, m, chunks), t)
        self.launch("ln_param_grads", t, (-(-m // 32), chunks), (32, 8),
                    (dy, x, mean, rstd, np.int32(rows), np.int32(m), partials))
        if chunks > 1:
            self.launch("ln_finish", t, (-(-(2 * m) // 8),), (32, 8),
                        (partials, np.int32(2 * m), np.int32(chunks), sums))
        return dx, sums[0], sums[1]

    # -- embeddings and GELU (kernels/embedding.cu, kernels/gelu.cu) ------------------------
    def embedding_backward(self, dweight: Any, indices: Any, dy: Any,
                           padding_idx: int | None = None) -> None:
        """Kernel version of :meth:`gpunet.backends.Backend.embedding_backward`, without
        atomics: a stable argsort groups equal indices in order of position (CuPy's argsort
        is stable, on the device), then ``embedding_backward`` (one thread per sorted position
        and feature) adds each run of equal indices into its row. No element has two writers
        and each sum runs in position order, as the generic loop's does."""
        _check_outputs("embedding_backward", dweight=dweight)
        m, d = dy.shape
        if m == 0:
            return
        indices = indices.astype(np.int64)
        order = self.xp.argsort(indices, kind="stable").astype(np.int64, copy=False)
        dy = self.xp.ascontiguousarray(dy)
        total = m * d
        self.launch("embedding_backward", dy.dtype, (_blocks(total, 256),), (256,),
                    (dy, order, indices[order], np.int64(m), np.int32(d),
                     np.int64(-1 if padding_idx is None else padding_idx), dweight))

    def gelu(self, x: Any, approximate: str = "none") -> Any:
        """Kernel version of :meth:`gpunet.backends.Backend.gelu`: one pass
        (``gelu_forward``, the device's own ``erf`` or ``tanh``)."""
        x = self.xp.ascontiguousarray(x)
        y = self.empty(x.shape, x.dtype)
        self.launch("gelu_forward", x.dtype, (_blocks(x.size, 256),), (256,),
                    (x, np.int64(x.size), np.int32(approximate == "tanh"), y))
        return y

    def backprop_gelu(self, dy: Any, x: Any, approximate: str = "none") -> Any:
        """Kernel version of :meth:`gpunet.backends.Backend.backprop_gelu`: one pass
        (``gelu_backward``)."""
        dy, x = self.xp.ascontiguousarray(dy), self.xp.ascontiguousarray(x)
        dx = self.empty(x.shape, x.dtype)
        self.launch("gelu_backward", x.dtype, (_blocks(x.size, 256),), (256,),
                    (dy, x, np.int64(x.size), np.int32(approximate == "tanh"), dx))
        return dx


def _check_outputs(op: str, **outputs: Any) -> None:
    """Kernels write through a raw pointer: an output must be one C-contiguous block."""
    for name, a in outputs.items():
        if not a.flags.c_contiguous:
            raise ValueError(f"{op}: expected output {name} to be C-contiguous, "
                             f"got strides {a.strides}")


#: Longest row one warp normalises alone (32 values per lane); longer rows get a block each.
LAYERNORM_WARP_MAX = 1024


def layernorm_grid(rows: int, m: int) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """``(path, grid, block)`` of the row kernels of layer normalisation over ``(rows, m)``
    data (kernels/layernorm.cu), chosen by the row length ``m`` alone:

    * ``m <= LAYERNORM_WARP_MAX``: ``"warp"``, one row per warp: ``ceil(rows / 8)`` blocks of
      32 x 8 threads, each lane taking at most 32 values of its row. Short rows would leave
      most threads of a block-per-row launch idle, and a warp needs no barrier.
    * longer rows: ``"block"``, one row per block: ``rows`` blocks of
      ``min(1024, 32 * ceil(m / 256))`` threads, about 8 values per thread (more above
      8192), the warps' sums meeting in shared memory.

    Since the path and the block size depend on ``m`` only, so does the summation order: a
    row gives the same bits whatever the number of rows around it."""
    if rows < 1 or m < 1:
        raise ValueError(f"layernorm_grid: expected rows, m >= 1, got {(rows, m)}")
    if m <= LAYERNORM_WARP_MAX:
        return "warp", (-(-rows // 8),), (32, 8)
    return "block", (rows,), (min(1024, 32 * -(-m // 256)),)
