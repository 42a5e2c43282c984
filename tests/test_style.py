"""Neural style transfer: the Gram layer and the content and style losses, against the notes'
formulas written out independently here, central differences in float64, every device, and
bad inputs."""
from __future__ import annotations

import numpy as np
import pytest

import gpunet
from gpunet import gradcheck, to_numpy
from gpunet.errors import DeviceError, DTypeError, ShapeError, StateError
from gpunet.layers import Gram
from gpunet.losses import ContentLoss, StyleLoss
from helpers import analytic_grad, numeric_grad

R = np.random.default_rng(5)


def gram_reference(x: np.ndarray) -> np.ndarray:
    """``G[n, i, j] = sum over positions of x[n, i] x[n, j]``, channel pair by channel pair."""
    n, c = x.shape[:2]
    g = np.zeros((n, c, c))
    for s in range(n):
        for i in range(c):
            for j in range(c):
                g[s, i, j] = np.sum(x[s, i] * x[s, j])
    return g


def content_reference(a_g: np.ndarray, a_c: np.ndarray) -> np.ndarray:
    """The notes' J_content of each sample."""
    _, c, h, w = a_g.shape
    a_c = np.broadcast_to(a_c, a_g.shape)
    return np.array([np.sum((a_c[s] - a_g[s]) ** 2) / (4 * h * w * c) for s in range(len(a_g))])


def style_reference(a_g: np.ndarray, a_s: np.ndarray) -> np.ndarray:
    """The notes' J_style of one layer, per sample."""
    _, c, h, w = a_g.shape
    g_g = gram_reference(a_g)
    g_s = gram_reference(np.broadcast_to(a_s, a_g.shape))
    return np.array([np.sum((g_s[s] - g_g[s]) ** 2) / (4 * c ** 2 * (h * w) ** 2)
                     for s in range(len(a_g))])


# -- the Gram layer --------------------------------------------------------------------------
def test_gram_forward_matches_the_formula():
    x = R.normal(size=(3, 4, 2, 5))
    y = Gram().to(dtype=np.float64).forward(x)
    assert y.shape == (3, 4, 4)
    np.testing.assert_allclose(y, gram_reference(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, y.transpose(0, 2, 1), rtol=0, atol=0)  # symmetric


def test_gram_backward_is_the_symmetrised_gradient_times_a():
    x, dg = R.normal(size=(2, 3, 4, 2)), R.normal(size=(2, 3, 3))
    layer = Gram()
    layer.forward(x)
    a = x.reshape(2, 3, 8)
    want = np.stack([(dg[s] + dg[s].T) @ a[s] for s in range(2)]).reshape(x.shape)
    np.testing.assert_allclose(layer.backward(dg), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 1, 1), (3, 5, 1, 7)])
def test_gram_gradcheck(shape):
    report = gradcheck(Gram(), R.normal(size=shape))
    assert report.ok, str(report)


