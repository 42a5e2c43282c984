"""BatchNorm: its formula in both modes, running statistics, state saved with the model, bad
inputs, and the backward kernels on the emulated device."""
from __future__ import annotations

import math

import numpy as np
import pytest

import gpunet
from gpunet import ShapeError, gradcheck
from gpunet.backends import Backend, EmulatedBackend
from gpunet.backends.kernel_ops import REDUCTION_MIN_VALUES, REDUCTION_SMS, reduction_grid
from gpunet.layers import BatchNorm, Dense, Sequential
from helpers import recorded_launches

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


# -- the per-channel reductions: grids, results, determinism -----------------------------------
# Every sum (forward statistics, backward sums, conv bias gradient) is the two-stage reduction
# of kernels/common.cuh on the grid kernel_ops.reduction_grid chooses.

GENERIC = Backend(np, "generic")  # the NumPy reference code, without the CPU device's threads
STAGE_2 = {"bn_finish", "conv_bias_grad_finish"}


def blocks(grid):
    return int(np.prod(grid))


def reductions(shape, dtype=np.float64):
    """The per-channel operations on ``shape`` data: name -> (method name, args)."""
    dy, x, mean, invstd, gamma = backward_inputs(shape, dtype)
    return {"channel_sum": ("channel_sum", (x,)),
            "channel_sq_dev": ("channel_sq_dev", (x, mean)),
            "batchnorm_backward": ("batchnorm_backward", (dy, x, mean, invstd, gamma))}


