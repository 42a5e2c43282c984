"""The recurrent family: every layer against an independent per-step formula, initial and
final states, gradients of states, Recurrent2D against RNN on one row, the LSTM kernels on
the emulator in every thread order, bad inputs, sequence losses, datasets, models and the two
training commands. (Gradient checks and device parity of every layer: test_layers.py and
test_parity.py, through the parity registry.)"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gpunet
from gpunet import DTypeError, ShapeError, StateError, data, gradcheck, models
from gpunet.cli import main
from gpunet.layers import (GRU, LSTM, RNN, AvgPoolTime, LastStep, MultiplicativeRNN,
                           Recurrent2D, TimeMajor)
from gpunet.losses import MSE, BinaryCrossEntropy, SoftmaxCrossEntropy

R = np.random.default_rng(21)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: 1 / (1 + math.exp(-v)))(z)


ACT = {"tanh": np.tanh, "sigmoid": sigmoid, "relu": lambda z: np.maximum(z, 0)}


def f64(layer):
    """The layer in float64 with small random changes to every parameter (biases nonzero)."""
    layer.to(dtype=np.float64)
    for p in layer.params().values():
        p.data += R.normal(size=p.shape) * 0.3
    return layer


def weights(layer) -> dict[str, np.ndarray]:
    return {k: p.data for k, p in layer.params().items()}


# -- each layer against its formula, one time step at a time ---------------------------------
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_rnn_formula(activation):
    layer = f64(RNN(3, 4, activation=activation))
    w = weights(layer)
    x, h0 = R.normal(size=(5, 2, 3)), R.normal(size=(2, 4))
    h, want = h0, []
    for t in range(5):
        h = ACT[activation](x[t] @ w["W_x"].T + h @ w["W_h"].T + w["b"])
        want.append(h)
    np.testing.assert_allclose(layer.forward([x, h0]), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.final_state[0], want[-1], rtol=1e-12)


def lstm_reference(w, x, h, c):
    """The LSTM step by step, the gates cut out of PyTorch's [i, f, g, o] layout."""
    hidden = h.shape[1]
    hs, cs = [], []
    for t in range(len(x)):
        z = x[t] @ w["W_x"].T + h @ w["W_h"].T + w["b"]
        i, f, g, o = (z[:, k * hidden:(k + 1) * hidden] for k in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        hs.append(h)
        cs.append(c)
    return np.array(hs), np.array(cs)


def test_lstm_formula_and_states():
    layer = f64(LSTM(3, 4, return_state=True))
    x, h0, c0 = R.normal(size=(6, 2, 3)), R.normal(size=(2, 4)), R.normal(size=(2, 4))
    hs, cs = lstm_reference(weights(layer), x, h0, c0)
    y, h_n, c_n = layer.forward([x, h0, c0])
    np.testing.assert_allclose(y, hs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h_n, hs[-1], rtol=1e-12)
    np.testing.assert_allclose(c_n, cs[-1], rtol=1e-12)
    assert [a.shape for a in layer.final_state] == [(2, 4), (2, 4)]
    # [x, h0] leaves c0 at zero; a bare x starts both at zero
    hs, _ = lstm_reference(weights(layer), x, h0, np.zeros((2, 4)))
    np.testing.assert_allclose(layer.forward([x, h0])[0], hs, rtol=1e-12, atol=1e-12)
    hs, _ = lstm_reference(weights(layer), x, np.zeros((2, 4)), np.zeros((2, 4)))
    np.testing.assert_allclose(layer.forward(x)[0], hs, rtol=1e-12, atol=1e-12)


def test_lstm_starts_with_an_open_forget_gate():
    layer = LSTM(2, 3)
    np.testing.assert_array_equal(layer.b.data, [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    assert abs(layer.W_h.data).max() <= 1 / math.sqrt(3)


def test_gru_formula():
    layer = f64(GRU(3, 4))
    w = weights(layer)
    x, h = R.normal(size=(5, 2, 3)), R.normal(size=(2, 4))
    cut = lambda a, k: a[..., k * 4:(k + 1) * 4]
    want = []
    y = layer.forward([x, h])
    for t in range(5):
        gx, gh = x[t] @ w["W_x"].T + w["b_x"], h @ w["W_h"].T + w["b_h"]
        r = sigmoid(cut(gx, 0) + cut(gh, 0))
        z = sigmoid(cut(gx, 1) + cut(gh, 1))
        n = np.tanh(cut(gx, 2) + r * cut(gh, 2))
        h = (1 - z) * n + z * h
        want.append(h)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_multiplicative_rnn_formula():
    layer = f64(MultiplicativeRNN(3, 4, factors=6))
    w = weights(layer)
    assert {k: v.shape for k, v in w.items()} == {
        "W_fx": (6, 3), "W_fh": (6, 4), "W_x": (4, 3), "W_hf": (4, 6), "b": (4,)}
    x, h = R.normal(size=(4, 2, 3)), np.zeros((2, 4))
    want = []
    for t in range(4):
        f = (x[t] @ w["W_fx"].T) * (h @ w["W_fh"].T)
        h = np.tanh(x[t] @ w["W_x"].T + f @ w["W_hf"].T + w["b"])
        want.append(h)
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12, atol=1e-12)


def test_multiplicative_rnn_with_several_inputs():
    layer = f64(MultiplicativeRNN([3, 2], 4, activation="sigmoid"))
    w = weights(layer)
    assert sorted(w) == ["W_fh", "W_fx.0", "W_fx.1", "W_hf", "W_x.0", "W_x.1", "b"]
    assert w["W_fx.1"].shape == (4, 2) and w["W_x.0"].shape == (4, 3)
    a, b, h = R.normal(size=(3, 2, 3)), R.normal(size=(3, 2, 2)), R.normal(size=(2, 4))
    y = layer.forward([a, b, h])
    want = []
    for t in range(3):
        f = (a[t] @ w["W_fx.0"].T + b[t] @ w["W_fx.1"].T) * (h @ w["W_fh"].T)
        h = sigmoid(a[t] @ w["W_x.0"].T + b[t] @ w["W_x.1"].T + f @ w["W_hf"].T + w["b"])
        want.append(h)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    grads = layer.backward(R.normal(size=(3, 2, 4)))
    assert [g.shape for g in grads] == [(3, 2, 3), (3, 2, 2), (2, 4)]


def test_recurrent2d_formula():
    layer = f64(Recurrent2D(3, 4))
    w = weights(layer)
    x = R.normal(size=(2, 3, 3, 5))  # (N, I, T, U)
    S = {}
    for t in range(3):
        for u in range(5):
            up = S.get((t - 1, u), np.broadcast_to(w["s0"], (2, 4)))
            left = S.get((t, u - 1), np.broadcast_to(w["s0"], (2, 4)))
            S[t, u] = np.tanh(x[:, :, t, u] @ w["W_in"].T + up @ w["W_t"].T
                              + left @ w["W_u"].T + w["b"])
    want = np.stack([np.stack([S[t, u] for u in range(5)], -1) for t in range(3)], -2)
    y = layer.forward(x)
    assert y.shape == (2, 4, 3, 5)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_recurrent2d_on_one_row_is_an_rnn():
    """On a 1-by-U grid, S(0, u) = g(W_in X + W_t s0 + W_u S(0, u-1) + b): an RNN along the
    row with W_x = W_in, W_h = W_u, b = b + W_t s0, started from s0. Gradients agree too."""
    grid = f64(Recurrent2D(3, 4))
    g = weights(grid)
    rnn = RNN(3, 4).to(dtype=np.float64)
    rnn.W_x.data[...], rnn.W_h.data[...] = g["W_in"], g["W_u"]
    rnn.b.data[...] = g["b"] + g["W_t"] @ g["s0"]
    x = R.normal(size=(2, 3, 1, 6))  # N=2, I=3, T=1, U=6
    seq = np.ascontiguousarray(x[:, :, 0, :].transpose(2, 0, 1))  # (U, N, I)
    h0 = np.broadcast_to(g["s0"], (2, 4)).copy()
    y_rnn = rnn.forward([seq, h0])
    y_grid = grid.forward(x)
    np.testing.assert_allclose(y_grid[:, :, 0, :].transpose(2, 0, 1), y_rnn, rtol=1e-12,
                               atol=1e-13)
    dy = R.normal(size=(2, 4, 1, 6))
    dx_grid = grid.backward(dy)
    dx_rnn, dh0 = rnn.backward(np.ascontiguousarray(dy[:, :, 0, :].transpose(2, 0, 1)))
    np.testing.assert_allclose(dx_grid[:, :, 0, :].transpose(2, 0, 1), dx_rnn, rtol=1e-10)
    np.testing.assert_allclose(grid.W_in.grad, rnn.W_x.grad, rtol=1e-10)
    np.testing.assert_allclose(grid.W_u.grad, rnn.W_h.grad, rtol=1e-10)
    # b and W_t s0 enter every cell the same way: db = the RNN's db, dW_t = db s0^T
    np.testing.assert_allclose(grid.b.grad, rnn.b.grad, rtol=1e-10)
    np.testing.assert_allclose(grid.W_t.grad, np.outer(rnn.b.grad, g["s0"]), rtol=1e-10)
    # s0: through W_t in every cell, and as the state left of the first cell
    np.testing.assert_allclose(grid.s0.grad, g["W_t"].T @ rnn.b.grad + dh0.sum(0), rtol=1e-10)


@pytest.mark.parametrize("window, stride, steps", [(3, 2, 7), (3, 2, 8), (5, 3, 8), (1, 1, 4),
                                                   (3, 1, 1), (7, 2, 5)])
def test_avg_pool_time_formula(window, stride, steps):
    x = R.normal(size=(steps, 2, 3))
    layer = AvgPoolTime(window, stride)
    y = layer.forward(x)
    out = (steps - 1) // stride + 1
    half = (window - 1) // 2
    want = np.zeros((out, 2, 3))
    for s in range(out):
        for i in range(-half, half + 1):
            if 0 <= stride * s + i < steps:
                want[s] += x[stride * s + i] / window
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-15)
    dy = R.normal(size=y.shape)  # the gradient spreads dy[s] / window over s's window
    dx = layer.backward(dy)
    want_dx = np.zeros_like(x)
    for s in range(out):
        for i in range(-half, half + 1):
            if 0 <= stride * s + i < steps:
                want_dx[stride * s + i] += dy[s] / window
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-15)


