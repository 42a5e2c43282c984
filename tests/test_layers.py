"""Every layer of the core: gradient check, forward against an independent formula, device
parity, and each bad input it rejects."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import gpunet
from gpunet import DTypeError, DeviceError, ShapeError, StateError, gradcheck, parity
from gpunet.layers import (ELU, GRU, LSTM, SELU, Concat, Conv2D, Dense, Dropout, Flatten,
                           LastStep, LeakyReLU, NonlinearityGenerator, ReLU, RNN, Sequential, Sigmoid,
                           SigmoidGenerator, Softmax, Softplus, Sum, Tanh, TimeMajor)
from gpunet.losses import MSE
from gpunet.optim import SGD
from helpers import assert_refused

R = np.random.default_rng(7)


def scalar_map(f, x: np.ndarray) -> np.ndarray:
    """Apply a Python-float function entry by entry: an implementation independent of gpunet."""
    return np.array([f(float(v)) for v in x.ravel()]).reshape(x.shape)


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# case -> (layer factory, input factory, independent forward formula on float64 NumPy)
FORMULAS = {
    "Sigmoid": (Sigmoid, lambda: R.normal(size=(3, 4)) * 3, lambda x: scalar_map(sig, x)),
    "Tanh": (Tanh, lambda: R.normal(size=(3, 4)), lambda x: scalar_map(math.tanh, x)),
    "ReLU": (ReLU, lambda: R.normal(size=(3, 4)), lambda x: scalar_map(lambda v: max(v, 0.0), x)),
    "LeakyReLU": (lambda: LeakyReLU(0.1), lambda: R.normal(size=(3, 4)),
                  lambda x: scalar_map(lambda v: v if v > 0 else 0.1 * v, x)),
    "ELU": (lambda: ELU(0.7), lambda: R.normal(size=(3, 4)),
            lambda x: scalar_map(lambda v: v if v > 0 else 0.7 * (math.exp(v) - 1), x)),
    "SELU": (SELU, lambda: R.normal(size=(3, 4)),
             lambda x: scalar_map(lambda v: 1.0507009873554805 * (
                 v if v > 0 else 1.6732632423543772 * (math.exp(v) - 1)), x)),
    "Softplus": (Softplus, lambda: R.normal(size=(3, 4)) * 3,
                 lambda x: scalar_map(lambda v: math.log(1 + math.exp(v)), x)),
    "Softmax": (Softmax, lambda: R.normal(size=(3, 5)),
                lambda x: np.array([[math.exp(v) / sum(math.exp(u) for u in row)
                                     for v in row] for row in x.tolist()])),
    "Softmax-axis0": (lambda: Softmax(axis=0), lambda: R.normal(size=(3, 5)),
                      lambda x: np.array([[math.exp(v) / sum(math.exp(u) for u in col)
                                           for v in col] for col in x.T.tolist()]).T),
    "Flatten": (Flatten, lambda: R.normal(size=(2, 3, 2, 2)),
                lambda x: np.array([list(s.ravel()) for s in x])),
    "Sum": (Sum, lambda: [R.normal(size=(3, 4)) for _ in range(3)],
            lambda xs: xs[0] + xs[1] + xs[2]),
    "Sum-tanh": (lambda: Sum("tanh"), lambda: [R.normal(size=(3, 4)) for _ in range(2)],
                 lambda xs: scalar_map(math.tanh, xs[0] + xs[1])),
    "Concat": (Concat, lambda: [R.normal(size=(2, 3)), R.normal(size=(2, 5))],
               lambda xs: np.array([list(a) + list(b) for a, b in zip(*xs)])),
}


@pytest.mark.parametrize("name", parity.CASES)
def test_gradcheck(name):
    """Every layer of the parity registry (so every layer gpunet has) in float64."""
    case = parity.CASES[name]
    layer = case.build()
    for p in layer.params().values():  # nonzero biases, so their gradients are exercised
        p.data += gpunet.asarray(R.normal(size=p.shape) * 0.1, dtype=p.data.dtype)
    report = gradcheck(layer, case.inputs(np.random.default_rng(3)), training=case.training)
    assert report.ok, str(report)
    assert set(report.errors) >= set(layer.params())


@pytest.mark.parametrize("name", FORMULAS)
def test_forward_matches_formula(name):
    make_layer, make_input, formula = FORMULAS[name]
    layer = make_layer().to(dtype=np.float64)
    x = make_input()
    np.testing.assert_allclose(layer.forward(x), formula(x), rtol=1e-12, atol=1e-12)


def test_dense_formula():
    layer = Dense(3, 2).to(dtype=np.float64)
    w, b = R.normal(size=(2, 3)), R.normal(size=2)
    layer.weight.data[...], layer.bias.data[...] = w, b
    x = R.normal(size=(4, 3))
    want = [[sum(x[n, i] * w[o, i] for i in range(3)) + b[o] for o in range(2)] for n in range(4)]
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12)
    np.testing.assert_allclose(layer.forward(x[None]), np.array(want)[None], rtol=1e-12)


def test_sigmoid_generator_formula_and_start():
    x = R.normal(size=(5, 3))
    layer = SigmoidGenerator(3).to(dtype=np.float64)
    np.testing.assert_allclose(layer.forward(x), x - 0.5, rtol=1e-12)  # alpha=0: linear
    layer.alpha.data[...] = [0.0, 0.5, 1.0]
    sig = scalar_map(lambda v: 1 / (1 + math.exp(-v)), x)
    want = np.stack([x[:, 0] - 0.5, 0.5 * sig[:, 1] + 0.5 * (x[:, 1] - 0.5), sig[:, 2]], 1)
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12)


def test_nonlinearity_generator_formula():
    layer = NonlinearityGenerator(2, b=0.0).to(dtype=np.float64)
    x = np.array([[-1.0, 2.0], [3.0, -4.0]])
    np.testing.assert_array_equal(layer.forward(x), [[0.0, 2.0], [3.0, 0.0]])  # b = 0: ReLU
    layer.b.data[...] = [-2.0, 2.5]
    np.testing.assert_array_equal(layer.forward(x), [[-1.0, 2.5], [3.0, 2.5]])
    dy = np.array([[1.0, 10.0], [100.0, 1000.0]])
    dx = layer.backward(dy)
    np.testing.assert_array_equal(dx, [[1.0, 0.0], [100.0, 0.0]])
    np.testing.assert_array_equal(layer.b.grad, [0.0, 1010.0])  # dy/db = 1 where x < b


def test_softmax_is_stable():
    y = Softmax().forward(np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32))
    np.testing.assert_allclose(y, [[0.5, 0.5, 0.0]])


def test_dropout_train_and_eval():
    layer = Dropout(0.25)
    x = np.ones((200, 100), np.float32)
    assert layer.forward(x, training=False) is x
    np.testing.assert_array_equal(layer.backward(x), x)
    y = layer.forward(x, training=True)
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(layer.backward(x), y)  # same mask backward
    gpunet.seed(5)
    a = Dropout(0.5).forward(x)
    gpunet.seed(5)
    np.testing.assert_array_equal(Dropout(0.5).forward(x), a)


def test_sum_fans_gradient_out_to_every_input():
    xs = [np.full((2, 2), v, np.float32) for v in (1.0, 2.0)]
    layer = Sum("relu")
    np.testing.assert_array_equal(layer.forward(xs), 3.0)
    grads = layer.backward(np.ones((2, 2), np.float32))
    assert len(grads) == 2 and all((g == 1).all() for g in grads)


# -- bad inputs ----------------------------------------------------------------------------
f32 = lambda *s: np.zeros(s, np.float32)


@pytest.mark.parametrize("layer, x, error, match", [
    (Dense(4, 2), f32(3, 5), ShapeError, r"Dense: expected input of shape \(\*, 4\), got \(3, 5\)"),
    (Dense(4, 2), np.zeros((3, 4), np.int64), DTypeError, "Dense: expected input of dtype float32, got int64"),
    (Dense(4, 2), np.zeros((3, 4), np.float64), DTypeError, "Dense: .*float32, got float64"),
    (Dense(4, 2), [[0.0] * 4], DTypeError, "Dense: expected input to be an array, got list"),
    (ReLU(), np.zeros(3, np.int32), DTypeError, "ReLU: expected input of dtype float32 or float64"),
    (Softmax(axis=2), f32(2, 3), ShapeError, "Softmax: expected an input with axis 2"),
    (SigmoidGenerator(3), f32(2, 4), ShapeError, "SigmoidGenerator: expected 3 features on axis 1"),
    (SigmoidGenerator(3), f32(3), ShapeError, "SigmoidGenerator: expected 2-D or 3-D or 4-D input"),
    (NonlinearityGenerator(3), f32(5, 2, 4), ShapeError, "NonlinearityGenerator: expected 3 features on axis 2"),
    (Flatten(), f32(3), ShapeError, "Flatten: expected input of shape \\(N, ...\\)"),
    (Sum(), f32(2, 2), ShapeError, "Sum: expected a list of input arrays, got ndarray"),
    (Sum(), [f32(2, 2), f32(2, 3)], ShapeError, r"Sum: expected every input of shape \(2, 2\), got \(2, 3\) for input 1"),
    (Concat(), [f32(2, 2), f32(3, 2)], ShapeError, "Concat: expected input 1 to match input 0's shape"),
    (Concat(axis=3), [f32(2, 2)], ShapeError, "Concat: expected inputs with axis 3"),
    (Concat(), [], ShapeError, "Concat: expected at least 1 inputs, got 0"),
])
def test_bad_input(layer, x, error, match):
    assert_refused(layer, x, error, match)


@pytest.mark.parametrize("make", [lambda: Dense(2, 2), Sigmoid, ReLU, lambda: Dropout(0.5),
                                  Flatten, Sum, Concat, lambda: SigmoidGenerator(2)])
def test_backward_before_forward(make):
    layer = make()
    with pytest.raises(StateError, match=f"{layer.name}: backward called before forward"):
        layer.backward(f32(2, 2))


def test_backward_twice_and_bad_gradient_shape():
    layer = Dense(3, 2)
    layer.forward(f32(4, 3))
    with pytest.raises(ShapeError, match=r"Dense: expected output gradient of shape \(4, 2\), got \(4, 3\)"):
        layer.backward(f32(4, 3))
    layer.backward(f32(4, 2))  # the failed call kept the forward state
    with pytest.raises(StateError):
        layer.backward(f32(4, 2))


@pytest.mark.parametrize("make, error, match", [
    (lambda: Dense(0, 3), ValueError, "Dense: expected positive in_features"),
    (lambda: Dense(2, 3, init="nope"), ValueError, "unknown initialiser 'nope'"),
    (lambda: Dropout(1.0), ValueError, r"Dropout: expected p in \[0, 1\), got 1.0"),
    (lambda: Sum("nope"), ValueError, "Sum: expected activation None or one of"),
])
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_float64_layers_and_casting():
    layer = Dense(3, 2).to(dtype=np.float64)
    assert layer.weight.data.dtype == np.float64 and layer.weight.grad.dtype == np.float64
    assert layer.forward(np.zeros((1, 3))).dtype == np.float64
    with pytest.raises(DTypeError, match="Dense.to: expected dtype float32 or float64, got int32"):
        layer.to(dtype=np.int32)


def test_non_array_input_is_reported():
    class ArrayLike:  # has a shape and dtype, but is no array of any device
        shape, dtype, ndim = (2, 2), np.dtype(np.float32), 2
    with pytest.raises(DTypeError, match="ReLU: expected input to be an array, got ArrayLike"):
        ReLU().forward(ArrayLike())


def test_array_from_another_device_is_reported(standin):
    with pytest.raises(DeviceError, match="ReLU: expected input on device cpu, got an array on cuda:0"):
        ReLU().forward(standin.zeros((2, 2), standin.float32))
    on_gpu1 = Dense(2, 2).to("cuda:1")
    with pytest.raises(DeviceError, match="Dense: expected input on device cuda:1, got an array "
                                          "on cuda:0"):
        on_gpu1.forward(gpunet.asarray(np.zeros((3, 2), np.float32), "cuda:0"))


# -- skipping the input gradient -----------------------------------------------------------
SKIPPERS = {  # layers whose backward can skip dx, with an input shape
    "Dense": (lambda: Dense(5, 3), (4, 5)),
    "Conv2D": (lambda: Conv2D(2, 3, 3, padding=1), (2, 2, 5, 4)),
    "RNN": (lambda: RNN(3, 4), (5, 2, 3)),
    "LSTM": (lambda: LSTM(3, 4), (5, 2, 3)),
    "GRU": (lambda: GRU(3, 4), (5, 2, 3)),
}


@pytest.mark.parametrize("name", SKIPPERS)
def test_without_input_grad_backward_returns_none_and_the_same_parameter_grads(name, device):
    make, shape = SKIPPERS[name]
    gpunet.seed(5)
    full = make().to(device, np.float64)
    skip = copy.deepcopy(full).set_input_grad(False)
    x = gpunet.asarray(np.random.default_rng(2).normal(size=shape), device)
    y = full.forward(x)
    skip.forward(x)
    dy = gpunet.asarray(np.random.default_rng(3).normal(size=y.shape), device)
    assert full.backward(dy) is not None
    assert skip.backward(dy) is None
    for key, p in full.params().items():
        np.testing.assert_allclose(gpunet.to_numpy(skip.params()[key].grad),
                                   gpunet.to_numpy(p.grad), rtol=1e-12, atol=1e-12)


def test_sequential_passes_no_input_grad_up_to_its_first_parameters():
    model = Sequential([TimeMajor(), LSTM(3, 4), LastStep(), Dense(4, 1)]).to("cpu", np.float64)
    model.set_input_grad(False)
    assert [layer.input_grad for layer in model.layers] == [False, False, True, True]
    x = np.random.default_rng(0).normal(size=(2, 5, 3))
    reference = copy.deepcopy(model).set_input_grad(True)
    dy = np.ones((2, 1))
    model.forward(x)
    reference.forward(x)
    assert model.backward(dy) is None
    assert reference.backward(dy).shape == x.shape
    for key, p in reference.params().items():
        np.testing.assert_allclose(model.params()[key].grad, p.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(StateError):  # what TimeMajor kept was dropped, not left behind
        model.layers[0].backward(np.ones((5, 2, 3)))


def test_the_trainer_turns_the_input_grad_of_its_model_off():
    model = Sequential([Dense(2, 2), ReLU(), Dense(2, 2)])
    gpunet.Trainer(model, MSE(), SGD(model.params(), lr=0.1), progress=False)
    assert [layer.input_grad for layer in model.layers] == [False, True, True]
