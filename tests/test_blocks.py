"""ResidualBlock, Inception and models.resnet: forward against the formulas written out here in
NumPy, float64 gradient checks, save/load, bad input, and `gpunet train resnet`'s target."""
from __future__ import annotations

import time

import numpy as np
import pytest

import gpunet
from gpunet import ShapeError, gradcheck, models
from gpunet.layers import Inception, ResidualBlock
from helpers import train_command

R = np.random.default_rng(11)


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: int = 1,
         pad: int = 0) -> np.ndarray:
    """Cross-correlation of x (N, C, H, W) with w (O, C, k, k), zero padding, by windows."""
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride,
                                                                            ::stride]
    y = np.einsum("ncpqij,ocij->nopq", win, w)
    return y if b is None else y + b[None, :, None, None]


def batchnorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
              ) -> np.ndarray:
    """Training-mode batch normalisation per channel with the biased batch variance."""
    mu = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mu) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    return gamma[None, :, None, None] * (x - mu) / np.sqrt(var + eps) + beta[None, :, None, None]


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def maxpool3_same(x: np.ndarray) -> np.ndarray:
    """3x3 max pooling, stride 1, padding 1 (the padding never wins)."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3)).max(axis=(4, 5))


def host(layer, name: str) -> np.ndarray:
    return gpunet.to_numpy(layer.params()[name].data)


def perturbed(layer):
    """float64, with nonzero BatchNorm shifts and conv biases so every term shows."""
    layer.to(dtype=np.float64)
    for p in layer.params().values():
        p.data += R.normal(size=p.shape) * 0.1
    return layer


@pytest.mark.parametrize("cin, cout, stride, shape", [(3, 3, 1, (2, 3, 5, 4)),
                                                      (2, 4, 2, (3, 2, 5, 5)),
                                                      (3, 5, 1, (2, 3, 4, 4))])
def test_residual_block_formula(cin, cout, stride, shape):
    block = perturbed(ResidualBlock(cin, cout, stride))
    x = R.normal(size=shape)
    p = lambda n: host(block, n)
    h = relu(batchnorm(conv(x, p("conv1.weight"), stride=stride, pad=1),
                       p("bn1.gamma"), p("bn1.beta")))
    main = batchnorm(conv(h, p("conv2.weight"), pad=1), p("bn2.gamma"), p("bn2.beta"))
    projected = stride != 1 or cin != cout
    assert ("proj.weight" in block.params()) == projected
    short = (batchnorm(conv(x, p("proj.weight"), stride=stride), p("proj_bn.gamma"),
                       p("proj_bn.beta")) if projected else x)
    y = block.forward(x)
    assert y.shape == (shape[0], cout, -(-shape[2] // stride), -(-shape[3] // stride))
    np.testing.assert_allclose(y, relu(main + short), rtol=1e-10, atol=1e-12)


def test_inception_formula_and_channels():
    block = perturbed(Inception(4, 3, 2, 5, 2, 1, 2))
    x = R.normal(size=(2, 4, 5, 6))
    c = lambda n, pad, src: relu(conv(src, host(block, f"{n}.weight"), host(block, f"{n}.bias"),
                                      pad=pad))
    want = np.concatenate([c("b1", 0, x),
                           c("b3", 1, c("b3_reduce", 0, x)),
                           c("b5", 2, c("b5_reduce", 0, x)),
                           c("pool_proj", 0, maxpool3_same(x))], axis=1)
    y = block.forward(x)
    assert y.shape == (2, 3 + 5 + 1 + 2, 5, 6) and block.out_channels == 11
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make, shape", [(lambda: ResidualBlock(3, 3), (3, 3, 4, 4)),
                                         (lambda: ResidualBlock(2, 3, stride=2), (2, 2, 5, 6)),
                                         (lambda: Inception(3, 2, 2, 3, 2, 2, 1), (2, 3, 4, 5))])
def test_gradcheck(make, shape):
    report = gradcheck(perturbed(make()), R.normal(size=shape))
    assert report.ok, str(report)
    assert set(report.errors) >= {"input", *make().params()}


@pytest.mark.parametrize("make", [lambda: ResidualBlock(2, 4, stride=2),
                                  lambda: Inception(3, 2, 2, 3, 1, 2, 2)])
def test_save_load_rebuilds_from_constructor_arguments(make, tmp_path):
    block = make()
    args = block.config()["args"]
    assert "nodes" not in args  # the constructor's arguments, not the graph
    x = R.normal(size=(2, args["in_channels"], 6, 6)).astype(np.float32)
    gpunet.save(block, tmp_path / "block.npz")
    again = gpunet.load(tmp_path / "block.npz")
    assert type(again) is type(block) and repr(again) == repr(block)
    np.testing.assert_array_equal(again.forward(x, training=False),
                                  block.forward(x, training=False))


@pytest.mark.parametrize("make, match", [
    (lambda: ResidualBlock(0, 4), "ResidualBlock: expected positive integer sizes, got "
                                  "in_channels=0"),
    (lambda: ResidualBlock(4, 4, stride=0), "stride=0"),
    (lambda: Inception(3, 2, 2, 3, 1, 2, -1), "Inception: expected positive integer sizes, "
                                              "got pool_proj=-1"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_input_names_the_layer():
    with pytest.raises(ShapeError, match=r"Conv2D: expected input of shape \(N, 3, H, W\), "
                                         r"got \(2, 4, 5, 5\)"):
        ResidualBlock(3, 3).forward(np.zeros((2, 4, 5, 5), np.float32))
    with pytest.raises(ShapeError, match="Conv2D"):
        Inception(3, 1, 1, 1, 1, 1, 1).forward(np.zeros((2, 3, 5), np.float32))


def test_resnet_shapes_and_errors():
    for shape in [(1, 8, 8), (1, 28, 28), (3, 5, 7)]:
        model = models.resnet(shape, 10)
        assert model.forward(np.zeros((2, *shape), np.float32)).shape == (2, 10)
    assert sum(isinstance(l, ResidualBlock) for l in models.resnet((1, 8, 8), 10, blocks=2)
               .walk()) == 6
    with pytest.raises(ValueError, match=r"resnet: expected images of shape \(C, H, W\) of "
                                         r"at least 4x4, got input shape \(64,\)"):
        models.resnet((64,), 10)
    with pytest.raises(ValueError, match="resnet: expected at least one width"):
        models.resnet((1, 8, 8), 10, widths=())


def test_gpunet_train_resnet_on_digits_reaches_098(tmp_path):
    started = time.perf_counter()
    metrics = train_command(["resnet", "--data", "digits"], tmp_path)
    assert metrics["test_accuracy"] >= 0.98, metrics
    assert metrics["epochs"] == 15
    assert time.perf_counter() - started < 60