def test_last_step_and_time_major():
    x = R.normal(size=(3, 5, 2))
    swapped = TimeMajor().forward(x)
    assert swapped.shape == (5, 3, 2) and swapped.flags.c_contiguous
    np.testing.assert_array_equal(swapped[4, 1], x[1, 4])
    last = LastStep()
    np.testing.assert_array_equal(last.forward(x), x[2])
    dx = last.backward(np.ones((5, 2)))
    assert (dx[2] == 1).all() and not dx[:2].any()


# -- states: gradients of h0/c0 and of the final state, and the list convention ------------
@pytest.mark.parametrize("make, states", [(lambda: RNN(3, 4, return_state=True), 1),
                                          (lambda: LSTM(3, 4, return_state=True), 2),
                                          (lambda: GRU(3, 4, return_state=True), 1),
                                          (lambda: MultiplicativeRNN(3, 4, return_state=True),
                                           1)])
def test_gradients_of_initial_and_final_states(make, states):
    layer = f64(make())
    inputs = [R.normal(size=(6, 3, 3))] + [R.normal(size=(3, 4)) for _ in range(states)]
    report = gradcheck(layer, inputs)
    assert report.ok, str(report)
    assert {f"input {k}" for k in range(1 + states)} <= set(report.errors)


def test_none_stands_for_a_zero_gradient():
    layer = f64(LSTM(2, 3, return_state=True))
    x = R.normal(size=(4, 2, 2))
    dy = R.normal(size=(4, 2, 3))
    layer.forward(x)
    a = layer.backward([dy, None, None])
    b_grads = {k: p.grad.copy() for k, p in layer.params().items()}
    layer.zero_grad()
    layer.forward(x)
    b = layer.backward([dy, np.zeros((2, 3)), np.zeros((2, 3))])
    np.testing.assert_array_equal(a, b)
    for k, p in layer.params().items():
        np.testing.assert_array_equal(p.grad, b_grads[k])
    layer.forward(x)  # only the final state feeds the loss: dy of every step may be None
    only_final = layer.backward([None, np.ones((2, 3)), None])
    assert only_final.shape == x.shape and np.abs(only_final).sum() > 0


