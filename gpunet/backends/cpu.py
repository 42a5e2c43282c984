"""The ``cpu`` device: NumPy on the host; convolutions blocked over samples (shifted GEMMs
through NumPy's own BLAS from 8 channels on), the blocks and the element-wise work of the big
layers split over a thread pool, and float32 element-wise formulas in compiled loops
(:mod:`.native`) where a C++ compiler is found."""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import blas, native
from .base import Array, Backend


def _cpu_threads() -> int:
    """The most threads for the CPU device's element-wise work: ``$GPUNET_NUM_THREADS``, else
    the CPUs this process may run on (:exc:`DeviceError` if the variable is not a positive
    integer, ``$GPUNET_THREAD_POLICY`` none of the policies or ``$GPUNET_CPU_ARCH`` no
    architecture the compiler knows: checked when the device is made, not at its first
    parallel call). The count used at each call is :func:`gpunet.threads.current`."""
    from .. import threads
    threads._env_policy()
    native.check_arch()
    return threads.env_maximum()


def _keep_freed_memory() -> None:
    """Have glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of handing
    them back to the system. By default a block of a few MiB is mapped afresh at each
    allocation and page-faulted in at first touch, 4 KiB at a time: 38 MiB a step for the bn
    workload (9,700 faults), about a tenth of its step. ``M_MMAP_THRESHOLD`` goes to 32 MiB
    (glibc's most) and ``M_TRIM_THRESHOLD`` to 256 MiB; the resident set then stays at its
    peak instead of shrinking between steps (the peak itself is unchanged). It is a setting
    of the whole process: ``GPUNET_MALLOC=default`` leaves glibc as it is."""
    if os.environ.get("GPUNET_MALLOC", "").strip().lower() == "default":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 256 << 20)


def _l2_cache_bytes(default: int = 1 << 20) -> int:
    """The size of one core's level-2 cache, read from sysfs (Linux), else ``default``."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(root)):
            with open(f"{root}/{index}/level") as f:
                if f.read().strip() != "2":
                    continue
            with open(f"{root}/{index}/size") as f:
                size = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
            return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return default


@dataclass(frozen=True, eq=False)
class PackedMatrix:
    """A float32 ``(k, n)`` matrix in the compiled GEMM's panels (:meth:`CpuBackend.pack`)."""

    data: Array
    k: int
    n: int


