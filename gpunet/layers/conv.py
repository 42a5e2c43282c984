"""2-D convolution and transposed convolution over images ``(N, C, H, W)``."""
from __future__ import annotations

import math
from typing import Any, Sequence

from .. import init as initializers
from .. import rng
from ..errors import ShapeError
from .base import Layer


def pair(value: Any, what: str, layer: str, minimum: int = 1) -> tuple[int, int]:
    """``value`` (an int or a pair of ints) as ``(height, width)``; a clear error otherwise."""
    items = list(value) if isinstance(value, (tuple, list)) else [value, value]
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                  and v >= minimum for v in items):
        raise ValueError(f"{layer}: expected {what} to be an int >= {minimum} or a pair of "
                         f"them, got {value!r}")
    return items[0], items[1]


def output_size(layer: Layer, x_shape: Sequence[int], kernel: tuple[int, int],
                stride: tuple[int, int], padding: tuple[int, int]) -> tuple[int, int]:
    """``(Ho, Wo) = ((H + 2 ph - kh) // sh + 1, ...)``; ShapeError when the kernel is larger
    than the padded input."""
    h, w = x_shape[2], x_shape[3]
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if h + 2 * ph < kh or w + 2 * pw < kw:
        raise ShapeError(f"{layer.name}: kernel {kh}x{kw} is larger than the padded input "
                         f"{h + 2 * ph}x{w + 2 * pw} (input {h}x{w}, padding {ph}x{pw}); "
                         f"expected an input of at least {max(kh - 2 * ph, 1)}x"
                         f"{max(kw - 2 * pw, 1)}, got shape {tuple(x_shape)}")
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


