"""GELU (and the backend's erf), Identity and Reshape: forward against independent formulas,
float64 gradient checks, bad inputs, and PyTorch as an oracle where it is installed."""
from __future__ import annotations

import math

import numpy as np
import pytest

import gpunet
from gpunet import DTypeError, ShapeError, gradcheck
from gpunet.backends import Backend
from gpunet.layers import GELU, Identity, Reshape, Sequential, Sum, from_config
from helpers import assert_refused

R = np.random.default_rng(5)


def scalar_map(f, x: np.ndarray) -> np.ndarray:
    return np.array([f(float(v)) for v in x.ravel()]).reshape(x.shape)


# -- erf ------------------------------------------------------------------------------------
def test_erf_is_float64_accurate():
    """Within 4 ulp of math.erf over a dense grid, tiny and huge arguments, the branch points
    of Cody's approximation, and signed zeros, infinities and NaN."""
    points = np.concatenate([np.linspace(-7, 7, 140001), np.geomspace(1e-300, 40, 4000),
                             -np.geomspace(1e-300, 40, 4000),
                             [0.46875, np.nextafter(0.46875, 1), 4.0, np.nextafter(4.0, 5),
                              26.5, 27.0, 1e300, 5e-324]])
    want = scalar_map(math.erf, points)
    got = Backend().erf(points)
    ulps = np.abs(got - want) / np.spacing(np.abs(want))
    assert ulps.max() <= 4, points[ulps.argmax()]
    special = Backend().erf(np.array([0.0, -0.0, np.inf, -np.inf, np.nan]))
    np.testing.assert_array_equal(special[:4], [0.0, -0.0, 1.0, -1.0])
    assert np.signbit(special[1]) and np.isnan(special[4])


def test_erf_float32_keeps_its_dtype():
    x = np.linspace(-5, 5, 2001).astype(np.float32)
    got = Backend().erf(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, scalar_map(math.erf, x.astype(np.float64)), rtol=1e-6,
                               atol=1e-7)


# -- GELU -----------------------------------------------------------------------------------
def _gelu(v: float) -> float:
    return 0.5 * v * (1 + math.erf(v / math.sqrt(2)))


def _gelu_tanh(v: float) -> float:
    return 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))