BIG = [(2, 32, 128, 128), (1, 1, 1024, 1024), (2**20, 1), (4, 1, 512, 512), (1024, 1024),
       (1, 1024, 32, 32), (4, 1024, 16, 16), (2**20 // 3 + 1, 3), (9, 260, 22, 22),
       (10, 263, 20, 20), (1, 2**20), (64, 64, 16, 16)]


@pytest.mark.parametrize("shape", BIG)
def test_tensors_of_a_million_values_launch_two_blocks_per_sm(shape):
    """The grids the kernels are launched on (recorded, not run): at least 2 blocks per SM of
    a 132-SM GPU for every operation, whatever the channel count; stage 2 exactly when a
    channel is split; blocks that split a channel keep thousands of values each."""
    assert np.prod(shape) >= 2**20
    dev = EmulatedBackend()
    x = np.zeros(shape, np.float32)
    ops = {"channel_sum": (x,), "channel_sq_dev": (x, np.zeros(shape[1], np.float32)),
           "batchnorm_backward": (x, x, *(np.ones(shape[1], np.float32),) * 3)}
    for name, args in ops.items():
        launches = recorded_launches(dev, run=False)
        getattr(dev, name)(*args)
        kernel, grid, block = launches[0]
        assert kernel.endswith("_nc" if len(shape) == 2 and shape[1] > 1 else "_nchw"), name
        assert blocks(grid) >= 2 * REDUCTION_SMS, (name, grid)
        chunks = grid[1]
        assert [k for k, _, _ in launches if k in STAGE_2] == (["bn_finish"] if chunks > 1 else [])
        if chunks > 1:
            per_block = np.prod(shape) / shape[1] / chunks
            if kernel.endswith("_nc"):  # a block holds 32 channels
                per_block *= min(shape[1], 32)
            assert per_block >= REDUCTION_MIN_VALUES / 2, (name, grid, per_block)


@pytest.mark.parametrize("n, c, hw, want", [
    (2, 32, 128 * 128, (16, 256)),      # the bn benchmark: 32 channels -> 512 blocks
    (1, 1, 2**20, (512, 256)),          # one channel: split 512 ways
    (1, 1024, 1024, (1, 256)),          # 1024 channels fill the GPU as they are
    (1024, 1024, 1, (16, 256)),         # (N, C): 32 column blocks x 16 row chunks
    (2, 3, 16, (1, 32)),                # tiny: one warp per channel, one launch
    (5, 3, 63, (1, 256)),               # 315 values: one block of 256 per channel
    (1, 2, 64 * 80, (3, 256)),          # 5120 values per channel: 3 chunks
    (10**6, 2, 1, (977, 256)),          # (N, 2): one column block, chunks of 2048 values
])
def test_reduction_grid(n, c, hw, want):
    assert reduction_grid(n, c, hw) == want


def test_reduction_grid_fills_the_gpu_for_every_million_value_shape():
    """The documented guarantee over a sweep of channel counts and spatial sizes (computed,
    nothing runs): >= 512 blocks for >= 2**20 values, within the launch limits."""
    for c in (1, 2, 3, 17, 31, 32, 33, 64, 100, 249, 255, 260, 263, 264, 300, 512, 1000, 1024,
              4096, 2**20):
        for hw in (1, 2, 7 * 7, 14 * 14, 56 * 56, 128 * 128, 2**20):
            for scale in (1, 3, 100):
                n = max(1, -(-2**20 // (c * hw))) * scale
                if c == 1 and hw == 1:  # (N, 1) data is reduced as (1, 1, N)
                    n, hw = 1, n
                chunks, threads = reduction_grid(n, c, hw)
                across = c if hw > 1 else -(-c // 32)
                assert across * chunks >= 512, (n, c, hw, chunks)
                assert 1 <= chunks <= 65535 and threads % 32 == 0 and 32 <= threads <= 256
    with pytest.raises(ValueError, match="expected n, c, hw >= 1"):
        reduction_grid(0, 3, 4)


def test_a_tiny_tensor_is_one_small_launch():
    dev = EmulatedBackend()
    launches = recorded_launches(dev)
    dev.channel_sum(R.normal(size=(2, 3, 4, 4)))
    assert launches == [("bn_sum_nchw", (3, 1), (32,))]
    launches.clear()
    dev.batchnorm_backward(*backward_inputs((6, 5), np.float64))
    assert launches[0] == ("bn_reduce_nc", (1, 1), (32, 8))
    assert [k for k, _, _ in launches] == ["bn_reduce_nc", "bn_backward_dx"]


# shape, forced (chunks, threads) or None for reduction_grid's choice
REDUCTION_CASES = [
    ((5, 3, 7, 9), None), ((2, 70, 1, 1), None), ((37, 40), None), ((300, 2), None),
    ((1, 4, 16, 16), None), ((64, 1), None), ((2, 2, 48, 48), None),  # 3 chunks of 1536
    ((5, 3, 7, 9), (5, 64)), ((1, 4, 16, 16), (7, 32)), ((3, 1, 5, 50), (9, 64)),
    ((37, 40), (6, 256)), ((300, 2), (11, 256)), ((64, 1), (4, 32)), ((4, 2, 3, 3), (3, 32)),
]


def force_grid(dev, grid):
    if grid is not None:
        dev._reduction_grid = lambda n, c, hw: grid


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize("shape, grid", REDUCTION_CASES)
def test_reductions_match_the_generic_code_and_are_bit_identical_in_every_order(shape, grid,
                                                                                dtype, tol):
    """Forward statistics and backward sums on the emulator, in the three thread (and block)
    orders: equal to the generic NumPy code within the dtype's tolerance, and the same bits in
    every order (no result depends on scheduling). Forced grids put many chunks of a few
    values each, and chunks left empty, through both stages."""
    results, ops = {}, reductions(shape, dtype)
    for order in ORDERS:
        dev = EmulatedBackend(order)
        force_grid(dev, grid)
        launches = recorded_launches(dev)
        for name, (method, args) in ops.items():
            got = getattr(dev, method)(*args)
            got = got if isinstance(got, tuple) else (got,)
            want = getattr(GENERIC, method)(*[a.astype(np.float64) for a in args])
            want = want if isinstance(want, tuple) else (want,)
            for g, w in zip(got, want):
                assert g.dtype == dtype and g.shape == w.shape
                np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=f"{name} {order}")
            results.setdefault(name, []).append(got)
        if grid is not None:
            stage1 = [g for k, g, _ in launches if k not in STAGE_2 and k != "bn_backward_dx"]
            assert all(g[1] == grid[0] for g in stage1)
            assert sum(k == "bn_finish" for k, _, _ in launches) == (3 if grid[0] > 1 else 0)
    for name, runs in results.items():
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                np.testing.assert_array_equal(a, b, err_msg=f"{name}: differs between orders")


BARRIERS = [  # every __syncthreads() the reductions have, with a shape whose kernels use it
    ("__syncthreads();  // every warp's partial sum", (4, 3, 8, 8)),
    ("__syncthreads();  // all 8 rows of partial sums", (64, 40)),
]


def test_every_barrier_of_the_reductions_is_tested():
    from gpunet import kernels
    text = "".join(kernels.read_kernel(f) for f in ("batchnorm.cu", "common.cuh", "conv.cu"))
    assert text.count("__syncthreads()") == len(BARRIERS)


@pytest.mark.parametrize("barrier, shape", BARRIERS)
def test_removing_a_barrier_makes_the_kernels_fail(tmp_path, monkeypatch, barrier, shape):
    """A scratch copy of the kernels without one __syncthreads() of common.cuh's reductions
    gives wrong results on the emulator in at least one thread order, for every operation
    built on it (forward statistics, backward sums, the conv bias gradient): the orders catch
    a missing barrier."""
    from gpunet import kernels
    source = kernels.read_kernel("common.cuh")
    assert source.count(barrier) == 1
    for file in ("batchnorm.cu", "conv.cu"):
        (tmp_path / file).write_text(kernels.read_kernel(file))
    (tmp_path / "common.cuh").write_text(source.replace(barrier, "// (barrier removed)"))
    monkeypatch.setattr(kernels, "kernel_dir", lambda: tmp_path)
    monkeypatch.setenv("GPUNET_CACHE_DIR", str(tmp_path / "cache"))
    ops = reductions(shape)
    if len(shape) == 4:
        ops["conv_bias_grad"] = ("conv_bias_grad", (ops["channel_sum"][1][0],))
    for name, (method, args) in ops.items():
        want = getattr(GENERIC, method)(*args)
        want = want if isinstance(want, tuple) else (want,)
        wrong = []
        for order in ORDERS:
            got = getattr(EmulatedBackend(order), method)(*args)
            got = got if isinstance(got, tuple) else (got,)
            if not all(np.allclose(g, w, rtol=1e-8, atol=1e-8) for g, w in zip(got, want)):
                wrong.append(order)
        assert wrong, f"{name} without the barrier gave right results in every order"
