"""Embedding, PositionEmbedding and PositionalEncoding: forward against independent formulas,
float64 gradient checks, the deterministic weight gradient on every device and thread order,
bad inputs, and PyTorch as an oracle where it is installed."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import gpunet
from gpunet import DTypeError, DeviceError, ShapeError, gradcheck, parity
from gpunet.layers import (Dense, Embedding, PositionalEncoding, PositionEmbedding, Sequential,
                           from_config)
from gpunet.layers.embedding import sinusoid_table
from helpers import assert_refused

R = np.random.default_rng(11)
INDICES = np.array([[1, 4, 4, 0], [2, 1, 4, 3], [4, 0, 1, 1]])  # repeats, and row 1 as padding


def _expected_grad(indices: np.ndarray, dy: np.ndarray, rows: int, skip: int | None) -> np.ndarray:
    """The weight gradient by a loop over positions: an implementation independent of gpunet."""
    grad = np.zeros((rows, dy.shape[-1]))
    for pos in np.ndindex(indices.shape):
        if indices[pos] != skip:
            grad[indices[pos]] += dy[pos]
    return grad


# -- Embedding ------------------------------------------------------------------------------
def test_embedding_forward_formula_and_start():
    layer = Embedding(5, 3, padding_idx=1).to(dtype=np.float64)
    w = layer.weight.data
    assert w.shape == (5, 3) and not w[1].any()  # the padding row starts at zero
    y = layer.forward(INDICES)
    assert y.shape == (3, 4, 3) and y.dtype == np.float64
    for pos in np.ndindex(INDICES.shape):
        np.testing.assert_array_equal(y[pos], w[INDICES[pos]])
    gpunet.seed(0)
    big = Embedding(400, 50).weight.data  # N(0, 1), as nn.Embedding
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.uint8])
def test_embedding_takes_any_integer_dtype_and_shape(dtype):
    layer = Embedding(6, 2)
    for shape in [(), (7,), (2, 3, 2)]:
        idx = R.integers(0, 6, size=shape).astype(dtype)
        assert layer.forward(np.asarray(idx)).shape == (*shape, 2)
        assert layer.backward(np.ones((*shape, 2), np.float32)) is None


def test_embedding_gradcheck():
    assert gradcheck(Embedding(5, 3), INDICES).ok
    # with padding: the padding row gets no gradient, by design, so the check's dy is zero at
    # the padding positions (elsewhere it is random) and the row's numeric gradient is zero too
    dy = R.normal(size=(3, 4, 3)) * (INDICES != 1)[..., None]
    report = gradcheck(Embedding(5, 3, padding_idx=1), INDICES, dy)
    assert report.ok and set(report.errors) == {"weight"}, str(report)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_embedding_backward_on_every_device(device, dtype):
    """Repeated indices add up, the padding row keeps its value (here nonzero), gradients add
    to what is there, and the input gradient is None: on cpu, emulated and the stand-in GPUs."""
    layer = Embedding(5, 3, padding_idx=1).to(device, dtype)
    before = R.normal(size=(5, 3))
    layer.weight.grad[...] = device.asarray(before, dtype=dtype)
    dy = R.normal(size=(3, 4, 3))
    y = layer.forward(device.asarray(INDICES))
    np.testing.assert_array_equal(gpunet.to_numpy(y),
                                  gpunet.to_numpy(layer.weight.data)[INDICES])
    assert layer.backward(device.asarray(dy, dtype=dtype)) is None
    want = before + _expected_grad(INDICES, dy, 5, skip=1)
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(gpunet.to_numpy(layer.weight.grad), want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(gpunet.to_numpy(layer.weight.grad)[1], before[1].astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", ["emulated", "emulated:reverse", "emulated:shuffled"])
def test_embedding_kernel_matches_the_loop_bit_for_bit(spec, dtype):
    """The kernel adds each run of equal indices in position order, starting from the grad's
    value, as np.add.at does: the same bits as the CPU in every thread order. 300 indices
    into 7 rows of 5 features: long runs, 1500 threads (six blocks, grid-stride)."""
    indices = R.integers(0, 7, size=(30, 10))
    dy = R.normal(size=(30, 10, 5))
    grads = []
    for dev in ("cpu", spec):
        layer = Embedding(7, 5, padding_idx=3).to(dev, dtype)
        layer.weight.grad[...] = 0.5
        layer.forward(indices)
        layer.backward(dy.astype(dtype))
        grads.append(layer.weight.grad)
    np.testing.assert_array_equal(grads[0], grads[1])
    np.testing.assert_allclose(grads[1], 0.5 + _expected_grad(indices, dy, 7, skip=3),
                               rtol=1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", ["emulated:reverse", "emulated:shuffled"])
@pytest.mark.parametrize("case", ["Embedding", "Embedding-padding", "GELU", "GELU-tanh"])
def test_kernel_cases_in_every_thread_order(case, spec, dtype):
    result = parity.run_case(case, gpunet.device(spec), dtype)
    assert result.ok, parity.table([result])


def test_embedding_in_a_model():
    """Indices in, a float loss gradient back through the chain; Sequential stops at the
    embedding's None."""
    model = Sequential([Embedding(10, 4), PositionalEncoding(4), Dense(4, 2)]).to(dtype=np.float64)
    y = model.forward(R.integers(0, 10, size=(5, 3)))
    assert y.shape == (5, 3, 2)
    assert model.backward(np.ones_like(y)) is None
    assert np.abs(model.params()["0.weight"].grad).sum() > 0


