"""The ``cpu`` device: NumPy on the host, with convolutions blocked over samples and the
element-wise work of the big layers split over a thread pool."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DeviceError
from .base import Array, Backend


def _cpu_threads() -> int:
    """Threads for the CPU device's element-wise work: ``$GPUNET_NUM_THREADS``, else the CPUs
    this process may run on."""
    value = os.environ.get("GPUNET_NUM_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise DeviceError(f"GPUNET_NUM_THREADS must be a positive integer, got {value!r}")
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CpuBackend(Backend):
    """NumPy on the host: the generic operations, with convolutions blocked over samples.

    The generic convolution builds one column matrix for the whole batch: ``C kh kw`` times
    the input's size, 150 MB for a batch of 128 32x32 images of 32 channels, written once and
    read by three GEMMs, each time from main memory (and, being fresh, page-faulted in on
    every step). Here the batch is cut into blocks of samples whose column matrix fits in
    :attr:`BLOCK_BYTES`, so it is made, used and dropped while it is in cache; backward makes
    it again from the saved input instead of keeping it.

    With stride 1 the columns are taken over the padded width ``Wp`` instead of ``Wo``: the
    row of kernel offset ``(i, j)`` is then ONE contiguous run of the flattened padded image,
    starting at ``i Wp + j``, so im2col copies runs of ``Ho Wp`` values instead of ``Ho`` runs
    of ``Wo``. The GEMM computes ``Wp - Wo`` extra outputs per row, which are dropped. The
    input gradient of a stride-1 convolution is itself a stride-1 correlation (of ``dy`` with
    the kernel flipped and its channel axes swapped), so it takes the same path where that is
    cheaper than a gather (not where it would pad a few output channels widely, as LeNet's
    second convolution); the gather adds contiguous runs back (:meth:`_uncolumns`) with stride
    1, and is col2im with other strides.
    """

    #: the size of one block's column matrix
    BLOCK_BYTES = 4 << 20
    #: element-wise work on arrays of at least this many elements is split over threads
    PARALLEL_MIN = 1 << 18

    def __init__(self, xp: Any = np, name: str = "cpu") -> None:
        super().__init__(xp, name)
        self._local = threading.local()
        self.threads = _cpu_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def _parallel(self, x: Array, fn: Callable[[slice], Any]) -> list[Any]:
        """``fn`` over parts of ``x``'s leading axis, one per thread, and its results in
        order. NumPy's BLAS is threaded but its element-wise loops are not; they release the
        GIL, so the calling thread takes the first part and a pool the others. Small arrays
        (under :attr:`PARALLEL_MIN` elements), and calls made from within a part (an op
        built on other ops), run in one part."""
        n = x.shape[0]
        nested = getattr(self._local, "in_part", False)
        parts = 1 if nested or x.size < self.PARALLEL_MIN else min(self.threads, n)
        bounds = [n * k // parts for k in range(parts + 1)]
        slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        if parts == 1:
            return [fn(slices[0])]

        def run(s: slice) -> Any:
            self._local.in_part = True
            try:
                return fn(s)
            finally:
                self._local.in_part = False
        if self._pool is None or self._pool_pid != os.getpid():  # a forked child has no pool
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="gpunet-cpu")
            self._pool_pid = os.getpid()
        futures = [self._pool.submit(run, s) for s in slices[1:]]
        return [run(slices[0])] + [f.result() for f in futures]

    def relu(self, x: Array) -> Array:
        y = np.empty_like(x)
        self._parallel(x, lambda s: np.maximum(x[s], 0, out=y[s]))
        return y

    def backprop_relu(self, dy: Array, x: Array) -> Array:
        dx = np.empty_like(dy)
        self._parallel(x, lambda s: np.multiply(dy[s], x[s] > 0, out=dx[s]))
        return dx

    def channel_sum(self, x: Array) -> Array:
        return sum(self._parallel(x, lambda s: Backend.channel_sum(self, x[s])))

    def channel_sq_dev(self, x: Array, mean: Array) -> Array:
        return sum(self._parallel(x, lambda s: Backend.channel_sq_dev(self, x[s], mean)))

    def batchnorm_apply(self, x: Array, mean: Array, scale: Array, shift: Array) -> Array:
        y = np.empty_like(x)

        def part(s: slice) -> None:
            y[s] = Backend.batchnorm_apply(self, x[s], mean, scale, shift)
        self._parallel(x, part)
        return y

    def _batchnorm_sums(self, dy: Array, x: Array, mean: Array) -> tuple[Array, Array]:
        parts = self._parallel(x, lambda s: Backend._batchnorm_sums(self, dy[s], x[s], mean))
        return sum(a for a, _ in parts), sum(b for _, b in parts)

    def _batchnorm_dx(self, dy: Array, x: Array, mean: Array, k: Array, coef: Array,
                      shift: Array) -> Array:
        dx = np.empty_like(dy)

        def part(s: slice) -> None:
            dx[s] = Backend._batchnorm_dx(self, dy[s], x[s], mean, k, coef, shift)
        self._parallel(x, part)
        return dx

    def _scratch(self, name: str, shape: Sequence[int], dtype: Any) -> Array:
        """A buffer of this thread's, reused from call to call: a fresh multi-megabyte array
        is page-faulted in on every touch (glibc hands such sizes back to the system), which
        cost LeNet's first convolution three quarters of its time."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if name not in buffers or buffers[name].nbytes < nbytes:
            buffers[name] = np.empty(nbytes, dtype=np.uint8)
        return buffers[name][:nbytes].view(dtype).reshape(shape)

    def _columns(self, x: Array, kernel: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int]) -> tuple[Array, int]:
        """``(cols, width)``: the column matrix ``(C kh kw, N Ho width)`` of a block of
        samples, with ``width = Wp`` (the padded width, stride 1) or ``Wo`` (:meth:`im2col`),
        in a scratch buffer."""
        if tuple(stride) != (1, 1):
            return self.im2col(x, kernel, stride, padding), (
                x.shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
        n, c, h, w = x.shape
        (kh, kw), (ph, pw) = kernel, padding
        hp, wp = h + 2 * ph, w + 2 * pw
        ho = hp - kh + 1
        # one spare row: the run of the last offset ends kw - 1 values past the padded image
        xpad = self._scratch("padded", (n, c, hp + 1, wp), x.dtype)
        xpad.fill(0)
        xpad[:, :, ph:ph + h, pw:pw + w] = x
        st = xpad.strides
        runs = np.lib.stride_tricks.as_strided(xpad, (c, kh, kw, n, ho * wp),
                                               (st[1], st[2], st[3], st[0], st[3]))
        cols = self._scratch("columns", runs.shape, x.dtype)
        np.copyto(cols, runs)
        return cols.reshape(c * kh * kw, n * ho * wp), wp

    def _blocks(self, x_shape: Sequence[int], weight: Array, stride: Sequence[int],
                padding: Sequence[int]) -> list[slice]:
        """The samples in slices whose column matrix takes at most ``BLOCK_BYTES``."""
        n, _, h, w = x_shape
        ho = (h + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
        per_sample = weight[0].size * ho * (w + 2 * padding[1]) * weight.itemsize
        step = max(1, self.BLOCK_BYTES // per_sample)
        return [slice(s, min(s + step, n)) for s in range(0, n, step)]

    def conv2d(self, x: Array, weight: Array, bias: Array | None, stride: Sequence[int],
               padding: Sequence[int]) -> tuple[Array, Array]:
        """As :meth:`Backend.conv2d`, one GEMM per block of samples; what backward needs is
        ``x`` itself."""
        (n, _, h, w), (o, _, kh, kw) = x.shape, weight.shape
        ho = (h + 2 * padding[0] - kh) // stride[0] + 1
        wo = (w + 2 * padding[1] - kw) // stride[1] + 1
        w2 = weight.reshape(o, -1)
        y = np.empty((n, o, ho, wo), dtype=x.dtype)
        for b in self._blocks(x.shape, weight, stride, padding):
            cols, width = self._columns(x[b], (kh, kw), stride, padding)
            out = np.matmul(w2, cols, out=self._scratch("product", (o, cols.shape[1]), x.dtype))
            if bias is not None:  # while the block is in cache, not in a pass over y
                out += bias.reshape(o, 1)
            y[b] = out.reshape(o, -1, ho, width)[..., :wo].transpose(1, 0, 2, 3)
        return y, x

    def conv2d_saved(self, x: Array, kernel: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int]) -> Array:
        """``x`` itself: :meth:`backprop_conv2d` remakes the columns block by block."""
        return x

    def _uncolumns(self, dcols: Array, x_shape: Sequence[int], kernel: Sequence[int],
                   padding: Sequence[int]) -> Array:
        """The adjoint of the stride-1 :meth:`_columns`: ``dx`` of a block from ``dcols``
        ``(C kh kw, N Ho Wp)``, one add of a contiguous run per kernel offset. The columns
        forward dropped must be zero in ``dcols``: they land in the padding."""
        n, c, h, w = x_shape
        (kh, kw), (ph, pw) = kernel, padding
        hp, wp = h + 2 * ph, w + 2 * pw
        run = (hp - kh + 1) * wp
        d = dcols.reshape(c, kh, kw, n, run)
        acc = self._scratch("padded", (c, n, (hp + 1) * wp), dcols.dtype)
        acc.fill(0)
        for i in range(kh):
            for j in range(kw):
                acc[:, :, i * wp + j:i * wp + j + run] += d[:, i, j]
        return acc.reshape(c, n, hp + 1, wp)[:, :, ph:ph + h, pw:pw + w].transpose(1, 0, 2, 3)

    def backprop_conv2d(self, dy: Array, x: Array, x_shape: Sequence[int], weight: Array,
                        stride: Sequence[int], padding: Sequence[int], bias: bool = True,
                        input_grad: bool = True) -> tuple[Array | None, Array, Array | None]:
        """As :meth:`Backend.backprop_conv2d`, blocked over samples, from the saved ``x``."""
        (o, c, kh, kw), (ho, wo) = weight.shape, dy.shape[2:]
        w2 = weight.reshape(o, -1)
        ph, pw = kh - 1 - padding[0], kw - 1 - padding[1]
        # the correlation reads an O-channel image padded by k - 1 - p; col2im writes and
        # adds up C kh kw runs per output pixel: about twice the cost per element
        correlate = input_grad and (tuple(stride) == (1, 1) and ph >= 0 and pw >= 0
                                    and o * x_shape[2] * (x_shape[3] + kw - 1)
                                    <= 2 * c * ho * wo)
        gather = input_grad and not correlate
        dx = np.empty(x_shape, dtype=dy.dtype) if gather else None
        dweight_t = np.zeros((w2.shape[1], o), dtype=w2.dtype)
        for b in self._blocks(x_shape, weight, stride, padding):
            cols, width = self._columns(x[b], (kh, kw), stride, padding)
            # dy laid out as the GEMM's output was, zero in the columns forward dropped
            dy2 = self._scratch("product", (o, b.stop - b.start, ho, width), dy.dtype)
            dy2[..., wo:] = 0
            dy2[..., :wo] = dy[b].transpose(1, 0, 2, 3)
            dy2 = dy2.reshape(o, -1)
            # dweight^T = cols dy^T: OpenBLAS runs this orientation a third faster than
            # dy cols^T (1.2 -> 0.8 ms for a 32 x 288 x 3264 block on one thread)
            dweight_t += cols @ dy2.T
            if gather:  # dcols = weight^T dy, over the block's columns (no longer needed)
                dcols = np.matmul(w2.T, dy2, out=cols)
                shape = (b.stop - b.start, *x_shape[1:])
                dx[b] = (self._uncolumns(dcols, shape, (kh, kw), padding)
                         if tuple(stride) == (1, 1) else
                         self.col2im(dcols, shape, (kh, kw), stride, padding))
        dweight = dweight_t.T.reshape(weight.shape)
        dbias = self.conv_bias_grad(dy) if bias else None
        if correlate:
            # dx[n, c, h, w] = sum_{o,i,j} weight[o, c, i, j] dy[n, o, h + p - i, w + p - j]:
            # a correlation of dy, padded by k - 1 - p, with the flipped, transposed kernel
            flipped = np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
            dx = self.conv2d(dy, flipped, None, (1, 1), (ph, pw))[0]
        return dx, dweight, dbias

    #: elements per piece of :meth:`_piecewise`: a piece of a few arrays stays in L2 cache
    PIECE = 1 << 14

    def _piecewise(self, fn: Callable[..., Array], *arrays: Array) -> Array:
        """``fn`` of same-shape ``arrays``, computed piece by piece (:attr:`PIECE` elements),
        the pieces shared among threads (:meth:`_parallel`). For formulas of many steps (erf:
        about fifty): each step then reads and writes cache, not main memory; GELU runs twice
        as fast on one thread."""
        flat = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
        out = np.empty_like(flat[0])

        def part(s: slice) -> None:
            for i in range(s.start, s.stop, self.PIECE):
                p = slice(i, min(i + self.PIECE, s.stop))
                out[p] = fn(*(a[p] for a in flat))
        self._parallel(flat[0], part)
        return out.reshape(arrays[0].shape)

    def gelu(self, x: Array, approximate: str = "none") -> Array:
        return self._piecewise(lambda v: Backend.gelu(self, v, approximate), x)

    def backprop_gelu(self, dy: Array, x: Array, approximate: str = "none") -> Array:
        return self._piecewise(lambda d, v: Backend.backprop_gelu(self, d, v, approximate), dy, x)
