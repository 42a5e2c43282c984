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
- :class:`L1`, :class:`Huber`: ``|pred - target|`` and its quadratic-near-zero form, as
  PyTorch's ``L1Loss`` and ``HuberLoss``.
- :class:`SoftmaxCrossEntropy`: ``-sum_c t_c log softmax(x)_c`` per position of logits
  ``(..., C)``; targets are integer labels ``(...)`` or class probabilities ``(..., C)``.
- :class:`ContentLoss`, :class:`StyleLoss`: neural style transfer's content and style costs
  on activations ``(N, C, H, W)``, one term per sample.
- :class:`TripletLoss` (``forward([anchor, positive, negative])``), :class:`CosineEmbeddingLoss`
  (``forward([x1, x2], y)``): losses on several embedding batches, given as a list;
  ``backward()`` returns one gradient per array. :class:`BatchTripletLoss`
  (``forward(embeddings, labels)``) mines the triplets inside the batch.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .backends import FLOAT_DTYPES, Array, Backend, device_name, device_of, is_device_array
from .backends.base import Pending
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
        self._pending = Pending()  # a bad target found on a GPU, raised at check()

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
            return self._pending.poisoned(ops, total)

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
        Trainer makes it when the loss turns out not to be finite). On the host devices such
        errors are raised at once (:class:`~gpunet.backends.base.Pending`)."""
        self._pending.take()

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
            where = device_name(target)
            raise DeviceError(f"{self.name}: expected the target on device {ops.name} "
                              f"(the prediction's), got an array on {where}")
        if target.dtype.kind not in "biuf":
            raise DTypeError(f"{self.name}: expected a numeric target, got dtype {target.dtype}")

    #: whether targets are probabilities in [0, 1] (the binary cross-entropies, Dice): a
    #: target outside, such as a class index, would give a wrong loss without an error
    _unit_targets = False

    def _check_target(self, ops: Backend, pred: Array, target: Any) -> Array:
        """Targets of the prediction's shape, cast to its dtype (labels 0/1 may be integers)."""
        self._check_target_array(ops, target)
        if tuple(target.shape) != tuple(pred.shape):
            raise ShapeError(f"{self.name}: expected the target of shape {tuple(pred.shape)} "
                             f"(the prediction's), got {tuple(target.shape)}")
        target = ops.asarray(target, dtype=pred.dtype)
        if self._unit_targets:
            self._check_range(ops, target, "targets", 0, 1)
        return target

    def _check_range(self, ops: Backend, values: Array, what: str, low: float,
                     high: float | None = None) -> None:
        """Reject entries of ``values`` outside ``[low, high]`` (``high=None``: ``>= low``):
        at once on the host devices, on a GPU at :meth:`check` (the loss turns NaN)."""
        bad = values < low if high is None else (values < low) | (values > high)
        where = f">= {low}" if high is None else f"in [{low}, {high}]"
        self._pending.flag(ops, bad, values,
                           lambda v: ValueError(f"{self.name}: expected {what} {where}, got {v}"))


class MSE(Loss):
    """Mean squared error. ``pred`` and ``target`` have one shape, any shape.

    ``loss = sum_i (pred_i - target_i)^2``, divided by the number of elements for
    ``reduction="mean"``. Gradient: ``2 (pred_i - target_i)``.
    """

    def _terms(self, ops: Backend, pred: Array, target: Array) -> Array:
        return (pred - target) ** 2

    def _dterms(self, ops: Backend, pred: Array, target: Array) -> Array:
        return 2 * (pred - target)


class L1(Loss):
    """Mean absolute error, PyTorch's ``nn.L1Loss``. ``pred`` and ``target`` have one shape.

    ``loss = sum_i |pred_i - target_i|``, divided by the number of elements for
    ``reduction="mean"``. Gradient: ``sign(pred_i - target_i)`` (0 where they are equal, as
    PyTorch's)::

        loss = L1()
        value = loss(pred, target)     # 0-d array
        model.backward(loss.backward())
    """

    def _terms(self, ops: Backend, pred: Array, target: Array) -> Array:
        return ops.abs(pred - target)

    def _dterms(self, ops: Backend, pred: Array, target: Array) -> Array:
        return ops.xp.sign(pred - target)