def test_embedding_config_and_copy():
    layer = Embedding(5, 3, padding_idx=-1)
    assert layer.padding_idx == 4 and not layer.weight.data[4].any()
    clone = from_config(layer.config())
    assert isinstance(clone, Embedding) and clone.padding_idx == 4
    twin = copy.deepcopy(layer)
    np.testing.assert_array_equal(twin.weight.data, layer.weight.data)


def test_embedding_bad_inputs():
    layer = Embedding(5, 3)
    assert_refused(layer, np.array([[0.0, 1.0]]), DTypeError,
                   "Embedding: expected integer indices, got dtype float64")
    assert_refused(layer, np.array([True, False]), DTypeError,
                   "Embedding: expected integer indices, got dtype bool")
    assert_refused(layer, [0, 1], DTypeError,
                   "Embedding: expected an integer array of indices, got list")
    assert_refused(layer, np.array([0, 5, 2]), IndexError,
                   r"Embedding: expected indices in \[0, 5\), got 5")
    assert_refused(layer, np.array([[0, -1]]), IndexError,
                   r"Embedding: expected indices in \[0, 5\), got -1")
    layer.forward(np.array([0, 1]))
    with pytest.raises(ShapeError, match=r"Embedding: expected output gradient of shape \(2, 3\)"
                                         r", got \(2, 4\)"):
        layer.backward(np.zeros((2, 4), np.float32))
    with pytest.raises(DTypeError, match="expected output gradient of dtype float32, got float64"):
        layer.backward(np.zeros((2, 3)))
    for args, match in [((0, 3), "expected num_embeddings to be a positive integer, got 0"),
                        ((4, 2.5), "expected embedding_dim to be a positive integer, got 2.5"),
                        ((4, 2, 4), r"expected padding_idx in \[-4, 4\), got 4"),
                        ((4, 2, -5), r"expected padding_idx in \[-4, 4\), got -5")]:
        with pytest.raises(ValueError, match=f"Embedding: {match}"):
            Embedding(*args)


def test_embedding_refuses_indices_on_another_device(standin):
    layer = Embedding(5, 3).to("cuda:1")
    with pytest.raises(DeviceError, match="Embedding: expected indices on device cuda:1, "
                                          "got an array on cpu"):
        layer.forward(np.array([1, 2]))
    with pytest.raises(DeviceError, match="got an array on cuda:0"):
        layer.forward(gpunet.device("cuda:0").asarray(np.array([1, 2])))


