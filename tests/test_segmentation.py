"""Segmentation: the focal and Dice losses against their formulas and finite differences, the
Dice metric, the synthetic `shapes` set, the U-Net, and `gpunet train unet --data shapes`."""
from __future__ import annotations

import math

import numpy as np
import pytest

import gpunet
from gpunet import DiceLoss, FocalLoss, ShapeError, gradcheck
from gpunet.data import shapes
from gpunet.losses import dice
from helpers import analytic_grad, numeric_grad, train_command

R = np.random.default_rng(29)


# -- focal loss ----------------------------------------------------------------------------
def focal_element(x: float, t: int, gamma: float, alpha: float | None) -> float:
    """Lin et al.'s formula, one element, in Python floats."""
    p = 1 / (1 + math.exp(-x))
    p_t = p if t == 1 else 1 - p
    a_t = 1.0 if alpha is None else (alpha if t == 1 else 1 - alpha)
    return -a_t * (1 - p_t) ** gamma * math.log(p_t)


@pytest.mark.parametrize("gamma, alpha", [(2.0, 0.25), (0.5, None), (0.0, 0.7), (3.0, 1.0)])
def test_focal_matches_the_formula(gamma, alpha):
    x, t = R.normal(size=(3, 2, 4)) * 3, R.integers(0, 2, (3, 2, 4))
    want = [focal_element(float(a), int(b), gamma, alpha) for a, b in zip(x.ravel(), t.ravel())]
    loss = FocalLoss(gamma, alpha)
    assert loss.forward(x, t) == pytest.approx(sum(want) / len(want), rel=1e-12)
    assert FocalLoss(gamma, alpha, reduction="sum").forward(x, t) == pytest.approx(sum(want), rel=1e-12)


@pytest.mark.parametrize("gamma, alpha", [(2.0, 0.25), (0.5, None), (0.0, 0.7), (1.0, 0.5)])
def test_focal_gradient(gamma, alpha):
    x = R.normal(size=(2, 3, 3)) * 2
    for t in (R.integers(0, 2, x.shape).astype(float), R.random(x.shape)):  # 0/1 and soft
        loss = FocalLoss(gamma, alpha)
        np.testing.assert_allclose(analytic_grad(loss, x, t), numeric_grad(loss, x, t),
                                   rtol=1e-6, atol=1e-9)


def test_focal_with_gamma_zero_is_weighted_cross_entropy():
    x, t = R.normal(size=(4, 5)), R.integers(0, 2, (4, 5)).astype(float)
    bce = gpunet.BinaryCrossEntropyWithLogits(reduction="sum").forward(x, t)
    assert FocalLoss(0.0, None, reduction="sum").forward(x, t) == pytest.approx(bce, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_focal_is_stable_for_huge_logits(dtype):
    x = np.array([[-800.0, -40.0, 0.0, 40.0, 800.0]] * 2, dtype)
    t = np.array([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]], np.float32)
    loss = FocalLoss()
    value = loss.forward(x, t)
    grad = loss.backward()
    assert math.isfinite(value) and np.isfinite(grad).all() and grad.dtype == dtype
    # the confidently wrong logits of the second row: loss alpha_t * |x| each
    want = (0.25 * 800 + 0.25 * 40 + 0.75 * math.log(2) * 0.25 + 0.75 * 40 + 0.75 * 800)
    row0 = FocalLoss(reduction="sum").forward(x[:1], t[:1])
    assert FocalLoss(reduction="sum").forward(x[1:], t[1:]) == pytest.approx(want, rel=1e-5)
    assert row0 == pytest.approx(0.25 * math.log(2) * 0.25, rel=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: FocalLoss(gamma=-1), "FocalLoss: expected gamma >= 0, got -1"),
    (lambda: FocalLoss(alpha=1.5), r"FocalLoss: expected alpha in \[0, 1\] or None, got 1.5"),
    (lambda: FocalLoss(reduction="none"), "FocalLoss: expected reduction 'mean' or 'sum'"),
])
def test_focal_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_focal_bad_target_shape():
    with pytest.raises(ShapeError, match=r"FocalLoss: expected the target of shape \(2, 3\)"):
        FocalLoss().forward(np.zeros((2, 3)), np.zeros((2, 4)))


# -- Dice loss -----------------------------------------------------------------------------
def dice_sample(h: np.ndarray, y: np.ndarray, g: np.ndarray, smooth: float) -> float:
    s = sum(a * b * c for a, b, c in zip(g.ravel(), y.ravel(), h.ravel()))
    fy = sum(a * b for a, b in zip(g.ravel(), y.ravel()))
    fh = sum(a * b for a, b in zip(g.ravel(), h.ravel()))
    return 1 - (2 * s + smooth) / (fy + fh + smooth)


@pytest.mark.parametrize("smooth, weights", [
    (1.0, None), (0.1, None), (1.0, np.array([1.0, 0.25])[:, None, None]),
    (0.5, R.random((2, 3, 4))),
])
def test_dice_matches_the_formula_and_gradient(smooth, weights):
    h, y = R.random((3, 2, 3, 4)), (R.random((3, 2, 3, 4)) > 0.5).astype(float)
    g = np.ones(h.shape[1:]) if weights is None else np.broadcast_to(weights, h.shape[1:])
    per_sample = [dice_sample(h[n], y[n], g, smooth) for n in range(3)]
    loss = DiceLoss(smooth, weights)
    assert loss.forward(h, y) == pytest.approx(sum(per_sample) / 3, rel=1e-12)
    assert DiceLoss(smooth, weights, reduction="sum").forward(h, y) == pytest.approx(sum(per_sample), rel=1e-12)
    np.testing.assert_allclose(analytic_grad(loss, h, y), numeric_grad(loss, h, y),
                               rtol=1e-6, atol=1e-9)


