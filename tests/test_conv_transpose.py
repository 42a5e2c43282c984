"""ConvTranspose2D: forward against the scatter written as loops and against PyTorch, the
adjoint of Conv2D, gradient checks, PyTorch's initialisation, every device without the input
gradient, the conv kernels in every thread order, bad inputs and saving."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import gpunet
from gpunet import DTypeError, ShapeError, StateError, gradcheck, parity
from gpunet.backends import Backend, CpuBackend
from gpunet.layers import Conv2D, ConvTranspose2D, ReLU, Sequential
from helpers import assert_refused

R = np.random.default_rng(29)


def scatter_loops(x, w, b, stride, padding, output_padding) -> np.ndarray:
    """Every input pixel adds ``x * kernel`` into the output at ``h sh - ph, w sw - pw``, one
    value at a time in plain Python arithmetic; what lands outside the output is dropped."""
    n, c, h, wd = x.shape
    _, o, kh, kw = w.shape
    (sh, sw), (ph, pw), (oh, ow) = stride, padding, output_padding
    ho, wo = (h - 1) * sh - 2 * ph + kh + oh, (wd - 1) * sw - 2 * pw + kw + ow
    y = np.zeros((n, o, ho, wo))
    for s in range(n):
        for k in range(o):
            y[s, k] = 0.0 if b is None else float(b[k])
            for ch in range(c):
                for p in range(h):
                    for q in range(wd):
                        for i in range(kh):
                            for j in range(kw):
                                r, col = p * sh + i - ph, q * sw + j - pw
                                if 0 <= r < ho and 0 <= col < wo:
                                    y[s, k, r, col] += float(w[ch, k, i, j]) * float(x[s, ch, p, q])
    return y


# (in, out, kernel, stride, padding, output_padding, bias, input shape)
CONFIGS = [
    (2, 3, 3, 1, 1, 0, True, (2, 2, 4, 4)),
    (3, 2, (3, 2), (2, 1), (1, 0), (1, 0), True, (2, 3, 3, 4)),
    (2, 2, 2, 2, 0, 0, False, (1, 2, 3, 2)),               # learnable 2x upsampling
    (1, 2, (2, 3), 3, (0, 1), 2, True, (2, 1, 2, 3)),      # stride > kernel: gaps in y
    (2, 1, 4, 2, 1, 1, True, (1, 2, 3, 3)),                # DCGAN's 4/2/1, output_padding
    (3, 2, 1, 1, 0, 0, True, (2, 3, 2, 3)),                # 1x1
    (1, 1, 3, 1, 3, 0, True, (1, 1, 5, 6)),                # padding > kernel - 1
]


def make(config, dtype=np.float64, device="cpu") -> tuple[ConvTranspose2D, np.ndarray]:
    cin, cout, k, s, p, op, bias, shape = config
    gpunet.seed(3)
    layer = ConvTranspose2D(cin, cout, k, stride=s, padding=p, output_padding=op, bias=bias)
    return layer.to(device, dtype), R.normal(size=shape)


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_matches_the_loops(config):
    layer, x = make(config)
    b = None if layer.bias is None else layer.bias.data
    y = layer.forward(x)
    want = scatter_loops(x, layer.weight.data, b, layer.stride, layer.padding,
                         layer.output_padding)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    assert y.shape == (x.shape[0], layer.out_channels, *layer.output_size(x.shape))
    assert y.flags.c_contiguous


@pytest.mark.parametrize("config", CONFIGS)
def test_gradcheck(config):
    layer, x = make(config)
    report = gradcheck(layer, x)
    assert report.ok, str(report)
    assert set(report.errors) == {"input", *layer.params()}


@pytest.mark.parametrize("config", CONFIGS)
def test_against_pytorch(config):
    """Output and every gradient as ``torch.nn.functional.conv_transpose2d``'s, on the same
    weight array (PyTorch's layout)."""
    torch = pytest.importorskip("torch")
    layer, x = make(config)
    y = layer.forward(x)
    dy = R.normal(size=y.shape)
    dx = layer.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(layer.weight.data, requires_grad=True)
    bt = None if layer.bias is None else torch.tensor(layer.bias.data, requires_grad=True)
    yt = torch.nn.functional.conv_transpose2d(xt, wt, bt, layer.stride, layer.padding,
                                              layer.output_padding)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, wt.grad.numpy(), rtol=1e-12, atol=1e-12)
    if bt is not None:
        np.testing.assert_allclose(layer.bias.grad, bt.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS)