@pytest.mark.parametrize("approximate, f", [("none", _gelu), ("tanh", _gelu_tanh)])
def test_gelu_formula(approximate, f):
    layer = GELU(approximate)
    x = np.concatenate([R.normal(size=40) * 3, [-30.0, -6.0, 0.0, 6.0, 30.0]]).reshape(5, 9)
    # absolute error where 1 + erf (or 1 + tanh) cancels, for x < 0, as in PyTorch's formula
    np.testing.assert_allclose(layer.forward(x), scalar_map(f, x), rtol=1e-14, atol=1e-15)
    # the derivative, by central differences of the scalar formula
    dx = layer.backward(np.ones_like(x))
    h = 1e-6
    np.testing.assert_allclose(dx, scalar_map(lambda v: (f(v + h) - f(v - h)) / (2 * h), x),
                               rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_gradcheck(approximate):
    report = gradcheck(GELU(approximate), R.normal(size=(3, 2, 4)) * 2)
    assert report.ok, str(report)


def test_cpu_gelu_in_pieces_matches_the_generic_formula():
    """The CPU device computes GELU in cache-sized pieces over threads: the same bits as the
    generic formula on the whole array (an array over PARALLEL_MIN elements, many pieces)."""
    cpu = gpunet.device("cpu")
    x = R.normal(size=(cpu.PARALLEL_MIN // 64 + 3, 64)) * 2
    for approximate in ("none", "tanh"):
        np.testing.assert_array_equal(cpu.gelu(x, approximate), Backend().gelu(x, approximate))
        np.testing.assert_array_equal(cpu.backprop_gelu(x[::-1], x, approximate),
                                      Backend().backprop_gelu(x[::-1], x, approximate))


def test_gelu_as_a_sum_activation():
    xs = [R.normal(size=(2, 3)) for _ in range(2)]
    np.testing.assert_allclose(Sum("gelu").forward(xs), scalar_map(_gelu, xs[0] + xs[1]),
                               rtol=1e-14)


def test_gelu_bad_inputs():
    assert_refused(GELU(), np.array([1, 2]), DTypeError,
                   "GELU: expected input of dtype float32 or float64, got int64")
    with pytest.raises(ValueError, match=r"GELU: expected approximate one of \('none', "
                                         r"'tanh'\), got 'erf'"):
        GELU("erf")
    layer = GELU()
    layer.forward(np.zeros((2, 3)))
    with pytest.raises(ShapeError, match=r"GELU: expected output gradient of shape \(2, 3\)"):
        layer.backward(np.zeros((3, 2)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_pytorch(approximate):
    torch = pytest.importorskip("torch")
    x = R.normal(size=(4, 6)) * 3
    t = torch.from_numpy(x).requires_grad_()
    out = torch.nn.GELU(approximate=approximate)(t)
    dy = R.normal(size=x.shape)
    out.backward(torch.from_numpy(dy))
    layer = GELU(approximate)
    np.testing.assert_allclose(layer.forward(x), out.detach().numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(layer.backward(dy), t.grad.numpy(), rtol=1e-13, atol=1e-15)


# -- Identity and Reshape -------------------------------------------------------------------
def test_identity():
    layer = Identity()
    x = R.normal(size=(2, 3, 4))
    np.testing.assert_array_equal(layer.forward(x), x)
    dy = R.normal(size=x.shape)
    np.testing.assert_array_equal(layer.backward(dy), dy)
    assert gradcheck(Identity(), x).ok
    assert_refused(layer, [1.0], DTypeError, "Identity: expected input to be an array, got list")
    layer.forward(x)
    with pytest.raises(ShapeError, match=r"Identity: expected output gradient of shape "
                                         r"\(2, 3, 4\), got \(2, 12\)"):
        layer.backward(dy.reshape(2, 12))


@pytest.mark.parametrize("shape, out", [((3, 4), (2, 3, 4)), ((-1, 2), (2, 6, 2)),
                                        (12, (2, 12)), ([2, -1, 3], (2, 2, 2, 3))])
def test_reshape_formula(shape, out):
    x = R.normal(size=(2, 4, 3))
    layer = Reshape(shape)
    y = layer.forward(x)
    assert y.shape == out
    for n in range(2):  # each sample's values in row-major order, the batch axis kept
        np.testing.assert_array_equal(y[n].ravel(), [v for row in x[n] for v in row])
    dy = R.normal(size=out)
    np.testing.assert_array_equal(layer.backward(dy), dy.reshape(x.shape))
    assert gradcheck(Reshape(shape), x).ok
    assert from_config(layer.config()).shape == layer.shape


def test_reshape_in_a_model():
    model = Sequential([Reshape((2, -1)), Reshape(-1)])
    x = R.normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_array_equal(model.forward(x), x)


def test_reshape_bad_inputs():
    layer = Reshape((3, 4))
    assert_refused(layer, np.zeros((2, 10)), ShapeError,
                   r"Reshape: expected input of shape \(N, \.\.\.\) with 12 values per sample, "
                   r"to reshape to \(N, 3, 4\); got \(2, 10\)")
    assert_refused(Reshape((-1, 4)), np.zeros((2, 3, 3)), ShapeError,
                   r"with a multiple of 4 values per sample, to reshape to \(N, \*, 4\); "
                   r"got \(2, 3, 3\)")
    assert_refused(layer, np.zeros(()), ShapeError, r"got \(\)")
    assert_refused(layer, np.zeros((2, 12), np.int32), DTypeError, "got int32")
    layer.forward(np.zeros((2, 12)))
    with pytest.raises(ShapeError, match=r"Reshape: expected output gradient of shape "
                                         r"\(2, 3, 4\), got \(2, 12\)"):
        layer.backward(np.zeros((2, 12)))
    for shape in [(-1, -1), (0, 3), (), (2.0,), (True,), "ab"]:
        with pytest.raises(ValueError, match="Reshape: expected a shape of positive sizes "
                                             "with at most one -1"):
            Reshape(shape)
