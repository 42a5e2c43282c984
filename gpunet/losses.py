"""Losses: a scalar from a prediction and a target, and its gradient with respect to the
prediction.

``loss.forward(pred, target)`` (or ``loss(pred, target)``) returns the loss as a 0-d array on
``pred``'s device (a NumPy scalar on the host devices), as PyTorch returns a 0-d tensor, and
keeps what ``loss.backward()`` needs. Reading it (``float(loss)``) waits for a GPU to finish
the step: the user's choice, once in a while, not gpunet's on every step. ``backward()`` returns ``dloss/dpred`` with the
shape, dtype and device of ``pred``, ready for ``model.backward``. Every loss is a sum of
terms, one per position; ``reduction="mean"`` divides it by the number of positions,
``reduction="sum"`` keeps it.

- :class:`MSE`: ``(pred - target)^2`` per element.
- :class:`BinaryCrossEntropy` (alias :data:`NegativeLogProbability`):
  ``-(t log p + (1 - t) log(1 - p))`` per element, on probabilities ``p``.
- :class:`BinaryCrossEntropyWithLogits`: the same on logits ``x``, ``p = sigmoid(x)``,
  computed without overflow.
- :class:`SoftmaxCrossEntropy`: ``-sum_c t_c log softmax(x)_c`` per position of logits
  ``(..., C)``; targets are integer labels ``(...)`` or class probabilities ``(..., C)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .backends import FLOAT_DTYPES, Array, Backend, device_of, is_device_array
from .errors import DeviceError, DTypeError, ShapeError, StateError


def _is_array(a: Any) -> bool:
    return isinstance(a, np.ndarray) or is_device_array(a)


class Loss:
    """Base class of the losses.

    A subclass writes its formula as two methods: ``_terms(ops, pred, target)``, the loss
    term of each position, and ``_dterms(ops, pred, target)``, the gradient of their sum
    with respect to ``pred``. Inputs are checked (and the target cast to ``pred``'s dtype)
    here, before either is called.
    """

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{self.name}: expected reduction 'mean' or 'sum', "
                             f"got {reduction!r}")
        self.reduction = reduction
        self._saved: tuple[Array, Array] | None = None
        # (any bad, first bad value) of targets checked on a GPU since the last check()
        self._pending: tuple[Array, Array] | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}(reduction={self.reduction!r})"

    def forward(self, pred: Array, target: Any) -> Array:
        """The loss of ``pred`` against ``target``, summed over positions or averaged: a 0-d
        array on ``pred``'s device."""
        ops = self._check_pred(pred)
        with ops.scope():  # a loss has no device of its own: it works on the prediction's
            target = self._check_target(ops, pred, target)
            self._saved = (pred, target)
            total = ops.sum(self._terms(ops, pred, target))
            if self.reduction == "mean":
                total = total / self.positions(pred)
            if self._pending is not None:  # a bad target not yet reported poisons the value
                total = ops.where(self._pending[0], ops.xp.nan, total)
            return total

    __call__ = forward

    def backward(self) -> Array:
        """``dloss/dpred`` for the last ``forward``: shape, dtype and device of ``pred``."""
        if self._saved is None:
            raise StateError(f"{self.name}: backward called before forward "
                             "(or twice for one forward)")
        pred, target = self._saved
        ops = device_of(pred)
        with ops.scope():
            dpred = self._dterms(ops, pred, target)
            self._saved = None  # the batch need not outlive its step
            return dpred / self.positions(pred) if self.reduction == "mean" else dpred

    def check(self) -> None:
        """Raise the error a target checked on a GPU deserved. There a check that reads the
        target back (a label out of range) would make every step wait for the device, so the
        check runs on the device, the loss becomes NaN and the error waits for this call (the
        Trainer makes it when the loss turns out not to be finite). Free on the host devices,
        where such errors are raised at once."""
        if self._pending is None:
            return
        bad, value = self._pending
        self._pending = None
        if bool(bad):
            raise self._target_error(value.item())

    def _defer(self, ops: Backend, bad: Array, values: Array) -> None:
        """Raise :meth:`_target_error` for the first of ``values`` where ``bad`` holds: now on
        a host device, at :meth:`check` on a GPU (without reading anything back now)."""
        if ops.on_host:
            if bool(bad.any()):
                raise self._target_error(values[bad].reshape(-1)[0].item())
            return
        any_bad, first = bad.any(), values.reshape(-1)[bad.reshape(-1).argmax()]
        if self._pending is not None:  # keep the earliest
            first = ops.where(self._pending[0], self._pending[1], first)
            any_bad = any_bad | self._pending[0]
        self._pending = (any_bad, first)

    def _target_error(self, value: Any) -> Exception:
        raise NotImplementedError

    def positions(self, pred: Array) -> int:
        """How many terms the loss adds up: every element of ``pred``, unless overridden."""
        return pred.size

    # -- for subclasses ------------------------------------------------------------------
    def _terms(self, ops: Backend, pred: Array, target: Array) -> Array:
        raise NotImplementedError

    def _dterms(self, ops: Backend, pred: Array, target: Array) -> Array:
        raise NotImplementedError

    def _check_pred(self, pred: Any) -> Backend:
        if not _is_array(pred):
            raise DTypeError(f"{self.name}: expected the prediction to be an array, "
                             f"got {type(pred).__name__}")
        if pred.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"{self.name}: expected the prediction of dtype float32 or "
                             f"float64, got {pred.dtype}")
        if pred.size == 0:
            raise ShapeError(f"{self.name}: expected a non-empty prediction, "
                             f"got shape {tuple(pred.shape)}")
        return device_of(pred)

    def _check_target_array(self, ops: Backend, target: Any) -> None:
        if not _is_array(target):
            raise DTypeError(f"{self.name}: expected the target to be an array, "
                             f"got {type(target).__name__}")
        if not ops.owns(target):
            where = f"cuda:{target.device.id}" if is_device_array(target) else "cpu"
            raise DeviceError(f"{self.name}: expected the target on device {ops.name} "
                              f"(the prediction's), got an array on {where}")
        if target.dtype.kind not in "biuf":
            raise DTypeError(f"{self.name}: expected a numeric target, got dtype {target.dtype}")

    def _check_target(self, ops: Backend, pred: Array, target: Any) -> Array:
        """Targets of the prediction's shape, cast to its dtype (labels 0/1 may be integers)."""
        self._check_target_array(ops, target)
        if tuple(target.shape) != tuple(pred.shape):
            raise ShapeError(f"{self.name}: expected the target of shape {tuple(pred.shape)} "
                             f"(the prediction's), got {tuple(target.shape)}")
        return ops.asarray(target, dtype=pred.dtype)