def test_backward_returns_the_form_forward_took():
    layer = LSTM(2, 3)
    x = np.zeros((4, 2, 2), np.float32)
    layer.forward(x)
    assert isinstance(layer.backward(np.zeros((4, 2, 3), np.float32)), np.ndarray)
    layer.forward([x])
    assert len(layer.backward(np.zeros((4, 2, 3), np.float32))) == 1
    layer.forward([x, np.zeros((2, 3), np.float32)])
    assert [g.shape for g in layer.backward(np.zeros((4, 2, 3), np.float32))] == [
        (4, 2, 2), (2, 3)]


def test_float32_end_to_end():
    layer = LSTM(3, 4)
    x = R.normal(size=(5, 2, 3)).astype(np.float32)
    y = layer.forward(x)
    assert y.dtype == np.float32 and layer.saved()[3].dtype == np.float32
    assert layer.backward(np.ones_like(y)).dtype == np.float32
    assert all(p.grad.dtype == np.float32 for p in layer.params().values())


def test_save_and_load(tmp_path):
    model = gpunet.Sequential([TimeMajor(), MultiplicativeRNN([2], 3), GRU(3, 4),
                               LSTM(4, 5), AvgPoolTime(), LastStep()])
    x = R.normal(size=(2, 7, 2)).astype(np.float32)
    gpunet.save(model, tmp_path / "m.npz")
    loaded = gpunet.load(tmp_path / "m.npz")
    assert list(loaded.params()) == list(model.params())
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))