def test_is_the_adjoint_of_conv2d(config):
    """``<convT(x), y> = <x, conv(y)>`` with the same weight array (no bias), and the conv of
    the same geometry maps the transposed conv's output size back to ``H x W``."""
    cin, cout, k, s, p, op, _, shape = config
    up = ConvTranspose2D(cin, cout, k, stride=s, padding=p, output_padding=op,
                         bias=False).to(dtype=np.float64)
    down = Conv2D(cout, cin, k, stride=s, padding=p, bias=False).to(dtype=np.float64)
    down.weight.data[...] = up.weight.data
    x = R.normal(size=shape)
    y = R.normal(size=up.forward(x).shape)
    back = down.forward(y)
    assert back.shape == x.shape
    np.testing.assert_allclose((up.forward(x) * y).sum(), (x * back).sum(), rtol=1e-12)


def test_output_padding_picks_among_the_sizes_a_conv_maps_back():
    layer = ConvTranspose2D(1, 1, 3, stride=2, padding=1, output_padding=1)
    assert layer.forward(np.zeros((1, 1, 4, 5), np.float32)).shape == (1, 1, 8, 10)
    layer = ConvTranspose2D(1, 1, 3, stride=2, padding=1)
    assert layer.forward(np.zeros((1, 1, 4, 5), np.float32)).shape == (1, 1, 7, 9)
    layer = ConvTranspose2D(1, 1, [3, 1], stride=[2, 1], padding=[1, 0], output_padding=(1, 0))
    assert (layer.kernel, layer.stride, layer.padding, layer.output_padding) == \
        ((3, 1), (2, 1), (1, 0), (1, 0))


def test_initialised_as_pytorch():
    """Weight ``(in, out, kh, kw)`` and bias uniform in ``+-1/sqrt(out kh kw)`` (PyTorch's
    fan_in of a transposed conv's weight), drawn from gpunet's seeded stream."""
    gpunet.seed(0)
    layer = ConvTranspose2D(40, 6, (3, 2))
    bound = 1 / math.sqrt(6 * 3 * 2)
    assert layer.weight.shape == (40, 6, 3, 2) and layer.bias.shape == (6,)
    for p in (layer.weight.data, layer.bias.data):
        assert np.abs(p).max() <= bound
    assert np.abs(layer.weight.data).max() > 0.95 * bound
    assert abs(layer.weight.data.std() - bound / math.sqrt(3)) < 0.05 * bound
    gpunet.seed(0)
    np.testing.assert_array_equal(ConvTranspose2D(40, 6, (3, 2)).weight.data, layer.weight.data)
    torch = pytest.importorskip("torch")
    reference = torch.nn.ConvTranspose2d(40, 6, (3, 2))
    assert tuple(reference.weight.shape) == layer.weight.shape
    assert float(reference.weight.detach().abs().max()) <= bound
    assert float(reference.bias.detach().abs().max()) <= bound


def test_float32_end_to_end_and_accumulation():
    layer = ConvTranspose2D(2, 3, 3, stride=2)
    x = R.normal(size=(2, 2, 3, 3)).astype(np.float32)
    y = layer.forward(x)
    dy = R.normal(size=y.shape).astype(np.float32)
    dx = layer.backward(dy)
    assert y.dtype == dx.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == np.float32
    once = layer.weight.grad.copy()
    layer.forward(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, 2 * once, rtol=1e-6)


