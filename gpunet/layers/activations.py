"""Activation layers, elementwise (Softmax along one axis), and the two learnable ones:
SigmoidGenerator and NonlinearityGenerator. Each takes any shape and returns the same."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ShapeError
from .base import Layer, feature_axis


class Sigmoid(Layer):
    """``y = 1 / (1 + exp(-x))``; ``dx = dy * y * (1 - y)``."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        y = self.ops.sigmoid(x)
        self.save_for_backward(y)
        return y

    def backward(self, dy: Any) -> Any:
        (y,) = self.saved()
        self.check_grad(dy, y.shape)
        return self.ops.backprop_sigmoid(dy, y)


class Tanh(Layer):
    """``y = tanh(x)``; ``dx = dy * (1 - y^2)``."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        y = self.ops.tanh(x)
        self.save_for_backward(y)
        return y

    def backward(self, dy: Any) -> Any:
        (y,) = self.saved()
        self.check_grad(dy, y.shape)
        return self.ops.backprop_tanh(dy, y)


class ReLU(Layer):
    """``y = max(x, 0)``; ``dx = dy * (x > 0)``."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        self.save_for_backward(x)
        return self.ops.relu(x)

    def backward(self, dy: Any) -> Any:
        (x,) = self.saved()
        self.check_grad(dy, x.shape)
        return self.ops.backprop_relu(dy, x)


class LeakyReLU(Layer):
    """``y = x`` where ``x > 0``, else ``slope * x``."""

    def __init__(self, slope: float = 0.01) -> None:
        super().__init__()
        self.slope = float(slope)

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        self.save_for_backward(x)
        return self.ops.leaky_relu(x, self.slope)

    def backward(self, dy: Any) -> Any:
        (x,) = self.saved()
        self.check_grad(dy, x.shape)
        return self.ops.backprop_leaky_relu(dy, x, self.slope)


class ELU(Layer):
    """``y = x`` where ``x > 0``, else ``alpha * (exp(x) - 1)``; there ``dy/dx = y + alpha``."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        y = self.ops.elu(x, self.alpha)
        self.save_for_backward(x, y)
        return y

    def backward(self, dy: Any) -> Any:
        x, y = self.saved()
        self.check_grad(dy, x.shape)
        return self.ops.backprop_elu(dy, x, y, self.alpha)


class SELU(Layer):
    """``y = scale * elu(x, alpha)`` with the self-normalising constants of Klambauer et al.
    2017 (scale = 1.0507..., alpha = 1.6732...)."""

    ALPHA = 1.6732632423543772848170429916717
    SCALE = 1.0507009873554804934193349852946

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        e = self.ops.elu(x, self.ALPHA)
        self.save_for_backward(x, e)
        return self.SCALE * e

    def backward(self, dy: Any) -> Any:
        x, e = self.saved()
        self.check_grad(dy, x.shape)
        return self.ops.backprop_elu(self.SCALE * dy, x, e, self.ALPHA)


class Softplus(Layer):
    """``y = log(1 + exp(x))``; ``dx = dy * sigmoid(x)``."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        self.save_for_backward(x)
        return self.ops.softplus(x)

    def backward(self, dy: Any) -> Any:
        (x,) = self.saved()
        self.check_grad(dy, x.shape)
        return self.ops.backprop_softplus(dy, x)


class Softmax(Layer):
    """``y = exp(x) / sum(exp(x))`` along ``axis``; ``dx = y * (dy - sum(dy * y))``."""

    def __init__(self, axis: int = -1) -> None:
        super().__init__()
        self.axis = int(axis)

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        if not -x.ndim <= self.axis < x.ndim:
            raise _axis_error(self, x)
        y = self.ops.softmax(x, self.axis)
        self.save_for_backward(y)
        return y

    def backward(self, dy: Any) -> Any:
        (y,) = self.saved()
        self.check_grad(dy, y.shape)
        return self.ops.backprop_softmax(dy, y, self.axis)