class Conv2D(Layer):
    """Cross-correlation, as PyTorch's ``Conv2d``:
    ``y[n, o, p, q] = bias[o] + sum_{c, i, j} weight[o, c, i, j] x[n, c, p sh + i - ph, q sw + j - pw]``
    with ``x`` zero outside the image.

    Shapes: x ``(N, in_channels, H, W)``, weight ``(out_channels, in_channels, kh, kw)``, bias
    ``(out_channels,)``, y ``(N, out_channels, Ho, Wo)`` with
    ``Ho = (H + 2 ph - kh) // sh + 1`` (likewise ``Wo``). ``kernel_size``, ``stride`` and
    ``padding`` take an int or a ``(height, width)`` pair; ``padding="valid"`` is 0 and
    ``padding="same"`` (stride 1, odd kernel) keeps ``H x W``. ``init`` names the weight
    initialiser (fans as PyTorch counts them, see :mod:`gpunet.init`); the bias starts at
    zero.

    >>> import numpy as np
    >>> conv = Conv2D(3, 8, kernel_size=3, padding="same")
    >>> y = conv(np.zeros((2, 3, 32, 32), np.float32))
    >>> y.shape
    (2, 8, 32, 32)
    >>> conv.backward(np.ones_like(y)).shape    # dx; adds into weight.grad and bias.grad
    (2, 3, 32, 32)

    Implementation. Forward: ``cols = im2col(x)`` of shape ``(in kh kw, N Ho Wo)`` and ONE GEMM
    ``weight @ cols``. Backward: ``dweight = dy @ cols^T`` (one GEMM),
    ``dx = col2im(weight^T @ dy)`` (one GEMM, then a gather; None after
    ``set_input_grad(False)``), ``dbias = sum(dy)`` over ``n, p, q``; on CUDA and the
    emulated device im2col, col2im and the bias sum are kernels (``kernels/conv.cu``); the
    CPU runs the same algebra over cache-sized blocks of samples
    (:class:`~gpunet.backends.CpuBackend`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, bias: bool = True, init: str = "glorot_uniform") -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"Conv2D: expected positive in_channels and out_channels, "
                             f"got {in_channels} and {out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel = pair(kernel_size, "kernel_size", self.name)
        self.stride = pair(stride, "stride", self.name)
        if padding == "same":
            if self.stride != (1, 1) or self.kernel[0] % 2 == 0 or self.kernel[1] % 2 == 0:
                raise ValueError(f"Conv2D: padding='same' needs stride 1 and an odd kernel, "
                                 f"got stride {self.stride} and kernel {self.kernel}")
            self.padding = (self.kernel[0] // 2, self.kernel[1] // 2)
        elif padding == "valid":
            self.padding = (0, 0)
        elif isinstance(padding, str):
            raise ValueError(f"Conv2D: expected padding 'same', 'valid', an int >= 0 or a pair "
                             f"of them, got {padding!r}")
        else:
            self.padding = pair(padding, "padding", self.name, minimum=0)
        shape = (out_channels, in_channels, *self.kernel)
        self.weight = self.add_param("weight", initializers.get(init)(shape))
        self.bias = self.add_param("bias", initializers.zeros((out_channels,))) if bias else None

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x, ndims=(4,))
        if x.shape[1] != self.in_channels:
            raise ShapeError(f"{self.name}: expected input of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        out = output_size(self, x.shape, self.kernel, self.stride, self.padding)
        y, cols = self.ops.conv2d(x, self.weight.data,
                                  None if self.bias is None else self.bias.data,
                                  self.stride, self.padding)
        self.save_for_backward(cols, tuple(x.shape), (x.shape[0], self.out_channels, *out))
        return y

    def backward(self, dy: Any) -> Any:
        cols, x_shape, y_shape = self.saved()
        self.check_grad(dy, y_shape)
        dx, dweight, dbias = self.ops.backprop_conv2d(dy, cols, x_shape, self.weight.data,
                                                      self.stride, self.padding,
                                                      self.bias is not None, self.input_grad)
        self.weight.grad += dweight
        if self.bias is not None:
            self.bias.grad += dbias
        return dx


class ConvTranspose2D(Layer):
    """Transposed convolution (the adjoint of :class:`Conv2D`, "deconvolution"), as PyTorch's
    ``ConvTranspose2d``: every input pixel scatters a weighted copy of the kernel into the
    output,
    ``y[n, o, h sh + i - ph, w sw + j - pw] += weight[c, o, i, j] x[n, c, h, w]`` (summed
    over ``c, h, w, i, j``; what lands outside ``y`` is dropped), plus ``bias[o]``.

    Shapes: x ``(N, in_channels, H, W)``, weight ``(in_channels, out_channels, kh, kw)``
    (PyTorch's layout), bias ``(out_channels,)``, y ``(N, out_channels, Ho, Wo)`` with
    ``Ho = (H - 1) sh - 2 ph + kh + oph`` (likewise ``Wo``). ``padding`` crops ``ph`` rows
    off each side of the full output; ``output_padding`` (smaller than the stride) adds
    rows at the bottom and columns on the right, choosing among the output sizes a
    ``Conv2D`` of the same geometry maps back to ``H x W``.

    Forward is :class:`Conv2D`'s input gradient and backward its forward (``dx``, the
    correlation of ``dy`` with the kernel) and weight gradient, so the layer runs the
    backend's conv operations (``ops.conv_transpose2d``, ``ops.backprop_conv_transpose2d``):
    ``y = col2im(weight^T @ x)``, ``dx = conv2d(dy, weight)``, ``dweight = x @ im2col(dy)^T``,
    ``dbias = sum(dy)`` over ``n, p, q`` (``dx`` is None after ``set_input_grad(False)``).
    Initialised as PyTorch: weight and bias uniform in ``+-1/sqrt(out_channels kh kw)``.

    Example, learnable 2x upsampling::

        up = ConvTranspose2D(16, 8, 2, stride=2)
        up.forward(x)  # (N, 16, H, W) -> (N, 8, 2H, 2W)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, output_padding: Any = 0, bias: bool = True) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"ConvTranspose2D: expected positive in_channels and out_channels, "
                             f"got {in_channels} and {out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel = pair(kernel_size, "kernel_size", self.name)
        self.stride = pair(stride, "stride", self.name)
        self.padding = pair(padding, "padding", self.name, minimum=0)
        self.output_padding = pair(output_padding, "output_padding", self.name, minimum=0)
        if any(op >= s for op, s in zip(self.output_padding, self.stride)):
            raise ValueError(f"ConvTranspose2D: expected output_padding smaller than the stride "
                             f"in each dimension, got output_padding {self.output_padding} and "
                             f"stride {self.stride}")
        shape = (in_channels, out_channels, *self.kernel)
        # PyTorch's kaiming_uniform(a=sqrt(5)) comes to U(+-1/sqrt(fan_in)), its fan_in
        # counted from weight.size(1): out_channels kh kw
        bound = 1.0 / math.sqrt(initializers.fans(shape)[0])
        self.weight = self.add_param("weight", rng.generator().uniform(-bound, bound, shape))
        self.bias = (self.add_param("bias", rng.generator().uniform(-bound, bound, out_channels))
                     if bias else None)

    def output_size(self, x_shape: Sequence[int]) -> tuple[int, int]:
        """``(Ho, Wo)`` for an input of shape ``x_shape``; ShapeError when not positive."""
        size = tuple((x_shape[2 + d] - 1) * self.stride[d] - 2 * self.padding[d]
                     + self.kernel[d] + self.output_padding[d] for d in (0, 1))
        if min(size) < 1:
            raise ShapeError(f"{self.name}: padding {self.padding[0]}x{self.padding[1]} crops "
                             f"the whole output (output size {size[0]}x{size[1]}); expected "
                             f"an input large enough for a positive output size, got shape "
                             f"{tuple(x_shape)}")
        return size  # type: ignore[return-value]

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x, ndims=(4,))
        if x.shape[1] != self.in_channels:
            raise ShapeError(f"{self.name}: expected input of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        out = self.output_size(x.shape)
        y = self.ops.conv_transpose2d(x, self.weight.data,
                                      None if self.bias is None else self.bias.data,
                                      self.stride, self.padding, self.output_padding)
        self.save_for_backward(x, (x.shape[0], self.out_channels, *out))
        return y

    def backward(self, dy: Any) -> Any:
        x, y_shape = self.saved()
        self.check_grad(dy, y_shape)
        dx, dweight, dbias = self.ops.backprop_conv_transpose2d(
            dy, x, self.weight.data, self.stride, self.padding, self.bias is not None,
            self.input_grad)
        self.weight.grad += dweight
        if self.bias is not None:
            self.bias.grad += dbias
        return dx
