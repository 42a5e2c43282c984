"""Batch normalisation and layer normalisation."""
from __future__ import annotations

import math
from typing import Any, Sequence

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
    ``running_mean`` and ``running_var`` are saved with the model.

    >>> import numpy as np
    >>> bn = BatchNorm(8)                        # 8 channels (or features)
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (16, 8, 4, 4)).astype(np.float32)
    >>> y = bn(x, training=True)                 # batch statistics; running ones updated
    >>> bool(abs(y.mean()) < 1e-5)
    True
    >>> bn(x, training=False).shape              # running statistics
    (16, 8, 4, 4)

    The training backward pass is ``ops.batchnorm_backward``: custom kernels on CUDA and
    the emulated device. Data-parallel training keeps per-process statistics unless ``sync=True``: then the batch
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


    def forward(self, x: Any, training: bool | None = None) -> Any:
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


class LayerNorm(Layer):
    """Layer normalisation over the trailing axes, as ``torch.nn.LayerNorm``.

    Each sample's ``M = prod(normalized_shape)`` trailing values are normalised by their own
    mean and biased variance, the same in training and in evaluation (no running estimates):
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``. Shapes: x ``(*, *normalized_shape)``,
    y the same; parameters ``"weight"`` (ones) and ``"bias"`` (zeros) of shape
    ``normalized_shape``, none with ``elementwise_affine=False``. Backward, with
    ``rstd = 1 / sqrt(var + eps)``, ``xhat = (x - mean) * rstd``, ``g = dy * weight`` and means
    over each sample's M values: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``;
    ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` over the leading axes. Both passes are
    ``ops.layernorm_forward`` and ``ops.layernorm_backward``: custom kernels on CUDA and the
    emulated device.

        >>> ln = LayerNorm(6)                           # (N, 6) or (T, N, 6) input
        >>> ln(np.ones((4, 3, 6), np.float32)).shape
        (4, 3, 6)
        >>> LayerNorm((2, 3), elementwise_affine=False).params()
        {}
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True) -> None:
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        if not eps > 0:
            raise ValueError(f"LayerNorm: expected eps > 0, got {eps}")
        self.eps = float(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self.weight = self.bias = None
        if self.elementwise_affine:
            self.weight = self.add_param("weight", np.ones(self.normalized_shape))
            self.bias = self.add_param("bias", np.zeros(self.normalized_shape))

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        k = len(self.normalized_shape)
        if x.ndim < k or tuple(x.shape[x.ndim - k:]) != self.normalized_shape:
            want = ", ".join(map(str, self.normalized_shape))
            raise ShapeError(f"{self.name}: expected input of shape (*, {want}), "
                             f"got {tuple(x.shape)}")
        x2 = x.reshape(-1, math.prod(self.normalized_shape))  # one row per sample
        weight, bias = ((self.weight.data.reshape(-1), self.bias.data.reshape(-1))
                        if self.elementwise_affine else (None, None))
        y, mean, rstd = self.ops.layernorm_forward(x2, weight, bias, self.eps)
        self.save_for_backward(x2, mean, rstd, x.shape)
        return y.reshape(x.shape)

    def backward(self, dy: Any) -> Any:
        x2, mean, rstd, shape = self.saved()
        self.check_grad(dy, shape)
        weight = self.weight.data.reshape(-1) if self.elementwise_affine else None
        dx, dweight, dbias = self.ops.layernorm_backward(dy.reshape(x2.shape), x2, mean, rstd,
                                                         weight)
        if self.elementwise_affine:
            self.weight.grad += dweight.reshape(self.normalized_shape)
            self.bias.grad += dbias.reshape(self.normalized_shape)
        return dx.reshape(shape)


def _normalized_shape(value: Any) -> tuple[int, ...]:
    """LayerNorm's ``normalized_shape`` (an int or a sequence of ints, as PyTorch takes it)
    as a tuple of positive ints; a ValueError for anything else."""
    dims = (value,) if isinstance(value, (int, np.integer)) else value
    try:
        ok = len(dims) > 0 and all(isinstance(d, (int, np.integer)) and
                                   not isinstance(d, bool) and d >= 1 for d in dims)
    except TypeError:  # not a sequence
        ok = False
    if not ok or isinstance(value, (bool, str)):
        raise ValueError(f"LayerNorm: expected normalized_shape to be a positive int or a "
                         f"non-empty sequence of positive ints, got {value!r}")
    return tuple(int(d) for d in dims)