class Huber(Loss):
    """Huber loss, PyTorch's ``nn.HuberLoss(delta=...)``: quadratic for small errors, linear
    for large ones. ``pred`` and ``target`` have one shape.

    With ``d = pred_i - target_i``: ``0.5 d^2`` where ``|d| <= delta``, else
    ``delta (|d| - 0.5 delta)``; summed, or divided by the number of elements for
    ``reduction="mean"``. Gradient: ``clip(d, -delta, delta)``. ``Huber(delta=1)`` is also
    PyTorch's ``SmoothL1Loss(beta=1)``::

        loss = Huber(delta=1.0)
        value = loss(pred, target)
    """

    def __init__(self, delta: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not delta > 0:
            raise ValueError(f"{self.name}: expected delta > 0, got {delta!r}")
        self.delta = float(delta)

    def __repr__(self) -> str:
        return f"{self.name}(delta={self.delta!r}, reduction={self.reduction!r})"

    def _terms(self, ops: Backend, pred: Array, target: Array) -> Array:
        a = ops.abs(pred - target)
        return ops.where(a <= self.delta, 0.5 * a * a, self.delta * (a - 0.5 * self.delta))

    def _dterms(self, ops: Backend, pred: Array, target: Array) -> Array:
        return ops.clip(pred - target, -self.delta, self.delta)


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

    _unit_targets = True

    def __repr__(self) -> str:
        return f"{self.name}(reduction={self.reduction!r}, eps={self.eps!r})"

    def _check_target(self, ops: Backend, pred: Array, target: Any) -> Array:
        target = super()._check_target(ops, pred, target)
        # logits given for probabilities would be clipped into a plausible, wrong loss (torch's
        # BCELoss refuses them too); BinaryCrossEntropyWithLogits is the loss for logits
        self._check_range(ops, pred, "probabilities as the prediction (logits: use "
                                     "BinaryCrossEntropyWithLogits),", 0, 1)
        return target

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

    _unit_targets = True

    def _terms(self, ops: Backend, x: Array, target: Array) -> Array:
        return ops.maximum(x, 0) - x * target + ops.log1p(ops.exp(-ops.abs(x)))

    def _dterms(self, ops: Backend, x: Array, target: Array) -> Array:
        return ops.sigmoid(x) - target


class SoftmaxCrossEntropy(Loss):
    """Cross-entropy of a softmax over the last axis. ``x``: logits ``(..., C)``, such as
    ``(N, C)`` or ``(T, N, C)``; ``target``: integer labels ``(...)`` in ``[0, C)``, or class
    probabilities (one-hot or soft, ``>= 0``) ``(..., C)``. ``C = 1`` is refused: a softmax
    over one class is 1 and the loss 0 whatever the target (one output per sample:
    :class:`BinaryCrossEntropyWithLogits` or :class:`MSE`). Targets are checked as labels
    are: at once on the host devices, through :meth:`check` on a GPU.

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
        if classes < 2:  # softmax over one class is 1: the loss would be 0 whatever the target
            raise ShapeError(f"{self.name}: expected logits (..., C) of at least 2 classes, got "
                             f"shape {shape}; for one output per sample use "
                             "BinaryCrossEntropyWithLogits (two classes) or MSE (regression)")
        if tuple(target.shape) == shape:
            target = ops.asarray(target, dtype=x.dtype)
            self._check_range(ops, target, "class probabilities", 0)
            return target
        if tuple(target.shape) != shape[:-1]:
            raise ShapeError(f"{self.name}: expected the target as labels of shape "
                             f"{shape[:-1]} or probabilities of shape {shape} for logits "
                             f"of shape {shape}, got {tuple(target.shape)}")
        if target.dtype.kind not in "iu":
            raise DTypeError(f"{self.name}: expected labels of shape {shape[:-1]} to be "
                             f"integers, got dtype {target.dtype}")
        self._pending.flag(ops, (target < 0) | (target >= classes), target,
                           lambda v: ValueError(f"{self.name}: expected labels in "
                                                f"[0, {classes}), got {v}"))
        # on a GPU a bad label is only flagged so far: keep the gather within the logits
        return target if ops.on_host else ops.clip(target, 0, classes - 1)


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

    _unit_targets = True

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

    _unit_targets = True

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


# -- neural style transfer (Gatys et al. 2015) ---------------------------------------------
class _FeatureMapLoss(Loss):
    """A loss between the activations ``(N, C, H, W)`` of one layer for the generated image
    (``pred``) and for a reference image (``target``: the same shape, or ``(1, C, H, W)``,
    one reference for every generated image). One term per sample: ``reduction="mean"``
    averages over the batch, ``"sum"`` adds the samples up."""

    def positions(self, pred: Array) -> int:
        return pred.shape[0]

    def _check_target(self, ops: Backend, pred: Array, target: Any) -> Array:
        if pred.ndim != 4:
            raise ShapeError(f"{self.name}: expected activations of shape (N, C, H, W), "
                             f"got {tuple(pred.shape)}")
        self._check_target_array(ops, target)
        shape = tuple(pred.shape)
        if tuple(target.shape) not in (shape, (1, *shape[1:])):
            raise ShapeError(f"{self.name}: expected the target of shape {shape} or "
                             f"{(1, *shape[1:])} (the activations'), got {tuple(target.shape)}")
        return ops.asarray(target, dtype=pred.dtype)


class ContentLoss(_FeatureMapLoss):
    """The content cost of neural style transfer: how far the generated image's activations
    ``a_G`` (``pred``, ``(N, C, H, W)``) are from the content image's ``a_C`` (``target``).

    Per sample: ``J = 1 / (4 H W C) sum (a_C - a_G)^2`` over all ``C H W`` entries; the mean
    over the batch for ``reduction="mean"``. Gradient: ``(a_G - a_C) / (2 H W C)``.

    The total cost of the notes, ``J = alpha J_content + beta sum_l lambda[l] J_style[l]``, is
    a weighted sum of losses, one object per layer; each ``backward()`` is the gradient of its
    own term, to be scaled by the same weights::

        content, styles = ContentLoss(), {l: StyleLoss() for l in lam}
        j = (alpha * content(a_G[k], a_C[k])
             + beta * sum(lam[l] * styles[l](a_G[l], a_S[l]) for l in lam))
        grads = {l: beta * lam[l] * styles[l].backward() for l in lam}   # dJ / da_G[l]
        grads[k] = grads.get(k, 0) + alpha * content.backward()
    """

    def _terms(self, ops: Backend, a_g: Array, a_c: Array) -> Array:
        _, c, h, w = a_g.shape
        return (a_c - a_g) ** 2 / (4 * h * w * c)

    def _dterms(self, ops: Backend, a_g: Array, a_c: Array) -> Array:
        _, c, h, w = a_g.shape
        return (a_g - a_c) / (2 * h * w * c)


class StyleLoss(_FeatureMapLoss):
    """The style cost of one layer in neural style transfer: how far the Gram matrix of the
    generated image's activations ``a_G`` (``pred``, ``(N, C, H, W)``) is from that of the
    style image's ``a_S`` (``target``).

    With ``A`` a sample's ``(C, H W)`` unrolled activations and ``G = A A^T`` (the
    :class:`~gpunet.layers.Gram` layer), per sample:
    ``J = 1 / (4 C^2 (H W)^2) sum_ij (G_S[i, j] - G_G[i, j])^2``; the mean over the batch for
    ``reduction="mean"``. Gradient: ``(G_G - G_S) A_G / (C^2 (H W)^2)``, reshaped to
    ``(N, C, H, W)``. Several layers, weighted by ``lambda[l]``, are a sum of losses: see
    :class:`ContentLoss`::

        style = StyleLoss()
        j = style(a_G, a_S)      # a 0-d array
        da_G = style.backward()  # (N, C, H, W), for the network's backward
    """

    @staticmethod
    def _unrolled(a: Array) -> Array:
        n, c, h, w = a.shape
        return a.reshape(n, c, h * w)

    def _grams(self, ops: Backend, a_g: Array, a_s: Array) -> tuple[Array, Array, float]:
        """``A_G``, ``G_G - G_S`` and the scale ``C^2 (H W)^2``."""
        _, c, h, w = a_g.shape
        ag, as_ = self._unrolled(a_g), self._unrolled(a_s)
        diff = ops.bmm(ag, ag, trans_b=True) - ops.bmm(as_, as_, trans_b=True)
        return ag, diff, float(c * c * (h * w) ** 2)

    def _terms(self, ops: Backend, a_g: Array, a_s: Array) -> Array:
        _, diff, scale = self._grams(ops, a_g, a_s)
        return diff * diff / (4 * scale)

    def _dterms(self, ops: Backend, a_g: Array, a_s: Array) -> Array:
        # d/dA of sum (G_G - G_S)^2 is 2 (D + D^T) A with D = G_G - G_S, and D is symmetric
        ag, diff, scale = self._grams(ops, a_g, a_s)
        return (ops.bmm(diff, ag) / scale).reshape(a_g.shape)


# -- embeddings: losses on pairs and triplets of vectors ---------------------------------

#: torch.nn.functional.pairwise_distance's eps: added to the difference before its norm.
PAIRWISE_EPS = 1e-6
#: torch's cosine_embedding_loss smoothing of the squared norms: 1e-12 as a C float
COSINE_EPS = float(np.float32(1e-12))



def _distance(ops: Backend, diff: Array, distance: str) -> tuple[Array, Array]:
    """``d`` over the last axis of ``diff = a - b`` and ``dd/ddiff``: ``||diff||^2``
    (``"squared"``) or ``||diff + eps||`` with eps = :data:`PAIRWISE_EPS` (``"euclidean"``,
    PyTorch's ``pairwise_distance``)."""
    if distance == "squared":
        return ops.sum(diff * diff, axis=-1), 2 * diff
    shifted = diff + PAIRWISE_EPS
    d = ops.sqrt(ops.sum(shifted * shifted, axis=-1))
    return d, shifted / d[..., None]


class _VectorLoss(Loss):
    """A loss on a list of embedding batches ``(N, D)`` rather than one prediction: checks
    them and keeps the gradients ``backward`` returns (computed in ``forward``, where the
    intermediate values are at hand)."""

    _grads: list[Array] | None = None

    def _check_vectors(self, xs: Any, names: tuple[str, ...]) -> Backend:
        listed = f"[{', '.join(names)}]"
        if not isinstance(xs, (list, tuple)):
            raise ShapeError(f"{self.name}: expected a list {listed}, got {type(xs).__name__}")
        if len(xs) != len(names):
            raise ShapeError(f"{self.name}: expected a list {listed} of {len(names)} arrays, "
                             f"got {len(xs)}")
        for x, what in zip(xs, names):
            if not _is_array(x):
                raise DTypeError(f"{self.name}: expected {what} to be an array, "
                                 f"got {type(x).__name__}")
        first, ops = xs[0], device_of(xs[0])
        if first.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"{self.name}: expected {names[0]} of dtype float32 or float64, "
                             f"got {first.dtype}")
        if first.ndim != 2 or first.size == 0:
            raise ShapeError(f"{self.name}: expected {names[0]} of shape (N, D), non-empty, "
                             f"got {tuple(first.shape)}")
        for x, what in zip(xs[1:], names[1:]):
            if not ops.owns(x):
                raise DeviceError(f"{self.name}: expected {what} on device {ops.name} (the "
                                  f"{names[0]}'s), got an array on {device_name(x)}")
            if x.dtype != first.dtype:
                raise DTypeError(f"{self.name}: expected {what} of dtype {first.dtype} (the "
                                 f"{names[0]}'s), got {x.dtype}")
            if tuple(x.shape) != tuple(first.shape):
                raise ShapeError(f"{self.name}: expected {what} of shape {tuple(first.shape)} "
                                 f"(the {names[0]}'s), got {tuple(x.shape)}")
        return ops

    def backward(self) -> Any:
        """The gradients of the last ``forward``'s loss, one per input."""
        if self._grads is None:
            raise StateError(f"{self.name}: backward called before forward "
                             "(or twice for one forward)")
        grads, self._grads = self._grads, None
        return grads


