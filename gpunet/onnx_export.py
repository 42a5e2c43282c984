"""Export a model to ONNX: ``export_onnx(model, path, sample_input, opset=17)``.

The graph is built with ``onnx.helper`` from the model as it computes in eval mode (dropout
off, BatchNorm on its running statistics): one forward of ``sample_input`` with
``training=False`` gives every intermediate rank, and axis 0 of the input becomes the symbolic
dimension ``"N"``. Each layer maps onto ONNX operators:

========================  ==============================================================
Dense                     Gemm (2-D input) or MatMul + Add (more axes)
Conv2D, ConvTranspose2D   Conv, ConvTranspose (weight layouts are ONNX's)
MaxPool2D, AvgPool2D      MaxPool, AveragePool (count_include_pad=1)
GlobalAvgPool2D           GlobalAveragePool + Flatten
BatchNorm                 BatchNormalization (running statistics)
LayerNorm                 LayerNormalization
activations               Relu, Tanh, Sigmoid, LeakyRelu, Elu, Selu, Softplus, Softmax,
                          Gelu (opset >= 20, else its erf or tanh formula)
RNN                       RNN (activation Tanh, Sigmoid or Relu)
LSTM, GRU                 LSTM (gates permuted i,f,g,o -> i,o,f,c), GRU
                          (linear_before_reset=1, gates r,z,n -> z,r,n)
Embedding                 Gather
Flatten, Reshape          Flatten, Reshape
TimeMajor, LastStep       Transpose, Gather of index -1
Sum, Concat               Add (then the activation), Concat
Dropout, Identity         Identity
Sequential, Graph         their layers, recursively
========================  ==============================================================

Any other layer raises a ``NotImplementedError`` naming it. onnx is an optional dependency:
``pip install -e ".[interop]"``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .backends.base import to_numpy
from .layers import (ELU, GELU, GRU, LSTM, RNN, SELU, AvgPool2D, BatchNorm, Concat, Conv2D,
                     ConvTranspose2D, Dense, Dropout, Embedding, Flatten, GlobalAvgPool2D,
                     Graph, Identity, LastStep, LayerNorm, LeakyReLU, MaxPool2D, ReLU, Reshape,
                     Sequential, Sigmoid, Softmax, Softplus, Sum, Tanh, TimeMajor)
from .layers.base import Layer

__all__ = ["export_onnx"]


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ImportError("export_onnx needs the onnx package: pip install -e \".[interop]\" "
                          "(or pip install onnx)") from e
    return onnx


def export_onnx(model: Layer, path: str, sample_input: Any, opset: int = 17) -> Any:
    """Write ``model`` (a Sequential, a Graph or a single layer) to the ONNX file ``path`` and
    return the ``onnx.ModelProto``. ``sample_input`` (an array, or a list of arrays for a
    Graph with several inputs) fixes every axis but the first, which is exported as the
    symbolic batch dimension ``"N"``. The model is exported as it computes in eval mode; its
    own modes are left as they were. ``opset`` is at least 17 (LayerNormalization)."""
    onnx = _require_onnx()
    if opset < 17:
        raise ValueError(f"export_onnx: expected opset >= 17 (LayerNormalization), got {opset}")
    samples = list(sample_input) if isinstance(sample_input, (list, tuple)) else [sample_input]
    samples = [model.ops.asarray(np.asarray(to_numpy(s))) for s in samples]
    names = (model.input_names if isinstance(model, Graph)
             else [f"input{i}" if len(samples) > 1 else "input" for i in range(len(samples))])
    if len(names) != len(samples):
        raise ValueError(f"export_onnx: expected {len(names)} sample inputs {names}, "
                         f"got {len(samples)}")
    builder = _Builder(onnx, opset)
    values = [_Value(n, s) for n, s in zip(names, samples)]
    single = model._single_input if isinstance(model, Graph) else len(values) == 1
    out = builder.layer(model, values[0] if single else values)
    outs = out if isinstance(out, list) else [out]
    helper = onnx.helper
    graph_inputs = [helper.make_tensor_value_info(
        v.name, helper.np_dtype_to_tensor_dtype(np.dtype(v.array.dtype)),
        ["N", *v.array.shape[1:]]) for v in values]
    graph_outputs = []
    for i, v in enumerate(outs):
        name = "output" if len(outs) == 1 else f"output{i}"
        builder.node("Identity", [v.name], name)
        graph_outputs.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(np.dtype(v.array.dtype)),
            [None] * v.array.ndim))
    graph = helper.make_graph(builder.nodes, type(model).__name__, graph_inputs, graph_outputs,
                              builder.initializers)
    proto = helper.make_model(graph, producer_name="gpunet",
                              opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return proto


class _Value:
    """An ONNX tensor name with the array gpunet computes there for the sample input."""

    def __init__(self, name: str, array: Any) -> None:
        self.name, self.array = name, array


class _Builder:
    """Collects nodes and initializers; ``layer`` emits one layer's operators."""

    def __init__(self, onnx: Any, opset: int) -> None:
        self.onnx, self.opset = onnx, opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, array: Any, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        output = output or self.fresh(op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], **attrs))
        return output

    def layer(self, layer: Layer, x: Any) -> Any:
        """Emit ``layer`` applied to ``x`` (a _Value or a list of them); return its _Value."""
        if isinstance(layer, Sequential):
            for child in layer.layers:
                x = self.layer(child, x)
            return x
        if isinstance(layer, Graph):
            return self.graph(layer, x)
        emit = _EMITTERS.get(type(layer))
        if emit is None:
            raise NotImplementedError(
                f"export_onnx: layer {layer.name} ({type(layer).__name__}) has no ONNX "
                f"export; supported: {', '.join(sorted(c.__name__ for c in _EMITTERS))}, "
                f"Sequential and Graph")
        arrays = [v.array for v in x] if isinstance(x, list) else x.array
        y = layer.forward(arrays, False)
        if isinstance(y, list):
            raise NotImplementedError(f"export_onnx: layer {layer.name} returns several "
                                      "arrays (return_state=True); export it without")
        return _Value(emit(self, layer, x), y)

    def graph(self, g: Graph, x: Any) -> Any:
        xs = [x] if g._single_input else list(x)
        values = dict(zip(g.input_names, xs))
        for name, layer, srcs in g._nodes:
            arg = values[srcs] if isinstance(srcs, str) else [values[s] for s in srcs]
            values[name] = self.layer(layer, arg)
        outs = [values[n] for n in g.output_names]
        return outs[0] if g._single_output else outs

    def param(self, p: Any, hint: str) -> str:
        return self.const(to_numpy(p.data), hint)