# -- the LSTM kernels on the emulator, in every thread order ----------------------------------
ORDERS = ["forward", "reverse", "shuffled"]


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 1e-6)])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n, h", [(3, 5), (9, 37), (1, 300)])
def test_lstm_kernels_match_the_generic_code(n, h, order, dtype, tol):
    """Odd sizes, more units than a block has threads, a batch of one."""
    dev, cpu = gpunet.device(f"emulated:{order}"), gpunet.device("cpu")
    xg, hg = R.normal(size=(n, 4 * h)) * 2, R.normal(size=(n, 4 * h))
    c_prev, dy, dh, dc = (R.normal(size=(n, h)) for _ in range(4))
    ins = [np.ascontiguousarray(a, dtype) for a in (xg, hg, c_prev)]
    out = [dev.empty(s, dtype) for s in ((n, 4 * h), (n, h), (n, h))]  # NaN-filled
    want = [np.empty(s) for s in ((n, 4 * h), (n, h), (n, h))]
    dev.lstm_cell_forward(*ins, *out)
    cpu.lstm_cell_forward(*[a.astype(np.float64) for a in ins], *want)
    for name, g, w in zip(("acts", "c", "h"), out, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=name)
    acts, c = want[0], want[1]
    bins = [np.ascontiguousarray(a, dtype) for a in (dy, dh, dc, acts, c_prev, c)]
    bout = [dev.empty(s, dtype) for s in ((n, 4 * h), (n, h))]
    bwant = [np.empty(s) for s in ((n, 4 * h), (n, h))]
    dev.lstm_cell_backward(*bins, *bout)
    cpu.lstm_cell_backward(*[a.astype(np.float64) for a in bins], *bwant)
    for name, g, w in zip(("dz", "dc_prev"), bout, bwant):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=name)


