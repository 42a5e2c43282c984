"""Layers that only change an array's shape."""
from __future__ import annotations

import math
from typing import Any

from ..errors import ShapeError
from .base import Layer


class Flatten(Layer):
    """``(N, d1, d2, ...) -> (N, d1 * d2 * ...)``; the gradient is reshaped back."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool = True) -> Any:
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