def test_dice_of_a_perfect_prediction_and_of_empty_masks():
    y = np.zeros((2, 1, 4, 4))
    y[0, 0, 1:3, 1:3] = 1
    assert DiceLoss(smooth=0.0).forward(y[:1], y[:1]) == 0.0
    assert DiceLoss().forward(y[1:], y[1:]) == 0.0  # smooth makes empty-vs-empty perfect
    assert DiceLoss(smooth=1e-9).forward(1 - y[:1], y[:1]) == pytest.approx(1.0)


@pytest.mark.parametrize("make, match", [
    (lambda: DiceLoss(smooth=-1), "DiceLoss: expected smooth >= 0, got -1"),
    (lambda: DiceLoss(weights=[0.5, 1.5]), r"DiceLoss: expected weights in \[0, 1\]"),
])
def test_dice_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("loss, pred, target, match", [
    (DiceLoss(), np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 3)),
     r"DiceLoss: expected the target of shape \(2, 1, 4, 4\)"),
    (DiceLoss(), np.zeros(5), np.zeros(5), r"DiceLoss: expected a prediction of shape \(N, ...\) with at least 2 axes"),
    (DiceLoss(weights=np.ones((3, 1, 1))), np.zeros((2, 2, 4, 4)), np.zeros((2, 2, 4, 4)),
     r"DiceLoss: expected weights that broadcast to one sample's shape \(2, 4, 4\), got \(3, 1, 1\)"),
])
def test_dice_bad_inputs(loss, pred, target, match):
    with pytest.raises(ShapeError, match=match):
        loss.forward(pred, target)


def test_dice_metric():
    y = np.zeros((2, 1, 2, 2), np.float32)
    y[0, 0, 0] = 1  # two pixels
    pred = np.zeros((2, 1, 2, 2), np.float32)
    pred[0, 0, 0, 0] = pred[0, 0, 1, 1] = 0.9  # one hit, one false positive
    # sample 0: 2 * 1 / (2 + 2) = 0.5; sample 1: both empty = 1
    assert dice(pred, y) == pytest.approx(0.75)
    assert dice(y, y) == 1.0
    assert dice(np.zeros((2, 3), np.float32), np.array([0, 1])) is None  # labels: no Dice


# -- data and model ------------------------------------------------------------------------
def test_shapes_dataset():
    train, test = shapes(n=50, size=16)
    assert (len(train), len(test)) == (40, 10)
    assert train.x.shape == train.y.shape == (40, 1, 16, 16)
    assert train.x.dtype == train.y.dtype == np.float32 and train.num_classes is None
    assert set(np.unique(train.y)) == {0.0, 1.0}
    assert (train.y.sum(axis=(1, 2, 3)) > 0).all()  # every image holds a shape
    inside = train.x[train.y == 1].mean() - train.x[train.y == 0].mean()
    assert 0.2 < inside < 0.7  # shapes are brighter than the background
    again, _ = shapes(n=50, size=16)
    np.testing.assert_array_equal(again.x, train.x)
    assert not np.array_equal(shapes(n=50, size=16, seed=1)[0].x, train.x)
    with pytest.raises(ValueError, match="shapes: expected n >= 2, size >= 8"):
        shapes(size=4)
    assert gpunet.data.DATASETS["shapes"] is shapes


def test_unet_shape_and_gradcheck():
    gpunet.seed(0)
    model = gpunet.models.unet((1, 8, 8), None, width=2)
    for p in model.params().values():  # nonzero biases: no pre-activation sits on a ReLU kink
        p.data += R.normal(size=p.shape).astype(np.float32) * 0.1
    names = {type(layer).__name__ for layer in model.walk()}
    assert {"Graph", "Concat", "Upscale2D", "MaxPool2D", "Conv2D", "Sigmoid"} <= names
    x = R.normal(size=(2, 1, 8, 8))
    y = model.forward(x.astype(np.float32))
    assert y.shape == (2, 1, 8, 8) and ((y > 0) & (y < 1)).all()
    report = gradcheck(model, x, max_entries=40)
    assert report.ok, str(report)


def test_unet_refuses_sizes_it_cannot_halve_twice():
    with pytest.raises(ValueError, match=r"unet: expected images of shape \(C, H, W\) with H and W divisible by 4"):
        gpunet.models.get("unet").build((1, 10, 12), None)


def test_train_unet_on_shapes_from_the_command_line(tmp_path):
    """`gpunet train unet --data shapes` with the registry defaults: held-out Dice >= 0.90."""
    metrics = train_command(["unet", "--data", "shapes"], tmp_path)
    assert set(metrics) == {"test_accuracy", "test_loss", "epochs", "seconds", "device",
                            "test_dice"}
    assert metrics["test_accuracy"] is None
    assert metrics["test_dice"] >= 0.90, metrics
