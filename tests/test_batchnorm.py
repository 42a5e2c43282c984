"""BatchNorm: its formula in both modes, running statistics, state saved with the model, bad
inputs, and the backward kernels on the emulated device."""
from __future__ import annotations

import math

import numpy as np
import pytest

import gpunet
from gpunet import ShapeError, gradcheck
from gpunet.layers import BatchNorm, Dense, Sequential

R = np.random.default_rng(5)


def per_channel_formula(x: np.ndarray, gamma, beta, eps: float) -> tuple[np.ndarray, list, list]:
    """y, batch means and biased variances, channel by channel in plain Python arithmetic."""
    n, c = x.shape[:2]
    y = np.empty_like(x)
    means, variances = [], []
    for k in range(c):
        values = x[:, k].ravel().tolist()
        mu = sum(values) / len(values)
        var = sum((v - mu) ** 2 for v in values) / len(values)
        y[:, k] = gamma[k] * (x[:, k] - mu) / math.sqrt(var + eps) + beta[k]
        means.append(mu)
        variances.append(var)
    return y, means, variances


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 5)])
def test_training_forward_and_running_statistics(shape):
    layer = BatchNorm(3, eps=1e-3, momentum=0.2).to(dtype=np.float64)
    layer.gamma.data[...] = [0.5, 1.5, -2.0]
    layer.beta.data[...] = [0.1, -0.2, 0.3]
    x = R.normal(size=shape) * 2 + 1
    y = layer.forward(x, training=True)
    want, means, variances = per_channel_formula(x, [0.5, 1.5, -2.0], [0.1, -0.2, 0.3], 1e-3)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    m = x.size // 3
    state = layer.state()
    np.testing.assert_allclose(state["running_mean"], [0.2 * mu for mu in means], rtol=1e-12)
    np.testing.assert_allclose(state["running_var"],
                               [0.8 + 0.2 * v * m / (m - 1) for v in variances], rtol=1e-12)


def test_eval_uses_running_statistics():
    layer = BatchNorm(2, eps=1e-5).to(dtype=np.float64)
    layer._buffers["running_mean"][...] = [1.0, -1.0]
    layer._buffers["running_var"][...] = [4.0, 0.25]
    layer.gamma.data[...] = [2.0, 3.0]
    layer.beta.data[...] = [0.5, 0.0]
    x = R.normal(size=(3, 2))
    want = np.stack([2.0 * (x[:, 0] - 1.0) / math.sqrt(4.0 + 1e-5) + 0.5,
                     3.0 * (x[:, 1] + 1.0) / math.sqrt(0.25 + 1e-5)], axis=1)
    np.testing.assert_allclose(layer.forward(x, training=False), want, rtol=1e-12)
    before = {k: v.copy() for k, v in layer.state().items()}
    layer.forward(x, training=False)
    for k, v in layer.state().items():  # eval never moves the running estimates
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("shape, training", [((5, 4), True), ((3, 4, 2, 3), True),
                                             ((3, 4, 2, 3), False), ((2, 4), True)])
def test_gradcheck_both_modes(shape, training):
    layer = BatchNorm(4)
    layer.gamma.data[...] = R.normal(size=4).astype(np.float32)
    layer.beta.data[...] = R.normal(size=4).astype(np.float32)
    layer._buffers["running_var"][...] = np.float32(1.7)
    report = gradcheck(layer, R.normal(size=shape), training=training)
    assert report.ok, str(report)


def test_state_is_saved_with_the_model(tmp_path):
    model = Sequential([Dense(3, 4), BatchNorm(4)])
    for _ in range(3):
        model.forward(R.normal(size=(8, 3)).astype(np.float32))
    gpunet.save(model, tmp_path / "bn.npz")
    loaded = gpunet.load(tmp_path / "bn.npz")
    assert set(loaded.state()) == {"1.running_mean", "1.running_var"}
    for k, v in model.state().items():
        np.testing.assert_array_equal(loaded.state()[k], v)
    x = R.normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward(x, training=False), model.forward(x, training=False))