def test_an_encoder_decoder_passes_gradcheck():
    gpunet.seed(0)
    model = Sequential([Conv2D(1, 2, 3, stride=2, padding=1), ReLU(),
                        ConvTranspose2D(2, 1, 3, stride=2, padding=1, output_padding=1)])
    x = R.normal(size=(2, 1, 6, 6))
    assert model.forward(x.astype(np.float32)).shape == x.shape
    report = gradcheck(model, x)
    assert report.ok, str(report)


# -- every device ------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS[:4])
def test_without_input_grad_the_same_parameter_grads(config, device):
    """``set_input_grad(False)``: None, and the same gradients from ``dy``'s columns alone
    (on the CPU its blocks, elsewhere im2col), on every device."""
    full, x = make(config, device=device)
    skip = copy.deepcopy(full).set_input_grad(False)
    x = gpunet.asarray(x, device)
    y = full.forward(x)
    skip.forward(x)
    dy = gpunet.asarray(R.normal(size=y.shape), device)
    assert full.backward(dy).shape == x.shape
    assert skip.backward(dy) is None
    for key, p in full.params().items():
        np.testing.assert_allclose(gpunet.to_numpy(skip.params()[key].grad),
                                   gpunet.to_numpy(p.grad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS)
def test_cpu_blocks_match_the_generic_backend(config):
    """The CPU device's backward reuses its blocked convolution (here one sample per block,
    ``dy`` in the role of the convolution's input); the generic Backend is the reference."""
    cpu = CpuBackend(np, "cpu-test")
    cpu.BLOCK_BYTES = 1
    reference = Backend(np, "reference")
    layer, x = make(config)
    w = layer.weight.data
    b = None if layer.bias is None else layer.bias.data
    geometry = (layer.stride, layer.padding)
    y = cpu.conv_transpose2d(x, w, b, *geometry, layer.output_padding)
    np.testing.assert_allclose(y, reference.conv_transpose2d(x, w, b, *geometry,
                                                             layer.output_padding), rtol=1e-12)
    dy = R.normal(size=y.shape)
    want = reference.backprop_conv_transpose2d(dy, x, w, *geometry, b is not None)
    for input_grad in (True, False):
        got = cpu.backprop_conv_transpose2d(dy, x, w, *geometry, b is not None, input_grad)
        assert (got[0] is None) == (not input_grad)
        for g, r in zip(got, want):
            if g is not None:
                np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", ["emulated:reverse", "emulated:shuffled"])
@pytest.mark.parametrize("case", [c for c in parity.CASES if c.startswith("ConvTranspose2D")])
def test_parity_in_every_thread_order(case, spec, dtype):
    result = parity.run_case(case, gpunet.device(spec), dtype)
    assert result.ok, parity.table([result])


# -- bad inputs ----------------------------------------------------------------------------
f32 = lambda *s: np.zeros(s, np.float32)


@pytest.mark.parametrize("layer, x, error, match", [
    (ConvTranspose2D(3, 4, 3), f32(2, 4, 5, 5), ShapeError,
     r"ConvTranspose2D: expected input of shape \(N, 3, H, W\), got \(2, 4, 5, 5\)"),
    (ConvTranspose2D(1, 1, 3), f32(1, 5, 5), ShapeError,
     r"ConvTranspose2D: expected 4-D input, got shape \(1, 5, 5\)"),
    (ConvTranspose2D(1, 1, 3), np.zeros((1, 1, 4, 4)), DTypeError,
     "ConvTranspose2D: expected input of dtype float32, got float64"),
    (ConvTranspose2D(1, 1, 1, padding=1), f32(1, 1, 1, 2), ShapeError,
     r"ConvTranspose2D: padding 1x1 crops the whole output \(output size -1x0\); expected an "
     r"input large enough for a positive output size, got shape \(1, 1, 1, 2\)"),
])
def test_bad_input(layer, x, error, match):
    assert_refused(layer, x, error, match)


def test_bad_gradient_and_order():
    layer = ConvTranspose2D(1, 2, 3, stride=2)
    with pytest.raises(StateError, match="ConvTranspose2D: backward called before forward"):
        layer.backward(f32(1, 2, 5, 5))
    layer.forward(f32(1, 1, 2, 2))
    with pytest.raises(ShapeError, match=r"ConvTranspose2D: expected output gradient of shape "
                                         r"\(1, 2, 5, 5\), got \(1, 2, 4, 4\)"):
        layer.backward(f32(1, 2, 4, 4))
    assert layer.backward(f32(1, 2, 5, 5)).shape == (1, 1, 2, 2)  # the state was kept


@pytest.mark.parametrize("args, kwargs, match", [
    ((0, 2, 3), {}, "ConvTranspose2D: expected positive in_channels and out_channels, got 0 and 2"),
    ((1, 2, 0), {}, "ConvTranspose2D: expected kernel_size to be an int >= 1 or a pair of them"),
    ((1, 2, 3), {"stride": (1, 0)}, "ConvTranspose2D: expected stride to be an int >= 1"),
    ((1, 2, 3), {"padding": -1}, "ConvTranspose2D: expected padding to be an int >= 0"),
    ((1, 2, 3), {"padding": "same"}, "ConvTranspose2D: expected padding to be an int >= 0"),
    ((1, 2, 3), {"output_padding": 1}, r"ConvTranspose2D: expected output_padding smaller than "
     r"the stride in each dimension, got output_padding \(1, 1\) and stride \(1, 1\)"),
    ((1, 2, 3), {"stride": (2, 1), "output_padding": (1, 1)}, "output_padding smaller than"),
    ((1, 2, 3), {"output_padding": -1}, "expected output_padding to be an int >= 0"),
])
def test_bad_constructor_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvTranspose2D(*args, **kwargs)


def test_save_load_round_trip(tmp_path):
    model = Sequential([ConvTranspose2D(1, 3, (3, 2), stride=(2, 1), padding=(1, 0),
                                        output_padding=(1, 0)),
                        ReLU(), ConvTranspose2D(3, 2, 2, stride=2, bias=False)])
    x = R.normal(size=(2, 1, 3, 4)).astype(np.float32)
    gpunet.save(model, tmp_path / "up.npz")
    loaded = gpunet.load(tmp_path / "up.npz")
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert loaded.layers[0].output_padding == (1, 0) and loaded.layers[2].bias is None


# -- the U-Net's learnable upsampling ----------------------------------------------------
def test_unet_with_transposed_convolutions():
    gpunet.seed(0)
    model = gpunet.models.unet((1, 8, 8), None, width=2, upsample="transpose")
    ups = [layer for layer in model.walk() if isinstance(layer, ConvTranspose2D)]
    assert [(u.in_channels, u.out_channels, u.kernel, u.stride) for u in ups] == \
        [(8, 8, (2, 2), (2, 2)), (4, 4, (2, 2), (2, 2))]
    assert not any(type(layer).__name__ == "Upscale2D" for layer in model.walk())
    for p in model.params().values():  # nonzero biases: no pre-activation sits on a ReLU kink
        p.data += R.normal(size=p.shape).astype(np.float32) * 0.1
    x = R.normal(size=(2, 1, 8, 8))
    assert model.forward(x.astype(np.float32)).shape == (2, 1, 8, 8)
    report = gradcheck(model, x, max_entries=40)
    assert report.ok, str(report)
    with pytest.raises(ValueError, match="unet: expected upsample 'upscale' or 'transpose', "
                                         "got 'bilinear'"):
        gpunet.models.unet((1, 8, 8), None, upsample="bilinear")