def _check_sequence(op: str, w_h: PackedMatrix, w_shape: tuple[int, int], steps: int,
                    batch: int, **arrays: Array) -> None:
    """The compiled recurrence reads and writes through raw pointers: the packed ``W_h``
    must be ``w_shape`` and every array the shape that the hidden size ``min(w_shape)``
    says, or ``op`` refuses (the step loop in NumPy would have raised)."""
    hidden = min(w_shape)
    if (w_h.k, w_h.n) != w_shape:
        raise ValueError(f"{op}: the packed W_h is {(w_h.k, w_h.n)}, expected {w_shape}")
    want = {"xg": (steps, batch, 4 * hidden), "acts": (steps, batch, 4 * hidden),
            "dz": (steps, batch, 4 * hidden), "hs": (steps + 1, batch, hidden),
            "cs": (steps + 1, batch, hidden), "dy": (steps, batch, hidden),
            "dh": (batch, hidden), "dc": (batch, hidden)}
    for name, a in arrays.items():
        if a.shape != want[name]:
            raise ValueError(f"{op}: {name} is {a.shape}, expected {want[name]}")


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
    1, and is col2im with other strides. From :attr:`SHIFT_MIN_CHANNELS` channels on, stride-1
    convolutions take no column matrix for forward and dx (see "shifted GEMMs" below).

    Blocks of samples are shared among threads, each running its GEMMs on one BLAS thread
    (:meth:`_over_samples`). Element-wise float32 formulas (ReLU, BatchNorm, pooling, the LSTM
    cell, the SGD step, the convolutions' layout copies, convolutions of few channels) run as
    compiled loops, one pass each (``kernels/cpu.cpp``), on a pool of compiled threads that
    also cuts every GEMM (:meth:`gemm`); so do the stride-1 convolutions' correlations, a GEMM
    kernel for packed operands (:meth:`pack`, :meth:`gemm_packed`) and the LSTM's step loop
    (:meth:`lstm_sequence_forward`). float64, and machines without a compiler, run the
    NumPy code, which is the reference the other devices are tested against.
    """

    #: the size of one block's column matrix
    BLOCK_BYTES = 4 << 20
    #: element-wise work on arrays of at least this many elements is split over threads
    PARALLEL_MIN = 1 << 18

    def __init__(self, xp: Any = np, name: str = "cpu") -> None:
        super().__init__(xp, name)
        _keep_freed_memory()
        from .. import threads
        self._local = threading.local()
        self._max_threads = _cpu_threads()
        #: None: as many threads as :func:`gpunet.threads.current` says; an int fixes the count
        self.threads: int | None = None
        self._current_threads = threads.current
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = self._pool_size = 0

    def _parallel(self, x: Array, fn: Callable[[slice], Any]) -> list[Any]:
        """``fn`` over parts of ``x``'s leading axis, one per thread, and its results in
        order. NumPy's BLAS is threaded but its element-wise loops are not; they release the
        GIL, so the calling thread takes the first part and a pool the others. Small arrays
        (under :attr:`PARALLEL_MIN` elements), and calls made from within a part (an op
        built on other ops), run in one part. The number of parts is :attr:`threads`, or
        the thread policy's count now (:mod:`gpunet.threads`)."""
        return self._split(x.shape[0], x.size, fn)

    def _split(self, n: int, size: int, fn: Callable[[slice], Any]) -> list[Any]:
        """:meth:`_parallel` over ``range(n)``, for work of ``size`` elements."""
        nested = getattr(self._local, "in_part", False)
        parts = (1 if nested or size < self.PARALLEL_MIN
                 else min(self.threads or self._current_threads(), n))
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
        # a forked child has no pool; set_num_threads may ask for more than the pool has
        if self._pool is None or self._pool_pid != os.getpid() or self._pool_size < parts - 1:
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.shutdown(wait=False)
            self._pool_size = max(parts, self._max_threads) - 1
            self._pool = ThreadPoolExecutor(self._pool_size, thread_name_prefix="gpunet-cpu")
            self._pool_pid = os.getpid()
        futures = [self._pool.submit(run, s) for s in slices[1:]]
        return [run(slices[0])] + [f.result() for f in futures]

    #: GEMMs of at least this many multiply-adds are cut among threads; smaller ones run on
    #: one BLAS thread of the calling thread
    GEMM_PARALLEL_MIN = 1 << 20

    def gemm(self, a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
        """:meth:`Backend.gemm` on gpunet's threads (:mod:`.native`'s pool): its rows or
        columns cut among them, each piece one single-threaded call of NumPy's BLAS, so that
        no BLAS worker spins after it on the cores the next loops need. Where the compiled
        library or the direct BLAS calls are missing: NumPy's matmul, after the thread policy
        has set the BLAS's threads for now."""
        threads = self.threads or self._current_threads()
        if not self._pooled_gemm(a, b):
            return Backend.gemm(self, a, b, trans_a, trans_b)
        m = a.shape[1] if trans_a else a.shape[0]
        out = np.empty((m, b.shape[0] if trans_b else b.shape[1]), a.dtype)
        self._gemm_into(out, a, b, trans_a, trans_b, 0.0, threads)
        return out

    def gemm_acc(self, out: Array, a: Array, b: Array, trans_a: bool = False,
                 trans_b: bool = False) -> None:
        """:meth:`Backend.gemm_acc` as one GEMM with ``beta = 1`` into ``out`` on gpunet's
        threads (no product array, no second pass), where :meth:`gemm` calls the BLAS."""
        if not (self._pooled_gemm(a, b) and out.ndim == 2 and out.dtype == a.dtype
                and out.flags.c_contiguous):
            return Backend.gemm_acc(self, out, a, b, trans_a, trans_b)
        self._gemm_into(out, a, b, trans_a, trans_b, 1.0)

    def pack(self, b: Array) -> Any:
        """:meth:`Backend.pack`: a float32 ``b`` into the compiled GEMM's panels
        (:class:`PackedMatrix`); for float64, without the compiled library or where its GEMM
        kernels disagree with NumPy (:func:`.native.gemm_kernels`), ``b`` with
        contiguous rows (NumPy's BLAS took a transposed view 15% slower in the LSTM's steps)."""
        if not (b.ndim == 2 and b.dtype == np.float32 and 0 not in b.shape
                and native.gemm_kernels()):
            return np.ascontiguousarray(b)
        b, trans, ld = self._blas_operand(b, False)
        k, n = (b.shape[1], b.shape[0]) if trans else b.shape
        lib, panel = native.library(), native.library().packed_panel()
        data = np.empty(-(-n // panel) * panel * k, np.float32)
        lib.pack_b_mt(b.ctypes.data, ld, trans, k, n, data.ctypes.data,
                      self._native_threads(data.size))
        return PackedMatrix(data, k, n)

    def gemm_packed(self, a: Array, packed: Any, out: Array | None = None) -> Array:
        """:meth:`Backend.gemm_packed` by the compiled kernel (``kernels/cpu.cpp``) for a
        :class:`PackedMatrix`, its panels of columns shared by the pool's threads."""
        if not isinstance(packed, PackedMatrix) or a.ndim != 2:
            return Backend.gemm_packed(self, a, packed, out)
        m, k = a.shape
        if k != packed.k:
            raise ValueError(f"gemm_packed: a is {a.shape} and the packed matrix "
                             f"{(packed.k, packed.n)}: their inner dimensions differ")
        if a.dtype != np.float32:  # the packed matrix is float32: no silent narrowing of a
            raise ValueError(f"gemm_packed: a must be float32 like the packed matrix, "
                             f"got {a.dtype}")
        if out is None:
            out = np.empty((m, packed.n), np.float32)
        elif out.shape != (m, packed.n) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"gemm_packed: out must be a C-contiguous float32 {(m, packed.n)} "
                             f"array, got {out.dtype} {out.shape}")
        elif np.shares_memory(a, out):  # the threads' panels would overwrite rows still read
            raise ValueError("gemm_packed: out overlaps a")
        if a.strides[1] != 4 or a.strides[0] < 4 * k:
            a = np.ascontiguousarray(a, np.float32)
        native.library().gemm_packed_mt(
            a.ctypes.data, a.strides[0] // 4, packed.data.ctypes.data, m, packed.n, k,
            out.ctypes.data, packed.n, 0, self._gemm_threads(m * packed.n * k))
        return out

    def _gemm_threads(self, work: int, threads: int | None = None) -> int:
        """Threads for a GEMM of ``work`` multiply-adds: one within a part of
        :meth:`_parallel` (the other threads have parts of their own) or below
        :attr:`GEMM_PARALLEL_MIN`, else ``threads``, :attr:`threads` or the policy's count."""
        if getattr(self._local, "in_part", False) or work < self.GEMM_PARALLEL_MIN:
            return 1
        return threads or self.threads or self._current_threads()

    @staticmethod
    def _pooled_gemm(a: Array, b: Array) -> bool:
        """Whether gpunet's pool takes the GEMM of ``a`` and ``b``."""
        return (native.library() is not None and blas.BLAS is not None and a.ndim == b.ndim == 2
                and a.dtype == b.dtype and a.dtype in (np.float32, np.float64)
                and 0 not in (*a.shape, *b.shape))

    def _gemm_into(self, out: Array, a: Array, b: Array, trans_a: bool, trans_b: bool,
                   beta: float, threads: int | None = None) -> None:
        """``out = op(a) op(b) + beta out`` by the pool, in :meth:`_gemm_threads` pieces."""
        a, trans_a, lda = self._blas_operand(a, trans_a)
        b, trans_b, ldb = self._blas_operand(b, trans_b)
        m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
        k_b, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
        if k_b != k:  # BLAS would read past an operand
            raise ValueError(f"gemm: op(a) is {(m, k)} and op(b) {(k_b, n)}: their inner "
                             f"dimensions differ")
        if out.shape != (m, n):
            raise ValueError(f"gemm_acc: the product is {(m, n)}, out is {out.shape}")
        native.library().gemm_mt(blas.BLAS.pointer(out.dtype), out.dtype == np.float64,
                                 trans_a, trans_b, m, n, k, a.ctypes.data, lda, b.ctypes.data,
                                 ldb, beta, out.ctypes.data, n, self._gemm_threads(m * n * k,
                                                                                   threads))

    @staticmethod
    def _blas_operand(a: Array, trans: bool) -> tuple[Array, bool, int]:
        """``(a', trans', ld)``: ``a`` as BLAS takes it, rows contiguous (a transposed view
        is read as its base with the transpose flag turned over; anything else is copied)."""
        size = a.itemsize
        if a.strides[1] == size and a.strides[0] >= a.shape[1] * size:
            return a, trans, a.strides[0] // size
        if a.strides[0] == size and a.strides[1] >= a.shape[0] * size:
            return a.T, not trans, a.strides[1] // size
        a = np.ascontiguousarray(a)
        return a, trans, a.shape[1]

    #: bytes of one piece of :meth:`_in_pieces`: a quarter of the L2 cache, so that the
    #: three or four arrays of a step fit there together
    SLAB_BYTES = _l2_cache_bytes() // 4

    def _in_pieces(self, x: Array, fn: Callable[[slice], Any]) -> list[Any]:
        """``fn`` over pieces of ``x``'s leading axis of about :attr:`SLAB_BYTES` (one
        sample at least), shared among threads (:meth:`_parallel`); the results in order.
        A formula of several steps then has each step read and write a piece in cache, not
        the whole array in main memory (BatchNorm's forward, 13.8 -> 6 ms for the bn
        workload's (128, 32, 32, 32) tensor on one thread)."""
        per_piece = self.SLAB_BYTES // x.itemsize
        step = max(1, per_piece // max(1, x[0].size)) if x.ndim > 1 else per_piece

        def part(s: slice) -> list[Any]:
            return [fn(slice(i, min(i + step, s.stop))) for i in range(s.start, s.stop, step)]
        return [r for rs in self._parallel(x, part) for r in rs]

    # -- element-wise work: compiled float32 loops (.native), else NumPy piece by piece --
    @staticmethod
    def _nchw(x: Array) -> tuple[int, int, int]:
        """``(N, C, HW)`` of ``(N, C)`` or ``(N, C, ...)`` data."""
        return x.shape[0], x.shape[1], x[0, 0].size

    @staticmethod
    def _f32(*vectors: Array) -> list[Array]:
        return [np.ascontiguousarray(v, dtype=np.float32) for v in vectors]

    #: compiled loops are shared among threads from this much work (elements times the
    #: operations per element) on: their pool hands out work in about a microsecond
    NATIVE_PARALLEL_MIN = 1 << 15

    def _native_threads(self, work: int) -> int:
        """Threads for a compiled loop of ``work``: one within a part of :meth:`_parallel`
        (the other threads have parts of their own) or for little work, else :attr:`threads`
        or the thread policy's count now."""
        if getattr(self._local, "in_part", False) or work < self.NATIVE_PARALLEL_MIN:
            return 1
        return self.threads or self._current_threads()

    def relu(self, x: Array) -> Array:
        y = np.empty_like(x)
        if native.usable(x):
            native.library().relu_mt(x.ctypes.data, y.ctypes.data, x.size,
                                     self._native_threads(x.size))
        else:
            self._parallel(x, lambda s: np.maximum(x[s], 0, out=y[s]))
        return y

    def backprop_relu(self, dy: Array, x: Array) -> Array:
        dx = np.empty_like(dy)
        if native.usable(dy, x):
            native.library().relu_backward_mt(dy.ctypes.data, x.ctypes.data, dx.ctypes.data,
                                              x.size, self._native_threads(x.size))
        else:
            self._in_pieces(x, lambda s: np.multiply(dy[s], x[s] > 0, out=dx[s]))
        return dx

    def _channel_sums(self, fn: str, arrays: Sequence[Array], vectors: Sequence[Array],
                      outputs: int) -> list[Array]:
        """``outputs`` per-channel sums of compiled loop ``fn`` (in double, the threads'
        parts added in order), in float32."""
        (n, c, hw), vectors = self._nchw(arrays[0]), self._f32(*vectors)
        out = np.empty((outputs, c))
        getattr(native.library(), fn)(*(a.ctypes.data for a in arrays), n, c, hw,
                                      *(v.ctypes.data for v in vectors), out.ctypes.data,
                                      self._native_threads(arrays[0].size))
        return list(out.astype(np.float32))

    def channel_sum(self, x: Array) -> Array:
        if native.usable(x):
            return self._channel_sums("channel_sum_mt", [x], [], 1)[0]
        return sum(self._parallel(x, lambda s: Backend.channel_sum(self, x[s])))

    def channel_sq_dev(self, x: Array, mean: Array) -> Array:
        if native.usable(x):
            return self._channel_sums("channel_sq_dev_mt", [x], [mean], 1)[0]
        return sum(self._in_pieces(x, lambda s: Backend.channel_sq_dev(self, x[s], mean)))

    def batchnorm_apply(self, x: Array, mean: Array, scale: Array, shift: Array) -> Array:
        y = np.empty_like(x)
        if native.usable(x):
            (n, c, hw), v = self._nchw(x), self._f32(mean, scale, shift)
            native.library().batchnorm_apply_mt(x.ctypes.data, y.ctypes.data, n, c, hw,
                                                *(a.ctypes.data for a in v),
                                                self._native_threads(x.size))
            return y
        mean, scale, shift = (self._per_channel(v, x.ndim) for v in (mean, scale, shift))

        def piece(s: slice) -> None:
            np.subtract(x[s], mean, out=y[s])
            y[s] *= scale
            y[s] += shift
        self._in_pieces(x, piece)
        return y

    def _batchnorm_sums(self, dy: Array, x: Array, mean: Array) -> tuple[Array, Array]:
        if native.usable(dy, x):
            sum_dy, sum_dyc = self._channel_sums("batchnorm_sums_mt", [dy, x], [mean], 2)
            return sum_dy, sum_dyc
        parts = self._in_pieces(x, lambda s: Backend._batchnorm_sums(self, dy[s], x[s], mean))
        return sum(a for a, _ in parts), sum(b for _, b in parts)

    def _batchnorm_dx(self, dy: Array, x: Array, mean: Array, k: Array, coef: Array,
                      shift: Array) -> Array:
        dx = np.empty_like(dy)
        if native.usable(dy, x):
            (n, c, hw), v = self._nchw(x), self._f32(mean, k, coef, shift)
            native.library().batchnorm_dx_mt(dy.ctypes.data, x.ctypes.data, dx.ctypes.data,
                                             n, c, hw, *(a.ctypes.data for a in v),
                                             self._native_threads(x.size))
            return dx
        mean, k, coef, shift = (self._per_channel(v, x.ndim) for v in (mean, k, coef, shift))

        def piece(s: slice) -> None:
            np.subtract(x[s], mean, out=dx[s])
            dx[s] *= coef
            dx[s] += shift
            dx[s] += dy[s] * k
        self._in_pieces(x, piece)
        return dx

    def maxpool2d(self, x: Array, kernel: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int]) -> tuple[Array, Array]:
        if not (native.usable(x) and tuple(kernel) == tuple(stride) == (2, 2)
                and tuple(padding) == (0, 0)):
            return Backend.maxpool2d(self, x, kernel, stride, padding)
        n, c, h, w = x.shape
        y = np.empty((n, c, h // 2, w // 2), np.float32)
        index = np.empty((n, c, h // 2, w // 2), np.int32)
        native.library().maxpool2x2_forward_mt(x.ctypes.data, y.ctypes.data, index.ctypes.data,
                                               n * c, h, w, self._native_threads(x.size))
        return y, index

    def backprop_maxpool2d(self, dy: Array, index: Array, x_shape: Sequence[int],
                           kernel: Sequence[int], stride: Sequence[int],
                           padding: Sequence[int]) -> Array:
        if not (native.usable(dy) and index.dtype == np.int32 and index.flags.c_contiguous):
            return Backend.backprop_maxpool2d(self, dy, index, x_shape, kernel, stride, padding)
        (n, c, h, w), (ho, wo) = x_shape, dy.shape[2:]
        dx = np.empty(x_shape, np.float32)
        native.library().maxpool_backward_mt(dy.ctypes.data, index.ctypes.data, dx.ctypes.data,
                                             n * c, h, w, kernel[1], *stride, *padding, ho, wo,
                                             self._native_threads(dx.size))
        return dx

    def sgd_update(self, w: Array, g: Array, buf: Array | None, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if not native.usable(w, g, *([] if buf is None else [buf])):
            return Backend.sgd_update(self, w, g, buf, lr, momentum, weight_decay, nesterov)
        native.library().sgd_update_mt(w.ctypes.data, g.ctypes.data,
                                       None if buf is None else buf.ctypes.data, w.size, lr,
                                       momentum, weight_decay, int(nesterov),
                                       self._native_threads(w.size))

    def lstm_cell_forward(self, xg: Array, hg: Array, c_prev: Array, acts: Array, c: Array,
                          h: Array) -> None:
        if not native.usable(xg, hg, c_prev, acts, c, h):
            return Backend.lstm_cell_forward(self, xg, hg, c_prev, acts, c, h)
        native.library().lstm_cell_forward_mt(xg.ctypes.data, hg.ctypes.data, c_prev.ctypes.data,
                                              acts.ctypes.data, c.ctypes.data, h.ctypes.data,
                                              *c.shape, self._native_threads(8 * acts.size))

    def lstm_cell_backward(self, dy: Array, dh_rec: Array, dc_next: Array, acts: Array,
                           c_prev: Array, c: Array, dz: Array, dc_prev: Array) -> None:
        arrays = (dy, dh_rec, dc_next, acts, c_prev, c, dz, dc_prev)
        if not native.usable(*arrays):
            return Backend.lstm_cell_backward(self, *arrays)
        native.library().lstm_cell_backward_mt(*(a.ctypes.data for a in arrays), *c.shape,
                                               self._native_threads(8 * acts.size))

    def lstm_sequence_forward(self, xg: Array, w_h: Any, hs: Array, cs: Array,
                              acts: Array) -> None:
        """:meth:`Backend.lstm_sequence_forward` in one compiled call for float32 and a
        packed ``w_h``: the steps' GEMMs and cells never return to Python."""
        if not (isinstance(w_h, PackedMatrix) and native.usable(xg, hs, cs, acts)):
            return Backend.lstm_sequence_forward(self, xg, w_h, hs, cs, acts)
        steps, batch, gates = xg.shape
        _check_sequence("lstm_sequence_forward", w_h, (gates // 4, gates), xg=xg, acts=acts,
                        hs=hs, cs=cs, steps=steps, batch=batch)
        native.library().lstm_sequence_forward_mt(
            xg.ctypes.data, w_h.data.ctypes.data, hs.ctypes.data, cs.ctypes.data,
            acts.ctypes.data, steps, batch, gates // 4, *self._step_threads(batch, gates // 4))

    def lstm_sequence_backward(self, dy: Array, dh: Array, dc: Array, acts: Array, cs: Array,
                               w_h: Any, dz: Array) -> tuple[Array, Array]:
        """:meth:`Backend.lstm_sequence_backward` in one compiled call, as the forward."""
        if not (isinstance(w_h, PackedMatrix) and native.usable(acts, cs, dz)
                and all(a.dtype == np.float32 for a in (dy, dh, dc))):
            return Backend.lstm_sequence_backward(self, dy, dh, dc, acts, cs, w_h, dz)
        dy, dh, dc = (np.ascontiguousarray(a) for a in (dy, dh, dc))
        steps, batch, hidden = dy.shape
        _check_sequence("lstm_sequence_backward", w_h, (4 * hidden, hidden), acts=acts, dz=dz,
                        cs=cs, dy=dy, dh=dh, dc=dc, steps=steps, batch=batch)
        dh0, dc0 = np.empty_like(dh), np.empty_like(dc)
        native.library().lstm_sequence_backward_mt(
            dy.ctypes.data, dh.ctypes.data, dc.ctypes.data, acts.ctypes.data, cs.ctypes.data,
            w_h.data.ctypes.data, dz.ctypes.data, dh0.ctypes.data, dc0.ctypes.data, steps,
            batch, hidden, *self._step_threads(batch, hidden))
        return dh0, dc0

    def _step_threads(self, batch: int, hidden: int) -> tuple[int, int]:
        """Threads for a recurrent step's GEMM and for its cell, as :meth:`gemm_packed` and
        :meth:`lstm_cell_forward` would pick them."""
        return (self._gemm_threads(batch * 4 * hidden * hidden),
                self._native_threads(8 * batch * 4 * hidden))

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
        (n, c, h, w), (o, _, kh, kw) = x.shape, weight.shape
        ho = (h + 2 * padding[0] - kh) // stride[0] + 1
        wo = (w + 2 * padding[1] - kw) // stride[1] + 1
        if self._shifts(x, stride, c):
            return self._conv_shifted(x, weight, bias, padding), x
        if self._direct(x, stride, c, o):
            return self._conv_direct(x, weight, bias, padding), x
        if self._vec(x, stride, c, o):
            return self._conv_vec(x, weight, bias, padding), x
        w2 = weight.reshape(o, -1)
        y = np.empty((n, o, ho, wo), dtype=x.dtype)

        def block(b: slice) -> None:
            cols, width = self._columns(x[b], (kh, kw), stride, padding)
            out = np.matmul(w2, cols, out=self._scratch("product", (o, cols.shape[1]), x.dtype))
            if bias is not None:  # while the block is in cache, not in a pass over y
                out += bias.reshape(o, 1)
            y[b] = out.reshape(o, -1, ho, width)[..., :wo].transpose(1, 0, 2, 3)
        self._over_blocks(self._blocks(x.shape, weight, stride, padding), block)
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
        if native.usable(dcols):
            dx = np.empty(x_shape, np.float32)
            native.library().uncolumns_mt(dcols.ctypes.data, dx.ctypes.data, n, c, h, w, kh, kw,
                                          ph, pw, self._native_threads(dcols.size))
            return dx
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
        flips = min(kh - 1 - padding[0], kw - 1 - padding[1]) >= 0  # dx as a correlation
        if self._shifts(x, stride, c) and (not input_grad
                                           or (o >= self.SHIFT_MIN_CHANNELS and flips)):
            return self._backprop_shifted(dy, x, weight, padding, bias, input_grad)
        if self._direct(x, stride, c, o) and flips:
            return self._backprop_direct(dy, x, weight, padding, bias, input_grad)
        w2 = weight.reshape(o, -1)
        ph, pw = kh - 1 - padding[0], kw - 1 - padding[1]
        # the correlation reads an O-channel image padded by k - 1 - p; col2im writes and
        # adds up C kh kw runs per output pixel: about twice the cost per element
        correlate = input_grad and (tuple(stride) == (1, 1) and ph >= 0 and pw >= 0
                                    and o * x_shape[2] * (x_shape[3] + kw - 1)
                                    <= 2 * c * ho * wo)
        gather = input_grad and not correlate
        dx = np.empty(x_shape, dtype=dy.dtype) if gather else None
        vec = self._vec(x, stride, c, o) and o in self.VEC_DWEIGHT_OUT  # dweight by loops
        width = x_shape[3] + 2 * padding[1] if tuple(stride) == (1, 1) else wo

        def block(b: slice) -> Array | None:
            cols = None if vec else self._columns(x[b], (kh, kw), stride, padding)[0]
            # dy laid out as the GEMM's output was, zero in the columns forward dropped
            dy2 = self._scratch("product", (o, b.stop - b.start, ho, width), dy.dtype)
            dy2[..., wo:] = 0
            dy2[..., :wo] = dy[b].transpose(1, 0, 2, 3)
            dy2 = dy2.reshape(o, -1)
            # dweight^T = cols dy^T: OpenBLAS runs this orientation a third faster than
            # dy cols^T (1.2 -> 0.8 ms for a 32 x 288 x 3264 block on one thread)
            dweight_t = None if vec else cols @ dy2.T
            if gather:  # dcols = weight^T dy, over the block's columns (no longer needed)
                if cols is None:
                    cols = self._scratch("columns", (w2.shape[1], dy2.shape[1]), dy.dtype)
                dcols = np.matmul(w2.T, dy2, out=cols)
                shape = (b.stop - b.start, *x_shape[1:])
                dx[b] = (self._uncolumns(dcols, shape, (kh, kw), padding)
                         if tuple(stride) == (1, 1) else
                         self.col2im(dcols, shape, (kh, kw), stride, padding))
            return dweight_t
        blocks = self._blocks(x_shape, weight, stride, padding)
        if vec:
            if gather:
                self._over_blocks(blocks, block)
            dweight = self._vec_dweight(dy, x, weight, padding)
        else:
            dweight = sum(self._over_blocks(blocks, block)).T.reshape(weight.shape)
        dbias = self.conv_bias_grad(dy) if bias else None
        if correlate:
            # dx[n, c, h, w] = sum_{o,i,j} weight[o, c, i, j] dy[n, o, h + p - i, w + p - j]:
            # a correlation of dy, padded by k - 1 - p, with the flipped, transposed kernel
            flipped = np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
            dx = self.conv2d(dy, flipped, None, (1, 1), (ph, pw))[0]
        return dx, dweight, dbias

    # -- stride-1 convolutions as shifted GEMMs ------------------------------------------
    # A stride-1 correlation over images padded to (Hp, Wp), laid out channel-major as
    # xc (C, N Hp Wp), is y (O, N Hp Wp) = sum over offsets (i, j) of
    # weight[:, :, i, j] (O, C) @ xc[:, i Wp + j:][:, :N Hp Wp]: kh kw GEMMs that read shifted
    # windows of ONE copy of the input and sum into one output (beta = 1, through
    # :mod:`.blas`), instead of a column matrix kh kw times the input's size. Outputs past
    # (Ho, Wo) in each padded image are computed and dropped; the shifted windows of the last
    # image read a tail of zeros. The input gradient is the same correlation of dy (padded by
    # k - 1 - p) with the flipped kernel. For float32 with the compiled library the whole sum
    # over taps is one call (:meth:`_correlate`) and the weight gradient the packed GEMM with
    # the shifted runs as rows; otherwise the weight gradient takes columns, a block of them
    # at a time, copied from xc as kh kw contiguous runs per channel.

    #: shifted GEMMs from this many channels on (C for forward and the weight gradient, O
    #: for the input gradient): each GEMM's inner dimension is one of them
    SHIFT_MIN_CHANNELS = 8
    #: the samples of one block of the shifted convolution (:meth:`_over_samples`): its
    #: channel-major copies of the input and output take at most this many bytes each, the
    #: L2 cache's size (the bn workload's second convolution, forward and backward on 2
    #: threads: 18.5 and 41 ms with 2 MiB blocks, 20 and 44 with 8 MiB, 33 and 77 as one
    #: block of the whole batch)
    SHIFT_BLOCK_BYTES = _l2_cache_bytes()

    def _shifts(self, x: Array, stride: Sequence[int], channels: int) -> bool:
        return (blas.BLAS is not None and tuple(stride) == (1, 1)
                and channels >= self.SHIFT_MIN_CHANNELS and x.dtype in (np.float32, np.float64))

    def _over_samples(self, n: int, per_sample: int, fn: Callable[[slice], Any]) -> list[Any]:
        """``fn`` over blocks of samples (at most :attr:`SHIFT_BLOCK_BYTES` per buffer),
        the blocks shared among threads, each thread's GEMMs on one BLAS thread; the results
        in block order. One BLAS thread per gpunet thread (NumPy's BLAS is set to one thread
        when the compiled pool starts, :mod:`.native`): with NumPy's BLAS threading each GEMM
        instead, its workers spin after every GEMM on the cores that the copies in between
        need (the bn workload's transposes took 7 ms instead of 1.7 next to them). Without
        the compiled pool, or a BLAS whose count gpunet cannot set, the blocks run in turn."""
        step = max(1, self.SHIFT_BLOCK_BYTES // max(per_sample, 1))
        return self._over_blocks([slice(s, min(s + step, n)) for s in range(0, n, step)], fn)

    def _over_blocks(self, blocks: list[slice], fn: Callable[[slice], Any]) -> list[Any]:
        """:meth:`_over_samples` over the given blocks."""
        if native.library() is None or blas.BLAS is None or blas.BLAS.local_threads is None:
            return [fn(b) for b in blocks]  # NumPy's BLAS keeps its threads: blocks in turn

        def part(s: slice) -> list[Any]:
            return [fn(blocks[i]) for i in range(s.start, s.stop)]
        return [r for rs in self._split(len(blocks), self.PARALLEL_MIN, part) for r in rs]

    def _channel_major(self, name: str, x: Array, at: Sequence[int], size: Sequence[int],
                       tail: int) -> Array:
        """``x (N, C, H, W)`` as ``(C, N Hp Wp + tail)`` in scratch ``name``: each image at
        row and column ``at`` of a ``size = (Hp, Wp)`` frame of zeros, ``tail`` zeros after
        the last; split over channels among threads."""
        n, c, h, w = x.shape
        (top, left), (hp, wp) = at, size
        buf = self._scratch(name, (c, n * hp * wp + tail), x.dtype)
        if native.usable(x):
            native.library().to_channel_major_mt(x.ctypes.data, buf.ctypes.data, n, c, h, w,
                                                 top, left, hp, wp, tail,
                                                 self._native_threads(buf.size))
            return buf

        def part(s: slice) -> None:
            img = buf[s, :n * hp * wp].reshape(-1, n, hp, wp)
            img[:, :, :top] = 0
            img[:, :, top + h:] = 0
            img[:, :, top:top + h, :left] = 0
            img[:, :, top:top + h, left + w:] = 0
            buf[s, n * hp * wp:] = 0
            img[:, :, top:top + h, left:left + w] = x[:, s].transpose(1, 0, 2, 3)
        self._parallel(buf, part)
        return buf

    @staticmethod
    def _spare() -> int:
        """Columns the channel-major buffers keep past their last shifted run for
        :meth:`_correlate`'s compiled kernel, which computes its last block of pixels whole."""
        return native.library().correlate_spare() if native.library() is not None else 0

    @staticmethod
    def _taps(weight: Array) -> Array:
        """``weight (O, C, kh, kw)`` as :meth:`_correlate` takes it, ``(kh, kw, C, O)``: laid
        out once per convolution, not per block of samples."""
        return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))

    def _correlate(self, xc: Array, taps: Array, wp: int, out: Array) -> None:
        """``out (O, L) = sum_ij taps[i, j]^T @ xc[:, i wp + j:][:, :L]`` (``taps`` from
        :meth:`_taps`): for float32, one compiled call that keeps blocks of ``out`` in
        registers over all taps (``correlate`` in kernels/cpu.cpp; a block of the bn
        workload's second convolution on one Zen 3 core: 85 GFLOP/s, against 63 for one BLAS
        GEMM per tap), else one BLAS GEMM per tap."""
        kh, kw, c, o = taps.shape
        length = out.shape[1]
        if (native.usable(xc, out, taps) and native.gemm_kernels()
                and xc.shape[1] >= length + (kh - 1) * wp + kw - 1 + self._spare()):
            native.library().correlate_mt(xc.ctypes.data, xc.shape[1], taps.ctypes.data, o, c,
                                          kh, kw, wp, out.ctypes.data, length,
                                          self._native_threads(out.size * c * kh * kw))
            return
        for i in range(kh):
            for j in range(kw):
                start = i * wp + j
                blas.BLAS.gemm(taps[i, j], xc[:, start:start + length], out,
                               beta=0.0 if i == j == 0 else 1.0, trans_a=True)

    def _from_channel_major(self, out: Array, frame: Sequence[int], y: Array,
                            bias: Array | None = None) -> None:
        """``y (N, O, Ho, Wo)`` from ``out (O, N Hp Wp)``: the top-left ``Ho x Wo`` of each
        frame (plus ``bias`` per channel, in the same pass), split over samples."""
        n, o, ho, wo = y.shape
        if native.usable(out, y) and (bias is None or bias.dtype == np.float32):
            b = None if bias is None else self._f32(bias)[0]
            native.library().from_channel_major_mt(out.ctypes.data, y.ctypes.data, n, o, *frame,
                                                   ho, wo, None if b is None else b.ctypes.data,
                                                   self._native_threads(y.size))
            return
        src = out.reshape(o, n, *frame)[:, :, :ho, :wo]

        def part(s: slice) -> None:
            if bias is None:
                y[s] = src[:, s].transpose(1, 0, 2, 3)
            else:
                np.add(src[:, s].transpose(1, 0, 2, 3), bias.reshape(1, o, 1, 1), out=y[s])
        self._parallel(y, part)

    def _conv_shifted(self, x: Array, weight: Array, bias: Array | None,
                      padding: Sequence[int]) -> Array:
        (n, c, h, w), (o, _, kh, kw) = x.shape, weight.shape
        hp, wp = h + 2 * padding[0], w + 2 * padding[1]
        y = np.empty((n, o, hp - kh + 1, wp - kw + 1), dtype=x.dtype)

        taps = self._taps(weight)

        def block(b: slice) -> None:
            xc = self._channel_major("padded", x[b], padding, (hp, wp),
                                     (kh - 1) * wp + kw - 1 + self._spare())
            out = self._scratch("product", (o, (b.stop - b.start) * hp * wp), x.dtype)
            self._correlate(xc, taps, wp, out)
            self._from_channel_major(out, (hp, wp), y[b], bias)
        self._over_samples(n, max(c, o) * hp * wp * x.itemsize, block)
        return y

    # -- direct convolutions: few channels, compiled loops ---------------------------------
    #: a stride-1 float32 convolution with at most this many input times output channels
    #: runs as compiled loops over shifted rows (kernels/cpu.cpp), no column matrix: LeNet's
    #: first convolution (1 -> 6 channels, 5x5), forward 1.31 -> 0.92 ms on one thread and
    #: weight gradient 1.84 -> 1.28 ms; at 3 -> 32 or 6 -> 16 channels the loops lost to the
    #: column GEMM by 3-4x, so the threshold stays low
    DIRECT_MAX_CHANNELS = 16

    def _direct(self, x: Array, stride: Sequence[int], c: int, o: int) -> bool:
        return (tuple(stride) == (1, 1) and c * o <= self.DIRECT_MAX_CHANNELS
                and native.usable(x))

    def _conv_direct(self, x: Array, weight: Array, bias: Array | None,
                     padding: Sequence[int]) -> Array:
        (n, c, h, w), (o, _, kh, kw), (ph, pw) = x.shape, weight.shape, padding
        y = np.empty((n, o, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1), np.float32)
        wt = np.ascontiguousarray(weight, np.float32)
        b = None if bias is None else np.ascontiguousarray(bias, np.float32)
        native.library().conv_direct_forward_mt(
            x.ctypes.data, wt.ctypes.data, None if b is None else b.ctypes.data, y.ctypes.data,
            n, c, h, w, o, kh, kw, ph, pw, self._native_threads(y.size * c * kh * kw))
        return y

    def _backprop_direct(self, dy: Array, x: Array, weight: Array, padding: Sequence[int],
                         bias: bool, input_grad: bool) -> tuple[Array | None, Array, Array | None]:
        (n, c, h, w), (o, _, kh, kw), (ph, pw) = x.shape, weight.shape, padding
        dy = np.ascontiguousarray(dy, np.float32)
        dweight = np.empty(weight.shape, np.float32)
        native.library().conv_direct_dweight_mt(x.ctypes.data, dy.ctypes.data,
                                                dweight.ctypes.data, n, c, h, w, o, kh, kw, ph,
                                                pw, self._native_threads(dy.size * c * kh * kw))
        dx = None
        if input_grad:  # the correlation of dy, padded by k - 1 - p, with the flipped kernel
            flipped = np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
            dx = self._conv_direct(dy, flipped, None, (kh - 1 - ph, kw - 1 - pw))
        return dx, dweight, self.conv_bias_grad(dy) if bias else None

    #: output channel counts of the loops vectorised across output channels (a template
    #: each in kernels/cpu.cpp), taken for stride 1 under SHIFT_MIN_CHANNELS input channels
    #: (where the direct loops are not): LeNet's second convolution (6 -> 16, 5x5) forward
    #: 1.30 -> 0.22 ms and weight gradient 1.26 -> 0.43 ms on 2 threads, the bn workload's
    #: first (3 -> 32, 3x3) forward 4.1 -> 2.0 ms
    VEC_OUT = (6, 8, 16, 32)
    #: ... and for the weight gradient: at 32 the loops were no faster than the columns
    VEC_DWEIGHT_OUT = (6, 8, 16)

    def _vec(self, x: Array, stride: Sequence[int], c: int, o: int) -> bool:
        return (tuple(stride) == (1, 1) and o in self.VEC_OUT and c < self.SHIFT_MIN_CHANNELS
                and native.usable(x))

    def _conv_vec(self, x: Array, weight: Array, bias: Array | None,
                  padding: Sequence[int]) -> Array:
        (n, c, h, w), (o, _, kh, kw), (ph, pw) = x.shape, weight.shape, padding
        y = np.empty((n, o, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1), np.float32)
        taps = np.ascontiguousarray(weight.transpose(1, 2, 3, 0), np.float32)  # (C, kh, kw, O)
        b = None if bias is None else np.ascontiguousarray(bias, np.float32)
        native.library().conv_vec_forward_mt(
            x.ctypes.data, taps.ctypes.data, None if b is None else b.ctypes.data,
            y.ctypes.data, n, c, h, w, o, kh, kw, ph, pw,
            self._native_threads(y.size * c * kh * kw))
        return y

    def _vec_dweight(self, dy: Array, x: Array, weight: Array, padding: Sequence[int]) -> Array:
        (n, c, h, w), (o, _, kh, kw) = x.shape, weight.shape
        dy = np.ascontiguousarray(dy, np.float32)
        taps = np.empty((c, kh, kw, o), np.float32)
        native.library().conv_vec_dweight_mt(x.ctypes.data, dy.ctypes.data, taps.ctypes.data, n,
                                             c, h, w, o, kh, kw, *padding,
                                             self._native_threads(dy.size * c * kh * kw))
        return np.ascontiguousarray(taps.transpose(3, 0, 1, 2))

    #: bytes of one block of the weight gradient's column matrix: half this machine's L2
    #: cache, so that the block is written and read by the GEMM there (1024 columns of a
    #: 32-channel 3x3 convolution on a 2 MiB L2: 6.4 ms of copies for the bn workload's
    #: second convolution on one thread, 8.1 with 2048 and 10.1 with 8192)
    DW_BLOCK_BYTES = _l2_cache_bytes() // 2

    def _backprop_shifted(self, dy: Array, x: Array, weight: Array, padding: Sequence[int],
                          bias: bool, input_grad: bool) -> tuple[Array | None, Array, Array | None]:
        (n, c, h, w), (o, _, kh, kw), (ho, wo) = x.shape, weight.shape, dy.shape[2:]
        (ph, pw), (qh, qw) = padding, (kh - 1 - padding[0], kw - 1 - padding[1])
        hp, wp = h + 2 * ph, w + 2 * pw
        tail = (kh - 1) * max(wp, wo + 2 * qw) + kw - 1 + self._spare()
        dx = np.empty(x.shape, dtype=dy.dtype) if input_grad else None
        # dy padded by k - 1 - p has x's padded frame when p = (k - 1) / 2 ("same"): one copy
        # of dy then serves both gradients, the weight's reading it from offset qh Wp + qw
        same = (qh, qw) == (ph, pw)
        flipped = self._taps(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))

        def block(b: slice) -> Array:
            nb = b.stop - b.start
            length = nb * hp * wp
            xc = self._channel_major("padded", x[b], padding, (hp, wp), tail)
            if input_grad:
                frame = (ho + 2 * qh, wo + 2 * qw)
                dyp = self._channel_major("dy", dy[b], (qh, qw), frame, tail)
            if input_grad and same:
                dyc = dyp[:, qh * wp + qw:][:, :length]
            else:  # dy at the top left of x's frames, zero past (Ho, Wo)
                dyc = self._channel_major("dy-aligned", dy[b], (0, 0), (hp, wp), 0)
            if (native.usable(xc) and native.gemm_kernels() and dyc.dtype == np.float32
                    and dyc.strides[1] == 4):
                dweight_t = np.empty((c * kh * kw, o), np.float32)  # compiled: no columns
                native.library().conv_dweight_mt(
                    xc.ctypes.data, xc.shape[1], dyc.ctypes.data, dyc.strides[0] // 4, o, c, kh,
                    kw, wp, length, dweight_t.ctypes.data,
                    self._native_threads(length * c * kh * kw * o))
            else:
                dweight_t = self._dweight_columns(xc, dyc, weight, wp, length)
            if input_grad:
                dxc = self._scratch("product", (c, nb * frame[0] * frame[1]), dy.dtype)
                self._correlate(dyp, flipped, frame[1], dxc)
                self._from_channel_major(dxc, frame, dx[b])
            return dweight_t
        dweight_t = sum(self._over_samples(n, max(c, o) * hp * wp * x.itemsize, block))
        dweight = np.ascontiguousarray(dweight_t.T).reshape(weight.shape)
        return dx, dweight, self.conv_bias_grad(dy) if bias else None

    def _dweight_columns(self, xc: Array, dyc: Array, weight: Array, wp: int,
                         length: int) -> Array:
        """The weight gradient transposed, ``(C kh kw, O)``, of a block in channel-major
        layout: ``cols (C kh kw, m) dy^T (m, O)`` summed over runs of ``m`` columns copied
        out of ``xc`` (where :meth:`_backprop_shifted` has no compiled kernel)."""
        o, c, kh, kw = weight.shape
        dweight_t = np.zeros((c * kh * kw, o), dtype=weight.dtype)
        m = max(64, self.DW_BLOCK_BYTES // (c * kh * kw * xc.itemsize))
        cols = self._scratch("columns", (c, kh, kw, m), xc.dtype)
        for s in range(0, length, m):
            k = min(m, length - s)
            for i in range(kh):
                for j in range(kw):
                    cols[:, i, j, :k] = xc[:, s + i * wp + j:s + i * wp + j + k]
            blas.BLAS.gemm(cols.reshape(c * kh * kw, m)[:, :k], dyc[:, s:s + k],
                           dweight_t, beta=1.0, trans_b=True)
        return dweight_t

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