class GELU(Layer):
    """``y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))``, ``Phi`` the standard normal CDF
    (Hendrycks and Gimpel 2016; the Transformer feed-forward activation of BERT and GPT).
    ``approximate="tanh"``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, as PyTorch's
    ``nn.GELU(approximate="tanh")``. ``dx = dy * (Phi(x) + x phi(x))`` (exact), ``phi`` the
    normal density. Any shape; ``GELU()(x)``."""

    APPROXIMATIONS = ("none", "tanh")

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in self.APPROXIMATIONS:
            raise ValueError(f"GELU: expected approximate one of {self.APPROXIMATIONS}, "
                             f"got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        self.save_for_backward(x)
        return self.ops.gelu(x, self.approximate)

    def backward(self, dy: Any) -> Any:
        (x,) = self.saved()
        self.check_grad(dy, x.shape)
        return self.ops.backprop_gelu(dy, x, self.approximate)


def _axis_error(layer: Layer, x: Any) -> Exception:
    return ShapeError(f"{layer.name}: expected an input with axis {layer.axis}, "
                      f"got shape {tuple(x.shape)}")


class _PerUnit(Layer):
    """A layer with one parameter per unit on the feature axis (see ``feature_axis``)."""

    features: int

    def check_units(self, x: Any) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """Validate ``x``; return the feature axis, the shape a per-unit parameter broadcasts
        in, and the axes its gradient sums over."""
        self.check_input(x, ndims=(2, 3, 4))
        axis = feature_axis(x.ndim)
        if x.shape[axis] != self.features:
            raise ShapeError(f"{self.name}: expected {self.features} features on axis {axis} "
                             f"of the input, got shape {tuple(x.shape)}")
        shape = tuple(self.features if a == axis else 1 for a in range(x.ndim))
        return axis, shape, tuple(a for a in range(x.ndim) if a != axis)


class SigmoidGenerator(_PerUnit):
    """``y = a * sigmoid(x) + (1 - a) * (x - 0.5)`` with a learnable ``alpha`` per unit.

    Starting at ``alpha = 0`` the layer is linear; training learns how much non-linearity
    each unit needs. ``dx = dy * (a * s * (1 - s) + 1 - a)`` and
    ``dalpha = sum(dy * (s - (x - 0.5)))`` with ``s = sigmoid(x)``.
    Input ``(N, F)``, ``(T, N, F)`` or ``(N, F, H, W)``; ``alpha`` has shape ``(F,)``.
    """

    def __init__(self, features: int, alpha: float = 0.0) -> None:
        super().__init__()
        self.features = features
        self.alpha = self.add_param("alpha", np.full((features,), float(alpha)))

    def forward(self, x: Any, training: bool | None = None) -> Any:
        _, shape, sum_axes = self.check_units(x)
        a = self.alpha.data.reshape(shape)
        s = self.ops.sigmoid(x)
        self.save_for_backward(x, s, shape, sum_axes)
        return a * s + (1 - a) * (x - 0.5)

    def backward(self, dy: Any) -> Any:
        x, s, shape, sum_axes = self.saved()
        self.check_grad(dy, x.shape)
        a = self.alpha.data.reshape(shape)
        self.alpha.grad += self.ops.sum(dy * (s - (x - 0.5)), axis=sum_axes)
        return dy * (a * s * (1 - s) + (1 - a))


class NonlinearityGenerator(_PerUnit):
    """``y = max(x, b)`` with a learnable threshold ``b`` per unit.

    At ``b = 0`` this is ReLU; a very negative start gives a nearly linear network whose
    capacity grows as ``b`` is learned. ``dx = dy`` where ``x >= b``, and ``db = sum(dy)``
    over the positions where ``x < b``. Input ``(N, F)``, ``(T, N, F)`` or ``(N, F, H, W)``.
    """

    def __init__(self, features: int, b: float = -4.0) -> None:
        super().__init__()
        self.features = features
        self.b = self.add_param("b", np.full((features,), float(b)))

    def forward(self, x: Any, training: bool | None = None) -> Any:
        _, shape, sum_axes = self.check_units(x)
        passed = x >= self.b.data.reshape(shape)
        self.save_for_backward(passed, sum_axes)
        return self.ops.where(passed, x, self.b.data.reshape(shape))

    def backward(self, dy: Any) -> Any:
        passed, sum_axes = self.saved()
        self.check_grad(dy, passed.shape)
        self.b.grad += self.ops.sum(self.ops.where(passed, 0, dy), axis=sum_axes)
        return self.ops.where(passed, dy, 0)


#: Parameter-free activations by lower-case name, for ``Sum(activation=...)`` and the CLI.
ACTIVATIONS: dict[str, type[Layer]] = {
    cls.__name__.lower(): cls
    for cls in (Sigmoid, Tanh, ReLU, LeakyReLU, ELU, SELU, Softplus, Softmax, GELU)}