def _single(layer: Layer, x: Any) -> _Value:
    if isinstance(x, list):
        raise NotImplementedError(f"export_onnx: layer {layer.name} given a list of inputs "
                                  "(initial states); export it with one input")
    return x


def _dense(b: _Builder, layer: Dense, x: _Value) -> str:
    w = to_numpy(layer.weight.data)
    if x.array.ndim == 2:
        inputs = [x.name, b.const(w, "weight")]
        if layer.bias is not None:
            inputs.append(b.param(layer.bias, "bias"))
        return b.node("Gemm", inputs, transB=1)
    y = b.node("MatMul", [x.name, b.const(np.ascontiguousarray(w.T), "weight_t")])
    if layer.bias is None:
        return y
    return b.node("Add", [y, b.param(layer.bias, "bias")])


def _conv(b: _Builder, layer: Any, x: _Value) -> str:
    (ph, pw), transpose = layer.padding, isinstance(layer, ConvTranspose2D)
    inputs = [x.name, b.param(layer.weight, "weight")]
    if layer.bias is not None:
        inputs.append(b.param(layer.bias, "bias"))
    attrs: dict[str, Any] = dict(kernel_shape=list(layer.kernel), strides=list(layer.stride),
                                 pads=[ph, pw, ph, pw])
    if transpose:
        attrs["output_padding"] = list(layer.output_padding)
    return b.node("ConvTranspose" if transpose else "Conv", inputs, **attrs)


