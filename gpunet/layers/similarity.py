"""Layers that compare or normalise vectors along one axis: cosine similarity of two inputs
and L2 normalisation, the building blocks of embedding models."""
from __future__ import annotations

from typing import Any

from ..errors import DTypeError, ShapeError
from .base import Layer


def _axis(layer: Layer, x: Any, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ShapeError(f"{layer.name}: expected input with axis {axis}, "
                         f"got shape {tuple(x.shape)}")
    return axis % x.ndim


class CosineSimilarity(Layer):
    """Cosine similarity of two inputs of one shape along ``axis``, as PyTorch's
    ``nn.CosineSimilarity(dim, eps)``: ``forward([x1, x2])`` of shape ``(..., D, ...)``
    returns the shape without ``axis``.

    ``y = x1 . x2 / (max(||x1||, eps) max(||x2||, eps))``: each norm is clamped on its own,
    as PyTorch 2 does (its documentation's older ``max(||x1|| ||x2||, eps)`` is not what it
    computes). Gradient, with ``m_i = max(||x_i||, eps)``:
    ``dx1 = dy (x2 / (m1 m2) - y x1 / m1^2)``, the second term only where ``||x1|| > eps``
    (a clamped norm is a constant), and symmetrically for ``x2``. PyTorch's backward keeps the
    norm's gradient also where it is clamped; the two agree wherever both norms exceed eps::

        sim = CosineSimilarity(axis=-1)
        y = sim.forward([a, b])          # (N, D), (N, D) -> (N,)
        da, db = sim.backward(dy)
    """

    def __init__(self, axis: int = -1, eps: float = 1e-8) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"CosineSimilarity: expected eps > 0, got {eps!r}")
        self.axis, self.eps = int(axis), float(eps)

    def forward(self, xs: Any, training: bool | None = None) -> Any:
        x1, x2 = self.check_inputs(xs, 2)
        if x1.shape != x2.shape:
            raise ShapeError(f"{self.name}: expected input 1 of input 0's shape "
                             f"{tuple(x1.shape)}, got {tuple(x2.shape)}")
        if x1.dtype != x2.dtype:
            raise DTypeError(f"{self.name}: expected input 1 of input 0's dtype {x1.dtype}, "
                             f"got {x2.dtype}")
        axis, ops = _axis(self, x1, self.axis), self.ops
        n1 = ops.sqrt(ops.sum(x1 * x1, axis=axis, keepdims=True))
        n2 = ops.sqrt(ops.sum(x2 * x2, axis=axis, keepdims=True))
        m1, m2 = ops.maximum(n1, self.eps), ops.maximum(n2, self.eps)
        y = ops.sum(x1 * x2, axis=axis, keepdims=True) / (m1 * m2)
        self.save_for_backward(x1, x2, n1 > self.eps, n2 > self.eps, m1, m2, y, axis)
        return y.squeeze(axis)

    def backward(self, dy: Any) -> list[Any]:
        x1, x2, free1, free2, m1, m2, y, axis = self.saved()
        self.check_grad(dy, y.squeeze(axis).shape)
        dy = self.ops.xp.expand_dims(dy, axis)
        dx1 = dy * (x2 / (m1 * m2) - free1 * (y / (m1 * m1)) * x1)
        dx2 = dy * (x1 / (m1 * m2) - free2 * (y / (m2 * m2)) * x2)
        return [dx1, dx2]


class L2Normalize(Layer):
    """Scale each vector along ``axis`` to unit length, as PyTorch's
    ``F.normalize(x, p=2, dim=axis, eps)``: ``y = x / max(||x||, eps)``, same shape.

    Gradient: ``dx = (dy - y (y . dy)) / ||x||`` where ``||x|| > eps``, ``dy / eps`` where the
    norm is clamped. Ends an embedding model whose distances should compare directions only
    (FaceNet's unit hypersphere)::

        model = Sequential([Dense(64, 32), L2Normalize()])   # rows of length 1
    """

    def __init__(self, axis: int = -1, eps: float = 1e-12) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"L2Normalize: expected eps > 0, got {eps!r}")
        self.axis, self.eps = int(axis), float(eps)

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        axis, ops = _axis(self, x, self.axis), self.ops
        norm = ops.sqrt(ops.sum(x * x, axis=axis, keepdims=True))
        m = ops.maximum(norm, self.eps)
        y = x / m
        self.save_for_backward(y, m, norm > self.eps, axis)
        return y

    def backward(self, dy: Any) -> Any:
        y, m, free, axis = self.saved()
        self.check_grad(dy, y.shape)
        radial = free * y * self.ops.sum(y * dy, axis=axis, keepdims=True)
        return (dy - radial) / m
