"""Losses: values against independent NumPy formulas and hand-computed numbers, gradients
against float64 central differences of ``forward``, reductions, stability, and bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest

import gpunet
from gpunet.errors import DeviceError, DTypeError, ShapeError, StateError
from gpunet.losses import (MSE, BinaryCrossEntropy, BinaryCrossEntropyWithLogits,
                           NegativeLogProbability, SoftmaxCrossEntropy)
from helpers import analytic_grad, numeric_grad

R = np.random.default_rng(11)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def ce_reference(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log softmax(x)[label] per row, written as the textbook ratio (fine for small x)."""
    e = np.exp(x)
    picked = np.take_along_axis(e, labels[:, None], axis=1)[:, 0]
    return -np.log(picked / e.sum(axis=1))


def soft_targets(shape: tuple[int, ...]) -> np.ndarray:
    t = R.random(shape) + 0.1
    return t / t.sum(axis=-1, keepdims=True)


# name -> (loss factory, pred, target, positions): float64 cases away from clipping and kinks
CASES = {
    "MSE": (MSE, R.normal(size=(3, 4)), R.normal(size=(3, 4)), 12),
    "BCE": (BinaryCrossEntropy, R.uniform(0.05, 0.95, (3, 4)), R.random((3, 4)), 12),
    "BCE-labels": (BinaryCrossEntropy, R.uniform(0.05, 0.95, (5,)),
                   np.array([0, 1, 1, 0, 1]), 5),
    "BCEWithLogits": (BinaryCrossEntropyWithLogits, R.normal(size=(2, 3, 2)) * 3,
                      R.random((2, 3, 2)), 12),
    "SoftmaxCE-labels": (SoftmaxCrossEntropy, R.normal(size=(4, 5)),
                         np.array([0, 4, 2, 2]), 4),
    "SoftmaxCE-probs": (SoftmaxCrossEntropy, R.normal(size=(4, 5)), soft_targets((4, 5)), 4),
    "SoftmaxCE-seq": (SoftmaxCrossEntropy, R.normal(size=(3, 2, 4)),
                      R.integers(0, 4, (3, 2)), 6),
}


# -- values against independent formulas ------------------------------------------------
def test_mse_value_by_hand():
    pred, target = np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 0.0])
    assert MSE().forward(pred, target) == pytest.approx(13 / 3, rel=1e-15)
    assert MSE(reduction="sum").forward(pred, target) == 13.0
    np.testing.assert_allclose(analytic_grad(MSE(), pred, target), [0.0, 4 / 3, 2.0])


def test_mse_value_against_formula():
    _, pred, target, _ = CASES["MSE"]
    assert MSE()(pred, target) == pytest.approx(np.mean((pred - target) ** 2), rel=1e-12)


def test_bce_value_by_hand():
    # -log 0.5 for both; -log 0.8 and -log(1 - 0.2)
    assert BinaryCrossEntropy().forward(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == \
        pytest.approx(math.log(2), rel=1e-12)
    assert BinaryCrossEntropy(reduction="sum").forward(
        np.array([0.8, 0.2]), np.array([1.0, 0.0])) == pytest.approx(-2 * math.log(0.8))


def test_bce_value_against_formula():
    _, p, t, _ = CASES["BCE"]
    want = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
    assert BinaryCrossEntropy()(p, t) == pytest.approx(want, rel=1e-12)


def test_negative_log_probability_is_summed_bce_over_a_sequence():
    assert NegativeLogProbability is BinaryCrossEntropy
    p = R.uniform(0.05, 0.95, (5, 2, 3))  # (T, N, units)
    t = (R.random((5, 2, 3)) > 0.5).astype(np.float64)
    # probability of the binary sequence under independent Bernoulli units
    log_prob = np.log(np.where(t == 1, p, 1 - p)).sum()
    assert NegativeLogProbability(reduction="sum")(p, t) == pytest.approx(-log_prob, rel=1e-12)


def test_bce_clips_probabilities_and_keeps_the_gradient_at_the_clipped_value():
    eps = 1e-7
    p, t = np.array([0.0, 1.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0, 1.0])
    loss = BinaryCrossEntropy(reduction="sum", eps=eps)
    want = -2 * math.log(eps) - 2 * math.log(1 - eps)
    assert loss(p, t) == pytest.approx(want, rel=1e-9)  # 1 - (1 - eps) is eps only to ~1e-10
    pc = np.clip(p, eps, 1 - eps)
    grad = loss.backward()
    np.testing.assert_allclose(grad, (pc - t) / (pc * (1 - pc)), rtol=1e-12)
    assert grad[0] < -1e6 and grad[1] > 1e6  # saturated on the wrong side: pushed back hard


def test_bce_with_logits_against_bce_on_probabilities():
    _, x, t, _ = CASES["BCEWithLogits"]
    p = sigmoid(x)
    want = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
    assert BinaryCrossEntropyWithLogits()(x, t) == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(analytic_grad(BinaryCrossEntropyWithLogits(), x, t),
                               (p - t) / x.size, rtol=1e-12)


def test_softmax_ce_value_by_hand_and_against_formula():
    assert SoftmaxCrossEntropy()(np.zeros((2, 4)), np.array([1, 3])) == \
        pytest.approx(math.log(4), rel=1e-15)
    _, x, labels, _ = CASES["SoftmaxCE-labels"]
    assert SoftmaxCrossEntropy()(x, labels) == \
        pytest.approx(ce_reference(x, labels).mean(), rel=1e-12)
    assert SoftmaxCrossEntropy(reduction="sum")(x, labels) == \
        pytest.approx(ce_reference(x, labels).sum(), rel=1e-12)


def test_softmax_ce_soft_targets_against_formula():
    _, x, t, _ = CASES["SoftmaxCE-probs"]
    logp = np.log(np.exp(x) / np.exp(x).sum(axis=1, keepdims=True))
    assert SoftmaxCrossEntropy()(x, t) == pytest.approx(-(t * logp).sum() / 4, rel=1e-12)


def test_softmax_ce_one_hot_equals_labels():
    _, x, labels, _ = CASES["SoftmaxCE-labels"]
    one_hot = np.eye(5)[labels]
    a, b = SoftmaxCrossEntropy(), SoftmaxCrossEntropy()
    assert a(x, labels) == pytest.approx(b(x, one_hot), rel=1e-14)
    np.testing.assert_allclose(a.backward(), b.backward(), rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])
