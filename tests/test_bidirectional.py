"""Bidirectional: forward against the two directions run by hand and against PyTorch's
bidirectional RNN, LSTM and GRU, gradient checks (merges, initial and final states), the
parameters and their names, the input-gradient switch, thread orders, bad inputs, saving."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import gpunet
from gpunet import DTypeError, ShapeError, StateError, gradcheck, parity
from gpunet.layers import (GRU, LSTM, RNN, Bidirectional, Dense, LastStep, MultiplicativeRNN,
                           Recurrent2D, Sequential, TimeMajor)
from helpers import assert_refused

R = np.random.default_rng(31)

CELLS = {"RNN": lambda: RNN(3, 4), "RNN-relu": lambda: RNN(3, 4, activation="relu"),
         "LSTM": lambda: LSTM(3, 4), "GRU": lambda: GRU(3, 4)}


def f64(layer):
    """The layer in float64 with every parameter moved a little (biases nonzero)."""
    layer.to(dtype=np.float64)
    for p in layer.params().values():
        p.data += R.normal(size=p.shape) * 0.3
    return layer


# -- the formula: each direction by hand --------------------------------------------------
@pytest.mark.parametrize("merge", ["concat", "sum"])
@pytest.mark.parametrize("cell", CELLS)
def test_forward_is_both_directions_merged(cell, merge):
    """``y = merge(f(x), reverse(b(reverse(x))))`` with ``f`` the given layer and ``b`` the
    backward-direction copy, each run on its own."""
    bi = f64(Bidirectional(CELLS[cell](), merge=merge))
    x = R.normal(size=(5, 2, 3))
    y = bi.forward(x)
    f = copy.deepcopy(bi.forward_layer)
    b = copy.deepcopy(bi.backward_layer)
    y_f, y_b = f.forward(x), b.forward(x[::-1].copy())[::-1]
    want = np.concatenate([y_f, y_b], axis=2) if merge == "concat" else y_f + y_b
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    assert y.shape == (5, 2, 8 if merge == "concat" else 4)
    # the final states: the forward one after x[T - 1], the backward one after x[0]
    h_n = bi.final_state[0]
    assert h_n.shape == (2, 2, 4)
    np.testing.assert_allclose(h_n[0], y_f[-1], rtol=1e-12)
    np.testing.assert_allclose(h_n[1], y_b[0], rtol=1e-12)


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_backward_is_both_directions_backward(merge):
    """dx is the forward direction's input gradient plus the backward one's, reversed back;
    each direction's parameters get the gradient of its own part of dy."""
    bi = f64(Bidirectional(LSTM(3, 4), merge=merge))
    f, b = copy.deepcopy(bi.forward_layer), copy.deepcopy(bi.backward_layer)
    x = R.normal(size=(4, 3, 3))
    y = bi.forward(x)
    dy = R.normal(size=y.shape)
    dx = bi.backward(dy)
    dy_f, dy_b = (dy[:, :, :4], dy[:, :, 4:]) if merge == "concat" else (dy, dy)
    f.forward(x)
    b.forward(x[::-1].copy())
    want = f.backward(dy_f.copy()) + b.backward(dy_b[::-1].copy())[::-1]
    np.testing.assert_allclose(dx, want, rtol=1e-12, atol=1e-12)
    for prefix, layer in (("forward", f), ("backward", b)):
        for k, p in layer.params().items():
            np.testing.assert_allclose(bi.params()[f"{prefix}.{k}"].grad, p.grad, rtol=1e-12)


# -- PyTorch's bidirectional layers, weights copied ---------------------------------------
def torch_twin(torch, bi: Bidirectional):
    """PyTorch's bidirectional layer with ``bi``'s weights: gpunet's single RNN/LSTM bias is
    PyTorch's ``b_ih + b_hh`` (so ``b_hh`` is zero); GRU's ``b_x``, ``b_h`` are the two."""
    cell = bi.forward_layer
    kind = type(cell).__name__
    kwargs = {"nonlinearity": cell.activation} if kind == "RNN" else {}
    twin = getattr(torch.nn, kind)(bi.input_size, bi.hidden_size, bidirectional=True,
                                   dtype=torch.float64, **kwargs)
    with torch.no_grad():
        for layer, suffix in ((bi.forward_layer, ""), (bi.backward_layer, "_reverse")):
            w = {k: torch.tensor(p.data) for k, p in layer.params().items()}
            getattr(twin, f"weight_ih_l0{suffix}").copy_(w["W_x"])
            getattr(twin, f"weight_hh_l0{suffix}").copy_(w["W_h"])
            getattr(twin, f"bias_ih_l0{suffix}").copy_(w["b_x"] if kind == "GRU" else w["b"])
            getattr(twin, f"bias_hh_l0{suffix}").copy_(w["b_h"] if kind == "GRU" else 0 * w["b"])
    return twin


