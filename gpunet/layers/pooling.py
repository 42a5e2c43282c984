"""Pooling and resampling over images ``(N, C, H, W)``: MaxPool2D, AvgPool2D, Subsampling2D,
Upscale2D and GlobalAvgPool2D."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ShapeError
from .base import Layer
from .conv import output_size, pair


class _Pool2D(Layer):
    """Windows ``kernel_size`` (int or pair) every ``stride`` (default: the kernel size) over
    the input padded by ``padding`` on each side (at most half the kernel, as in PyTorch, so
    every window holds a real element)."""

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0) -> None:
        super().__init__()
        self.kernel = pair(kernel_size, "kernel_size", self.name)
        self.stride = self.kernel if stride is None else pair(stride, "stride", self.name)
        self.padding = pair(padding, "padding", self.name, minimum=0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel)):
            raise ValueError(f"{self.name}: expected padding at most half the kernel size, "
                             f"got padding {self.padding} for kernel {self.kernel}")

    def _check(self, x: Any) -> tuple[int, ...]:
        """The output shape for input ``x``, or a clear error."""
        self.check_input(x, ndims=(4,))
        out = output_size(self, x.shape, self.kernel, self.stride, self.padding)
        return (x.shape[0], x.shape[1], *out)


class MaxPool2D(_Pool2D):
    """``y[n, c, p, q]`` = the maximum of the window at ``(p sh - ph, q sw - pw)``, padding
    counting as -inf, as PyTorch's ``MaxPool2d``. x ``(N, C, H, W)``, y ``(N, C, Ho, Wo)``,
    ``Ho = (H + 2 ph - kh) // sh + 1``; ``stride`` defaults to ``kernel_size``.

    >>> import numpy as np
    >>> pool = MaxPool2D(2)                          # 2 x 2 windows, stride 2
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> pool(x)[0, 0].tolist()
    [[5.0, 7.0], [13.0, 15.0]]
    >>> pool.backward(np.ones((1, 1, 2, 2), np.float32))[0, 0].tolist()  # dx: at the maxima
    [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]

    The gradient of each window goes to its FIRST maximum (row-major order within the
    window); with overlapping windows (stride < kernel) an element collects the gradients of
    every window it is the maximum of. Both directions are kernels on CUDA and the emulated
    device (``kernels/pooling.cu``)."""

    def forward(self, x: Any, training: bool | None = None) -> Any:
        shape = self._check(x)
        y, index = self.ops.maxpool2d(x, self.kernel, self.stride, self.padding)
        self.save_for_backward(index, tuple(x.shape), shape)
        return y

    def backward(self, dy: Any) -> Any:
        index, x_shape, y_shape = self.saved()
        self.check_grad(dy, y_shape)
        return self.ops.backprop_maxpool2d(dy, index, x_shape, self.kernel, self.stride,
                                           self.padding)


class AvgPool2D(_Pool2D):
    """``y[n, c, p, q]`` = the mean of the window at ``(p sh - ph, q sw - pw)`` over the
    zero-padded input, always divided by ``kh kw`` (PyTorch's default
    ``count_include_pad=True``). Each input element receives ``dy / (kh kw)`` of every window
    that holds it."""

    def forward(self, x: Any, training: bool | None = None) -> Any:
        shape = self._check(x)
        self.save_for_backward(tuple(x.shape), shape)
        return self.ops.avgpool2d(x, self.kernel, self.stride, self.padding)

    def backward(self, dy: Any) -> Any:
        x_shape, y_shape = self.saved()
        self.check_grad(dy, y_shape)
        return self.ops.backprop_avgpool2d(dy, x_shape, self.kernel, self.stride, self.padding)


class Subsampling2D(Layer):
    """The trainable subsampling of LeNet-1: average pooling over non-overlapping
    ``kernel_size`` windows with a learnable weight and bias per feature map,
    ``y[n, c] = weight[c] * avgpool(x)[n, c] + bias[c]``. Parameters ``weight`` (starts at 1)
    and ``bias`` (starts at 0), shape ``(channels,)``. Backward: ``dbias = sum(dy)``,
    ``dweight = sum(dy * avgpool(x))`` over ``n, p, q``, ``dx = avgpool^T(weight * dy)``."""

    def __init__(self, channels: int, kernel_size: Any) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"Subsampling2D: expected channels >= 1, got {channels}")
        self.channels = channels
        self.kernel = pair(kernel_size, "kernel_size", self.name)
        self.weight = self.add_param("weight", np.ones(channels))
        self.bias = self.add_param("bias", np.zeros(channels))

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x, ndims=(4,))
        if x.shape[1] != self.channels:
            raise ShapeError(f"{self.name}: expected input of shape (N, {self.channels}, H, W), "
                             f"got {tuple(x.shape)}")
        output_size(self, x.shape, self.kernel, self.kernel, (0, 0))
        pooled = self.ops.avgpool2d(x, self.kernel, self.kernel, (0, 0))
        self.save_for_backward(pooled, tuple(x.shape))
        return self.weight.data.reshape(1, -1, 1, 1) * pooled + self.bias.data.reshape(1, -1, 1, 1)

    def backward(self, dy: Any) -> Any:
        pooled, x_shape = self.saved()
        self.check_grad(dy, pooled.shape)
        self.bias.grad += self.ops.sum(dy, axis=(0, 2, 3))
        self.weight.grad += self.ops.sum(dy * pooled, axis=(0, 2, 3))
        return self.ops.backprop_avgpool2d(dy * self.weight.data.reshape(1, -1, 1, 1), x_shape,
                                           self.kernel, self.kernel, (0, 0))


class Upscale2D(Layer):
    """Nearest-neighbour upsampling by an integer ``scale``:
    ``y[n, c, i, j] = x[n, c, i // s, j // s]``, ``(N, C, H, W) -> (N, C, s H, s W)``. The
    gradient of ``x[n, c, i, j]`` is the sum of its ``s x s`` block of ``dy``."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
            raise ValueError(f"Upscale2D: expected scale to be an int >= 1, got {scale!r}")
        self.scale = scale

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x, ndims=(4,))
        s = self.scale
        self.save_for_backward((x.shape[0], x.shape[1], x.shape[2] * s, x.shape[3] * s))
        return self.ops.upscale2d(x, (s, s))

    def backward(self, dy: Any) -> Any:
        (y_shape,) = self.saved()
        self.check_grad(dy, y_shape)
        return self.ops.backprop_upscale2d(dy, (self.scale, self.scale))


class GlobalAvgPool2D(Layer):
    """The mean of each feature map: ``(N, C, H, W) -> (N, C)``, ready for ``Dense``. Each
    element receives ``dy[n, c] / (H W)``."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x, ndims=(4,))
        plane = (x.shape[2], x.shape[3])
        self.save_for_backward(tuple(x.shape))
        return self.ops.avgpool2d(x, plane, plane, (0, 0)).reshape(x.shape[0], x.shape[1])

    def backward(self, dy: Any) -> Any:
        (x_shape,) = self.saved()
        self.check_grad(dy, x_shape[:2])
        plane = (x_shape[2], x_shape[3])
        return self.ops.backprop_avgpool2d(dy.reshape(*x_shape[:2], 1, 1), x_shape, plane,
                                           plane, (0, 0))