class MSE(Loss):
    """Mean squared error. ``pred`` and ``target`` have one shape, any shape.

    ``loss = sum_i (pred_i - target_i)^2``, divided by the number of elements for
    ``reduction="mean"``. Gradient: ``2 (pred_i - target_i)``.
    """

    def _terms(self, ops: Backend, pred: Array, target: Array) -> Array:
        return (pred - target) ** 2

    def _dterms(self, ops: Backend, pred: Array, target: Array) -> Array:
        return 2 * (pred - target)


class BinaryCrossEntropy(Loss):
    """Cross-entropy of independent binary units. ``pred``: probabilities, any shape;
    ``target``: the same shape, values in [0, 1].

    ``p = clip(pred, eps, 1 - eps)``, ``loss = -sum_i t_i log p_i + (1 - t_i) log(1 - p_i)``,
    divided by the number of elements for ``reduction="mean"`` (as torch's ``BCELoss``).
    Gradient: ``(p_i - t_i) / (p_i (1 - p_i))`` at the clipped ``p``, also where clipping is
    active. The exact derivative of the clipped loss is 0 there, which would stop a unit
    that saturated on the wrong side from ever learning; the formula at the clipped value
    keeps pushing it back, bounded by ``1/eps`` in size (torch's backward does the same).
    """

    def __init__(self, reduction: str = "mean", eps: float = 1e-7) -> None:
        super().__init__(reduction)
        if not 0 < eps < 0.5:
            raise ValueError(f"{self.name}: expected eps in (0, 0.5), got {eps!r}")
        self.eps = eps

    def __repr__(self) -> str:
        return f"{self.name}(reduction={self.reduction!r}, eps={self.eps!r})"

    def _terms(self, ops: Backend, pred: Array, target: Array) -> Array:
        p = ops.clip(pred, self.eps, 1 - self.eps)
        return -(target * ops.log(p) + (1 - target) * ops.log(1 - p))

    def _dterms(self, ops: Backend, pred: Array, target: Array) -> Array:
        p = ops.clip(pred, self.eps, 1 - self.eps)
        return (p - target) / (p * (1 - p))