def test_softmax_ce_takes_any_integer_label_dtype(dtype):
    _, x, labels, _ = CASES["SoftmaxCE-labels"]
    loss = SoftmaxCrossEntropy()
    assert loss(x, labels.astype(dtype)) == pytest.approx(ce_reference(x, labels).mean())
    want = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True) - np.eye(5)[labels]
    np.testing.assert_allclose(loss.backward(), want / 4, rtol=1e-12, atol=1e-15)


def test_softmax_ce_sequence_logits_average_over_time_and_batch():
    _, x, labels, _ = CASES["SoftmaxCE-seq"]  # (T, N, C) with (T, N) labels
    flat = ce_reference(x.reshape(6, 4), labels.reshape(6))
    loss = SoftmaxCrossEntropy()
    assert loss(x, labels) == pytest.approx(flat.mean(), rel=1e-12)
    assert loss.backward().shape == x.shape


# -- gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradient_matches_finite_differences(case, reduction):
    make, pred, target, _ = CASES[case]
    loss = make(reduction=reduction)
    np.testing.assert_allclose(analytic_grad(loss, pred, target),
                               numeric_grad(loss, pred, target), rtol=1e-6, atol=1e-8)


def test_soft_targets_that_do_not_sum_to_one_still_get_the_exact_gradient():
    x, t = R.normal(size=(3, 4)), R.random((3, 4)) * 2
    loss = SoftmaxCrossEntropy(reduction="sum")
    np.testing.assert_allclose(analytic_grad(loss, x, t), numeric_grad(loss, x, t),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", list(CASES))
def test_mean_is_sum_over_positions(case):
    make, pred, target, positions = CASES[case]
    mean, total = make(reduction="mean"), make(reduction="sum")
    assert total(pred, target) == pytest.approx(mean(pred, target) * positions, rel=1e-12)
    np.testing.assert_allclose(total.backward(), mean.backward() * positions, rtol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_float32_prediction_gives_float32_gradient_and_close_value(case):
    make, pred, target, _ = CASES[case]
    loss = make()
    value = loss(pred.astype(np.float32), target)  # float64 target cast to the pred's dtype
    assert np.ndim(value) == 0 and value.dtype == np.float32  # a 0-d value, as torch's
    assert value == pytest.approx(make()(pred, target), rel=1e-5)
    grad = loss.backward()
    assert grad.dtype == np.float32 and grad.shape == pred.shape


# -- stability ---------------------------------------------------------------------------
def test_bce_with_logits_is_stable_for_huge_logits():
    x = np.array([1000.0, -1000.0, 1000.0, -1000.0], dtype=np.float32)
    t = np.array([0.0, 1.0, 1.0, 0.0], dtype=np.float32)
    loss = BinaryCrossEntropyWithLogits(reduction="sum")
    assert loss(x, t) == 2000.0
    np.testing.assert_array_equal(loss.backward(), [1.0, -1.0, 0.0, 0.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_ce_is_stable_for_huge_logits(dtype):
    x = np.array([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]], dtype=dtype)
    loss = SoftmaxCrossEntropy(reduction="sum")
    assert loss(x, np.array([1, 1])) == 2000.0
    np.testing.assert_array_equal(loss.backward(), [[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])


def test_bce_is_finite_at_zero_and_one():
    loss = BinaryCrossEntropy()
    assert math.isfinite(loss(np.array([0.0, 1.0], dtype=np.float32), np.array([1, 0])))
    assert np.isfinite(loss.backward()).all()


# -- devices -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_each_device_matches_numpy(case, device):
    make, pred, target, _ = CASES[case]
    host = make()
    want_value, want_grad = host(pred, target), host.backward()
    loss = make()
    value = loss(device.asarray(pred), device.asarray(target))
    grad = loss.backward()
    assert device.owns(grad)
    assert np.ndim(value) == 0 and (device.on_host or device.owns(value))  # left on the GPU
    assert float(value) == pytest.approx(want_value, rel=1e-12)
    np.testing.assert_allclose(gpunet.to_numpy(grad), want_grad, rtol=1e-10, atol=1e-14)


class _ArrayOnGpu:
    """Looks like a CuPy array on GPU 0 to gpunet (it goes by the type's module), so the
    device check runs on machines without a GPU."""
    __module__ = "cupy._core.core"
    dtype, shape, ndim, size = np.dtype(np.float64), (2,), 1, 2

    class device:
        id = 0


# -- bad inputs --------------------------------------------------------------------------
LOSSES = [MSE, BinaryCrossEntropy, BinaryCrossEntropyWithLogits, SoftmaxCrossEntropy]


@pytest.mark.parametrize("make", LOSSES)
def test_bad_reduction(make):
    with pytest.raises(ValueError, match=f"{make.__name__}.*'mean' or 'sum'.*'avg'"):
        make(reduction="avg")


@pytest.mark.parametrize("make", LOSSES)
def test_integer_or_non_array_prediction(make):
    with pytest.raises(DTypeError, match=f"{make.__name__}.*float32 or float64, got int64"):
        make()(np.zeros((2, 3), dtype=np.int64), np.zeros((2, 3)))
    with pytest.raises(DTypeError, match=f"{make.__name__}.*array, got list"):
        make()([[0.5, 0.5]], np.zeros((1, 2)))


@pytest.mark.parametrize("make", LOSSES)
def test_target_on_another_device(make):
    with pytest.raises(DeviceError, match=f"{make.__name__}.*device cpu.*got an array on cuda:0"):
        make()(np.zeros(2), _ArrayOnGpu())


@pytest.mark.parametrize("make", [MSE, BinaryCrossEntropy, BinaryCrossEntropyWithLogits])
def test_elementwise_losses_want_the_prediction_shape(make):
    with pytest.raises(ShapeError, match=rf"{make.__name__}.*\(3, 1\).*got \(3,\)"):
        make()(np.full((3, 1), 0.5), np.zeros(3))


@pytest.mark.parametrize("make", LOSSES)
def test_backward_before_forward_or_twice(make):
    loss = make()
    with pytest.raises(StateError, match=make.__name__):
        loss.backward()
    loss(np.full((2, 3), 0.5), np.zeros((2, 3)))
    loss.backward()
    with pytest.raises(StateError, match=make.__name__):
        loss.backward()


def test_softmax_ce_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy.*\[0, 3\).*got 7"):
        SoftmaxCrossEntropy()(np.zeros((3, 3)), np.array([0, 7, 1]))
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy.*\[0, 3\).*got -1"):
        SoftmaxCrossEntropy()(np.zeros((3, 3)), np.array([0, 2, -1]))


def test_softmax_ce_reports_bad_labels_on_a_gpu_without_reading_each_batch(standin):
    gpu = gpunet.device("cuda:1")
    loss, counters = SoftmaxCrossEntropy(), standin._standin.counters
    logits = gpu.asarray(np.zeros((3, 3), np.float32))
    counters.reset()
    good = loss(logits, gpu.asarray(np.array([0, 2, 1])))
    bad = loss(logits, gpu.asarray(np.array([0, 7, 1])))  # flagged on the device, not raised
    later = loss(logits, gpu.asarray(np.array([0, -1, 1])))
    assert counters.host_reads == 0
    assert float(good) == pytest.approx(np.log(3)) and np.isnan(float(bad))
    assert np.isnan(float(later))  # stays NaN until the error is taken
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy.*\[0, 3\).*got 7"):
        loss.check()  # the first bad label
    loss.check()  # reported once
    assert float(loss(logits, gpu.asarray(np.array([0, 2, 1])))) == pytest.approx(np.log(3))


def test_softmax_ce_rejects_float_labels_and_wrong_shapes():
    with pytest.raises(DTypeError, match="SoftmaxCrossEntropy.*integers, got dtype float64"):
        SoftmaxCrossEntropy()(np.zeros((3, 4)), np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ShapeError, match=r"SoftmaxCrossEntropy.*\(3,\).*\(3, 4\).*got \(4,\)"):
        SoftmaxCrossEntropy()(np.zeros((3, 4)), np.array([0, 1, 2, 3]))
    with pytest.raises(ShapeError, match=r"SoftmaxCrossEntropy.*\(2, 3\).*got \(2, 4\)"):
        SoftmaxCrossEntropy()(np.zeros((2, 3, 4)), np.zeros((2, 4), dtype=np.int64))


def test_bce_rejects_bad_eps():
    with pytest.raises(ValueError, match="BinaryCrossEntropy.*eps"):
        BinaryCrossEntropy(eps=0.0)