def test_lstm_kernels_refuse_a_strided_output():
    dev = gpunet.device("emulated")
    a = np.zeros((2, 8)), np.zeros((2, 8)), np.zeros((2, 2))
    acts = np.zeros((2, 16))[:, ::2]
    with pytest.raises(ValueError, match="lstm_cell_forward: expected output acts to be C-contiguous"):
        dev.lstm_cell_forward(*a, acts, np.zeros((2, 2)), np.zeros((2, 2)))


def test_lstm_on_the_emulator_matches_the_cpu():
    """A whole sequence with states through the layer: the kernels inside the loop."""
    layer = f64(LSTM(3, 6, return_state=True))
    x, h0, c0 = R.normal(size=(5, 4, 3)), R.normal(size=(4, 6)), R.normal(size=(4, 6))
    dy, dh, dc = R.normal(size=(5, 4, 6)), R.normal(size=(4, 6)), R.normal(size=(4, 6))
    want = layer.forward([x, h0, c0])
    want_dx = layer.backward([dy, dh, dc])
    want_grads = {k: p.grad.copy() for k, p in layer.params().items()}
    layer.zero_grad()
    layer.to("emulated")
    for g, w in zip(layer.forward([x, h0, c0]), want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13)
    for g, w in zip(layer.backward([dy, dh, dc]), want_dx):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13)
    for k, p in layer.params().items():
        np.testing.assert_allclose(p.grad, want_grads[k], rtol=1e-12, atol=1e-13, err_msg=k)


# -- bad inputs -------------------------------------------------------------------------------
f32 = lambda *s: np.zeros(s, np.float32)


@pytest.mark.parametrize("layer, x, error, match", [
    (LSTM(3, 4), f32(5, 2, 2), ShapeError,
     r"LSTM: expected input of shape \(T, N, 3\) \(time-major\), got \(5, 2, 2\)"),
    (RNN(3, 4), f32(2, 3), ShapeError, r"RNN: expected input of shape \(T, N, 3\)"),
    (GRU(3, 4), f32(0, 2, 3), ShapeError, "GRU: expected at least one time step and one sample"),
    (LSTM(3, 4), [f32(5, 2, 3), f32(3, 4)], ShapeError,
     r"LSTM: expected initial state h0 of shape \(2, 4\), got \(3, 4\)"),
    (LSTM(3, 4), [f32(5, 2, 3), f32(2, 4), f32(2, 5)], ShapeError,
     r"LSTM: expected initial state c0 of shape \(2, 4\), got \(2, 5\)"),
    (LSTM(3, 4), [f32(5, 2, 3)] * 4, ShapeError,
     r"LSTM: expected x, \[x\], \[x, h0\] or \[x, h0, c0\], got a list of 4"),
    (GRU(3, 4), [f32(5, 2, 3)] * 3, ShapeError, r"GRU: expected x, \[x\], or \[x, h0\], got a list of 3"),
    (MultiplicativeRNN([3, 2], 4), [f32(5, 2, 3), f32(4, 2, 2)], ShapeError,
     r"MultiplicativeRNN: expected input 1 of shape \(5, 2, 2\) \(the steps and batch of "
     r"input 0\), got \(4, 2, 2\)"),
    (MultiplicativeRNN([3, 2], 4), [f32(5, 2, 3), f32(5, 3, 2)], ShapeError,
     r"MultiplicativeRNN: expected input 1 of shape \(5, 2, 2\)"),
    (MultiplicativeRNN([3, 2], 4), f32(5, 2, 3), ShapeError,
     "MultiplicativeRNN: expected a list of 2 input sequences, optionally followed by h0, got ndarray"),
    (MultiplicativeRNN([3, 2], 4), [f32(5, 2, 3)], ShapeError,
     "MultiplicativeRNN: expected a list of 2 input sequences.*got 1 items|got a list of 1"),
    (LSTM(3, 4), np.zeros((5, 2, 3)), DTypeError, "LSTM: expected input of dtype float32, got float64"),
    (Recurrent2D(3, 4), f32(2, 2, 3, 3), ShapeError,
     r"Recurrent2D: expected input of shape \(N, 3, T, U\), got \(2, 2, 3, 3\)"),
    (Recurrent2D(3, 4), f32(2, 3, 3), ShapeError, r"Recurrent2D: expected input of shape \(N, 3, T, U\)"),
    (AvgPoolTime(), f32(5), ShapeError, r"AvgPoolTime: expected a sequence of shape \(T, N, ...\)"),
    (LastStep(), f32(0, 2), ShapeError, "LastStep: expected a sequence of shape"),
    (TimeMajor(), f32(3), ShapeError, r"TimeMajor: expected input of shape \(N, T, ...\)"),
])
def test_bad_input(layer, x, error, match):
    with pytest.raises(error, match=match):
        layer.forward(x)