def test_an_index_out_of_range_on_a_gpu_is_flagged_without_a_read(standin):
    layer, gpu = Embedding(5, 3).to("cuda:1"), gpunet.device("cuda:1")
    counters = standin._standin.counters
    counters.reset()
    y = layer.forward(gpu.asarray(np.array([1, 7, 9])))
    good = layer.forward(gpu.asarray(np.array([2, 3])))  # stays flagged until checked
    assert counters.host_reads == 0
    assert np.isnan(gpunet.to_numpy(y)).any() and np.isnan(gpunet.to_numpy(good)).any()
    layer.backward(gpu.asarray(np.ones((2, 3), np.float32)))  # the scatter stays in the table
    with pytest.raises(IndexError, match=r"Embedding: expected indices in \[0, 5\), got 7"):
        layer.check()  # the first bad index
    layer.check()  # taken once
    assert not np.isnan(gpunet.to_numpy(layer.forward(gpu.asarray(np.array([4]))))).any()


def test_embedding_matches_pytorch():
    torch = pytest.importorskip("torch")
    layer = Embedding(6, 4, padding_idx=2).to(dtype=np.float64)
    layer.weight.data[2] = 0.25  # a nonzero padding row: used forward, frozen backward
    ref = torch.nn.Embedding(6, 4, padding_idx=2).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(layer.weight.data))
    idx = np.array([[2, 5, 5], [0, 2, 1]])
    dy = R.normal(size=(2, 3, 4))
    out = ref(torch.from_numpy(idx))
    out.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(layer.forward(idx), out.detach().numpy(), rtol=1e-15)
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, ref.weight.grad.numpy(), rtol=1e-14)


# -- PositionEmbedding ----------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
def test_position_embedding_formula(batch_first):
    layer = PositionEmbedding(6, 3, batch_first=batch_first).to(dtype=np.float64)
    w = layer.weight.data
    x = R.normal(size=(2, 4, 3) if batch_first else (4, 2, 3))
    y = layer.forward(x)
    for t in range(4):
        for n in range(2):
            at = (n, t) if batch_first else (t, n)
            np.testing.assert_array_equal(y[at], x[at] + w[t])
    dy = R.normal(size=x.shape)
    np.testing.assert_array_equal(layer.backward(dy), dy)
    sums = dy.sum(axis=0 if batch_first else 1)
    np.testing.assert_allclose(layer.weight.grad[:4], sums, rtol=1e-14)
    assert not layer.weight.grad[4:].any()  # positions past T get nothing


def test_position_embedding_gradcheck():
    for layer in (PositionEmbedding(5, 3), PositionEmbedding(4, 2, batch_first=True)):
        report = gradcheck(layer, R.normal(size=(3, 2, 3) if not layer.batch_first else (2, 4, 2)))
        assert report.ok and set(report.errors) == {"input", "weight"}, str(report)


def test_position_embedding_bad_inputs():
    layer = PositionEmbedding(4, 3)
    assert_refused(layer, np.zeros((5, 2, 3), np.float32), ShapeError,
                   r"PositionEmbedding: expected at most max_len = 4 time steps in an input of "
                   r"shape \(T, N, E\), got \(5, 2, 3\)")
    assert_refused(layer, np.zeros((2, 2, 4), np.float32), ShapeError,
                   r"PositionEmbedding: expected input of shape \(T, N, E\) with E = 3, "
                   r"got \(2, 2, 4\)")
    assert_refused(layer, np.zeros((2, 3), np.float32), ShapeError,
                   r"PositionEmbedding: expected 3-D input, got shape \(2, 3\)")
    assert_refused(layer, np.zeros((2, 2, 3)), DTypeError,
                   "PositionEmbedding: expected input of dtype float32, got float64")
    with pytest.raises(ValueError, match="PositionEmbedding: expected max_len to be a positive "
                                         "integer, got 0"):
        PositionEmbedding(0, 3)