class TripletLoss(_VectorLoss):
    """Triplet loss (Schroff et al. 2015, FaceNet) on anchors ``A``, positives ``P`` (of the
    anchor's class) and negatives ``N`` (of another class), each ``(N, D)``, given as a list.

    Per triplet ``loss_i = max(0, d(A_i, P_i) - d(A_i, N_i) + margin)``, averaged over the N
    triplets for ``reduction="mean"``. ``distance="squared"``: ``d(a, b) = ||a - b||^2``, the
    reference notes' formula; ``"euclidean"``: ``d(a, b) = ||a - b + 1e-6||``, which makes
    ``TripletLoss(m, "euclidean")`` PyTorch's ``nn.TripletMarginLoss(margin=m)`` (p = 2, its
    ``pairwise_distance`` eps). Gradient of an active triplet (hinge > 0), with
    ``g(a, b) = dd(a, b)/da``: ``dA = g(A, P) - g(A, N)``, ``dP = -g(A, P)``,
    ``dN = g(A, N)``; an inactive one contributes 0::

        loss = TripletLoss(margin=0.2)
        value = loss.forward([anchor, positive, negative])   # 0-d array
        da, dp, dn = loss.backward()
    """

    def __init__(self, margin: float = 0.2, distance: str = "squared",
                 reduction: str = "mean") -> None:
        super().__init__(reduction)
        if not margin >= 0:
            raise ValueError(f"{self.name}: expected margin >= 0, got {margin!r}")
        if distance not in ("squared", "euclidean"):
            raise ValueError(f"{self.name}: expected distance 'squared' or 'euclidean', "
                             f"got {distance!r}")
        self.margin, self.distance = float(margin), distance

    def __repr__(self) -> str:
        return (f"{self.name}(margin={self.margin!r}, distance={self.distance!r}, "
                f"reduction={self.reduction!r})")

    def forward(self, triplet: Any, target: Any = None) -> Array:
        """The loss of ``[anchor, positive, negative]``: a 0-d array on their device.
        ``target`` is not used (the roles are the labels); it is there for the signature."""
        ops = self._check_vectors(triplet, ("anchor", "positive", "negative"))
        a, p, n = triplet
        with ops.scope():
            d_ap, g_ap = _distance(ops, a - p, self.distance)
            d_an, g_an = _distance(ops, a - n, self.distance)
            hinge = d_ap - d_an + self.margin
            active = hinge > 0
            scale = 1 / len(a) if self.reduction == "mean" else 1.0
            w = (active * scale).astype(a.dtype)[:, None]
            self._grads = [w * (g_ap - g_an), -w * g_ap, w * g_an]
            return ops.sum(ops.where(active, hinge, 0)) * scale

    __call__ = forward


