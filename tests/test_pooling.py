"""Pooling and resampling layers: forward against loops over windows, the first-maximum rule
and overlapping windows, gradient checks, the max-pooling kernels on the emulated device in
every thread order, and bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest

import gpunet
from gpunet import ShapeError, StateError, gradcheck
from gpunet.layers import AvgPool2D, GlobalAvgPool2D, MaxPool2D, Subsampling2D, Upscale2D

R = np.random.default_rng(23)
ORDERS = ["forward", "reverse", "shuffled"]


def windows(x, kernel, stride, padding):
    """Yield ``(n, c, p, q, [(value or None for padding, (r, col)), ...])`` per window, the
    window's positions in row-major order."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    for s in range(n):
        for ch in range(c):
            for p in range(ho):
                for q in range(wo):
                    cells = []
                    for i in range(kh):
                        for j in range(kw):
                            r, col = p * sh + i - ph, q * sw + j - pw
                            inside = 0 <= r < h and 0 <= col < w
                            cells.append((float(x[s, ch, r, col]) if inside else None, (r, col)))
                    yield s, ch, p, q, cells


def out_shape(x, kernel, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    return (*x.shape[:2], (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1)


def maxpool_loops(x, dy, kernel, stride, padding):
    """y and dx of max pooling: the first (row-major) maximum of the real values wins."""
    y, dx = np.zeros(out_shape(x, kernel, stride, padding)), np.zeros(x.shape)
    for s, ch, p, q, cells in windows(x, kernel, stride, padding):
        best, at = -math.inf, None
        for v, pos in cells:
            if v is not None and (at is None or v > best):
                best, at = v, pos
        y[s, ch, p, q] = best
        dx[s, ch, at[0], at[1]] += dy[s, ch, p, q]
    return y, dx


def avgpool_loops(x, kernel, stride, padding):
    y = np.zeros(out_shape(x, kernel, stride, padding))
    for s, ch, p, q, cells in windows(x, kernel, stride, padding):
        y[s, ch, p, q] = sum(v for v, _ in cells if v is not None) / len(cells)
    return y


# kernel, stride, padding, input shape
POOLS = [
    (2, None, 0, (2, 3, 4, 6)),
    (3, 2, 1, (1, 2, 7, 6)),          # overlapping windows, padding, a batch of one
    ((2, 3), (1, 2), 0, (2, 1, 5, 7)),
    ((3, 2), (2, 1), (1, 1), (1, 2, 5, 6)),
    (2, 3, 0, (1, 1, 7, 8)),          # stride > kernel
    (2, None, 0, (1, 1, 5, 5)),       # the last row and column belong to no window
]


@pytest.mark.parametrize("kernel, stride, padding, shape", POOLS)
def test_maxpool_matches_the_loops(kernel, stride, padding, shape):
    layer = MaxPool2D(kernel, stride, padding)
    x = R.normal(size=shape)
    y = layer.forward(x)
    dy = R.normal(size=y.shape)
    want_y, want_dx = maxpool_loops(x, dy, layer.kernel, layer.stride, layer.padding)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_allclose(layer.backward(dy), want_dx, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kernel, stride, padding, shape", POOLS)
def test_avgpool_matches_the_loops(kernel, stride, padding, shape):
    layer = AvgPool2D(kernel, stride, padding)
    x = R.normal(size=shape)
    np.testing.assert_allclose(layer.forward(x),
                               avgpool_loops(x, layer.kernel, layer.stride, layer.padding),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("kernel, stride, padding, shape", POOLS)
def test_pool_gradcheck(cls, kernel, stride, padding, shape):
    x = R.permutation(np.prod(shape)).reshape(shape) * 0.1  # distinct values: no ties
    report = gradcheck(cls(kernel, stride, padding), x)
    assert report.ok, str(report)


@pytest.mark.parametrize("spec", ["cpu", *(f"emulated:{o}" for o in ORDERS)])
def test_gradient_goes_to_the_first_maximum(spec):
    dev = gpunet.device(spec)
    x = np.array([[[[1.0, 3.0, 3.0],
                    [3.0, 2.0, 3.0],
                    [0.0, 3.0, 1.0]]]])
    layer = MaxPool2D(2, stride=1).to(dev, np.float64)  # four overlapping windows, all max 3
    y = layer.forward(gpunet.asarray(x, dev))
    np.testing.assert_array_equal(gpunet.to_numpy(y), [[[[3.0, 3.0], [3.0, 3.0]]]])
    dx = gpunet.to_numpy(layer.backward(gpunet.asarray(np.array([[[[1.0, 10.0], [100.0, 1000.0]]]]), dev)))
    # windows' first maxima: (0,1), (0,1), (1,0), (1,2): the top-middle 3 collects two
    np.testing.assert_array_equal(dx, [[[[0.0, 11.0, 0.0], [100.0, 0.0, 1000.0], [0.0, 0.0, 0.0]]]])


def test_maxpool_padding_never_wins():
    x = -np.ones((1, 1, 2, 2))
    y = MaxPool2D(2, stride=1, padding=1).to(dtype=np.float64).forward(x)
    np.testing.assert_array_equal(y, -np.ones((1, 1, 3, 3)))


def test_avgpool_counts_the_padding():
    y = AvgPool2D(2, padding=1).to(dtype=np.float64).forward(np.ones((1, 1, 2, 2)))
    np.testing.assert_array_equal(y, np.full((1, 1, 2, 2), 0.25))  # count_include_pad


def test_subsampling_formula_and_gradcheck():
    layer = Subsampling2D(2, 2).to(dtype=np.float64)
    layer.weight.data[...] = [2.0, -0.5]
    layer.bias.data[...] = [0.1, 0.3]
    x = R.normal(size=(2, 2, 4, 5))
    want = avgpool_loops(x, (2, 2), (2, 2), (0, 0))
    want = want * np.array([2.0, -0.5])[None, :, None, None] + np.array([0.1, 0.3])[None, :, None, None]
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12)
    report = gradcheck(layer, x)
    assert report.ok and set(report.errors) == {"input", "weight", "bias"}, str(report)


def test_subsampling_starts_as_average_pooling():
    x = R.normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(Subsampling2D(3, 2).forward(x), AvgPool2D(2).forward(x), rtol=1e-6)


def test_upscale_formula_and_block_sums():
    layer = Upscale2D(3).to(dtype=np.float64)
    x = R.normal(size=(2, 2, 2, 3))
    y = layer.forward(x)
    assert y.shape == (2, 2, 6, 9) and y.flags.c_contiguous
    for i in range(6):
        for j in range(9):
            np.testing.assert_array_equal(y[:, :, i, j], x[:, :, i // 3, j // 3])
    dy = R.normal(size=y.shape)
    dx = layer.backward(dy)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(dx[:, :, i, j],
                                       dy[:, :, 3 * i:3 * i + 3, 3 * j:3 * j + 3].sum(axis=(2, 3)))
    assert gradcheck(Upscale2D(2), R.normal(size=(1, 2, 2, 3))).ok


def test_global_average_pooling():
    layer = GlobalAvgPool2D().to(dtype=np.float64)
    x = R.normal(size=(3, 4, 2, 5))
    y = layer.forward(x)
    assert y.shape == (3, 4)
    np.testing.assert_allclose(y, [[sum(x[n, c].ravel().tolist()) / 10 for c in range(4)]
                                   for n in range(3)], rtol=1e-12)
    np.testing.assert_allclose(layer.backward(np.ones((3, 4))), np.full(x.shape, 0.1))
    assert gradcheck(GlobalAvgPool2D(), x).ok


# -- the max-pooling kernels on the CPU emulator --------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kernel, stride, padding, shape", POOLS + [
    ((3, 3), (1, 1), (1, 1), (2, 3, 9, 10))])  # more elements than a block has threads
def test_maxpool_kernels_match_the_generic_code(kernel, stride, padding, shape, order, dtype):
    """Integer-valued inputs make many ties: the kernels must pick the same first maximum."""
    layer = MaxPool2D(kernel, stride, padding)
    args = (layer.kernel, layer.stride, layer.padding)
    cpu, emu = gpunet.device("cpu"), gpunet.device(f"emulated:{order}")
    x = R.integers(-3, 4, size=shape).astype(dtype)
    y, index = emu.maxpool2d(x, *args)
    want_y, want_index = cpu.maxpool2d(x, *args)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(index, want_index)
    assert index.dtype == np.int32
    dy = R.normal(size=y.shape).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(emu.backprop_maxpool2d(dy, index, shape, *args),
                               cpu.backprop_maxpool2d(dy.astype(np.float64), want_index, shape, *args),
                               rtol=tol, atol=tol)


# -- bad inputs ----------------------------------------------------------------------------
f32 = lambda *s: np.zeros(s, np.float32)


@pytest.mark.parametrize("layer, x, match", [
    (MaxPool2D(3), f32(1, 1, 2, 5), r"MaxPool2D: kernel 3x3 is larger than the padded input 2x5"),
    (AvgPool2D((2, 4), padding=(1, 0)), f32(1, 1, 4, 3), r"AvgPool2D: kernel 2x4 is larger than the padded input 6x3 \(input 4x3, padding 1x0\)"),
    (MaxPool2D(2), f32(4, 4), r"MaxPool2D: expected 4-D input, got shape \(4, 4\)"),
    (Subsampling2D(3, 2), f32(1, 2, 4, 4), r"Subsampling2D: expected input of shape \(N, 3, H, W\), got \(1, 2, 4, 4\)"),
    (Subsampling2D(1, 3), f32(1, 1, 2, 4), "Subsampling2D: kernel 3x3 is larger than the padded input 2x4"),
    (Upscale2D(2), f32(2, 3, 4), "Upscale2D: expected 4-D input"),
    (GlobalAvgPool2D(), f32(2, 3), "GlobalAvgPool2D: expected 4-D input"),
])
def test_bad_input(layer, x, match):
    with pytest.raises(ShapeError, match=match):
        layer.forward(x)


@pytest.mark.parametrize("make, match", [
    (lambda: MaxPool2D(2, padding=2), r"MaxPool2D: expected padding at most half the kernel size, got padding \(2, 2\) for kernel \(2, 2\)"),
    (lambda: AvgPool2D(0), "AvgPool2D: expected kernel_size to be an int >= 1"),
    (lambda: MaxPool2D(2, stride=(1, 0)), "MaxPool2D: expected stride to be an int >= 1"),
    (lambda: Subsampling2D(0, 2), "Subsampling2D: expected channels >= 1, got 0"),
    (lambda: Upscale2D(0), "Upscale2D: expected scale to be an int >= 1, got 0"),
    (lambda: Upscale2D(1.5), "Upscale2D: expected scale to be an int >= 1, got 1.5"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("layer, x, dy", [
    (MaxPool2D(2), f32(1, 1, 4, 4), f32(1, 1, 3, 3)),
    (AvgPool2D(2), f32(1, 1, 4, 4), f32(1, 1, 2, 3)),
    (Upscale2D(2), f32(1, 1, 2, 2), f32(1, 1, 2, 2)),
    (GlobalAvgPool2D(), f32(2, 3, 2, 2), f32(2, 3, 1, 1)),
])
def test_bad_gradient_and_order(layer, x, dy):
    with pytest.raises(StateError, match=f"{layer.name}: backward called before forward"):
        layer.backward(dy)
    y = layer.forward(x)
    with pytest.raises(ShapeError, match=f"{layer.name}: expected output gradient of shape"):
        layer.backward(dy)
    assert layer.backward(np.zeros_like(y)).shape == x.shape