TORCH_CELLS = {"RNN-tanh": lambda: RNN(3, 4, return_state=True),
               "RNN-relu": lambda: RNN(3, 4, activation="relu", return_state=True),
               "LSTM": lambda: LSTM(3, 4, return_state=True),
               "GRU": lambda: GRU(3, 4, return_state=True)}


@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_against_pytorch(cell):
    """Output, final states and every gradient (input, initial states, weights) as PyTorch's
    ``bidirectional=True`` layer's, states in its ``(2, N, H)`` layout."""
    torch = pytest.importorskip("torch")
    bi = f64(Bidirectional(TORCH_CELLS[cell]()))
    lstm = cell == "LSTM"
    steps, batch, hidden = 5, 3, 4
    x = R.normal(size=(steps, batch, 3))
    states = [R.normal(size=(2, batch, hidden)) for _ in range(2 if lstm else 1)]
    outs = bi.forward([x, *states])
    grads_out = [R.normal(size=o.shape) for o in outs]
    grads_in = bi.backward(grads_out)

    twin = torch_twin(torch, bi)
    xt = torch.tensor(x, requires_grad=True)
    st = [torch.tensor(s, requires_grad=True) for s in states]
    y, finals = twin(xt, tuple(st) if lstm else st[0])
    outs_t = [y, *(finals if lstm else [finals])]
    torch.autograd.backward(outs_t, [torch.tensor(g) for g in grads_out])
    for got, want in zip(outs, outs_t):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads_in, [xt, *st]):
        np.testing.assert_allclose(got, want.grad.numpy(), rtol=1e-10, atol=1e-12)
    for prefix, suffix in (("forward", ""), ("backward", "_reverse")):
        p = bi.params()
        np.testing.assert_allclose(p[f"{prefix}.W_x"].grad,
                                   getattr(twin, f"weight_ih_l0{suffix}").grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(p[f"{prefix}.W_h"].grad,
                                   getattr(twin, f"weight_hh_l0{suffix}").grad.numpy(), rtol=1e-10)
        b_ih = getattr(twin, f"bias_ih_l0{suffix}").grad.numpy()
        b_hh = getattr(twin, f"bias_hh_l0{suffix}").grad.numpy()
        if cell == "GRU":
            np.testing.assert_allclose(p[f"{prefix}.b_x"].grad, b_ih, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(p[f"{prefix}.b_h"].grad, b_hh, rtol=1e-10, atol=1e-12)
        else:  # one bias, b_ih + b_hh: both have its gradient
            np.testing.assert_allclose(p[f"{prefix}.b"].grad, b_ih, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(b_hh, b_ih, rtol=1e-12)


# -- gradient checks ------------------------------------------------------------------------
GRADCHECKS = {
    "RNN-concat": (lambda: Bidirectional(RNN(3, 4)), lambda: R.normal(size=(4, 2, 3))),
    "LSTM-sum": (lambda: Bidirectional(LSTM(2, 3), merge="sum"), lambda: R.normal(size=(3, 2, 2))),
    "GRU-[x]": (lambda: Bidirectional(GRU(2, 3)), lambda: [R.normal(size=(3, 2, 2))]),
    "LSTM-states": (lambda: Bidirectional(LSTM(2, 3, return_state=True)),
                    lambda: [R.normal(size=(3, 2, 2)), R.normal(size=(2, 2, 3)),
                             R.normal(size=(2, 2, 3))]),
    "LSTM-h0-only": (lambda: Bidirectional(LSTM(2, 3)),
                     lambda: [R.normal(size=(3, 2, 2)), R.normal(size=(2, 2, 3))]),
    "GRU-sum-states": (lambda: Bidirectional(GRU(2, 3, return_state=True), merge="sum"),
                       lambda: [R.normal(size=(3, 2, 2)), R.normal(size=(2, 2, 3))]),
    "RNN-return-state": (lambda: Bidirectional(RNN(2, 3, activation="sigmoid",
                                                   return_state=True)),
                         lambda: R.normal(size=(4, 1, 2))),
}


@pytest.mark.parametrize("name", GRADCHECKS)
def test_gradcheck(name):
    make_layer, make_input = GRADCHECKS[name]
    layer = f64(make_layer())
    report = gradcheck(layer, make_input())
    assert report.ok, str(report)
    assert set(report.errors) >= set(layer.params())


def test_a_bidirectional_sequence_classifier_passes_gradcheck():
    gpunet.seed(0)
    model = Sequential([TimeMajor(), Bidirectional(GRU(3, 4)), LastStep(), Dense(8, 2)])
    report = gradcheck(model, R.normal(size=(2, 5, 3)))
    assert report.ok, str(report)


def test_none_stands_for_a_zero_gradient_of_an_output():
    bi = f64(Bidirectional(LSTM(2, 3, return_state=True)))
    x = R.normal(size=(3, 2, 2))
    y, h_n, c_n = bi.forward(x)
    dy = R.normal(size=y.shape)
    with_zeros = bi.backward([dy, np.zeros_like(h_n), np.zeros_like(c_n)])
    bi.forward(x)
    np.testing.assert_allclose(bi.backward([dy, None, None]), with_zeros, rtol=1e-12)
    bi.forward(x)
    dh = R.normal(size=h_n.shape)
    with_zeros = bi.backward([np.zeros_like(y), dh, np.zeros_like(c_n)])
    bi.forward(x)
    np.testing.assert_allclose(bi.backward([None, dh, None]), with_zeros, rtol=1e-12)


# -- parameters, copies and switches -----------------------------------------------------
def test_parameters_are_two_independent_directions():
    gpunet.seed(5)
    bi = Bidirectional(GRU(3, 4))
    assert list(bi.params()) == ["forward.W_x", "forward.W_h", "forward.b_x", "forward.b_h",
                                 "backward.W_x", "backward.W_h", "backward.b_x", "backward.b_h"]
    p = bi.params()
    assert p["backward.W_x"].shape == (12, 3)
    assert not np.array_equal(p["forward.W_x"].data, p["backward.W_x"].data)  # own draws
    assert p["forward.W_x"].data is not p["backward.W_x"].data
    gpunet.seed(5)
    again = Bidirectional(GRU(3, 4))  # one seed, the same two directions
    for k, v in again.params().items():
        np.testing.assert_array_equal(v.data, p[k].data)


def test_the_given_layer_is_the_forward_direction():
    lstm = LSTM(3, 4)
    bi = Bidirectional(lstm, merge="sum")
    assert bi.forward_layer is lstm and type(bi.backward_layer) is LSTM
    assert bi.backward_layer.config() == lstm.config()
    assert bi.config() == {"type": "Bidirectional",
                           "args": {"layer": lstm.config(), "merge": "sum"}}


def test_set_input_grad_reaches_both_directions(device):
    """On every device: no input gradient, the same state and parameter gradients."""
    gpunet.seed(2)
    full = Bidirectional(LSTM(3, 4)).to(device, np.float64)
    skip = copy.deepcopy(full).set_input_grad(False)
    assert not skip.forward_layer.input_grad and not skip.backward_layer.input_grad
    x = [gpunet.asarray(R.normal(size=s), device) for s in ((4, 2, 3), (2, 2, 4))]
    dy = gpunet.asarray(R.normal(size=full.forward(x).shape), device)
    skip.forward(x)
    got, want = skip.backward(dy), full.backward(dy)
    assert got[0] is None and want[0].shape == (4, 2, 3)
    close = lambda a, b: np.testing.assert_allclose(gpunet.to_numpy(a), gpunet.to_numpy(b),
                                                    rtol=1e-12, atol=1e-12)
    close(got[1], want[1])  # the states' gradients remain
    for k, p in full.params().items():
        close(skip.params()[k].grad, p.grad)
    # a layer already told keeps its setting; the copy follows it
    wrapped = Bidirectional(RNN(3, 4).set_input_grad(False))
    assert not wrapped.input_grad and not wrapped.backward_layer.input_grad


def test_moves_and_casts_both_directions(standin):
    bi = Bidirectional(GRU(3, 4)).to("cuda:1", np.float64)
    for layer in bi.walk():
        assert layer.device.name == "cuda:1" and layer.dtype == np.float64
    x = gpunet.asarray(R.normal(size=(3, 2, 3)), "cuda:1")
    y = bi.forward(x)
    assert y.device.id == 1 and bi.backward(y).device.id == 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", ["emulated:reverse", "emulated:shuffled"])
@pytest.mark.parametrize("case", [c for c in parity.CASES if c.startswith("Bidirectional-LSTM")])
def test_parity_in_every_thread_order(case, spec, dtype):
    result = parity.run_case(case, gpunet.device(spec), dtype)
    assert result.ok, parity.table([result])


# -- bad inputs ----------------------------------------------------------------------------
f32 = lambda *s: np.zeros(s, np.float32)


@pytest.mark.parametrize("make, error, match", [
    (lambda: Bidirectional(Dense(3, 4)), TypeError,
     "Bidirectional: expected an RNN, LSTM or GRU layer, got Dense"),
    (lambda: Bidirectional(MultiplicativeRNN(3, 4)), TypeError, "got MultiplicativeRNN"),
    (lambda: Bidirectional(Recurrent2D(3, 4)), TypeError, "got Recurrent2D"),
    (lambda: Bidirectional("lstm"), TypeError, "got str"),
    (lambda: Bidirectional(LSTM(3, 4), merge="mean"), ValueError,
     r"Bidirectional: expected merge one of \('concat', 'sum'\), got 'mean'"),
])
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("layer, x, error, match", [
    (Bidirectional(LSTM(3, 4)), f32(5, 2, 2), ShapeError,
     r"Bidirectional: expected input of shape \(T, N, 3\) \(time-major, T and N at least 1\), "
     r"got \(5, 2, 2\)"),
    (Bidirectional(RNN(3, 4)), f32(5, 3), ShapeError, r"expected input of shape \(T, N, 3\)"),
    (Bidirectional(RNN(3, 4)), f32(0, 2, 3), ShapeError, r"T and N at least 1\), got \(0, 2, 3\)"),
    (Bidirectional(GRU(3, 4)), np.zeros((5, 2, 3)), DTypeError,
     "Bidirectional: expected input of dtype float32, got float64"),
    (Bidirectional(GRU(3, 4)), [f32(5, 2, 3), f32(2, 4)], ShapeError,
     r"Bidirectional: expected initial state h0 \(forward direction first\) of shape "
     r"\(2, 2, 4\), got \(2, 4\)"),
    (Bidirectional(LSTM(3, 4)), [f32(5, 2, 3), f32(2, 2, 4), f32(1, 2, 4)], ShapeError,
     r"expected initial state c0 \(forward direction first\) of shape \(2, 2, 4\)"),
    (Bidirectional(GRU(3, 4)), [f32(5, 2, 3), f32(2, 2, 4), f32(2, 2, 4)], ShapeError,
     r"Bidirectional: expected x, \[x\] or \[x, h0\] \(leading states optional\), "
     r"got a list of 3"),
    (Bidirectional(LSTM(3, 4)), [], ShapeError,
     r"expected x, \[x\] or \[x, h0, c0\] \(leading states optional\), got a list of 0"),
    (Bidirectional(RNN(3, 4)), "x", DTypeError, "Bidirectional: expected input to be an array"),
])
def test_bad_input(layer, x, error, match):
    assert_refused(layer, x, error, match)


def test_bad_gradient_and_order():
    bi = Bidirectional(LSTM(3, 4))
    with pytest.raises(StateError, match="Bidirectional: backward called before forward"):
        bi.backward(f32(5, 2, 8))
    bi.forward(f32(5, 2, 3))
    with pytest.raises(ShapeError, match=r"Bidirectional: expected output gradient of shape "
                                         r"\(5, 2, 8\), got \(5, 2, 4\)"):
        bi.backward(f32(5, 2, 4))
    assert bi.backward(f32(5, 2, 8)).shape == (5, 2, 3)  # the state was kept

    bi = Bidirectional(GRU(3, 4, return_state=True), merge="sum")
    bi.forward(f32(5, 2, 3))
    with pytest.raises(ShapeError, match=r"Bidirectional: expected the output gradient as a "
                                         r"list \[dy, dh_T\] \(return_state=True\), got ndarray"):
        bi.backward(f32(5, 2, 4))
    with pytest.raises(ShapeError, match=r"expected gradient of the final state h_T of shape "
                                         r"\(2, 2, 4\), got \(2, 4\)"):
        bi.backward([f32(5, 2, 4), f32(2, 4)])
    dx = bi.backward([f32(5, 2, 4), f32(2, 2, 4)])
    assert dx.shape == (5, 2, 3)


def test_save_load_round_trip(tmp_path):
    model = Sequential([Bidirectional(LSTM(3, 4)), Bidirectional(GRU(8, 2), merge="sum")])
    x = R.normal(size=(4, 2, 3)).astype(np.float32)
    gpunet.save(model, tmp_path / "bi.npz")
    gpunet.seed(99)  # the rebuilt layers draw other weights; loading replaces them
    loaded = gpunet.load(tmp_path / "bi.npz")
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert loaded.layers[1].merge == "sum" and "0.backward.W_h" in loaded.params()