def test_bad_output_gradients():
    layer = LSTM(3, 4, return_state=True)
    x = f32(5, 2, 3)
    layer.forward(x)
    with pytest.raises(ShapeError, match=r"LSTM: expected the output gradient as a list \[dy, "
                                         r"dh_T, dc_T\] \(return_state=True\), got ndarray"):
        layer.backward(f32(5, 2, 4))
    with pytest.raises(ShapeError, match=r"LSTM: expected gradient of the final state c_T of "
                                         r"shape \(2, 4\), got \(2, 3\)"):
        layer.backward([f32(5, 2, 4), None, f32(2, 3)])
    with pytest.raises(ShapeError, match=r"LSTM: expected output gradient of shape \(5, 2, 4\)"):
        layer.backward([f32(4, 2, 4), None, None])
    layer.backward([f32(5, 2, 4), None, None])  # the failed calls kept the forward state
    with pytest.raises(StateError, match="LSTM: backward called before forward"):
        layer.backward([f32(5, 2, 4), None, None])
    grid = Recurrent2D(2, 3)
    grid.forward(f32(1, 2, 2, 3))
    with pytest.raises(ShapeError, match=r"Recurrent2D: expected output gradient of shape \(1, 3, 2, 3\)"):
        grid.backward(f32(1, 3, 3, 2))
    with pytest.raises(ShapeError, match=r"AvgPoolTime: expected output gradient of shape \(3, 2\)"):
        pool = AvgPoolTime()
        pool.forward(f32(5, 2))
        pool.backward(f32(2, 2))


