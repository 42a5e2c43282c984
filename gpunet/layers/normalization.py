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

    Data-parallel training keeps per-process statistics unless ``sync=True``: then the batch
    mean and variance, and the sums of the backward pass, are taken over the samples of all
    processes (the Trainer hands the layer its communicator as ``comm``), so N processes
    normalise exactly as one process with their joint batch would.
    """

    # a copy (gradcheck's) computes alone: it must not take part in collectives
    _uncopied = ("comm",)

    def __init__(self, features: int, eps: float = 1e-5, momentum: float = 0.1,
                 sync: bool = False) -> None:
        super().__init__()
        if features < 1 or eps <= 0 or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm: expected features >= 1, eps > 0 and momentum in "
                             f"[0, 1], got {features}, {eps} and {momentum}")
        self.features, self.eps, self.momentum = features, float(eps), float(momentum)
        self.gamma = self.add_param("gamma", np.ones(features))
        self.beta = self.add_param("beta", np.zeros(features))
        self.add_buffer("running_mean", np.zeros(features))
        self.add_buffer("running_var", np.ones(features))
        self.sync, self.comm = bool(sync), None

    def _across(self) -> Any:
        """With synchronised statistics over several processes: a function that turns this
        process's per-feature sums and count into all processes' (in place), else None."""
        if not self.sync or self.comm is None or self.comm.size == 1:
            return None

        def across(sums: list, count: int) -> int:
            self.comm.allreduce_mean(sums)  # one reduction for all of them, on the device
            for a in sums:
                a *= self.comm.size
            # the counts are the host's own: summed between hosts, never read from a GPU
            return int(round(self.comm.allreduce_sum([count])[0]))
        return across


    def forward(self, x: Any, training: bool = True) -> Any:
        self.check_input(x, ndims=(2, 4))
        if x.shape[1] != self.features:
            raise ShapeError(f"{self.name}: expected {self.features} features on axis 1 of the "
                             f"input, got shape {tuple(x.shape)}")
        count = x.size // self.features
        if training:
            if count < 2:
                raise ShapeError(f"{self.name}: expected more than 1 value per feature in "
                                 f"training, got input of shape {tuple(x.shape)}")
            across = self._across()
            mean = self.ops.channel_sum(x)
            if across is not None:  # two reductions over all processes: the mean, then var
                count = across([mean], count)
            mean /= count
            var = self.ops.channel_sq_dev(x, mean)
            if across is not None:
                across([var], 0)
            var /= count
            m = self.momentum
            running_mean, running_var = self._buffers["running_mean"], self._buffers["running_var"]
            running_mean *= 1 - m
            running_mean += m * mean
            running_var *= 1 - m
            running_var += (m * count / (count - 1)) * var
        else:
            mean, var = self._buffers["running_mean"], self._buffers["running_var"]
        invstd = 1 / self.ops.sqrt(var + self.eps)
        self.save_for_backward(x, mean, invstd, training)
        return self.ops.batchnorm_apply(x, mean, self.gamma.data * invstd, self.beta.data)

    def backward(self, dy: Any) -> Any:
        x, mean, invstd, training = self.saved()
        self.check_grad(dy, x.shape)
        if training:
            dx, dgamma, dbeta = self.ops.batchnorm_backward(dy, x, mean, invstd, self.gamma.data,
                                                            self._across())
        else:  # mean and invstd are constants here: the layer is an affine map per feature
            axes = (0,) + tuple(range(2, x.ndim))
            shape = (1, -1) + (1,) * (x.ndim - 2)
            dbeta = self.ops.sum(dy, axis=axes)
            dgamma = self.ops.channel_dot(dy, x - mean.reshape(shape)) * invstd
            dx = dy * (self.gamma.data * invstd).reshape(shape)
        self.gamma.grad += dgamma
        self.beta.grad += dbeta
        return dx