def test_gram_on_every_device_matches_the_cpu(device):
    x, dg = R.normal(size=(2, 3, 4, 5)), R.normal(size=(2, 3, 3))
    layer = Gram().to(device, np.float64)
    y = layer.forward(device.asarray(x))
    dx = layer.backward(device.asarray(dg))
    assert device.owns(y) and device.owns(dx)
    np.testing.assert_allclose(to_numpy(y), gram_reference(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(dx), np.stack(
        [((dg[s] + dg[s].T) @ x[s].reshape(3, 20)).reshape(3, 4, 5) for s in range(2)]),
        rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x", [np.zeros((3, 4, 5)), np.zeros((2, 3, 4, 5, 6)), np.zeros(4)])
def test_gram_rejects_inputs_that_are_not_feature_maps(x):
    with pytest.raises(ShapeError, match=r"Gram: expected 4-D input, got shape"):
        Gram().forward(x)


def test_gram_rejects_a_gradient_of_the_wrong_shape():
    layer = Gram()
    layer.forward(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ShapeError, match=r"Gram: expected output gradient of shape \(2, 3, 3\)"):
        layer.backward(np.zeros((2, 3, 16), np.float32))


# -- the losses ------------------------------------------------------------------------------
LOSSES = {"content": (ContentLoss, content_reference), "style": (StyleLoss, style_reference)}


@pytest.mark.parametrize("name", LOSSES)
def test_loss_values_match_the_notes(name):
    make, reference = LOSSES[name]
    a_g, a_t = R.normal(size=(3, 4, 2, 5)), R.normal(size=(3, 4, 2, 5))
    per_sample = reference(a_g, a_t)
    assert make()(a_g, a_t) == pytest.approx(per_sample.mean(), rel=1e-12)
    assert make(reduction="sum")(a_g, a_t) == pytest.approx(per_sample.sum(), rel=1e-12)


def test_content_loss_by_hand():
    # one sample, C = 1, H = 1, W = 2: (1 - 0)^2 + (3 - 1)^2 = 5, over 4 * 1 * 2 * 1 = 8
    a_g, a_c = np.array([[[[0.0, 1.0]]]]), np.array([[[[1.0, 3.0]]]])
    assert float(ContentLoss()(a_g, a_c)) == 5 / 8
    # gradient (a_G - a_C) / (2 H W C) = [-1, -2] / 4
    np.testing.assert_allclose(analytic_grad(ContentLoss(), a_g, a_c), [[[[-0.25, -0.5]]]])


def test_style_loss_by_hand():
    # C = 1, H W = 2: G_G = 1^2 + 1^2 = 2, G_S = 2^2 + 0^2 = 4; (4 - 2)^2 / (4 * 1 * 4) = 1/4;
    # gradient (G_G - G_S) A_G / (C^2 (H W)^2) = -2 [1, 1] / 4
    a_g, a_s = np.array([[[[1.0, 1.0]]]]), np.array([[[[2.0, 0.0]]]])
    assert float(StyleLoss()(a_g, a_s)) == 0.25
    np.testing.assert_allclose(analytic_grad(StyleLoss(), a_g, a_s), [[[[-0.5, -0.5]]]])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", LOSSES)
def test_loss_gradients_match_central_differences(name, reduction):
    make, _ = LOSSES[name]
    a_g, a_t = R.normal(size=(2, 3, 2, 3)), R.normal(size=(2, 3, 2, 3))
    loss = make(reduction=reduction)
    np.testing.assert_allclose(analytic_grad(loss, a_g, a_t), numeric_grad(loss, a_g, a_t),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", LOSSES)
def test_one_target_for_a_batch_is_broadcast(name):
    make, reference = LOSSES[name]
    a_g, a_t = R.normal(size=(3, 2, 3, 2)), R.normal(size=(1, 2, 3, 2))
    loss = make()
    assert loss(a_g, a_t) == pytest.approx(reference(a_g, a_t).mean(), rel=1e-12)
    repeated = analytic_grad(make(), a_g, np.repeat(a_t, 3, axis=0))
    np.testing.assert_allclose(loss.backward(), repeated, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(analytic_grad(loss, a_g, a_t), numeric_grad(loss, a_g, a_t),
                               rtol=1e-6, atol=1e-9)


def test_the_total_cost_is_a_weighted_sum_of_losses():
    """The notes' J = alpha J_content + beta (lambda_1 J_style[1] + lambda_2 J_style[2]), here
    with every term on one activation: the weighted sum of backward()s is its gradient."""
    alpha, beta, lam = 10.0, 40.0, (0.3, 0.7)
    a_c, a_s1, a_s2 = (R.normal(size=(1, 3, 2, 2)) for _ in range(3))
    content, style1, style2 = ContentLoss(), StyleLoss(), StyleLoss()

    def total(a_g):
        return (alpha * content(a_g, a_c)
                + beta * (lam[0] * style1(a_g, a_s1) + lam[1] * style2(a_g, a_s2)))

    a_g = R.normal(size=(1, 3, 2, 2))
    total(a_g)
    grad = alpha * content.backward() + beta * (lam[0] * style1.backward()
                                                + lam[1] * style2.backward())
    numeric = np.zeros_like(a_g)
    for i in np.ndindex(a_g.shape):
        up, down = a_g.copy(), a_g.copy()
        up[i] += 1e-6
        down[i] -= 1e-6
        numeric[i] = (total(up) - total(down)) / 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_style_loss_against_torch_autograd():
    torch = pytest.importorskip("torch")
    a_g, a_s = R.normal(size=(2, 3, 4, 3)), R.normal(size=(2, 3, 4, 3))
    t_g = torch.tensor(a_g, requires_grad=True)
    t_s = torch.tensor(a_s)

    def gram(t):
        a = t.reshape(2, 3, 12)
        return a @ a.transpose(1, 2)

    j = ((gram(t_s) - gram(t_g)) ** 2).sum(dim=(1, 2)).mean() / (4 * 3 ** 2 * 12 ** 2)
    j.backward()
    loss = StyleLoss()
    assert float(loss(a_g, a_s)) == pytest.approx(j.item(), rel=1e-12)
    np.testing.assert_allclose(loss.backward(), t_g.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", LOSSES)
def test_losses_on_every_device(name, dtype, device):
    make, reference = LOSSES[name]
    a_g, a_t = R.normal(size=(2, 3, 4, 2)), R.normal(size=(2, 3, 4, 2))
    loss = make()
    value = loss(device.asarray(a_g, dtype=dtype), device.asarray(a_t, dtype=dtype))
    grad = loss.backward()
    assert value.shape == () and value.dtype == dtype and grad.dtype == dtype
    assert device.owns(grad) and (device.on_host or device.owns(value))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert float(value) == pytest.approx(reference(a_g, a_t).mean(), rel=tol)
    np.testing.assert_allclose(to_numpy(grad), analytic_grad(make(), a_g, a_t), rtol=tol,
                               atol=tol * 1e-2)


@pytest.mark.parametrize("name", LOSSES)
def test_losses_reject_bad_inputs(name):
    make, _ = LOSSES[name]
    loss = make()
    with pytest.raises(ShapeError, match=rf"{make.__name__}: expected activations of shape "
                                         r"\(N, C, H, W\), got \(3, 4\)"):
        loss(np.zeros((3, 4)), np.zeros((3, 4)))
    with pytest.raises(ShapeError, match=rf"{make.__name__}: expected the target of shape "
                                         r"\(2, 3, 4, 4\) or \(1, 3, 4, 4\).*got \(2, 3, 2, 8\)"):
        loss(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 2, 8)))
    with pytest.raises(ShapeError, match=r"got \(2, 3, 4, 4\)"):  # no broadcast of the pred
        loss(np.zeros((1, 3, 4, 4)), np.zeros((2, 3, 4, 4)))
    with pytest.raises(DTypeError, match=rf"{make.__name__}: expected the target to be an array"):
        loss(np.zeros((1, 3, 4, 4)), [[0.0]])
    with pytest.raises(DTypeError, match=rf"{make.__name__}: expected the prediction of dtype"):
        loss(np.zeros((1, 3, 4, 4), np.int64), np.zeros((1, 3, 4, 4)))
    with pytest.raises(StateError, match=make.__name__):
        make().backward()


def test_losses_reject_a_target_on_another_device(standin):
    gpu = gpunet.device("cuda:0")
    with pytest.raises(DeviceError, match=r"StyleLoss: expected the target on device cuda:0"):
        StyleLoss()(gpu.asarray(np.zeros((1, 2, 2, 2))), np.zeros((1, 2, 2, 2)))
