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
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

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

    def empty(self, shape: Sequence[int] | int, dtype: Any = np.float32) -> Array:
        from .emulator import empty
        return empty(shape, dtype)  # all bytes 0xFF: NaN for floats, -1 for integers

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


def _cpu_threads() -> int:
    """Threads for the CPU device's element-wise work: ``$GPUNET_NUM_THREADS``, else the CPUs
    this process may run on."""
    value = os.environ.get("GPUNET_NUM_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise DeviceError(f"GPUNET_NUM_THREADS must be a positive integer, got {value!r}")
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
        dev = CpuBackend(np, "cpu")
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