# -- PositionalEncoding ---------------------------------------------------------------------
@pytest.mark.parametrize("dim", [6, 5])
def test_sinusoid_table_formula(dim):
    table = sinusoid_table(7, dim)
    for pos in range(7):
        for j in range(dim):
            angle = pos / 10000 ** ((j - j % 2) / dim)
            want = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[pos, j] == pytest.approx(want, rel=1e-13, abs=1e-15)


@pytest.mark.parametrize("batch_first", [False, True])
def test_positional_encoding_formula(batch_first):
    layer = PositionalEncoding(4, max_len=10, batch_first=batch_first)
    x = R.normal(size=(3, 5, 4) if batch_first else (5, 3, 4))
    y = layer.forward(x)
    assert y.dtype == np.float64 and not layer.params() and not layer.state()
    for t in range(5):
        angles = [t / 10000 ** (0 / 4), t / 10000 ** (2 / 4)]
        pe = [math.sin(angles[0]), math.cos(angles[0]), math.sin(angles[1]), math.cos(angles[1])]
        got = y[:, t] - x[:, t] if batch_first else y[t] - x[t]
        np.testing.assert_allclose(got, np.broadcast_to(pe, got.shape), rtol=1e-13, atol=1e-15)
    dy = R.normal(size=x.shape)
    np.testing.assert_array_equal(layer.backward(dy), dy)
    y32 = layer.forward(x.astype(np.float32))  # the table follows the input's dtype
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y, rtol=1e-5, atol=1e-6)


def test_positional_encoding_dropout():
    layer = PositionalEncoding(4, dropout=0.5)
    x = R.normal(size=(6, 5, 4)).astype(np.float32)
    clean = layer.forward(x, training=False)
    y = layer.forward(x)
    kept = y != 0
    assert 0.25 < kept.mean() < 0.75
    np.testing.assert_allclose(y[kept], 2 * clean[kept], rtol=1e-6)
    np.testing.assert_allclose(layer.backward(np.ones_like(y)), 2.0 * kept)
    assert gradcheck(PositionalEncoding(4, dropout=0.3), x.astype(np.float64)).ok


def test_positional_encoding_moves_with_the_layer(standin):
    layer = PositionalEncoding(4, max_len=8)
    x = R.normal(size=(3, 2, 4)).astype(np.float32)
    want = layer.forward(x)
    layer.to("cuda:1")
    got = layer.forward(gpunet.device("cuda:1").asarray(x))
    assert got.device.id == 1
    np.testing.assert_allclose(gpunet.to_numpy(got), want, rtol=1e-6)
    assert copy.deepcopy(layer)._table is None  # a cache, rebuilt where the copy runs


def test_positional_encoding_bad_inputs():
    layer = PositionalEncoding(4, max_len=3, batch_first=True)
    assert_refused(layer, np.zeros((2, 4, 4)), ShapeError,
                   r"PositionalEncoding: expected at most max_len = 3 time steps in an input "
                   r"of shape \(N, T, E\), got \(2, 4, 4\)")
    assert_refused(layer, np.zeros((2, 3, 5)), ShapeError, "with E = 4, got")
    assert_refused(layer, np.zeros((2, 3, 4), np.int64), DTypeError,
                   "PositionalEncoding: expected input of dtype float32 or float64, got int64")
    with pytest.raises(ValueError, match=r"PositionalEncoding: expected dropout in \[0, 1\), "
                                         r"got 1.0"):
        PositionalEncoding(4, dropout=1.0)


def test_positional_encoding_matches_pytorch_tutorial():
    """The table of PyTorch's Transformer tutorial (pe[:, 0::2] = sin, pe[:, 1::2] = cos of
    position * exp(arange(0, E, 2) * -log(10000) / E)), computed by torch."""
    torch = pytest.importorskip("torch")
    position = torch.arange(50, dtype=torch.float64).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, 8, 2, dtype=torch.float64) * (-math.log(10000.0) / 8))
    pe = torch.zeros(50, 8, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    np.testing.assert_allclose(sinusoid_table(50, 8), pe.numpy(), rtol=1e-14, atol=1e-15)
