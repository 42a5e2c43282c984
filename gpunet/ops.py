"""Utilities outside the layer protocol, on every device: boxes of object detection
(:func:`box_iou`, :func:`nms`) and word vectors (:func:`cosine_similarity`, :func:`neutralize`,
:func:`equalize`).

Arrays of any device go in and results come back on the same device, computed with that
device's array module (NumPy or CuPy). Nothing is read back to the host except where a
function says so: :func:`nms` (its greedy pass is sequential) and the check that a bias axis
is not zero.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .backends import Array, Backend, device_name, device_of, is_device_array, to_numpy
from .errors import DeviceError, DTypeError, ShapeError



def _device(fn: str, **arrays: Any) -> Backend:
    """The device of ``arrays`` (by argument name), after checking that each is a real
    numeric array and that all live on one device."""
    first = None
    for name, a in arrays.items():
        if not (isinstance(a, np.ndarray) or is_device_array(a)):
            raise DTypeError(f"{fn}: expected {name} to be an array, got {type(a).__name__}")
        if a.dtype.kind not in "biuf":
            raise DTypeError(f"{fn}: expected {name} of a real numeric dtype, got {a.dtype}")
        if first is None:
            first = (name, a)
        elif device_name(a) != device_name(first[1]):
            raise DeviceError(f"{fn}: expected {name} on the device of {first[0]} "
                              f"({device_name(first[1])}), got an array on {device_name(a)}")
    return device_of(first[1])


def _floats(a: Array) -> Array:
    """``a`` itself if it holds floats, else as float64 (integer coordinates, say)."""
    return a if a.dtype.kind == "f" else a.astype(np.float64)


def _refuse(ops: Backend, checks: Sequence[tuple[Array, Exception]]) -> None:
    """Raise the first error whose 0-d boolean condition holds. The conditions are read back
    together: on a GPU, one host read for all of them."""
    flags = to_numpy(ops.xp.stack([c for c, _ in checks]))
    for flag, (_, error) in zip(flags, checks):
        if flag:
            raise error


# -- boxes (x1, y1, x2, y2) ------------------------------------------------------------------
def _check_boxes(fn: str, name: str, boxes: Array) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ShapeError(f"{fn}: expected {name} of shape (N, 4) as (x1, y1, x2, y2), "
                         f"got {tuple(boxes.shape)}")


def box_iou(a: Array, b: Array) -> Array:
    """Intersection over union of every box of ``a`` ``(N, 4)`` with every box of ``b``
    ``(M, 4)``: ``(N, M)``, as ``torchvision.ops.box_iou``.

    Boxes are ``(x1, y1, x2, y2)`` with ``x1 <= x2`` and ``y1 <= y2``; area
    ``(x2 - x1)(y2 - y1)``, intersection ``max(0, min(x2) - max(x1)) max(0, min(y2) - max(y1))``,
    ``iou = inter / (area_a + area_b - inter)``. Degenerate boxes are not checked, as in
    torchvision: a box of zero area has IoU 0 with any box of positive area, and two boxes of
    zero area have ``0 / 0 = NaN``. Integer coordinates give float64::

        box_iou(x.asarray([[0, 0, 2, 2]]), x.asarray([[1, 1, 3, 3]]))  # [[1 / 7]]
    """
    ops = _device("box_iou", a=a, b=b)
    _check_boxes("box_iou", "a", a)
    _check_boxes("box_iou", "b", b)
    with ops.scope():
        a, b = _floats(a), _floats(b)
        xp = ops.xp
        # corners as columns (N, 1) against rows (1, M): each product below is (N, M) and
        # contiguous (3 times faster on the CPU than (N, M, 2) pairs of coordinates)
        ax1, ay1, ax2, ay2 = (a[:, k, None] for k in range(4))
        bx1, by1, bx2, by2 = (b[None, :, k] for k in range(4))
        inter = (xp.maximum(xp.minimum(ax2, bx2) - xp.maximum(ax1, bx1), 0)
                 * xp.maximum(xp.minimum(ay2, by2) - xp.maximum(ay1, by1), 0))
        union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 is NaN, as torchvision
            return inter / union


def nms(boxes: Array, scores: Array, iou_threshold: float) -> Array:
    """Non-maximum suppression, as ``torchvision.ops.nms``: the indices (int64, on the
    boxes' device) of the boxes kept, in decreasing order of score.

    ``boxes`` ``(N, 4)`` as ``(x1, y1, x2, y2)``, ``scores`` ``(N,)``. Greedily, from the
    highest score down (equal scores in order of index; NaN scores first, as ``torch.sort``
    puts them): keep a box, then drop every later box whose IoU (:func:`box_iou`) with it is
    greater than ``iou_threshold`` in ``[0, 1]``. The notes' first step, dropping boxes of low
    score, is the caller's: ``keep = nms(boxes[s > 0.6], s[s > 0.6], 0.5)`` (indices into the
    filtered boxes).

    The sort and the ``(N, N)`` IoU matrix are computed on the device; the greedy pass is
    sequential, so, as torchvision's CPU path, it runs on the host after one read of the
    boolean matrix "box j overlaps box i too much" (``N^2`` bytes), and the kept positions are
    sent back. Memory is ``O(N^2)``: filter by score first when there are many thousands.
    """
    ops = _device("nms", boxes=boxes, scores=scores)
    _check_boxes("nms", "boxes", boxes)
    if scores.shape != (boxes.shape[0],):
        raise ShapeError(f"nms: expected scores of shape ({boxes.shape[0]},), one per box, "
                         f"got {tuple(scores.shape)}")
    real = (int, float, np.integer, np.floating)
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, real) \
            or not 0 <= iou_threshold <= 1:
        raise ValueError(f"nms: expected iou_threshold a number in [0, 1], got {iou_threshold!r}")
    with ops.scope():
        xp = ops.xp
        s = _floats(scores)
        nan = xp.isnan(s)
        # two stable sorts: by score, highest first, then NaN scores before the rest
        order = xp.argsort(-xp.where(nan, 0, s), kind="stable")
        order = order[xp.argsort((~nan[order]).astype(np.int8), kind="stable")]
        ranked = boxes[order]
        over = xp.triu(box_iou(ranked, ranked) > iou_threshold, 1)  # later boxes only
        over = to_numpy(over)  # the one host read
        dropped = np.zeros(len(over), dtype=bool)
        kept = []
        for i in range(len(over)):
            if not dropped[i]:
                kept.append(i)
                dropped |= over[i]
        return order[ops.asarray(np.asarray(kept, dtype=np.int64))].astype(np.int64, copy=False)


# -- word vectors (..., D) ------------------------------------------------------------------
def _dot(u: Array, v: Array) -> Array:
    return (u * v).sum(axis=-1, keepdims=True)


def _check_vectors(fn: str, **arrays: Array) -> None:
    for name, a in arrays.items():
        if a.ndim == 0 or a.shape[-1] == 0:
            raise ShapeError(f"{fn}: expected {name} of shape (..., D) with D >= 1, "
                             f"got {tuple(a.shape)}")


def _bias_axis(fn: str, ops: Backend, e: Array, g: Array,
               more: Sequence[tuple[Array, Exception]] = ()) -> Array:
    """``||g||^2`` (a ``(1,)`` array), after checking that ``g`` is a nonzero ``(D,)`` vector
    that fits ``e`` ``(..., D)``: one host read, with the checks ``more`` (bool arrays, one
    error each) read in the same go."""
    if g.ndim != 1 or g.shape[0] != e.shape[-1]:
        raise ShapeError(f"{fn}: expected the bias axis g of shape ({e.shape[-1]},), the "
                         f"length of the word vectors, got {tuple(g.shape)}")
    gg = _dot(g, g)
    _refuse(ops, [(gg[0] == 0, ValueError(f"{fn}: expected a nonzero bias axis g, got a zero "
                                          "vector (its direction is undefined)")),
                  *more])
    return gg


def cosine_similarity(u: Array, v: Array, eps: float = 1e-8) -> Array:
    """``u . v / (||u||_2 ||v||_2) = cos(theta)`` over the last axis: ``u`` and ``v``
    ``(..., D)``, broadcast against each other, to ``(...)`` (a 0-d array for two vectors).

    As ``torch.nn.functional.cosine_similarity``, each norm is taken as at least ``eps``, so
    a zero vector has similarity 0 with everything instead of ``0 / 0``::

        cosine_similarity(e["father"], e["mother"])  # near 1: similar words
    """
    ops = _device("cosine_similarity", u=u, v=v)
    _check_vectors("cosine_similarity", u=u, v=v)
    if u.shape[-1] != v.shape[-1]:
        raise ShapeError(f"cosine_similarity: expected u and v of one length D, got shapes "
                         f"{tuple(u.shape)} and {tuple(v.shape)}")
    with ops.scope():
        u, v = _floats(u), _floats(v)
        xp = ops.xp
        nu = xp.maximum(xp.sqrt(_dot(u, u)), eps)
        nv = xp.maximum(xp.sqrt(_dot(v, v)), eps)
        return (_dot(u, v) / (nu * nv))[..., 0]


def neutralize(e: Array, g: Array) -> Array:
    """Remove the bias component of word vectors (Bolukbasi et al. 2016, the notes' form):
    ``e_bias = (e . g / ||g||_2^2) g`` and ``e_debiased = e - e_bias``, so that
    ``e_debiased . g = 0``. ``e``: ``(..., D)``, one word or a batch; ``g``: the bias axis
    ``(D,)`` (for gender, say ``e["woman"] - e["man"]``), nonzero; the result has ``e``'s
    shape. For words that should be neutral ("receptionist"), not for gendered pairs (see
    :func:`equalize`). On a GPU the check that ``g`` is not zero reads ``||g||^2`` back::

        e_fixed = neutralize(e["receptionist"], e["woman"] - e["man"])
    """
    ops = _device("neutralize", e=e, g=g)
    _check_vectors("neutralize", e=e)
    with ops.scope():
        e, g = _floats(e), _floats(g)
        gg = _bias_axis("neutralize", ops, e, g)
        return e - _dot(e, g) / gg * g


def equalize(e_w1: Array, e_w2: Array, g: Array) -> tuple[Array, Array]:
    """Equalise a pair of words that differ only along the bias axis, such as ("actress",
    "actor") (Bolukbasi et al. 2016), exactly as the notes write it: with
    ``p(x) = (x . g / ||g||_2^2) g``, the projection on the bias axis ``g`` ``(D,)``,

    - ``mu = (e_w1 + e_w2) / 2``, ``mu_B = p(mu)``, ``mu_orth = mu - mu_B``;
    - ``e_wiB = p(e_wi)`` and ``e_wiB_corrected =
      sqrt(|1 - ||mu_orth||_2^2|) (e_wiB - mu_B) / ||(e_wi - mu_orth) - mu_B||``;
    - ``e_i = e_wiB_corrected + mu_orth``; returns ``(e_1, e_2)``.

    Both results have the same part orthogonal to ``g`` (``mu_orth``) and opposite parts along
    it: the pair is symmetric about the bias axis, so any neutralised word is equally far from
    both. The square root assumes unit word vectors (as the paper's). The notes divide by the
    whole ``||e_wi - mu||``, where the paper divides by its part along ``g``,
    ``||e_wiB - mu_B||``: the results have length 1 when the pair differs only along ``g``
    and are shorter otherwise (the paper's always have length 1); this follows the notes.
    ``e_w1``, ``e_w2``: ``(..., D)``, one shape (one pair or a batch of pairs). A
    pair of equal vectors (the denominator 0) and a zero ``g`` raise ``ValueError``; on a GPU
    both checks cost one host read together::

        e_actress, e_actor = equalize(e["actress"], e["actor"], e["woman"] - e["man"])
    """
    ops = _device("equalize", e_w1=e_w1, e_w2=e_w2, g=g)
    _check_vectors("equalize", e_w1=e_w1, e_w2=e_w2)
    if e_w1.shape != e_w2.shape:
        raise ShapeError(f"equalize: expected e_w1 and e_w2 of one shape, got "
                         f"{tuple(e_w1.shape)} and {tuple(e_w2.shape)}")
    with ops.scope():
        xp = ops.xp
        e_w1, e_w2, g = _floats(e_w1), _floats(e_w2), _floats(g)
        # ||(e_w1 - mu_orth) - mu_B|| = ||e_w1 - mu|| = ||e_w2 - mu|| = ||e_w1 - e_w2|| / 2
        half = (e_w1 - e_w2) / 2
        same = xp.any(_dot(half, half) == 0)
        gg = _bias_axis("equalize", ops, e_w1, g, [(same, ValueError(
            "equalize: expected two different word vectors, got a pair of equal ones (the "
            "notes' denominator ||e_w1 - mu|| is 0)"))])

        def project(x: Array) -> Array:
            return _dot(x, g) / gg * g

        mu = (e_w1 + e_w2) / 2
        mu_b = project(mu)
        mu_orth = mu - mu_b
        scale = xp.sqrt(xp.abs(1 - _dot(mu_orth, mu_orth)))

        def corrected(e_w: Array) -> Array:
            d = (e_w - mu_orth) - mu_b
            return scale * (project(e_w) - mu_b) / xp.sqrt(_dot(d, d))

        return corrected(e_w1) + mu_orth, corrected(e_w2) + mu_orth