@pytest.mark.parametrize("x, training, match", [
    (np.zeros((4, 5), np.float32), True, r"BatchNorm: expected 3 features on axis 1 of the input, got shape \(4, 5\)"),
    (np.zeros((4, 3, 2), np.float32), True, r"BatchNorm: expected 2-D or 4-D input, got shape \(4, 3, 2\)"),
    (np.zeros((1, 3), np.float32), True, "BatchNorm: expected more than 1 value per feature in training"),
])
def test_bad_input(x, training, match):
    layer = BatchNorm(3)
    before = {k: v.copy() for k, v in layer.state().items()}
    with pytest.raises(ShapeError, match=match):
        layer.forward(x, training)
    for k, v in layer.state().items():  # a refused batch leaves the running estimates alone
        np.testing.assert_array_equal(v, before[k])


def test_batch_of_one_is_fine_in_eval():
    assert BatchNorm(3).forward(np.ones((1, 3), np.float32), training=False).shape == (1, 3)


@pytest.mark.parametrize("args", [(0,), (3, 0.0), (3, 1e-5, 1.5)])
def test_bad_constructor_arguments(args):
    with pytest.raises(ValueError, match="BatchNorm: expected features >= 1, eps > 0"):
        BatchNorm(*args)


# -- the backward kernels on the CPU emulator ------------------------------------------------
ORDERS = ["forward", "reverse", "shuffled"]


def backward_inputs(shape, dtype):
    x, dy = R.normal(size=shape) * 2 + 0.5, R.normal(size=shape)
    axes = (0,) + tuple(range(2, len(shape)))
    mean, invstd = x.mean(axis=axes), 1 / np.sqrt(x.var(axis=axes) + 1e-5)
    gamma = R.normal(size=shape[1])
    return [np.ascontiguousarray(a, dtype) for a in (dy, x, mean, invstd, gamma)]


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", [(37, 40), (2, 3), (300, 2), (5, 3, 7, 9), (2, 70, 1, 1),
                                   (1, 4, 16, 16)])
def test_backward_kernels_match_the_generic_code(shape, order, dtype, tol):
    """Both reduction layouts (HW = 1 and HW > 1), channel counts that are not a multiple of
    32, more rows than threads, a batch of one: in every thread order."""
    args = backward_inputs(shape, dtype)
    got = gpunet.device(f"emulated:{order}").batchnorm_backward(*args)
    want = gpunet.device("cpu").batchnorm_backward(*[a.astype(np.float64) for a in args])
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("barrier, shape", [
    ("__syncthreads();  // every warp's partial sum", (4, 3, 8, 8)),
    ("__syncthreads();  // all 8 rows of partial sums", (64, 40)),
])
def test_removing_a_barrier_makes_the_kernels_fail(tmp_path, monkeypatch, barrier, shape):
    """A scratch copy of batchnorm.cu without one __syncthreads() gives wrong gradients on
    the emulator in at least one thread order: the orders catch a missing barrier."""
    from gpunet import kernels
    from gpunet.backends import EmulatedBackend
    source = kernels.read_kernel("batchnorm.cu")
    assert source.count(barrier) == 1
    (tmp_path / "batchnorm.cu").write_text(source.replace(barrier, "// (barrier removed)"))
    (tmp_path / "common.cuh").write_text(kernels.read_kernel("common.cuh"))
    monkeypatch.setattr(kernels, "kernel_dir", lambda: tmp_path)
    monkeypatch.setenv("GPUNET_CACHE_DIR", str(tmp_path / "cache"))
    args = backward_inputs(shape, np.float64)
    want = gpunet.device("cpu").batchnorm_backward(*args)
    wrong = []
    for order in ORDERS:
        got = EmulatedBackend(order).batchnorm_backward(*args)
        if not all(np.allclose(g, w, rtol=1e-8, atol=1e-8) for g, w in zip(got, want)):
            wrong.append(order)
    assert wrong, "the kernels without the barrier gave right results in every order"