def _pool(b: _Builder, layer: Any, x: _Value) -> str:
    (ph, pw) = layer.padding
    attrs: dict[str, Any] = dict(kernel_shape=list(layer.kernel), strides=list(layer.stride),
                                 pads=[ph, pw, ph, pw])
    if isinstance(layer, AvgPool2D):
        return b.node("AveragePool", [x.name], count_include_pad=1, **attrs)
    return b.node("MaxPool", [x.name], **attrs)


def _global_pool(b: _Builder, layer: GlobalAvgPool2D, x: _Value) -> str:
    return b.node("Flatten", [b.node("GlobalAveragePool", [x.name])], axis=1)


def _batchnorm(b: _Builder, layer: BatchNorm, x: _Value) -> str:
    inputs = [x.name, b.param(layer.gamma, "gamma"), b.param(layer.beta, "beta"),
              b.const(to_numpy(layer._buffers["running_mean"]), "running_mean"),
              b.const(to_numpy(layer._buffers["running_var"]), "running_var")]
    return b.node("BatchNormalization", inputs, epsilon=layer.eps)


def _layernorm(b: _Builder, layer: LayerNorm, x: _Value) -> str:
    dtype = x.array.dtype
    shape = layer.normalized_shape
    scale = (b.param(layer.weight, "weight") if layer.elementwise_affine
             else b.const(np.ones(shape, dtype), "ones"))
    bias = (b.param(layer.bias, "bias") if layer.elementwise_affine
            else b.const(np.zeros(shape, dtype), "zeros"))
    return b.node("LayerNormalization", [x.name, scale, bias], axis=-len(shape),
                  epsilon=layer.eps)


def _gelu(b: _Builder, layer: GELU, x: _Value) -> str:
    if b.opset >= 20:
        return b.node("Gelu", [x.name], approximate=layer.approximate)
    dtype = layer.dtype
    c = lambda v, hint: b.const(np.asarray(v, dtype), hint)
    if layer.approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = b.node("Mul", [b.node("Mul", [x.name, x.name]), x.name])
        inner = b.node("Add", [x.name, b.node("Mul", [x3, c(0.044715, "k")])])
        t = b.node("Tanh", [b.node("Mul", [inner, c(math.sqrt(2 / math.pi), "k")])])
    else:  # 0.5 x (1 + erf(x / sqrt(2)))
        t = b.node("Erf", [b.node("Mul", [x.name, c(1 / math.sqrt(2), "k")])])
    half = b.node("Mul", [x.name, c(0.5, "half")])
    return b.node("Mul", [half, b.node("Add", [t, c(1.0, "one")])])


def _gate_blocks(a: np.ndarray, order: list[int], h: int) -> np.ndarray:
    """``a`` (gates * h, ...) with its gate blocks reordered as ``order``."""
    return np.concatenate([a[k * h:(k + 1) * h] for k in order], axis=0)