#: With ``reduction="sum"``: the negative log probability of binary targets under
#: independent Bernoulli outputs, summed over the time steps and units of a sequence.
NegativeLogProbability = BinaryCrossEntropy


class BinaryCrossEntropyWithLogits(Loss):
    """Binary cross-entropy on logits: ``x`` any shape, ``target`` the same, in [0, 1].

    With ``p = sigmoid(x)``, ``-(t log p + (1 - t) log(1 - p))`` equals
    ``max(x, 0) - x t + log(1 + e^-|x|)``, which never overflows. Gradient:
    ``sigmoid(x) - t``. Mean over all elements for ``reduction="mean"``.
    """

    def _terms(self, ops: Backend, x: Array, target: Array) -> Array:
        return ops.maximum(x, 0) - x * target + ops.log1p(ops.exp(-ops.abs(x)))

    def _dterms(self, ops: Backend, x: Array, target: Array) -> Array:
        return ops.sigmoid(x) - target


class SoftmaxCrossEntropy(Loss):
    """Cross-entropy of a softmax over the last axis. ``x``: logits ``(..., C)``, such as
    ``(N, C)`` or ``(T, N, C)``; ``target``: integer labels ``(...)`` in ``[0, C)``, or class
    probabilities (one-hot or soft) ``(..., C)``.

    Per position: ``loss = -sum_c t_c log softmax(x)_c`` (``-log softmax(x)_label`` for
    labels), from a stable ``log_softmax``; divided by the number of positions (``N``, or
    ``T N``) for ``reduction="mean"``. Gradient: ``softmax(x) sum_c t_c - t``, which is
    ``softmax(x) - onehot`` for labels and any targets that sum to 1.
    """

    def positions(self, x: Array) -> int:
        return x.size // x.shape[-1]

    @staticmethod
    def _labels(x: Array, target: Array) -> bool:
        return target.ndim == x.ndim - 1

    def _terms(self, ops: Backend, x: Array, target: Array) -> Array:
        logp = ops.log_softmax(x)
        if self._labels(x, target):
            return -ops.xp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        return -ops.sum(target * logp, axis=-1)

    def _dterms(self, ops: Backend, x: Array, target: Array) -> Array:
        p = ops.softmax(x)
        if self._labels(x, target):
            return p - (target[..., None] == ops.xp.arange(x.shape[-1]))
        return p * ops.sum(target, axis=-1, keepdims=True) - target

    def _check_target(self, ops: Backend, x: Array, target: Any) -> Array:
        if x.ndim == 0:
            raise ShapeError(f"{self.name}: expected logits of shape (..., C), got a scalar")
        self._check_target_array(ops, target)
        shape, classes = tuple(x.shape), x.shape[-1]
        if tuple(target.shape) == shape:
            return ops.asarray(target, dtype=x.dtype)
        if tuple(target.shape) != shape[:-1]:
            raise ShapeError(f"{self.name}: expected the target as labels of shape "
                             f"{shape[:-1]} or probabilities of shape {shape} for logits "
                             f"of shape {shape}, got {tuple(target.shape)}")
        if target.dtype.kind not in "iu":
            raise DTypeError(f"{self.name}: expected labels of shape {shape[:-1]} to be "
                             f"integers, got dtype {target.dtype}")
        self._classes = classes
        self._defer(ops, (target < 0) | (target >= classes), target)
        # on a GPU a bad label is only flagged so far: keep the gather within the logits
        return target if ops.on_host else ops.clip(target, 0, classes - 1)

    def _target_error(self, value: Any) -> Exception:
        return ValueError(f"{self.name}: expected labels in [0, {self._classes}), got {value}")


