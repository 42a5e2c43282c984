"""The generic backend: every operation a layer needs, written once against an array module.

:class:`Backend` with ``xp = numpy`` is the reference every other device is tested against;
the CPU, CUDA and emulated backends (``cpu.py``, ``cuda.py``, ``emulated.py`` beside this file)
subclass it and override only what they do better. Layers never call NumPy or CuPy for
computation; they call these methods, so the same layer code runs on every device.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence, TypeVar

import numpy as np

from .. import rng

Array = Any  # numpy.ndarray or cupy.ndarray

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

F = TypeVar("F", bound=Callable[..., Any])
_HOST = nullcontext()  # the host has no current device: one reusable do-nothing context


def is_device_array(a: Any) -> bool:
    """True for a CuPy array; tells without importing CuPy."""
    return type(a).__module__.split(".")[0] == "cupy"


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy copy (or view) of ``a``, wherever it lives."""
    return a.get() if is_device_array(a) else np.asarray(a)


def on_device(method: F) -> F:
    """Run ``method`` with ``self.device`` current (:meth:`Backend.scope`).

    This is how gpunet keeps a ``cuda:N`` device's work on GPU N. CuPy puts every new array
    (allocations, ``astype``, ``copy``, every arithmetic result) and every loaded kernel module
    on the calling thread's *current* device, whatever device the inputs live on. So each object
    that holds a device's arrays (the backend itself, layers, optimizers, the Trainer) runs its
    public methods under that device: correct by construction, not by a caller remembering to
    activate it, and cheap (a no-op context on the host)."""
    @functools.wraps(method)
    def scoped(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.device.scope():
            return method(self, *args, **kwargs)
    return scoped  # type: ignore[return-value]


class Pending:
    """An input error found on a device and not raised yet.

    A check such as "every label lies in [0, C)" is cheap on a GPU, but reading its outcome
    back makes the host wait for the device on every step. So a layer or loss flags the error
    on the device (:meth:`flag`: whether any entry was bad, and the first bad one) and raises
    it at :meth:`take`, when the host reads anyway: the Trainer takes pending errors when a
    loss turns out not to be finite (``poisoned`` turns the loss into NaN meanwhile). On the
    host devices reading is free, and :meth:`flag` raises at once."""

    def __init__(self) -> None:
        self._state: tuple[Array, Array, Callable[[Any], Exception]] | None = None

    def flag(self, ops: "Backend", bad: Array, values: Array,
             error: Callable[[Any], Exception]) -> None:
        """Record ``error(v)`` for the first ``v`` of ``values`` where ``bad`` holds (same
        shapes); raise it now on a host device."""
        if ops.on_host:
            if bool(bad.any()):
                raise error(values[bad].reshape(-1)[0].item())
            return
        any_bad, first = bad.any(), values.reshape(-1)[bad.reshape(-1).argmax()]
        if self._state is not None:  # the earliest error is the one to report
            first = ops.where(self._state[0], self._state[1], first)
            any_bad = any_bad | self._state[0]
        self._state = (any_bad, first, error)

    def poisoned(self, ops: "Backend", value: Array) -> Array:
        """``value``, or NaN in its place while an error is pending (so a loss built on it
        is not finite, and training stops where the error is taken)."""
        return value if self._state is None else ops.where(self._state[0], ops.xp.nan, value)

    def take(self) -> None:
        """Raise the pending error, if any (one read of the device), and forget it."""
        if self._state is None:
            return
        bad, value, error = self._state
        self._state = None
        if bool(bad):
            raise error(value.item())


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

    @property
    def device(self) -> "Backend":
        """The device itself (so :func:`on_device` applies to backends as to layers)."""
        return self

    @property
    def on_host(self) -> bool:
        """Whether this device's arrays are host memory, so reading one back costs nothing
        (``cpu``, ``emulated``); on a GPU each read waits for the device."""
        return True

    @property
    def label(self) -> str:
        """The name shown in reports: :attr:`name`, plus what stands in for a GPU, if anything."""
        return self.name

    def scope(self) -> ContextManager[Any]:
        """A context in which this device is the current one: new arrays and kernel modules
        land on it. Nothing to do on the host."""
        return _HOST

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


    # -- linear algebra and reductions ----------------------------------------------------
    def gemm(self, a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
        """``op(a) @ op(b)`` with ``op`` an optional transpose; one BLAS call, no copies."""
        return (a.T if trans_a else a) @ (b.T if trans_b else b)


    def gemm_acc(self, out: Array, a: Array, b: Array, trans_a: bool = False,
                 trans_b: bool = False) -> None:
        """``out += op(a) @ op(b)``, in place: how a layer adds a weight gradient."""
        out += self.gemm(a, b, trans_a, trans_b)

    def pack(self, b: Array) -> Any:
        """``b`` (K, N) laid out for many :meth:`gemm_packed` products with it on the right,
        as MKL's ``cblas_sgemm_pack`` or oneDNN's weight reorder: a recurrent layer packs
        ``W_h`` once per sequence and multiplies every step's state by it. Here ``b`` itself;
        a backend with a faster layout (the CPU's compiled GEMM) returns its own object,
        which only that backend's :meth:`gemm_packed` reads. Valid while ``b`` is unchanged."""
        return b

    def gemm_packed(self, a: Array, packed: Any, out: Array | None = None) -> Array:
        """``a @ b`` (M, N) for ``packed = pack(b)``; written into ``out`` where given (and
        returned), else a new array."""
        if out is None:
            return self.gemm(a, packed)
        return self.xp.matmul(a, packed, out=out)

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
    # Arrays are (N, C) or (N, C, H, W); per-channel vectors have shape (C,).
    @staticmethod
    def _per_channel(v: Array, ndim: int) -> Array:
        """``v`` of shape ``(C,)`` shaped to broadcast along axis 1 of an ``ndim`` array."""
        return v.reshape((1, -1) + (1,) * (ndim - 2))

    def channel_sum(self, x: Array) -> Array:
        """``sum(x)`` over every axis but axis 1."""
        return x.sum(axis=(0,) + tuple(range(2, x.ndim)))

    def channel_sq_dev(self, x: Array, mean: Array) -> Array:
        """``sum((x - mean)^2)`` over every axis but axis 1."""
        centred = x - self._per_channel(mean, x.ndim)
        return self.channel_dot(centred, centred)

    def batchnorm_apply(self, x: Array, mean: Array, scale: Array, shift: Array) -> Array:
        """``(x - mean) scale + shift`` per channel, as a fresh array."""
        y = x - self._per_channel(mean, x.ndim)
        y *= self._per_channel(scale, x.ndim)
        y += self._per_channel(shift, x.ndim)
        return y

    def channel_dot(self, a: Array, b: Array) -> Array:
        """``sum(a * b)`` over every axis but axis 1 of ``(N, C, ...)`` arrays, shape
        ``(C,)``, without the product array: dot products along each ``(n, c)`` row, then a
        sum over ``n``."""
        n, c = a.shape[:2]
        return self.xp.einsum("ncp,ncp->nc", a.reshape(n, c, -1), b.reshape(n, c, -1)).sum(axis=0)

    def batchnorm_backward(self, dy: Array, x: Array, mean: Array, invstd: Array,
                           gamma: Array, across: Any = None) -> tuple[Array, Array, Array]:
        """``(dx, dgamma, dbeta)`` of training-mode batch normalisation of ``x`` with shape
        ``(N, C)`` or ``(N, C, H, W)``; ``mean``, ``invstd`` and ``gamma`` have shape ``(C,)``.
        With ``xhat = (x - mean) * invstd`` and ``M`` values per channel:
        ``dx = gamma * invstd * (dy - sum(dy)/M - xhat * sum(dy * xhat)/M)``.
        ``across(sums, count)`` (synchronised batch statistics) turns this process's sums and
        count into those of all processes, in place, and returns the total count; dgamma and
        dbeta stay this process's own."""
        dbeta, sum_dy_centred = self._batchnorm_sums(dy, x, mean)
        dgamma = sum_dy_centred * invstd
        sum_dy, sum_dy_xhat, m = dbeta, dgamma, x.size // x.shape[1]
        if across is not None:
            sum_dy, sum_dy_xhat = dbeta.copy(), dgamma.copy()
            m = across([sum_dy, sum_dy_xhat], m)
        # dx = k dy + (-k invstd sum(dy xhat)/M) (x - mean) - k sum(dy)/M, k = gamma invstd:
        # per-channel coefficients, so two full-size arrays instead of a chain of temporaries
        k = gamma * invstd
        return (self._batchnorm_dx(dy, x, mean, k, -k * invstd * sum_dy_xhat / m, -k * sum_dy / m),
                dgamma, dbeta)

    def _batchnorm_sums(self, dy: Array, x: Array, mean: Array) -> tuple[Array, Array]:
        """``(sum(dy), sum(dy (x - mean)))`` per channel."""
        return self.channel_sum(dy), self.channel_dot(dy, x - self._per_channel(mean, x.ndim))

    def _batchnorm_dx(self, dy: Array, x: Array, mean: Array, k: Array, coef: Array,
                      shift: Array) -> Array:
        """``k dy + coef (x - mean) + shift`` per channel."""
        dx = self.batchnorm_apply(x, mean, coef, shift)
        dx += dy * self._per_channel(k, x.ndim)
        return dx

    # -- optimizer steps ------------------------------------------------------------------
    def sgd_update(self, w: Array, g: Array, buf: Array | None, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0, nesterov: bool = False) -> None:
        """One SGD step on ``w`` in place, as ``torch.optim.SGD`` (no dampening):
        ``g' = g + weight_decay w``; with a momentum buffer ``buf`` (updated in place)
        ``buf = momentum buf + g'`` and ``g' = g' + momentum buf`` (Nesterov) or ``buf``;
        ``w -= lr g'``."""
        if weight_decay:
            g = g + weight_decay * w
        if buf is not None:
            buf *= momentum
            buf += g  # starts at zero, so the first step leaves buf = g exactly, as torch does
            g = g + momentum * buf if nesterov else buf
        w -= lr * g

    # -- convolution and pooling over (N, C, H, W) ----------------------------------------
    # ``kernel``, ``stride`` and ``padding`` are (height, width) pairs; an output is
    # (Ho, Wo) = ((H + 2 ph - kh) // sh + 1, (W + 2 pw - kw) // sw + 1). Loops below run
    # over the kh * kw kernel offsets at most, never over pixels or samples.
    def pad2d(self, x: Array, padding: Sequence[int], value: float = 0.0) -> Array:
        """``x`` with ``padding = (ph, pw)`` rows and columns of ``value`` on each side
        (``x`` itself when there is none)."""
        ph, pw = padding
        if ph == 0 and pw == 0:
            return x
        n, c, h, w = x.shape
        out = self.xp.full((n, c, h + 2 * ph, w + 2 * pw), value, dtype=x.dtype)
        out[:, :, ph:ph + h, pw:pw + w] = x
        return out

    def im2col(self, x: Array, kernel: Sequence[int], stride: Sequence[int],
               padding: Sequence[int]) -> Array:
        """The column matrix of a convolution, ``(C kh kw, N Ho Wo)``, C-contiguous:
        ``cols[(c, i, j), (n, ho, wo)] = xpad[n, c, ho sh + i, wo sw + j]``. A strided view
        of the padded input (no copy) made contiguous in one copy."""
        (kh, kw), (sh, sw) = kernel, stride
        xpad = self.pad2d(x, padding)
        n, c, hp, wp = xpad.shape
        ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
        s = xpad.strides
        view = self.xp.lib.stride_tricks.as_strided(
            xpad, (c, kh, kw, n, ho, wo), (s[1], s[2], s[3], s[0], s[2] * sh, s[3] * sw))
        return self.xp.ascontiguousarray(view).reshape(c * kh * kw, n * ho * wo)

    def col2im(self, dcols: Array, x_shape: Sequence[int], kernel: Sequence[int],
               stride: Sequence[int], padding: Sequence[int]) -> Array:
        """The adjoint of :meth:`im2col`: ``dx[n, c, h, w]`` is the sum of the ``dcols``
        entries im2col copied from ``x[n, c, h, w]``. One strided slice-add per kernel offset
        (``kh kw`` of them) into a ``(C, N, Hp, Wp)`` buffer; no scatter."""
        n, c, h, w = x_shape
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        d = dcols.reshape(c, kh, kw, n, ho, wo)
        acc = self.xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=dcols.dtype)
        for i in range(kh):
            for j in range(kw):
                acc[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += d[:, i, j]
        return self.xp.ascontiguousarray(acc[:, :, ph:ph + h, pw:pw + w].transpose(1, 0, 2, 3))

    def conv_bias_grad(self, dy: Array) -> Array:
        """``dbias[o] = sum over n, ho, wo of dy[n, o, ho, wo]``."""
        return dy.sum(axis=(0, 2, 3))

    def conv2d(self, x: Array, weight: Array, bias: Array | None, stride: Sequence[int],
               padding: Sequence[int]) -> tuple[Array, Array]:
        """``(y, cols)``: the cross-correlation ``y[n, o] = sum_{c,i,j} weight[o, c, i, j]
        xpad[n, c, ho sh + i, wo sw + j] + bias[o]`` of ``x (N, C, H, W)`` with ``weight
        (O, C, kh, kw)``, as ONE GEMM ``weight (O, C kh kw) @ cols (C kh kw, N Ho Wo)``;
        ``cols`` (:meth:`im2col`) is what the backward pass needs."""
        n, o = x.shape[0], weight.shape[0]
        cols = self.im2col(x, weight.shape[2:], stride, padding)
        ho = (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
        wo = cols.shape[1] // (n * ho)
        y = self.gemm(weight.reshape(o, -1), cols)
        if bias is not None:
            y += bias.reshape(o, 1)
        return self.xp.ascontiguousarray(y.reshape(o, n, ho, wo).transpose(1, 0, 2, 3)), cols

    def backprop_conv2d(self, dy: Array, cols: Array, x_shape: Sequence[int], weight: Array,
                        stride: Sequence[int], padding: Sequence[int], bias: bool = True,
                        input_grad: bool = True) -> tuple[Array | None, Array, Array | None]:
        """``(dx, dweight, dbias)`` of :meth:`conv2d`: ``dweight = dy (O, N Ho Wo) @ cols^T``
        (one GEMM), ``dx = col2im(weight^T @ dy)`` (one GEMM and the gather),
        ``dbias = conv_bias_grad(dy)``. ``dx`` is None without ``input_grad``, ``dbias``
        without ``bias``."""
        o = weight.shape[0]
        dy2 = self.xp.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(o, -1)
        dweight = self.gemm(dy2, cols, trans_b=True).reshape(weight.shape)
        dbias = self.conv_bias_grad(dy) if bias else None
        if not input_grad:
            return None, dweight, dbias
        dcols = self.gemm(weight.reshape(o, -1), dy2, trans_a=True)
        return self.col2im(dcols, x_shape, weight.shape[2:], stride, padding), dweight, dbias

    @staticmethod
    def _window(k: int, kernel: Sequence[int], stride: Sequence[int], out: Sequence[int]
                ) -> tuple[slice, slice, slice, slice]:
        """The strided slice of a padded input that kernel offset ``k = i kw + j`` reads
        from every window."""
        i, j = divmod(k, kernel[1])
        return (slice(None), slice(None), slice(i, i + stride[0] * (out[0] - 1) + 1, stride[0]),
                slice(j, j + stride[1] * (out[1] - 1) + 1, stride[1]))

    @staticmethod
    def _pool_out(shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int]) -> tuple[int, int]:
        return ((shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1,
                (shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1)

    def maxpool2d(self, x: Array, kernel: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int]) -> tuple[Array, Array]:
        """``(y, index)``: the maximum of each window of ``x`` padded with -inf, and
        ``index`` (int32, the shape of ``y``), the kernel offset ``i kw + j`` of the window's
        first maximum in row-major order (later ties never win). A knockout tournament over
        the offsets' strided views: neighbours meet pairwise, the later one winning only when
        strictly greater, so ``log2(kh kw)`` rounds of whole-array operations replace
        ``kh kw`` rounds of masked copies. With NaN in a window the winner is unspecified."""
        out = self._pool_out(x.shape, kernel, stride, padding)
        xpad = self.pad2d(x, padding, -np.inf)
        entries = [(xpad[self._window(k, kernel, stride, out)], np.int32(k))
                   for k in range(kernel[0] * kernel[1])]
        while len(entries) > 1:
            merged = []
            for (a, index_a), (b, index_b) in zip(entries[0::2], entries[1::2]):
                better = b > a  # arithmetic, not where(): four times faster on strided views
                merged.append((self.xp.maximum(a, b), index_a + better * (index_b - index_a)))
            entries = merged + entries[len(merged) * 2:]
        y, index = entries[0]
        if kernel[0] * kernel[1] == 1:  # no round was played: y is a view, index a scalar
            y, index = y.copy(), self.xp.zeros(y.shape, dtype=np.int32)
        return y, index

    def backprop_maxpool2d(self, dy: Array, index: Array, x_shape: Sequence[int],
                           kernel: Sequence[int], stride: Sequence[int],
                           padding: Sequence[int]) -> Array:
        """``dx`` of :meth:`maxpool2d`: each window's gradient goes to its first maximum;
        an element that is the maximum of several (overlapping) windows gets their sum."""
        n, c, h, w = x_shape
        (ph, pw), out = padding, dy.shape[2:]
        acc = self.xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dy.dtype)
        for k in range(kernel[0] * kernel[1]):
            acc[self._window(k, kernel, stride, out)] += dy * (index == k)
        return self.xp.ascontiguousarray(acc[:, :, ph:ph + h, pw:pw + w])

    def avgpool2d(self, x: Array, kernel: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int]) -> Array:
        """The mean of each window of ``x`` padded with zeros; padded positions count in the
        divisor ``kh kw`` (PyTorch's ``count_include_pad=True``)."""
        (kh, kw), (ho, wo) = kernel, self._pool_out(x.shape, kernel, stride, padding)
        xpad = self.pad2d(x, padding)
        scale = 1.0 / (kh * kw)
        if tuple(stride) == tuple(kernel):  # tiling windows: one reduction over a reshape
            n, c = x.shape[:2]
            tiles = xpad[:, :, :ho * kh, :wo * kw].reshape(n, c, ho, kh, wo, kw)
            return tiles.sum(axis=(3, 5)) * scale
        y = xpad[self._window(0, kernel, stride, (ho, wo))].copy()
        for k in range(1, kh * kw):
            y += xpad[self._window(k, kernel, stride, (ho, wo))]
        y *= scale
        return y

    def backprop_avgpool2d(self, dy: Array, x_shape: Sequence[int], kernel: Sequence[int],
                           stride: Sequence[int], padding: Sequence[int]) -> Array:
        """``dx`` of :meth:`avgpool2d`: every element of a window gets its ``dy / (kh kw)``."""
        n, c, h, w = x_shape
        (kh, kw), (ph, pw), (ho, wo) = kernel, padding, dy.shape[2:]
        g = dy * (1.0 / (kh * kw))
        acc = self.xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dy.dtype)
        if tuple(stride) == tuple(kernel):
            acc[:, :, :ho * kh, :wo * kw] = self.upscale2d(g, (kh, kw))
        else:
            for k in range(kh * kw):
                acc[self._window(k, kernel, stride, (ho, wo))] += g
        return self.xp.ascontiguousarray(acc[:, :, ph:ph + h, pw:pw + w])

    def upscale2d(self, x: Array, scale: Sequence[int]) -> Array:
        """Nearest-neighbour upsampling by ``scale = (sh, sw)``:
        ``y[n, c, i, j] = x[n, c, i // sh, j // sw]``, C-contiguous."""
        n, c, h, w = x.shape
        sh, sw = scale
        return self.xp.broadcast_to(x[:, :, :, None, :, None], (n, c, h, sh, w, sw)).reshape(
            n, c, h * sh, w * sw)

    def backprop_upscale2d(self, dy: Array, scale: Sequence[int]) -> Array:
        """``dx`` of :meth:`upscale2d`: the sum of each ``sh x sw`` block of ``dy``."""
        n, c, h, w = dy.shape
        sh, sw = scale
        return dy.reshape(n, c, h // sh, sh, w // sw, sw).sum(axis=(3, 5))

    # -- transposed convolution: a convolution's passes in the other order ----------------
    # The transposed convolution of x (N, C, H, W) with weight (C, O, kh, kw) is the input
    # gradient of the convolution conv2d(y, weight) of a y of its output's shape, weight read
    # as (out C, in O, kh, kw); its backward is that convolution's forward (dx) and weight
    # gradient (dweight, with x in the role of the output gradient). So it is written with
    # the conv operations above and every device runs its own: blocked on the CPU, kernels
    # (im2col, col2im, the bias sum) on CUDA and the emulator.
    def conv2d_saved(self, x: Array, kernel: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int]) -> Array:
        """What :meth:`conv2d` of ``x`` returns for :meth:`backprop_conv2d` (its second
        value), without computing the convolution: the column matrix :meth:`im2col`."""
        return self.im2col(x, kernel, stride, padding)

    def conv_transpose2d(self, x: Array, weight: Array, bias: Array | None,
                         stride: Sequence[int], padding: Sequence[int],
                         output_padding: Sequence[int]) -> Array:
        """``y[n, o, h sh + i - ph, w sw + j - pw] += weight[c, o, i, j] x[n, c, h, w]``
        summed over ``c, h, w, i, j`` (entries that land outside ``y`` dropped), plus
        ``bias[o]``: shape ``(N, O, Ho, Wo)``, ``Ho = (H - 1) sh - 2 ph + kh + oph`` (likewise
        ``Wo``). The input gradient of ``conv2d(y, weight)``: ONE GEMM
        ``weight^T (O kh kw, C) @ x (C, N H W)`` and :meth:`col2im`."""
        n, c, h, w = x.shape
        o, kh, kw = weight.shape[1:]
        ho = (h - 1) * stride[0] - 2 * padding[0] + kh + output_padding[0]
        wo = (w - 1) * stride[1] - 2 * padding[1] + kw + output_padding[1]
        x2 = self.xp.ascontiguousarray(x.transpose(1, 0, 2, 3)).reshape(c, -1)
        dcols = self.gemm(weight.reshape(c, -1), x2, trans_a=True)
        y = self.col2im(dcols, (n, o, ho, wo), (kh, kw), stride, padding)
        if bias is not None:
            y += bias.reshape(1, o, 1, 1)
        return y

    def backprop_conv_transpose2d(self, dy: Array, x: Array, weight: Array,
                                  stride: Sequence[int], padding: Sequence[int],
                                  bias: bool = True, input_grad: bool = True
                                  ) -> tuple[Array | None, Array, Array | None]:
        """``(dx, dweight, dbias)`` of :meth:`conv_transpose2d`: ``dx = conv2d(dy, weight)``
        (the correlation), ``dweight`` the weight gradient :meth:`backprop_conv2d` of that
        convolution given ``x`` as its output gradient, ``dbias = conv_bias_grad(dy)``. ``dx``
        is None without ``input_grad`` (only ``dy``'s columns are made then), ``dbias``
        without ``bias``."""
        kernel = weight.shape[2:]
        if input_grad:
            dx, saved = self.conv2d(dy, weight, None, stride, padding)
        else:
            dx, saved = None, self.conv2d_saved(dy, kernel, stride, padding)
        dweight = self.backprop_conv2d(x, saved, dy.shape, weight, stride, padding,
                                       bias=False, input_grad=False)[1]
        return dx, dweight, self.conv_bias_grad(dy) if bias else None

    # -- randomness (drawn on the host so every device sees the same numbers) -------------
    def dropout_mask(self, shape: Sequence[int], p: float, dtype: Any) -> Array:
        """Inverted-dropout mask: 0 with probability ``p``, else ``1/(1-p)``."""
        keep = rng.generator().random(shape) >= p
        return self.asarray((keep / (1 - p)).astype(dtype))

    # -- LSTM: the pointwise work of one time step (kernels/lstm.cu on CUDA and emulated) --
    def empty(self, shape: Sequence[int] | int, dtype: Any = np.float32) -> Array:
        """An uninitialised array to be filled (the emulated device fills it with NaN)."""
        return self.xp.empty(shape, dtype=dtype)

    def lstm_cell_forward(self, xg: Array, hg: Array, c_prev: Array, acts: Array, c: Array,
                          h: Array) -> None:
        """One LSTM step, written into the preallocated ``acts``, ``c`` and ``h``.

        ``xg`` and ``hg``: ``(N, 4H)`` pre-activations from the input (bias included) and the
        recurrent projection, gates in the order i, f, g, o; ``c_prev``, ``c``, ``h``:
        ``(N, H)``. ``acts = [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)]`` (of
        ``xg + hg``), ``c = f c_prev + i g``, ``h = o tanh(c)``. Outputs are C-contiguous
        (views of the layer's per-sequence buffers), so nothing is copied."""
        xp, n = self.xp, c.shape[-1]
        xp.add(xg, hg, out=acts)
        sig = (acts[:, :2 * n], acts[:, 3 * n:])  # i, f and o
        for a in sig:  # sigmoid(z) = (1 + tanh(z/2)) / 2: one tanh for all four gates
            a *= 0.5
        xp.tanh(acts, out=acts)
        for a in sig:
            a *= 0.5
            a += 0.5
        i, f, g, o = acts[:, :n], acts[:, n:2 * n], acts[:, 2 * n:3 * n], acts[:, 3 * n:]
        xp.multiply(i, g, out=h)  # h serves as scratch for i g
        xp.multiply(f, c_prev, out=c)
        c += h
        xp.tanh(c, out=h)
        h *= o

    def lstm_sequence_forward(self, xg: Array, w_h: Any, hs: Array, cs: Array,
                              acts: Array) -> None:
        """The LSTM's recurrence over all ``T`` steps, in place: for each ``t``,
        ``hg = hs[t] @ W_h^T`` (``w_h = pack(W_h^T)``, :meth:`pack`) and
        :meth:`lstm_cell_forward` of ``xg[t]``, ``hg`` and ``cs[t]`` into ``acts[t]``,
        ``cs[t + 1]`` and ``hs[t + 1]``. ``xg``, ``acts``: ``(T, N, 4H)``, the inputs'
        projections (bias included) and the activated gates; ``hs``, ``cs``: ``(T + 1, N, H)``,
        entry 0 the initial state. One call per sequence, as cuDNN's RNN, so that a backend
        may run the whole loop in compiled code (the CPU's)."""
        hg = self.empty(acts.shape[1:], acts.dtype)
        for t in range(xg.shape[0]):
            self.gemm_packed(hs[t], w_h, out=hg)
            self.lstm_cell_forward(xg[t], hg, cs[t], acts[t], cs[t + 1], hs[t + 1])

    def lstm_sequence_backward(self, dy: Array, dh: Array, dc: Array, acts: Array, cs: Array,
                               w_h: Any, dz: Array) -> tuple[Array, Array]:
        """The backward of :meth:`lstm_sequence_forward`, from the last step: for each ``t``,
        :meth:`lstm_cell_backward` into ``dz[t]`` ``(N, 4H)``, then the gradient reaching
        ``h_{t-1}`` from the recurrence, ``dz[t] @ W_h`` (``w_h = pack(W_h)``). ``dy``
        ``(T, N, H)``: the gradient of every output; ``dh``, ``dc`` ``(N, H)``: those of the
        final state (only read). Returns the gradients of the initial state, ``(dh_0, dc_0)``."""
        batch, h = dh.shape
        dc_bufs = (self.empty((batch, h), dz.dtype), self.empty((batch, h), dz.dtype))
        dh_buf = self.empty((batch, h), dz.dtype)  # never the caller's dh_T: it is only read
        for k, t in enumerate(reversed(range(dy.shape[0]))):
            dc_prev = dc_bufs[k % 2]  # never the caller's dc_T, nor the dc being read
            self.lstm_cell_backward(dy[t], dh, dc, acts[t], cs[t], cs[t + 1], dz[t], dc_prev)
            dh, dc = self.gemm_packed(dz[t], w_h, out=dh_buf), dc_prev
        return dh, dc

    def lstm_cell_backward(self, dy: Array, dh_rec: Array, dc_next: Array, acts: Array,
                           c_prev: Array, c: Array, dz: Array, dc_prev: Array) -> None:
        """The backward pass of :meth:`lstm_cell_forward`, written into the preallocated
        ``dz`` ``(N, 4H)`` (gradients of the gate pre-activations) and ``dc_prev`` ``(N, H)``.

        ``dh = dy + dh_rec`` (``dh_rec``: the gradient from step t+1, ``dz_{t+1} W_h``),
        ``tc = tanh(c)``, ``dc = dc_next + dh o (1 - tc^2)``; then ``dz_i = dc g i (1 - i)``,
        ``dz_f = dc c_prev f (1 - f)``, ``dz_g = dc i (1 - g^2)``, ``dz_o = dh tc o (1 - o)``
        and ``dc_prev = dc f``."""
        xp, n = self.xp, c.shape[-1]
        i, f, g, o = acts[:, :n], acts[:, n:2 * n], acts[:, 2 * n:3 * n], acts[:, 3 * n:]
        dz_i, dz_f, dz_g, dz_o = dz[:, :n], dz[:, n:2 * n], dz[:, 2 * n:3 * n], dz[:, 3 * n:]
        dh = dy + dh_rec
        tc = xp.tanh(c)
        xp.multiply(dh, tc, out=dz_o)
        dz_o *= o
        dz_o *= 1 - o
        dc = tc  # tc is not needed any more: dc = dc_next + dh o (1 - tc^2), in its place
        dc *= tc
        xp.subtract(1, dc, out=dc)
        dc *= o
        dc *= dh
        dc += dc_next
        xp.multiply(dc, g, out=dz_i)
        dz_i *= i
        dz_i *= 1 - i
        xp.multiply(dc, c_prev, out=dz_f)
        dz_f *= f
        dz_f *= 1 - f
        xp.multiply(dc, i, out=dz_g)
        dz_g *= 1 - g * g
        xp.multiply(dc, f, out=dc_prev)

    # -- attention: batched products over leading axes, and the causal mask ------------------
    def bmm(self, a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
        """``op(a) @ op(b)`` for each matrix of a batch: ``a (*, m, k)``, ``b (*, k, n)`` (after
        the optional transposes of their last two axes; leading axes broadcast), result
        ``(*, m, n)``. One batched BLAS call (cuBLAS on a GPU); transposes are views."""
        return self.xp.matmul(a.swapaxes(-1, -2) if trans_a else a,
                              b.swapaxes(-1, -2) if trans_b else b)

    def causal_mask(self, rows: int, cols: int) -> Array:
        """Boolean ``(rows, cols)``, True where ``j > i``: the keys after query ``i``, which a
        causal attention ignores. Made on this device, so nothing is uploaded."""
        xp = self.xp
        return xp.arange(cols)[None, :] > xp.arange(rows)[:, None]

    # -- layer normalisation over the rows of (R, M) data (kernels/layernorm.cu) ---------
    # Per-row vectors (mean, rstd) have shape (R,); weight and bias have shape (M,).
    def layernorm_forward(self, x: Array, weight: Array | None, bias: Array | None,
                          eps: float) -> tuple[Array, Array, Array]:
        """``(y, mean, rstd)`` of each row of ``x`` ``(R, M)`` normalised over its M values:
        ``mean`` and the biased ``var`` per row, ``rstd = 1 / sqrt(var + eps)``,
        ``y = (x - mean) * rstd * weight + bias`` (no scale or shift where None)."""
        mean = x.mean(axis=1)
        centred = x - mean[:, None]
        rstd = 1 / self.xp.sqrt((centred * centred).mean(axis=1) + eps)
        y = centred
        y *= rstd[:, None]
        if weight is not None:
            y *= weight
        if bias is not None:
            y += bias
        return y, mean, rstd

    def layernorm_backward(self, dy: Array, x: Array, mean: Array, rstd: Array,
                           weight: Array | None) -> tuple[Array, Array | None, Array | None]:
        """``(dx, dweight, dbias)`` of :meth:`layernorm_forward`. With
        ``xhat = (x - mean) * rstd`` and ``g = dy * weight`` (``dy`` without a weight):
        ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``, means over each row;
        ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` over the rows (both None
        without a weight: the layer has no parameters then)."""
        xhat = (x - mean[:, None]) * rstd[:, None]
        g = dy if weight is None else dy * weight
        dx = g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True)
        dx *= rstd[:, None]
        if weight is None:
            return dx, None, None
        return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)

    # -- embeddings: rows gathered by index, their gradients added back (kernels/embedding.cu)
    def embedding_backward(self, dweight: Array, indices: Array, dy: Array,
                           padding_idx: int | None = None) -> None:
        """Add row ``m`` of ``dy`` ``(M, D)`` into row ``indices[m]`` of ``dweight`` ``(V, D)``,
        in place, in order of ``m`` (an index used several times gets the sum); row
        ``padding_idx`` is left as it was. ``indices``: ``(M,)`` integers in ``[0, V)``."""
        kept = None if padding_idx is None else dweight[padding_idx].copy()
        self.xp.add.at(dweight, indices, dy)
        if kept is not None:
            dweight[padding_idx] = kept

    # -- GELU, and the error function it needs (kernels/gelu.cu) ----------------------------
    # W. J. Cody's rational Chebyshev approximations of erf and erfc ("Rational Chebyshev
    # approximations for the error function", Math. Comp. 23, 1969; netlib's CALERF): erf on
    # |x| <= 0.46875, erfc on (0.46875, 4] and on (4, inf). Within 4 ulp of erf in float64.
    _ERF_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
              3.20937758913846947e03, 1.85777706184603153e-1)
    _ERF_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
              2.84423683343917062e03)
    _ERF_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
              2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
              2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)
    _ERF_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
              1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
              3.43936767414372164e03, 1.23033935480374942e03)
    _ERF_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
              1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)
    _ERF_Q = (2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1,
              6.05183413124413191e-2, 2.33520497626869185e-3)
    #: sqrt(2 / pi) and the cubic coefficient of GELU's tanh approximation (PyTorch's)
    GELU_BETA, GELU_KAPPA = 0.7978845608028654, 0.044715

    @staticmethod
    def _cody_ratio(t: Array, num: Sequence[float], den: Sequence[float]) -> Array:
        """CALERF's rational function of ``t``: numerator coefficients ``num`` (the
        highest-order one last), denominator ``den`` (monic), by Horner's rule, in place."""
        n, d = num[-1] * t, t.copy()
        for a, b in zip(num[:-2], den[:-1]):
            n += a
            n *= t
            d += b
            d *= t
        n += num[-2]
        d += den[-1]
        n /= d
        return n

    def erf(self, x: Array) -> Array:
        """The error function ``erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt``, in
        ``x``'s dtype (NumPy has none). Every branch of Cody's approximation is computed for
        every element and the right one picked, so nothing waits on the data; ``|x|`` is
        capped at 27, where ``erfc`` is below the smallest float64."""
        xp = self.xp
        y = xp.minimum(xp.abs(x), 27.0)
        z = y * y
        small = x * self._cody_ratio(z, self._ERF_A, self._ERF_B)
        middle = self._cody_ratio(y, self._ERF_C, self._ERF_D)
        w = 1 / xp.maximum(z, 16.0)
        tail = (0.56418958354775628695 - w * self._cody_ratio(w, self._ERF_P, self._ERF_Q)
                ) / xp.maximum(y, 4.0)
        # erfc(y) = exp(-y^2) R(y), with y^2 split as s^2 + (y - s)(y + s), s = y rounded down
        # to 1/16: exp(-s^2) is then exact enough that the product keeps full precision
        s = xp.trunc(y * 16) / 16
        erfc = xp.where(y <= 4.0, middle, tail) * xp.exp(-s * s) * xp.exp(-(y - s) * (y + s))
        big = (0.5 - erfc) + 0.5
        return xp.where(y <= 0.46875, small, xp.where(x < 0, -big, big))

    def gelu(self, x: Array, approximate: str = "none") -> Array:
        """``x * Phi(x)`` with ``Phi`` the standard normal CDF: ``0.5 x (1 + erf(x/sqrt(2)))``;
        ``approximate="tanh"``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
        if approximate == "tanh":
            return 0.5 * x * (1 + self.xp.tanh(self.GELU_BETA * (x + self.GELU_KAPPA * x * x * x)))
        return 0.5 * x * (1 + self.erf(x * 0.7071067811865476))

    def backprop_gelu(self, dy: Array, x: Array, approximate: str = "none") -> Array:
        """``dx`` of :meth:`gelu`: ``dy (Phi(x) + x phi(x))``, ``phi`` the normal density;
        with ``"tanh"``, ``t = tanh(u)``: ``dy (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx)``,
        ``du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)``."""
        if approximate == "tanh":
            x2 = x * x
            t = self.xp.tanh(self.GELU_BETA * (x + self.GELU_KAPPA * x2 * x))
            du = self.GELU_BETA * (1 + 3 * self.GELU_KAPPA * x2)
            return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du)
        cdf = 0.5 * (1 + self.erf(x * 0.7071067811865476))
        pdf = self.xp.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)
        return dy * (cdf + x * pdf)