@pytest.mark.parametrize("make, match", [
    (lambda: LSTM(0, 4), "LSTM: expected input_size to be a positive integer or a list of "
                         "them, got 0"),
    (lambda: GRU(3, -1), "GRU: expected hidden_size to be a positive integer, got -1"),
    (lambda: RNN(3, 4, activation="swish"), r"RNN: expected activation one of \('tanh', "),
    (lambda: MultiplicativeRNN([3, 0], 4), r"MultiplicativeRNN: expected input_size to be a "
                                           r"positive integer or a list of them, got \[3, 0\]"),
    (lambda: MultiplicativeRNN(3, 4, factors=0), "MultiplicativeRNN: expected factors"),
    (lambda: AvgPoolTime(4), "AvgPoolTime: expected an odd window >= 1 and a stride >= 1"),
    (lambda: AvgPoolTime(3, 0), "AvgPoolTime: expected an odd window"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- losses on sequences ----------------------------------------------------------------------
def test_softmax_cross_entropy_on_sequences():
    logits, labels = R.normal(size=(4, 3, 5)), R.integers(0, 5, (4, 3))
    loss = SoftmaxCrossEntropy()
    value = loss.forward(logits, labels)
    terms = [-math.log(math.exp(logits[t, n, labels[t, n]])
                       / sum(math.exp(v) for v in logits[t, n])) for t in range(4) for n in range(3)]
    assert value == pytest.approx(sum(terms) / 12, rel=1e-12)
    grad = loss.backward()
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    p[np.arange(4)[:, None], np.arange(3), labels] -= 1
    np.testing.assert_allclose(grad, p / 12, rtol=1e-12)


def test_binary_cross_entropy_sums_over_time_and_units():
    p, t = R.uniform(0.05, 0.95, (4, 3, 2)), R.integers(0, 2, (4, 3, 2)).astype(float)
    value = BinaryCrossEntropy(reduction="sum").forward(p, t)
    want = -sum(math.log(p[i] if t[i] else 1 - p[i]) for i in np.ndindex(p.shape))
    assert value == pytest.approx(want, rel=1e-12)
    assert gpunet.NegativeLogProbability is BinaryCrossEntropy


# -- datasets, models and the command line ---------------------------------------------------
def test_adding_problem():
    train, test = data.adding(seq_len=12, n_train=300, n_test=100, seed=4)
    assert train.x.shape == (300, 12, 2) and train.y.shape == (300, 1)
    assert train.y.dtype == np.float32 and train.num_classes is None
    marks = train.x[:, :, 1]
    assert (marks.sum(1) == 2).all() and (marks[:, :6].sum(1) == 1).all()
    np.testing.assert_allclose(train.y[:, 0], (train.x[:, :, 0] * marks).sum(1), rtol=1e-6)
    again, _ = data.adding(seq_len=12, n_train=300, n_test=100, seed=4)
    np.testing.assert_array_equal(again.x, train.x)
    big, _ = data.load("adding")  # the default: T = 50; the mean answers about 1/6
    assert big.input_shape == (50, 2)
    assert abs(float(((big.y - big.y.mean()) ** 2).mean()) - 1 / 6) < 0.01


def test_digits_rows_is_digits_read_row_by_row():
    rows, rows_test = data.load("digits-rows")
    flat, flat_test = data.digits()
    assert rows.input_shape == (8, 8) and rows.num_classes == 10
    np.testing.assert_array_equal(rows.x.reshape(len(rows), 64), flat.x)
    np.testing.assert_array_equal(rows_test.y, flat_test.y)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_sequence_models_for_both_tasks(name):
    spec = models.get(name)
    for shape, classes, loss in [((50, 2), None, MSE), ((8, 8), 10, SoftmaxCrossEntropy)]:
        model = spec.build(shape, classes)
        out = model.forward(np.zeros((3, *shape), np.float32))
        assert out.shape == (3, classes or 1)
        assert type(spec.make_loss(classes)) is loss
    assert type(models.get("mlp").make_loss(10)) is SoftmaxCrossEntropy
    with pytest.raises(ValueError, match=f"{name}: expected sequences of shape"):
        spec.build((1, 8, 8), 10)


def train_metrics(tmp_path, *args) -> dict:
    out = tmp_path / "metrics.json"
    assert main(["train", *args, "--device", "cpu", "--no-progress",
                 "--metrics-out", str(out)]) == 0
    return json.loads(out.read_text())


def test_lstm_learns_the_adding_problem(tmp_path):
    """`gpunet train lstm --data adding` at T = 50: the mean scores about 0.167."""
    metrics = train_metrics(tmp_path, "lstm", "--data", "adding")
    assert metrics["test_loss"] < 0.01, metrics
    assert metrics["test_accuracy"] is None


def test_lstm_reads_digits_row_by_row(tmp_path):
    metrics = train_metrics(tmp_path, "lstm", "--data", "digits-rows")
    assert metrics["test_accuracy"] >= 0.95, metrics


def test_seq_len_flag(tmp_path, capsys):
    metrics = train_metrics(tmp_path, "gru", "--data", "adding", "--seq-len", "6",
                            "--epochs", "1", "--clip-norm", "0.5")
    assert metrics["epochs"] == 1 and "'clip_norm': 0.5" in capsys.readouterr().err
    assert main(["train", "lstm", "--data", "digits", "--seq-len", "5"]) == 2
    assert "--seq-len: dataset 'digits' has no sequence length" in capsys.readouterr().err