class FocalLoss(Loss):
    """Focal loss on logits for binary or multi-label targets (Lin et al. 2017,
    arXiv 1708.02002). ``x``: logits, any shape; ``target``: the same shape, in [0, 1].

    With ``p = sigmoid(x)``: ``p_t = p`` where ``t = 1`` else ``1 - p``, ``alpha_t = alpha``
    where ``t = 1`` else ``1 - alpha`` (``alpha=None``: 1), and per element
    ``loss = -alpha_t (1 - p_t)^gamma log(p_t)``; mean over elements for ``reduction="mean"``.
    Written as torchvision's ``sigmoid_focal_loss`` does, ``p_t = p t + (1 - p)(1 - t)`` and
    ``alpha_t = alpha t + (1 - alpha)(1 - t)``, which is the formula above for 0/1 targets.
    Stable for any logits: ``-log(p_t)`` is the cross-entropy ``max(x, 0) - x t +
    log(1 + e^-|x|)`` and ``1 - p_t = t sigmoid(-x) + (1 - t) sigmoid(x)``, never ``1 - p``.
    Gradient, with ``m = 1 - p_t`` and ``ce = -log(p_t)``:
    ``alpha_t (m^gamma (p - t) + gamma m^(gamma-1) (1 - 2t) p (1 - p) ce)``.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25,
                 reduction: str = "mean") -> None:
        super().__init__(reduction)
        if not gamma >= 0:
            raise ValueError(f"{self.name}: expected gamma >= 0, got {gamma!r}")
        if alpha is not None and not 0 <= alpha <= 1:
            raise ValueError(f"{self.name}: expected alpha in [0, 1] or None, got {alpha!r}")
        self.gamma, self.alpha = float(gamma), alpha

    def __repr__(self) -> str:
        return (f"{self.name}(gamma={self.gamma!r}, alpha={self.alpha!r}, "
                f"reduction={self.reduction!r})")

    def _parts(self, ops: Backend, x: Array, t: Array) -> tuple[Any, Array, Array, Array, Array]:
        p, q = ops.sigmoid(x), ops.sigmoid(-x)  # q = 1 - p without cancellation
        m = t * q + (1 - t) * p                   # 1 - p_t
        ce = ops.maximum(x, 0) - x * t + ops.log1p(ops.exp(-ops.abs(x)))  # -log p_t
        a = 1 if self.alpha is None else self.alpha * t + (1 - self.alpha) * (1 - t)
        return a, p, q, m, ce

    def _terms(self, ops: Backend, x: Array, target: Array) -> Array:
        a, _, _, m, ce = self._parts(ops, x, target)
        return a * m ** self.gamma * ce

    def _dterms(self, ops: Backend, x: Array, target: Array) -> Array:
        a, p, q, m, ce = self._parts(ops, x, target)
        grad = m ** self.gamma * (p - target)
        if self.gamma != 0:  # m = 0 only where p (1 - p) = 0 too: that term is 0 there
            m_pow = ops.where(m > 0, m, 1) ** (self.gamma - 1)
            grad = grad + self.gamma * m_pow * (1 - 2 * target) * p * q * ce
        return a * grad


class DiceLoss(Loss):
    """Dice loss for segmentation. ``pred``: predicted probabilities ``H`` of shape
    ``(N, ...)``; ``target``: the mask ``Y``, same shape, in [0, 1].

    Per sample, over all non-batch axes: ``S = sum(G Y H)``, ``f(A) = sum(G A)``,
    ``loss = 1 - (2 S + smooth) / (f(Y) + f(H) + smooth)``; mean over the batch for
    ``reduction="mean"`` (``"sum"``: the sum). ``weights`` ``G``: values in [0, 1] of a shape
    that broadcasts to one sample's shape (per class: ``(C, 1, 1)``), default 1. Gradient,
    with ``F = f(Y) + f(H) + smooth``: ``G ((2 S + smooth) - 2 Y F) / F^2``.
    """

    def __init__(self, smooth: float = 1.0, weights: Any = None, reduction: str = "mean") -> None:
        super().__init__(reduction)
        if not smooth >= 0:
            raise ValueError(f"{self.name}: expected smooth >= 0, got {smooth!r}")
        self.smooth = float(smooth)
        self.weights = None
        if weights is not None:
            w = np.asarray(weights.get() if is_device_array(weights) else weights,
                           dtype=np.float64)
            if w.size == 0 or not bool(np.all((w >= 0) & (w <= 1))):
                raise ValueError(f"{self.name}: expected weights in [0, 1], got values in "
                                 f"[{w.min(initial=np.nan)}, {w.max(initial=np.nan)}]")
            self.weights = w
        self._device_weights: dict[tuple[str, str], Array] = {}

    def __repr__(self) -> str:
        w = None if self.weights is None else f"<array {self.weights.shape}>"
        return f"{self.name}(smooth={self.smooth!r}, weights={w}, reduction={self.reduction!r})"

    def positions(self, pred: Array) -> int:
        return pred.shape[0]

    def _check_target(self, ops: Backend, pred: Array, target: Any) -> Array:
        if pred.ndim < 2:
            raise ShapeError(f"{self.name}: expected a prediction of shape (N, ...) with at "
                             f"least 2 axes, got {tuple(pred.shape)}")
        if self.weights is not None:
            sample = tuple(pred.shape[1:])
            try:
                fits = np.broadcast_shapes(self.weights.shape, sample) == sample
            except ValueError:
                fits = False
            if not fits:
                raise ShapeError(f"{self.name}: expected weights that broadcast to one "
                                 f"sample's shape {sample}, got {self.weights.shape}")
        return super()._check_target(ops, pred, target)

    def _weights(self, ops: Backend, dtype: Any) -> Array | None:
        if self.weights is None:
            return None
        key = (ops.name, str(dtype))
        if key not in self._device_weights:
            self._device_weights[key] = ops.asarray(self.weights, dtype=dtype)
        return self._device_weights[key]

    def _sums(self, ops: Backend, h: Array, y: Array) -> tuple[Array | None, Array, Array]:
        """``G``, ``2 S + smooth`` and ``F`` per sample, shaped ``(N, 1, ..., 1)``."""
        g = self._weights(ops, h.dtype)
        gy, gh = (y, h) if g is None else (g * y, g * h)
        axes = tuple(range(1, h.ndim))
        num = 2 * ops.sum(gy * h, axis=axes, keepdims=True) + self.smooth
        den = ops.sum(gy, axis=axes, keepdims=True) + ops.sum(gh, axis=axes, keepdims=True) \
            + self.smooth
        return g, num, den

    def _terms(self, ops: Backend, h: Array, y: Array) -> Array:
        _, num, den = self._sums(ops, h, y)
        return 1 - num / den

    def _dterms(self, ops: Backend, h: Array, y: Array) -> Array:
        g, num, den = self._sums(ops, h, y)
        grad = (num - 2 * y * den) / (den * den)
        return grad if g is None else g * grad


def dice(pred: Any, target: Any, threshold: float = 0.5) -> Array | None:
    """The mean Dice coefficient of a batch, a :class:`~gpunet.Trainer` metric: per sample,
    ``2 |P & Y| / (|P| + |Y|)`` with ``P = pred > threshold`` and ``Y = target > 0.5`` over
    all non-batch axes (1 where both are empty). None unless ``target`` is a float mask of
    ``pred``'s shape (labels, for instance)."""
    if tuple(pred.shape) != tuple(target.shape) or target.dtype.kind != "f" or pred.ndim < 2:
        return None
    axes = tuple(range(1, pred.ndim))
    p, y = pred > threshold, target > 0.5
    inter = (p & y).sum(axis=axes)
    total = p.sum(axis=axes) + y.sum(axis=axes)
    empty = total == 0
    return ((2 * inter + empty) / (total + empty)).mean()  # a 0-d array: read it when needed
