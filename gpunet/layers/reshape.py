"""Layers that only change an array's shape."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..errors import ShapeError
from .base import Layer


class Flatten(Layer):
    """``(N, d1, d2, ...) -> (N, d1 * d2 * ...)``; the gradient is reshaped back."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        if x.ndim < 2:
            raise ShapeError(f"{self.name}: expected input of shape (N, ...) with at least "
                             f"2 axes, got {tuple(x.shape)}")
        self.save_for_backward(x.shape)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: Any) -> Any:
        (shape,) = self.saved()
        self.check_grad(dy, (shape[0], math.prod(shape[1:])))
        return dy.reshape(shape)


class Identity(Layer):
    """``y = x``, ``dx = dy``: a placeholder (PyTorch's ``nn.Identity``), such as the
    projection of a residual block whose shapes already match. Any shape; the very same
    array comes back, not a copy: ``Identity().forward(x) is x``."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        self.save_for_backward(x.shape)
        return x

    def backward(self, dy: Any) -> Any:
        (shape,) = self.saved()
        self.check_grad(dy, shape)
        return dy


class Reshape(Layer):
    """``(N, *in) -> (N, *shape)``: each sample reshaped, the batch axis kept, as PyTorch's
    ``nn.Unflatten(1, shape)`` or ``x.view(N, *shape)``. One entry of ``shape`` may be -1,
    the size that makes the counts match. The gradient is reshaped back::

        Reshape((16, 7, 7)).forward(x)  # x (N, 784) -> (N, 16, 7, 7)
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if (not dims or any(not isinstance(d, (int, np.integer)) or isinstance(d, bool)
                            or not (d > 0 or d == -1) for d in dims)
                or sum(d == -1 for d in dims) > 1):
            raise ValueError(f"Reshape: expected a shape of positive sizes with at most one "
                             f"-1, got {shape!r}")
        self.shape = tuple(int(d) for d in dims)

    def output_shape(self, x: Any) -> tuple[int, ...]:
        """``(N, *shape)`` for the input ``x``, the -1 resolved; a ShapeError where the
        samples of ``x`` do not have the values ``shape`` holds."""
        known = math.prod(d for d in self.shape if d != -1)
        values = math.prod(x.shape[1:]) if x.ndim else -1
        free = values // known if -1 in self.shape else 1
        if values < 0 or known * free != values:
            want = ", ".join("*" if d == -1 else str(d) for d in self.shape)
            count = f"a multiple of {known}" if -1 in self.shape else str(known)
            raise ShapeError(f"{self.name}: expected input of shape (N, ...) with {count} "
                             f"values per sample, to reshape to (N, {want}); "
                             f"got {tuple(x.shape)}")
        return (x.shape[0], *(free if d == -1 else d for d in self.shape))

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        out = self.output_shape(x)
        self.save_for_backward(x.shape, out)
        return x.reshape(out)

    def backward(self, dy: Any) -> Any:
        shape, out = self.saved()
        self.check_grad(dy, out)
        return dy.reshape(shape)