class CosineEmbeddingLoss(_VectorLoss):
    """PyTorch's ``nn.CosineEmbeddingLoss(margin)`` in gpunet's list convention:
    ``forward([x1, x2], y)`` with ``x1``, ``x2`` of shape ``(N, D)`` and targets ``y`` of
    shape ``(N,)``, 1 (similar) or -1 (dissimilar), integers or floats.

    With ``cos = x1 . x2 / sqrt((||x1||^2 + e)(||x2||^2 + e))`` and PyTorch's smoothing
    ``e = float32(1e-12)`` (:data:`COSINE_EPS`), ``loss_i = 1 - cos`` for ``y = 1`` and
    ``max(0, cos - margin)`` for ``y = -1``; mean over N for ``reduction="mean"``. Gradient, with ``q_i = ||x_i||^2 + e``:
    ``dcos/dx1 = x2 / sqrt(q1 q2) - cos x1 / q1`` (symmetrically for ``x2``), times -1 for
    ``y = 1`` and 1 where ``cos > margin`` for ``y = -1``::

        loss = CosineEmbeddingLoss(margin=0.5)
        value = loss.forward([x1, x2], y)
        dx1, dx2 = loss.backward()
    """

    def __init__(self, margin: float = 0.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        if not -1 <= margin <= 1:
            raise ValueError(f"{self.name}: expected margin in [-1, 1], got {margin!r}")
        self.margin = float(margin)

    def __repr__(self) -> str:
        return f"{self.name}(margin={self.margin!r}, reduction={self.reduction!r})"

    def forward(self, pair: Any, target: Any) -> Array:
        """The loss of ``[x1, x2]`` against targets ``y`` of 1 and -1: a 0-d array on their
        device. On a GPU a target other than 1 or -1 makes it NaN and is reported by
        :meth:`check`, as :class:`SoftmaxCrossEntropy` does with labels."""
        ops = self._check_vectors(pair, ("x1", "x2"))
        x1, x2 = pair
        self._check_target_array(ops, target)
        if tuple(target.shape) != (len(x1),):
            raise ShapeError(f"{self.name}: expected the target of shape ({len(x1)},), one "
                             f"1 or -1 per pair, got {tuple(target.shape)}")
        with ops.scope():
            self._pending.flag(ops, (target != 1) & (target != -1), target,
                               lambda v: ValueError(f"{self.name}: expected targets 1 or -1, "
                                                    f"got {v}"))
            similar = (target == 1)[:, None]
            q1 = ops.sum(x1 * x1, axis=1, keepdims=True) + COSINE_EPS
            q2 = ops.sum(x2 * x2, axis=1, keepdims=True) + COSINE_EPS
            root = ops.sqrt(q1 * q2)
            cos = ops.sum(x1 * x2, axis=1, keepdims=True) / root
            terms = ops.where(similar, 1 - cos, ops.maximum(cos - self.margin, 0))
            scale = 1 / len(x1) if self.reduction == "mean" else 1.0
            dcos = ops.where(similar, -1.0, (cos > self.margin).astype(x1.dtype)) * scale
            self._grads = [dcos * (x2 / root - cos * x1 / q1), dcos * (x1 / root - cos * x2 / q2)]
            return self._pending.poisoned(ops, ops.sum(terms) * scale)

    __call__ = forward


class BatchTripletLoss(Loss):
    """Triplet loss with the triplets mined inside each batch: ``forward(embeddings, labels)``
    with embeddings ``(N, D)`` and integer class labels ``(N,)``; ``backward()`` returns
    ``d loss / d embeddings``, so a :class:`~gpunet.Trainer` trains an embedding model on it
    like on any loss. Distances ``d`` between all pairs of the batch as :class:`TripletLoss`'s.

    - ``mining="hard"`` (batch-hard, Hermans et al. 2017, arXiv 1703.07737): each sample is
      an anchor ``a``, with its farthest positive and nearest negative in the batch:
      ``loss_a = max(0, max_p d(a, p) - min_n d(a, n) + margin)``, averaged over the anchors
      that have a positive and a negative in the batch.
    - ``mining="semi-hard"`` (FaceNet, Schroff et al. 2015; TensorFlow's
      ``triplet_semihard_loss``): each pair of an anchor and a positive takes the nearest
      negative that is farther than the positive, ``d(a, n) > d(a, p)`` (none: the farthest
      negative); averaged over those pairs.

    The gradient reaches every embedding through the distances the mined triplets use (the
    choice of triplet itself is piecewise constant)::

        loss = BatchTripletLoss(margin=0.2)
        value = loss.forward(model.forward(x), labels)
        model.backward(loss.backward())
    """

    def __init__(self, margin: float = 0.2, mining: str = "hard", distance: str = "squared",
                 reduction: str = "mean") -> None:
        super().__init__(reduction)
        if not margin >= 0:
            raise ValueError(f"{self.name}: expected margin >= 0, got {margin!r}")
        if mining not in ("hard", "semi-hard"):
            raise ValueError(f"{self.name}: expected mining 'hard' or 'semi-hard', got {mining!r}")
        if distance not in ("squared", "euclidean"):
            raise ValueError(f"{self.name}: expected distance 'squared' or 'euclidean', "
                             f"got {distance!r}")
        self.margin, self.mining, self.distance = float(margin), mining, distance
        self._grad: Array | None = None

    def __repr__(self) -> str:
        return (f"{self.name}(margin={self.margin!r}, mining={self.mining!r}, "
                f"distance={self.distance!r}, reduction={self.reduction!r})")

    def forward(self, embeddings: Array, labels: Any) -> Array:
        """The mean (or summed) loss of the triplets mined from this batch: a 0-d array on the
        embeddings' device; 0 when no anchor has both a positive and a negative."""
        ops = self._check_pred(embeddings)
        self._check_target_array(ops, labels)
        if embeddings.ndim != 2:
            raise ShapeError(f"{self.name}: expected embeddings of shape (N, D), "
                             f"got {tuple(embeddings.shape)}")
        if tuple(labels.shape) != (len(embeddings),):
            raise ShapeError(f"{self.name}: expected labels of shape ({len(embeddings)},), "
                             f"got {tuple(labels.shape)}")
        if labels.dtype.kind not in "iu":
            raise DTypeError(f"{self.name}: expected integer class labels, got dtype "
                             f"{labels.dtype}")
        with ops.scope():
            xp, dtype = ops.xp, embeddings.dtype
            d, g = _distance(ops, embeddings[:, None, :] - embeddings[None, :, :], self.distance)
            cols = xp.arange(len(embeddings))
            same = labels[:, None] == labels[None, :]
            positive, negative = same & (cols[:, None] != cols), ~same
            terms, valid, w = (self._hard if self.mining == "hard" else self._semi_hard)(
                ops, d, positive, negative, cols)
            scale = (ops.maximum(ops.sum(valid), 1).astype(dtype) if self.reduction == "mean"
                     else 1)
            w = w.astype(dtype) / scale   # d loss / d d(a, b), (N, N)
            wg = w[:, :, None] * g        # d d(a, b) / d e_a = g(a, b), d / d e_b = -g(a, b)
            self._grad = ops.sum(wg, axis=1) - ops.sum(wg, axis=0)
            return (ops.sum(terms) / scale).astype(dtype)

    __call__ = forward

    def _hard(self, ops: Backend, d: Array, positive: Array, negative: Array,
              cols: Array) -> tuple[Array, Array, Array]:
        """Per anchor: hinge term, whether it counts, and its weights on ``d`` (+1 at the
        hardest positive, -1 at the hardest negative)."""
        xp = ops.xp
        p = xp.where(positive, d, -xp.inf).argmax(axis=1)
        n = xp.where(negative, d, xp.inf).argmin(axis=1)
        valid = positive.any(axis=1) & negative.any(axis=1)
        hinge = (xp.take_along_axis(d, p[:, None], axis=1)
                 - xp.take_along_axis(d, n[:, None], axis=1))[:, 0] + self.margin
        active = valid & (hinge > 0)
        w = active[:, None] * ((cols == p[:, None]).astype(d.dtype)
                               - (cols == n[:, None]).astype(d.dtype))
        return ops.where(active, hinge, 0), valid, w

    def _semi_hard(self, ops: Backend, d: Array, positive: Array, negative: Array,
                   cols: Array) -> tuple[Array, Array, Array]:
        """Per (anchor, positive) pair: hinge term, whether it counts, and the weights on
        ``d`` summed over the pairs (+1 at the positive, -1 at its chosen negative)."""
        xp = ops.xp
        d_an = d[:, None, :]                                         # (a, 1, n)
        farther = negative[:, None, :] & (d_an > d[:, :, None])      # (a, p, n)
        nearest_farther = xp.where(farther, d_an, xp.inf).argmin(axis=2)
        farthest = xp.where(negative, d, -xp.inf).argmax(axis=1)
        n = xp.where(farther.any(axis=2), nearest_farther, farthest[:, None])  # (a, p)
        valid = positive & negative.any(axis=1)[:, None]
        hinge = d - xp.take_along_axis(d, n, axis=1) + self.margin
        active = valid & (hinge > 0)
        chosen = active[:, :, None] & (n[:, :, None] == cols)        # (a, p, n)
        w = active.astype(d.dtype) - ops.sum(chosen.astype(d.dtype), axis=1)
        return ops.where(active, hinge, 0), valid, w

    def backward(self) -> Array:
        """``d loss / d embeddings`` for the last ``forward``: ``(N, D)``."""
        if self._grad is None:
            raise StateError(f"{self.name}: backward called before forward "
                             "(or twice for one forward)")
        grad, self._grad = self._grad, None
        return grad
