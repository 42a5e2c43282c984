"""Fully connected layer."""
from __future__ import annotations

from typing import Any

from .. import init as initializers
from ..errors import ShapeError
from .base import Layer


class Dense(Layer):
    """``y = x @ weight.T + bias``.

    Shapes: x ``(*, in_features)``, weight ``(out_features, in_features)``, bias
    ``(out_features,)``, y ``(*, out_features)``. Backward: ``dx = dy @ weight``,
    ``dweight = dy.T @ x``, ``dbias = sum(dy)`` over all leading axes (``dx`` is None
    after ``set_input_grad(False)``).
    ``init`` names the weight initialiser (see :mod:`gpunet.init`); the bias starts at zero.

    >>> import numpy as np
    >>> layer = Dense(3, 2)                     # 3 features in, 2 out
    >>> y = layer(np.ones((4, 3), np.float32))  # a batch of 4
    >>> y.shape
    (4, 2)
    >>> layer.backward(np.ones_like(y)).shape   # dx; adds into weight.grad and bias.grad
    (4, 3)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init: str = "glorot_uniform") -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Dense: expected positive in_features and out_features, "
                             f"got {in_features} and {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = self.add_param("weight", initializers.get(init)((out_features, in_features)))
        self.bias = self.add_param("bias", initializers.zeros((out_features,))) if bias else None

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ShapeError(f"{self.name}: expected input of shape (*, {self.in_features}), "
                             f"got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)
        y = self.ops.gemm(x2, self.weight.data, trans_b=True)
        if self.bias is not None:
            y += self.bias.data
        self.save_for_backward(x2, x.shape)
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward(self, dy: Any) -> Any:
        x2, shape = self.saved()
        self.check_grad(dy, (*shape[:-1], self.out_features))
        dy2 = dy.reshape(-1, self.out_features)
        self.ops.gemm_acc(self.weight.grad, dy2, x2, trans_a=True)
        if self.bias is not None:
            self.bias.grad += self.ops.sum(dy2, axis=0)
        if not self.input_grad:
            return None
        return self.ops.gemm(dy2, self.weight.data).reshape(shape)

