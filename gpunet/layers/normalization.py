"""Batch normalisation."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ShapeError
from .base import Layer


class BatchNorm(Layer):
    """Batch normalisation over ``(N, F)`` or ``(N, C, H, W)``, per feature (axis 1).

    Training: ``mu = mean(x)`` and ``var = mean((x - mu)^2)`` over the batch (and H, W),
    ``xhat = (x - mu) / sqrt(var + eps)``, ``y = gamma * xhat + beta``; the running estimates
    follow PyTorch: ``running = (1 - momentum) * running + momentum * batch``, with the
    unbiased variance (``var * M / (M - 1)``, ``M`` values per feature). Eval: the running
    estimates take the place of ``mu`` and ``var``. Parameters ``"gamma"`` and ``"beta"``;
    ``running_mean`` and ``running_var`` are saved with the model. The training backward
    pass is ``ops.batchnorm_backward``: custom kernels on CUDA and the emulated device.
    """

    def __init__(self, features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if features < 1 or eps <= 0 or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm: expected features >= 1, eps > 0 and momentum in "
                             f"[0, 1], got {features}, {eps} and {momentum}")
        self.features, self.eps, self.momentum = features, float(eps), float(momentum)
        self.gamma = self.add_param("gamma", np.ones(features))
        self.beta = self.add_param("beta", np.zeros(features))
        self.add_buffer("running_mean", np.zeros(features))
        self.add_buffer("running_var", np.ones(features))

    def forward(self, x: Any, training: bool = True) -> Any:
        self.check_input(x, ndims=(2, 4))
        if x.shape[1] != self.features:
            raise ShapeError(f"{self.name}: expected {self.features} features on axis 1 of the "
                             f"input, got shape {tuple(x.shape)}")
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        count = x.size // self.features
        if training:
            if count < 2:
                raise ShapeError(f"{self.name}: expected more than 1 value per feature in "
                                 f"training, got input of shape {tuple(x.shape)}")
            mean = self.ops.mean(x, axis=axes)
            var = self.ops.mean((x - mean.reshape(shape)) ** 2, axis=axes)
            m = self.momentum
            running_mean, running_var = self._buffers["running_mean"], self._buffers["running_var"]
            running_mean *= 1 - m
            running_mean += m * mean
            running_var *= 1 - m
            running_var += (m * count / (count - 1)) * var
        else:
            mean, var = self._buffers["running_mean"], self._buffers["running_var"]
        invstd = 1 / self.ops.sqrt(var + self.eps)
        xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
        self.save_for_backward(x, mean, invstd, training)
        return self.gamma.data.reshape(shape) * xhat + self.beta.data.reshape(shape)

    def backward(self, dy: Any) -> Any:
        x, mean, invstd, training = self.saved()
        self.check_grad(dy, x.shape)
        if training:
            dx, dgamma, dbeta = self.ops.batchnorm_backward(dy, x, mean, invstd, self.gamma.data)
        else:  # mean and invstd are constants here: the layer is an affine map per feature
            axes = (0,) + tuple(range(2, x.ndim))
            shape = (1, -1) + (1,) * (x.ndim - 2)
            xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
            dbeta = self.ops.sum(dy, axis=axes)
            dgamma = self.ops.sum(dy * xhat, axis=axes)
            dx = dy * (self.gamma.data * invstd).reshape(shape)
        self.gamma.grad += dgamma
        self.beta.grad += dbeta
        return dx
