"""Conv2D: forward against the convolution sum written as loops, gradient checks, the
kernels on the emulated device against the generic code in every thread order, bad inputs,
saving, and LeNet trained from the command line."""
from __future__ import annotations


import numpy as np
import pytest

import gpunet
from gpunet import DTypeError, ShapeError, StateError, gradcheck
from gpunet.backends import Backend, CpuBackend, EmulatedBackend
from gpunet.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential
from helpers import assert_refused, recorded_launches, train_command

R = np.random.default_rng(17)


def conv_loops(x, w, b, stride, padding) -> np.ndarray:
    """The cross-correlation sum, one output value at a time in plain Python arithmetic;
    positions outside the image contribute nothing."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    y = np.zeros((n, o, ho, wo))
    for s in range(n):
        for k in range(o):
            for p in range(ho):
                for q in range(wo):
                    total = 0.0 if b is None else float(b[k])
                    for ch in range(c):
                        for i in range(kh):
                            for j in range(kw):
                                r, col = p * sh + i - ph, q * sw + j - pw
                                if 0 <= r < h and 0 <= col < wd:
                                    total += float(w[k, ch, i, j]) * float(x[s, ch, r, col])
                    y[s, k, p, q] = total
    return y


# (in, out, kernel, stride, padding, bias, input shape)
CONFIGS = [
    (2, 3, 3, 1, 1, True, (2, 2, 5, 5)),
    (3, 2, (3, 2), (2, 1), (1, 0), True, (2, 3, 6, 5)),
    (1, 2, (2, 3), 2, "valid", False, (1, 1, 7, 6)),
    (2, 2, 5, 1, "same", True, (1, 2, 4, 3)),         # kernel larger than the unpadded input
    (2, 3, 2, 3, 0, True, (2, 2, 7, 8)),              # stride > kernel: some pixels unread
    (4, 1, 1, 1, 0, True, (3, 4, 2, 3)),              # 1x1
    (1, 2, (1, 4), (1, 2), (0, 2), True, (2, 1, 3, 5)),
]


def make(config, dtype=np.float64, device="cpu") -> tuple[Conv2D, np.ndarray]:
    cin, cout, k, s, p, bias, shape = config
    gpunet.seed(3)
    layer = Conv2D(cin, cout, k, stride=s, padding=p, bias=bias).to(device, dtype)
    if bias:
        layer.bias.data[...] = gpunet.asarray(np.linspace(-0.5, 0.5, cout), device, dtype)
    return layer, R.normal(size=shape)


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_matches_the_loops(config):
    layer, x = make(config)
    w = layer.weight.data
    b = None if layer.bias is None else layer.bias.data
    y = layer.forward(x)
    np.testing.assert_allclose(y, conv_loops(x, w, b, layer.stride, layer.padding),
                               rtol=1e-12, atol=1e-12)
    assert y.flags.c_contiguous


@pytest.mark.parametrize("config", CONFIGS)
def test_gradcheck(config):
    layer, x = make(config)
    report = gradcheck(layer, x)
    assert report.ok, str(report)
    assert set(report.errors) == {"input", *layer.params()}


def test_same_and_valid_padding_and_pairs():
    assert Conv2D(1, 1, 5, padding="same").padding == (2, 2)
    assert Conv2D(1, 1, (3, 5), padding="same").padding == (1, 2)
    assert Conv2D(1, 1, 3, padding="valid").padding == (0, 0)
    layer = Conv2D(1, 1, [3, 1], stride=[2, 1], padding=[1, 0])
    assert (layer.kernel, layer.stride, layer.padding) == ((3, 1), (2, 1), (1, 0))
    assert layer.weight.shape == (1, 1, 3, 1)
    y = Conv2D(2, 4, 3, padding="same").forward(np.zeros((1, 2, 6, 5), np.float32))
    assert y.shape == (1, 4, 6, 5)


def test_float32_end_to_end():
    layer = Conv2D(2, 3, 3, padding=1)
    x = R.normal(size=(2, 2, 5, 5)).astype(np.float32)
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == np.float32


def test_gradients_accumulate():
    layer, x = make(CONFIGS[0])
    dy = R.normal(size=(2, 3, 5, 5))
    layer.forward(x)
    layer.backward(dy)
    once = layer.weight.grad.copy()
    layer.forward(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, 2 * once, rtol=1e-12)


def test_a_small_convnet_passes_gradcheck():
    gpunet.seed(0)
    model = Sequential([Conv2D(1, 2, 3, padding=1), ReLU(), MaxPool2D(2), Flatten(),
                        Dense(2 * 3 * 3, 3)])
    report = gradcheck(model, R.normal(size=(2, 1, 6, 6)))
    assert report.ok, str(report)


# -- the kernels on the CPU emulator, against the generic code -------------------------------
ORDERS = ["forward", "reverse", "shuffled"]
GEOMETRIES = [  # x shape, kernel, stride, padding
    ((2, 3, 6, 5), (3, 2), (2, 1), (1, 0)),
    ((1, 1, 7, 6), (2, 3), (2, 2), (0, 0)),
    ((2, 2, 7, 8), (2, 2), (3, 3), (0, 0)),
    ((1, 2, 4, 3), (5, 5), (1, 1), (2, 2)),
    ((3, 2, 9, 9), (3, 3), (1, 1), (1, 1)),   # more output positions than a block has threads
]


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape, kernel, stride, padding", GEOMETRIES)
def test_conv_kernels_match_the_generic_code(shape, kernel, stride, padding, order, dtype, tol):
    cpu, emu = gpunet.device("cpu"), gpunet.device(f"emulated:{order}")
    x = R.normal(size=shape).astype(dtype)
    cols = emu.im2col(x, kernel, stride, padding)
    np.testing.assert_array_equal(cols, cpu.im2col(x, kernel, stride, padding))
    dcols = R.normal(size=cols.shape).astype(dtype)
    got = emu.col2im(dcols, shape, kernel, stride, padding)
    want = cpu.col2im(dcols.astype(np.float64), shape, kernel, stride, padding)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    dy = R.normal(size=(shape[0], 5, 7, 11)).astype(dtype)  # N * HW = 77 or 231 per channel
    np.testing.assert_allclose(emu.conv_bias_grad(dy), dy.astype(np.float64).sum(axis=(0, 2, 3)),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("shape, want", [
    ((2, 32, 128, 128), [("conv_bias_grad", (32, 16), (256,)),   # 512 blocks for 32 channels
                         ("conv_bias_grad_finish", (4,), (32, 8))]),
    ((4, 1, 512, 512), [("conv_bias_grad", (1, 512), (256,)),
                        ("conv_bias_grad_finish", (1,), (32, 8))]),
    ((1, 1024, 32, 32), [("conv_bias_grad", (1024, 1), (256,))]),  # one launch fills the GPU
    ((1024, 1024, 1, 1), [("bn_sum_nc", (32, 16), (32, 8)), ("bn_finish", (128,), (32, 8))]),
    ((2, 5, 7, 11), [("conv_bias_grad", (5, 1), (160,))]),  # 154 values: 5 warps, one launch
])
def test_bias_gradient_grids(shape, want):
    """The grids conv_bias_grad launches (recorded, not run): a (channels x chunks) grid that
    fills a 132-SM GPU twice over for a million values, whatever the channel count; a 1 x 1
    output goes to the (N, C) kernel; a small one is a single launch."""
    dev = EmulatedBackend()
    launches = recorded_launches(dev, run=False)
    dev.conv_bias_grad(np.zeros(shape, np.float32))
    assert launches == want
    if np.prod(shape) >= 2**20:
        assert np.prod(launches[0][1]) >= 2 * 132


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape, grid", [
    ((2, 5, 7, 11), None), ((1, 3, 40, 60), None), ((6, 3, 1, 1), None), ((7, 1, 1, 1), None),
    ((3, 4, 5, 6), (5, 64)), ((2, 1, 9, 9), (4, 32)), ((1, 2, 3, 3), (3, 32)),
])
def test_bias_gradient_in_every_order_is_the_same_bits(shape, grid, dtype, tol):
    """conv_bias_grad on the emulator against the generic code, in every thread and block
    order, with the same bits in all three; forced grids split channels into many chunks."""
    dy = R.normal(size=shape).astype(dtype)
    want = Backend(np).conv_bias_grad(dy.astype(np.float64))
    results = []
    for order in ORDERS:
        dev = EmulatedBackend(order)  # a fresh one: its launch and grid are replaced here
        if grid is not None:
            dev._reduction_grid = lambda n, c, hw: grid
        launches = recorded_launches(dev)
        got = dev.conv_bias_grad(dy)
        assert got.dtype == dtype and got.shape == (shape[1],)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=order)
        if grid is not None:
            assert launches[0][1] == (shape[1], grid[0]) and len(launches) == 2
        results.append(got)
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


def test_col2im_is_the_adjoint_of_im2col():
    """<im2col(x), c> = <x, col2im(c)> for every x and c: col2im is exactly the transpose."""
    shape, kernel, stride, padding = GEOMETRIES[0]
    for dev in (gpunet.device("cpu"), gpunet.device("emulated")):
        x = R.normal(size=shape)
        c = R.normal(size=dev.im2col(x, kernel, stride, padding).shape)
        lhs = float((dev.im2col(x, kernel, stride, padding) * c).sum())
        rhs = float((x * dev.col2im(c, shape, kernel, stride, padding)).sum())
        assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))


# (input shape, out channels, kernel, stride, padding, how CpuBackend takes dx)
CPU_CASES = [
    ((3, 4, 6, 5), 2, (3, 3), (1, 1), (1, 1), "correlate"),
    ((2, 3, 5, 7), 3, (3, 2), (1, 1), (0, 1), "correlate"),
    ((3, 6, 14, 14), 16, (5, 5), (1, 1), (0, 0), "_uncolumns"),  # LeNet's second convolution
    ((2, 2, 3, 3), 2, (1, 1), (1, 1), (1, 1), "_uncolumns"),     # padding > kernel - 1
    ((2, 3, 4, 5), 8, (2, 3), (1, 1), (1, 2), "_uncolumns"),
    ((3, 3, 7, 8), 2, (3, 3), (2, 3), (1, 0), "col2im"),         # strided: im2col, not runs
]


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape, out, kernel, stride, padding, path", CPU_CASES)
def test_cpu_blocks_match_the_one_gemm_convolution(shape, out, kernel, stride, padding, path,
                                                   dtype, tol, monkeypatch):
    """The CPU device cuts the batch into blocks (here one sample each) and takes dx by a
    correlation or by col2im; the generic one-GEMM code is the reference."""
    cpu = CpuBackend(np, "cpu-test")
    cpu.BLOCK_BYTES = 1
    gathers = []
    for name in ("col2im", "_uncolumns"):
        monkeypatch.setattr(cpu, name, lambda *a, name=name, f=getattr(cpu, name):
                            gathers.append(name) or f(*a))
    reference = Backend(np, "reference")
    x = R.normal(size=shape).astype(dtype)
    w = R.normal(size=(out, shape[1], *kernel)).astype(dtype)
    b = R.normal(size=out).astype(dtype)
    y, saved = cpu.conv2d(x, w, b, stride, padding)
    y_ref, cols = reference.conv2d(x, w, b, stride, padding)
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    assert y.dtype == dtype and y.flags.c_contiguous
    dy = R.normal(size=y.shape).astype(dtype)
    got = cpu.backprop_conv2d(dy, saved, shape, w, stride, padding)
    want = reference.backprop_conv2d(dy, cols, shape, w, stride, padding)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * 10)
    assert set(gathers) == ({path} - {"correlate"})
    dx, dw, db = cpu.backprop_conv2d(dy, saved, shape, w, stride, padding, input_grad=False)
    assert dx is None
    np.testing.assert_array_equal(dw, got[1])


# -- bad inputs ----------------------------------------------------------------------------
f32 = lambda *s: np.zeros(s, np.float32)


@pytest.mark.parametrize("layer, x, error, match", [
    (Conv2D(3, 4, 3), f32(2, 4, 8, 8), ShapeError,
     r"Conv2D: expected input of shape \(N, 3, H, W\), got \(2, 4, 8, 8\)"),
    (Conv2D(1, 4, 5, padding=1), f32(2, 1, 2, 6), ShapeError,
     r"Conv2D: kernel 5x5 is larger than the padded input 4x8 \(input 2x6, padding 1x1\); "
     r"expected an input of at least 3x3, got shape \(2, 1, 2, 6\)"),
    (Conv2D(1, 4, (1, 3)), f32(2, 1, 4, 2), ShapeError, "Conv2D: kernel 1x3 is larger than"),
    (Conv2D(1, 1, 3), f32(1, 8, 8), ShapeError, r"Conv2D: expected 4-D input, got shape \(1, 8, 8\)"),
    (Conv2D(1, 1, 3), np.zeros((1, 1, 4, 4)), DTypeError, "Conv2D: expected input of dtype float32, got float64"),
])
def test_bad_input(layer, x, error, match):
    assert_refused(layer, x, error, match)


def test_bad_gradient_and_order():
    layer = Conv2D(1, 2, 3)
    with pytest.raises(StateError, match="Conv2D: backward called before forward"):
        layer.backward(f32(1, 2, 2, 2))
    layer.forward(f32(1, 1, 4, 4))
    with pytest.raises(ShapeError, match=r"Conv2D: expected output gradient of shape \(1, 2, 2, 2\), got \(1, 2, 4, 4\)"):
        layer.backward(f32(1, 2, 4, 4))
    assert layer.backward(f32(1, 2, 2, 2)).shape == (1, 1, 4, 4)  # the state was kept


@pytest.mark.parametrize("args, kwargs, match", [
    ((0, 2, 3), {}, "Conv2D: expected positive in_channels and out_channels, got 0 and 2"),
    ((1, 2, 0), {}, r"Conv2D: expected kernel_size to be an int >= 1 or a pair of them, got 0"),
    ((1, 2, (3, 3, 3)), {}, "Conv2D: expected kernel_size to be an int >= 1 or a pair"),
    ((1, 2, 3), {"stride": 0}, "Conv2D: expected stride to be an int >= 1"),
    ((1, 2, 3), {"padding": -1}, "Conv2D: expected padding to be an int >= 0"),
    ((1, 2, 3), {"padding": "full"}, "Conv2D: expected padding 'same', 'valid', an int >= 0"),
    ((1, 2, 4), {"padding": "same"}, r"Conv2D: padding='same' needs stride 1 and an odd kernel"),
    ((1, 2, 3), {"padding": "same", "stride": 2}, "Conv2D: padding='same' needs stride 1"),
    ((1, 2, 3), {"init": "nope"}, "unknown initialiser 'nope'"),
])
def test_bad_constructor_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conv2D(*args, **kwargs)


def test_save_load_round_trip(tmp_path):
    model = Sequential([Conv2D(1, 3, (3, 2), stride=(2, 1), padding=(1, 0)),
                        ReLU(), Conv2D(3, 2, 3, padding="same", bias=False)])
    x = R.normal(size=(2, 1, 7, 6)).astype(np.float32)
    gpunet.save(model, tmp_path / "conv.npz")
    loaded = gpunet.load(tmp_path / "conv.npz")
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert loaded.layers[0].stride == (2, 1) and loaded.layers[2].padding == (1, 1)


# -- LeNet ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, flat", [((1, 8, 8), 64), ((1, 28, 28), 400), ((3, 32, 32), 400)])
def test_lenet_adapts_to_the_input_size(shape, flat):
    model = gpunet.models.get("lenet").build(shape, 10)
    assert model.forward(f32(2, *shape)).shape == (2, 10)
    assert model[7].in_features == flat  # the Dense after Flatten


def test_lenet_refuses_flat_input():
    with pytest.raises(ValueError, match=r"lenet: expected images of shape \(C, H, W\)"):
        gpunet.models.get("lenet").build((64,), 10)


def test_train_lenet_on_digits_from_the_command_line(tmp_path):
    """`gpunet train lenet --data digits` with the registry defaults reaches 0.97."""
    metrics = train_command(["lenet", "--data", "digits"], tmp_path)
    assert set(metrics) == {"test_accuracy", "test_loss", "epochs", "seconds", "device"}
    assert metrics["test_accuracy"] >= 0.97, metrics


# (input shape, out channels, kernel, padding): stride 1 with at least SHIFT_MIN_CHANNELS
# channels, which the CPU device takes as shifted GEMMs through NumPy's own BLAS
SHIFTED_CASES = [
    ((3, 8, 6, 5), 8, (3, 3), (1, 1)),     # "same" padding: one padded copy of dy for both
    ((2, 9, 5, 7), 10, (3, 2), (0, 1)),
    ((2, 8, 6, 6), 8, (5, 5), (2, 2)),
    ((2, 16, 7, 7), 12, (3, 3), (0, 0)),   # "valid": dy padded by k - 1
    ((2, 8, 4, 5), 9, (1, 1), (0, 0)),
    ((2, 8, 4, 4), 8, (3, 3), (2, 2)),     # padding > (k - 1) / 2
]


@pytest.mark.skipif(gpunet.backends.blas.BLAS is None,
                    reason="NumPy's BLAS has no 64-bit CBLAS symbols gpunet can call here")
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("shape, out, kernel, padding", SHIFTED_CASES)
def test_cpu_shifted_gemms_match_the_one_gemm_convolution(shape, out, kernel, padding, dtype,
                                                          tol, monkeypatch):
    """Forward, dx and dweight of the shifted-GEMM path, with blocks of one sample and
    weight-gradient blocks of a few columns, against the generic one-GEMM code; with the
    direct BLAS calls off, the blocked im2col path gives the same."""
    cpu = CpuBackend(np, "cpu-test")
    cpu.SHIFT_BLOCK_BYTES, cpu.DW_BLOCK_BYTES = 1, 1
    used = []
    monkeypatch.setattr(cpu, "_correlate", lambda *a, f=cpu._correlate: used.append(1) or f(*a))
    reference = Backend(np, "reference")
    x = R.normal(size=shape).astype(dtype)
    w = R.normal(size=(out, shape[1], *kernel)).astype(dtype)
    b = R.normal(size=out).astype(dtype)
    y, saved = cpu.conv2d(x, w, b, (1, 1), padding)
    y_ref, cols = reference.conv2d(x, w, b, (1, 1), padding)
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    assert y.dtype == dtype and y.flags.c_contiguous and used
    dy = R.normal(size=y.shape).astype(dtype)
    want = reference.backprop_conv2d(dy, cols, shape, w, (1, 1), padding)
    for input_grad in (True, False):
        got = cpu.backprop_conv2d(dy, saved, shape, w, (1, 1), padding, input_grad=input_grad)
        for g, r in zip(got, want if input_grad else (None, *want[1:])):
            if r is None:
                assert g is None
            else:
                np.testing.assert_allclose(g, r, rtol=tol, atol=tol * 10)
    monkeypatch.setattr(gpunet.backends.blas, "BLAS", None)
    used.clear()
    y2, _ = cpu.conv2d(x, w, b, (1, 1), padding)
    got = cpu.backprop_conv2d(dy, saved, shape, w, (1, 1), padding)
    assert not used
    np.testing.assert_allclose(y2, y_ref, rtol=tol, atol=tol)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * 10)


def test_few_channels_take_the_column_path():
    """Under SHIFT_MIN_CHANNELS input channels (LeNet, an RGB image) a shifted GEMM would
    multiply by a matrix of a few columns: those convolutions keep the column matrix."""
    cpu = CpuBackend(np, "cpu-test")
    x = R.normal(size=(2, 3, 8, 8)).astype(np.float32)
    assert not cpu._shifts(x, (1, 1), 3)
    assert not cpu._shifts(x.astype(np.float16), (1, 1), 8)
    assert not cpu._shifts(x, (2, 2), 8)
    assert cpu._shifts(x, (1, 1), 8) == (gpunet.backends.blas.BLAS is not None)


@pytest.mark.skipif(gpunet.backends.native.library() is None,
                    reason=f"no compiled CPU loops here: {gpunet.backends.native.status()}")
@pytest.mark.parametrize("shape, out, kernel, padding", [
    ((3, 1, 9, 8), 6, (5, 5), (2, 2)),      # LeNet's first convolution, smaller
    ((2, 2, 6, 7), 3, (3, 2), (0, 1)),
    ((2, 1, 5, 5), 1, (1, 1), (0, 0)),
    ((2, 4, 6, 6), 2, (3, 3), (2, 2)),      # padding > k - 1: dx by the column path
])
def test_cpu_direct_loops_match_the_one_gemm_convolution(shape, out, kernel, padding):
    """float32 convolutions of few channels run as compiled loops: forward, dweight and dx
    against the generic code; float64 takes the column path."""
    cpu = CpuBackend(np, "cpu-test")
    reference = Backend(np, "reference")
    x = R.normal(size=shape).astype(np.float32)
    w = R.normal(size=(out, shape[1], *kernel)).astype(np.float32)
    b = R.normal(size=out).astype(np.float32)
    assert cpu._direct(x, (1, 1), shape[1], out) and not cpu._direct(x.astype(np.float64), (1, 1),
                                                                      shape[1], out)
    y, saved = cpu.conv2d(x, w, b, (1, 1), padding)
    y_ref, cols = reference.conv2d(x, w, b, (1, 1), padding)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = R.normal(size=y.shape).astype(np.float32)
    got = cpu.backprop_conv2d(dy, saved, shape, w, (1, 1), padding)
    want = reference.backprop_conv2d(dy, cols, shape, w, (1, 1), padding)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(gpunet.backends.native.library() is None,
                    reason=f"no compiled CPU loops here: {gpunet.backends.native.status()}")
@pytest.mark.parametrize("shape, out, kernel, padding", [
    ((3, 6, 14, 14), 16, (5, 5), (0, 0)),   # LeNet's second convolution
    ((2, 3, 9, 11), 32, (3, 3), (1, 1)),    # an RGB input (weight gradient by columns)
    ((2, 3, 7, 6), 8, (3, 2), (2, 0)),
    ((2, 4, 5, 30), 6, (1, 3), (0, 1)),     # a row longer than the loops' register tile
])
def test_cpu_vectorised_loops_match_the_one_gemm_convolution(shape, out, kernel, padding):
    """float32 convolutions of few input channels into 6, 8, 16 or 32 output channels run as
    loops vectorised across output channels: forward, dweight and dx against the generic
    code."""
    cpu = CpuBackend(np, "cpu-test")
    reference = Backend(np, "reference")
    x = R.normal(size=shape).astype(np.float32)
    w = R.normal(size=(out, shape[1], *kernel)).astype(np.float32)
    b = R.normal(size=out).astype(np.float32)
    assert cpu._vec(x, (1, 1), shape[1], out) and not cpu._direct(x, (1, 1), shape[1], out)
    y, saved = cpu.conv2d(x, w, b, (1, 1), padding)
    y_ref, cols = reference.conv2d(x, w, b, (1, 1), padding)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = R.normal(size=y.shape).astype(np.float32)
    want = reference.backprop_conv2d(dy, cols, shape, w, (1, 1), padding)
    for input_grad in (True, False):
        got = cpu.backprop_conv2d(dy, saved, shape, w, (1, 1), padding, input_grad=input_grad)
        assert (got[0] is None) == (not input_grad)
        for g, r in zip(got, want):
            if g is not None:
                np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)
