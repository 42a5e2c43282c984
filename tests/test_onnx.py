"""export_onnx: each exported file passes onnx.checker and onnxruntime reproduces gpunet's
eval forward in float32."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import gpunet  # noqa: E402
from gpunet.layers import (ELU, GELU, GRU, LSTM, SELU, AvgPool2D, BatchNorm, Concat,  # noqa: E402
                           Conv2D, ConvTranspose2D, Dense, Dropout, Embedding, Flatten,
                           GlobalAvgPool2D, Graph, Identity, LastStep, LayerNorm, LeakyReLU,
                           MaxPool2D, RNN, ReLU, Reshape, Sequential, Sigmoid, Softmax, Softplus,
                           Sum, Tanh, TimeMajor, Upscale2D)
from gpunet.onnx_export import export_onnx  # noqa: E402


def roundtrip(model, x, tmp_path, opset=17, batch=None):
    """Export ``model`` with sample ``x``; return (gpunet's eval output, onnxruntime's) for
    ``x``, or for a batch of another size when ``batch`` is given (the symbolic N)."""
    path = str(tmp_path / "model.onnx")
    model.eval()
    export_onnx(model, path, x, opset=opset)
    onnx.checker.check_model(onnx.load(path))
    if batch is not None:
        rng = np.random.default_rng(1)
        x = (rng.integers(0, 10, (batch, *x.shape[1:])) if x.dtype.kind in "iu"
             else rng.standard_normal((batch, *x.shape[1:])).astype(x.dtype))
    want = model.forward(x, training=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    return want, got


def check(model, x, tmp_path, **kw):
    want, got = roundtrip(model, x, tmp_path, **kw)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def randn(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("act", [ReLU(), Tanh(), Sigmoid(), LeakyReLU(0.2), ELU(0.7), SELU(),
                                 Softplus(), Softmax(), Softmax(0), GELU(), GELU("tanh"),
                                 Dropout(0.5), Identity()],
                         ids=lambda a: f"{type(a).__name__}")
def test_activations(act, tmp_path):
    gpunet.seed(0)
    check(Sequential([Dense(6, 5), act]), randn(4, 6), tmp_path)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_opset20(approximate, tmp_path):
    gpunet.seed(0)
    check(Sequential([Dense(6, 5), GELU(approximate)]), randn(4, 6), tmp_path, opset=20)


def test_dense_3d_uses_matmul(tmp_path):
    gpunet.seed(0)
    model = Sequential([Dense(6, 5), ReLU(), Dense(5, 3, bias=False)])
    check(model, randn(2, 7, 6), tmp_path)


def test_mlp_other_batch(tmp_path):
    gpunet.seed(0)
    model = Sequential([Dense(8, 16), ReLU(), Dropout(0.3), Dense(16, 4), Softmax()])
    check(model, randn(3, 8), tmp_path, batch=11)


def test_conv_pool_batchnorm(tmp_path):
    gpunet.seed(0)
    bn = BatchNorm(4)
    model = Sequential([Conv2D(3, 4, 3, stride=2, padding=1), bn, ReLU(),
                        MaxPool2D(3, stride=2, padding=1), AvgPool2D(2, padding=1),
                        GlobalAvgPool2D()])
    model.train()
    for _ in range(3):  # running statistics away from their start
        model.forward(randn(5, 3, 13, 11) * 2 + 1)
    check(model, randn(2, 3, 13, 11), tmp_path, batch=3)


def test_batchnorm_2d_input(tmp_path):
    gpunet.seed(0)
    model = Sequential([Dense(5, 6), BatchNorm(6)])
    model.forward(randn(8, 5), training=True)
    check(model, randn(4, 5), tmp_path)


def test_lenet(tmp_path):
    gpunet.seed(0)
    model = Sequential([Conv2D(1, 6, 5, padding="same"), Tanh(), AvgPool2D(2),
                        Conv2D(6, 16, 5), Tanh(), MaxPool2D(2), Flatten(),
                        Dense(16 * 5 * 5, 120), ReLU(), Dense(120, 10)])
    check(model, randn(2, 1, 28, 28), tmp_path, batch=5)


def test_conv_transpose_and_reshape(tmp_path):
    gpunet.seed(0)
    model = Sequential([Dense(12, 2 * 4 * 4), Reshape((2, 4, 4)),
                        ConvTranspose2D(2, 3, 3, stride=2, padding=1, output_padding=1),
                        Flatten()])
    check(model, randn(3, 12), tmp_path, batch=2)


def test_layernorm(tmp_path):
    gpunet.seed(0)
    ln = LayerNorm((3, 4))
    ln.weight.data[...] = randn(3, 4)
    ln.bias.data[...] = randn(3, 4)
    check(Sequential([ln, LayerNorm(4, elementwise_affine=False)]), randn(2, 5, 3, 4),
          tmp_path)


def test_embedding(tmp_path):
    gpunet.seed(0)
    model = Sequential([Embedding(10, 4), Flatten(), Dense(12, 2)])
    check(model, np.array([[1, 2, 3], [9, 0, 4]], np.int64), tmp_path, batch=5)


@pytest.mark.parametrize("cell", [LSTM, GRU, RNN, lambda i, h: RNN(i, h, "relu"),
                                  lambda i, h: RNN(i, h, "sigmoid")],
                         ids=["LSTM", "GRU", "RNN-tanh", "RNN-relu", "RNN-sigmoid"])
def test_recurrent_classifier(cell, tmp_path):
    gpunet.seed(0)
    layer = cell(5, 7)
    for p in layer.params().values():  # biases away from zero, so their placement matters
        p.data[...] = randn(*p.data.shape) * 0.5
    model = Sequential([TimeMajor(), layer, LastStep(), Dense(7, 3)])
    check(model, randn(4, 6, 5), tmp_path, batch=2)


def test_recurrent_sequence_output(tmp_path):
    gpunet.seed(0)
    model = Sequential([TimeMajor(), GRU(3, 4), TimeMajor()])
    check(model, randn(2, 5, 3), tmp_path)


def test_residual_graph(tmp_path):
    gpunet.seed(0)
    g = Graph("x")
    g.add("fc", Dense(8, 8), "x").add("act", Tanh(), "fc")
    g.add("res", Sum("relu"), ["act", "x"])
    g.add("side", Sequential([Dense(8, 3), Sigmoid()]), "x")
    g.add("out", Concat(axis=1), ["res", "side"])
    check(g, randn(3, 8), tmp_path, batch=6)


def test_conv_residual_graph(tmp_path):
    gpunet.seed(0)
    g = Graph("x")
    g.add("c1", Conv2D(3, 3, 3, padding=1), "x").add("bn", BatchNorm(3), "c1")
    g.add("sum", Sum(), ["bn", "x"]).add("gelu", GELU(), "sum")
    g.add("pool", GlobalAvgPool2D(), "gelu")
    check(g, randn(2, 3, 6, 6), tmp_path)


def test_unsupported_layer_is_named(tmp_path):
    model = Sequential([Conv2D(1, 2, 3), Upscale2D(2)])
    with pytest.raises(NotImplementedError, match="Upscale2D"):
        export_onnx(model, str(tmp_path / "m.onnx"), randn(1, 1, 5, 5))


def test_opset_below_17_refused(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(Sequential([Dense(2, 2)]), str(tmp_path / "m.onnx"), randn(1, 2), opset=13)


def test_modes_left_as_they_were(tmp_path):
    model = Sequential([Dense(2, 2), Dropout(0.5)])
    model.train()
    export_onnx(model, str(tmp_path / "m.onnx"), randn(1, 2))
    assert all(layer.training for layer in model.walk())


def test_without_onnx_names_the_extra(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ImportError, match=r"\.\[interop\]"):
        export_onnx(Sequential([Dense(2, 2)]), str(tmp_path / "m.onnx"), randn(1, 2))


def test_graph_with_two_inputs_and_two_outputs(tmp_path):
    gpunet.seed(0)
    g = Graph(["a", "b"])
    g.add("fa", Dense(3, 4), "a").add("fb", Dense(5, 4), "b")
    g.add("sum", Sum("tanh"), ["fa", "fb"]).add("cat", Concat(), ["fa", "fb"])
    g.set_outputs(["sum", "cat"])
    g.eval()
    a, b = randn(2, 3), randn(2, 5)
    path = str(tmp_path / "g.onnx")
    export_onnx(g, path, [a, b])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["a", "b"]
    got = session.run(None, {"a": a, "b": b})
    for w, o in zip(g.forward([a, b]), got):
        np.testing.assert_allclose(o, w, rtol=1e-4, atol=1e-5)
