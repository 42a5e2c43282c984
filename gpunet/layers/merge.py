"""Layers that join several inputs into one: the fan-in points of a Graph."""
from __future__ import annotations

from typing import Any

from ..errors import ShapeError
from .activations import ACTIVATIONS
from .base import Layer


class Sum(Layer):
    """``y = g(x_1 + x_2 + ... + x_k)`` for inputs of one shape, with ``g`` the optional
    activation named by ``activation`` (``"relu"``, ``"tanh"``, ...). Each input receives
    ``dz = g'(z) * dy``."""

    def __init__(self, activation: str | None = None) -> None:
        super().__init__()
        if activation is not None and activation.lower() not in ACTIVATIONS:
            raise ValueError(f"Sum: expected activation None or one of {sorted(ACTIVATIONS)}, "
                             f"got {activation!r}")
        self.activation = None if activation is None else ACTIVATIONS[activation.lower()]()

    def to(self, device: Any = None, dtype: Any = None) -> "Sum":
        super().to(device, dtype)
        if self.activation is not None:
            self.activation.to(device, dtype)
        return self

    def forward(self, xs: Any, training: bool | None = None) -> Any:
        xs = self.check_inputs(xs)
        for i, x in enumerate(xs[1:], 1):
            if x.shape != xs[0].shape:
                raise ShapeError(f"{self.name}: expected every input of shape "
                                 f"{tuple(xs[0].shape)}, got {tuple(x.shape)} for input {i}")
        z = xs[0]
        for x in xs[1:]:
            z = z + x
        self.save_for_backward(len(xs), z.shape)
        return z if self.activation is None else self.activation.forward(z, training)

    def backward(self, dy: Any) -> list[Any]:
        count, shape = self.saved()
        self.check_grad(dy, shape)
        dz = dy if self.activation is None else self.activation.backward(dy)
        return [dz] * count


class Concat(Layer):
    """``y = concatenate([x_1, ..., x_k], axis)``; the gradient is cut back into pieces."""

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = int(axis)

    def forward(self, xs: Any, training: bool | None = None) -> Any:
        xs = self.check_inputs(xs)
        ndim = xs[0].ndim
        if not -ndim <= self.axis < ndim:
            raise ShapeError(f"{self.name}: expected inputs with axis {self.axis}, "
                             f"got shape {tuple(xs[0].shape)}")
        axis = self.axis % ndim
        other = lambda s: s[:axis] + s[axis + 1:]
        for i, x in enumerate(xs[1:], 1):
            if x.ndim != ndim or other(x.shape) != other(xs[0].shape):
                raise ShapeError(f"{self.name}: expected input {i} to match input 0's shape "
                                 f"{tuple(xs[0].shape)} on every axis but {axis}, "
                                 f"got {tuple(x.shape)}")
        y = self.ops.concat(xs, axis)
        self.save_for_backward([x.shape[axis] for x in xs], axis, y.shape)
        return y

    def backward(self, dy: Any) -> list[Any]:
        sizes, axis, shape = self.saved()
        self.check_grad(dy, shape)
        return self.ops.split(dy, sizes, axis)
