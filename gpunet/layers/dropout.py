"""Inverted dropout."""
from __future__ import annotations

from typing import Any

from .base import Layer


class Dropout(Layer):
    """In training, ``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` drawn per element
    from gpunet's seeded stream; ``dx = dy * m / (1 - p)``. At eval ``y = x``. Any shape."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: expected p in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        if not training or self.p == 0.0:
            self.save_for_backward(None, x.shape)
            return x
        mask = self.ops.dropout_mask(x.shape, self.p, x.dtype)
        self.save_for_backward(mask, x.shape)
        return x * mask

    def backward(self, dy: Any) -> Any:
        mask, shape = self.saved()
        self.check_grad(dy, shape)
        return dy if mask is None else dy * mask