def _recurrent(b: _Builder, layer: Any, x: Any) -> str:
    x = _single(layer, x)
    h = layer.hidden_size
    attrs: dict[str, Any]
    if isinstance(layer, RNN):  # one gate; ONNX names its activations Tanh, Sigmoid, Relu
        order, op = [0], "RNN"
        wb = to_numpy(layer.b.data)
        rb = np.zeros_like(wb)
        attrs = {"activations": [layer.activation.capitalize()]}
    elif isinstance(layer, LSTM):  # gpunet i, f, g, o; ONNX i, o, f, c
        order, op = [0, 3, 1, 2], "LSTM"
        wb = _gate_blocks(to_numpy(layer.b.data), order, h)
        rb = np.zeros_like(wb)
        attrs = {}
    else:  # gpunet r, z, n; ONNX z, r, h; both apply r after W_hn h + b_hn
        order, op = [1, 0, 2], "GRU"
        wb = _gate_blocks(to_numpy(layer.b_x.data), order, h)
        rb = _gate_blocks(to_numpy(layer.b_h.data), order, h)
        attrs = {"linear_before_reset": 1}
    w = _gate_blocks(to_numpy(layer.W_x.data), order, h)[None]
    r = _gate_blocks(to_numpy(layer.W_h.data), order, h)[None]
    bias = np.concatenate([wb, rb])[None]
    y = b.node(op, [x.name, b.const(w, "W"), b.const(r, "R"), b.const(bias, "B")],
               hidden_size=h, **attrs)  # Y: (T, 1, N, H)
    return b.node("Squeeze", [y, b.const(np.array([1], np.int64), "axes")])


def _sum(b: _Builder, layer: Sum, xs: list[_Value]) -> str:
    z = xs[0].name
    for v in xs[1:]:
        z = b.node("Add", [z, v.name])
    if layer.activation is None:
        return z
    emit = _EMITTERS[type(layer.activation)]
    return emit(b, layer.activation, _Value(z, None))


def _simple(op: str, **fixed: Any) -> Callable[..., str]:
    def emit(b: _Builder, layer: Any, x: _Value) -> str:
        return b.node(op, [_single(layer, x).name], **fixed)
    return emit


def _with(op: str, **attrs: str) -> Callable[..., str]:
    """An operator whose attributes are layer attributes: ``attrs`` maps ONNX's to gpunet's."""
    def emit(b: _Builder, layer: Any, x: _Value) -> str:
        return b.node(op, [_single(layer, x).name],
                      **{k: getattr(layer, v) for k, v in attrs.items()})
    return emit


def _reshape(b: _Builder, layer: Reshape, x: _Value) -> str:  # 0: keep the batch axis
    return b.node("Reshape", [x.name, b.const(np.array([0, *layer.shape], np.int64), "shape")])


def _time_major(b: _Builder, layer: TimeMajor, x: _Value) -> str:
    return b.node("Transpose", [x.name], perm=[1, 0, *range(2, x.array.ndim)])


def _last_step(b: _Builder, layer: LastStep, x: _Value) -> str:
    return b.node("Gather", [x.name, b.const(np.array(-1, np.int64), "last")], axis=0)


def _embedding(b: _Builder, layer: Embedding, x: _Value) -> str:
    return b.node("Gather", [b.param(layer.weight, "weight"), x.name], axis=0)


_EMITTERS: dict[type, Callable[..., str]] = {
    Dense: _dense, Conv2D: _conv, ConvTranspose2D: _conv, MaxPool2D: _pool, AvgPool2D: _pool,
    GlobalAvgPool2D: _global_pool, BatchNorm: _batchnorm, LayerNorm: _layernorm,
    ReLU: _simple("Relu"), Tanh: _simple("Tanh"), Sigmoid: _simple("Sigmoid"),
    Softplus: _simple("Softplus"),
    SELU: _simple("Selu", alpha=SELU.ALPHA, gamma=SELU.SCALE),
    LeakyReLU: _with("LeakyRelu", alpha="slope"), ELU: _with("Elu", alpha="alpha"),
    Softmax: _with("Softmax", axis="axis"), GELU: _gelu,
    RNN: _recurrent, LSTM: _recurrent, GRU: _recurrent, Embedding: _embedding,
    Flatten: _simple("Flatten", axis=1), Reshape: _reshape, TimeMajor: _time_major,
    LastStep: _last_step, Dropout: _simple("Identity"), Identity: _simple("Identity"),
    Sum: _sum, Concat: lambda b, layer, xs: b.node("Concat", [v.name for v in xs],
                                                   axis=layer.axis),
}
