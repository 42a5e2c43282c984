"""The device-parity suite: every registered layer on every available device, against the
float64 NumPy reference, with identical weights, inputs and output gradients.

Each entry of :data:`CASES` builds a layer and its sample input. Later layers add an entry
here and get the same coverage on ``cpu``, ``emulated`` (whose kernels run on the CPU
emulator) and ``cuda``. Tolerances are data, per dtype (:data:`TOLERANCES`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import rng
from .backends import Backend, asarray, available_devices, to_numpy
from .layers import (ELU, SELU, BatchNorm, Concat, Dense, Dropout, Flatten, Graph, LeakyReLU,
                     NonlinearityGenerator, ReLU, Sequential, Sigmoid, SigmoidGenerator,
                     Softmax, Softplus, Sum, Tanh)
from .layers import (AvgPool2D, Conv2D, GlobalAvgPool2D, MaxPool2D, Subsampling2D,
                     Upscale2D)
from .layers import (GRU, LSTM, RNN, AvgPoolTime, LastStep, MultiplicativeRNN, Recurrent2D,
                     TimeMajor)
from .layers import Bidirectional, ConvTranspose2D
from .layers import LayerNorm
from .layers import AdditiveAttention, MultiHeadAttention
from .layers import (GELU, Embedding, Identity, PositionalEncoding, PositionEmbedding,
                     Reshape)
from .layers import Gram
from .layers import Inception, ResidualBlock
from .layers import CosineSimilarity, L2Normalize
from .layers.base import Layer

#: Allowed error per dtype: an entry passes when ``|got - want| <= atol + rtol * |want|``.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"rtol": 1e-4, "atol": 1e-5},
    "float64": {"rtol": 1e-10, "atol": 1e-12},
}


@dataclass
class Case:
    """A layer to compare: ``build()`` makes it, ``inputs(generator)`` its sample input (an
    array or, for multi-input layers, a list), run in ``training`` mode or not. Float inputs
    are cast to the dtype compared; integer arrays (indices) are passed as they are."""

    build: Callable[[], Layer]
    inputs: Callable[[np.random.Generator], Any]
    training: bool = True


def away_from(x: np.ndarray, kink: float, gap: float = 0.05) -> np.ndarray:
    """Move entries within ``gap`` of a kink away from it: float32 and float64 must not land
    on different sides of a ReLU-like switch."""
    d = x - kink
    return np.where(np.abs(d) < gap, kink + np.where(d < 0, -2 * gap, 2 * gap), x)


def _normal(*shape: int, scale: float = 1.0, kink: float | None = None
            ) -> Callable[[np.random.Generator], np.ndarray]:
    def make(g: np.random.Generator) -> np.ndarray:
        x = g.normal(size=shape) * scale
        return x if kink is None else away_from(x, kink)
    return make


def _residual() -> Graph:
    g = Graph("x")
    g.add("fc", Dense(6, 6), "x")
    g.add("act", Tanh(), "fc")
    g.add("out", Sum("relu"), ["act", "x"])
    return g


class _Masked(Layer):
    """An attention layer run with a fixed ``key_padding_mask`` (``mask``: nested lists of
    bools, True = ignore), put on the layer's device at each forward: a case's layer is only
    called as ``forward(x, training)``."""

    def __init__(self, layer: Layer, mask: list[list[bool]]) -> None:
        super().__init__()
        self.layer, self.mask = layer, np.asarray(mask, dtype=bool)

    def children(self) -> dict[str, Layer]:
        return {"layer": self.layer}

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.save_for_backward()
        return self.layer.forward(x, training, key_padding_mask=self.ops.asarray(self.mask))

    def backward(self, dy: Any) -> Any:
        return self.layer.backward(dy)


CASES: dict[str, Case] = {
    "Dense": Case(lambda: Dense(6, 4), _normal(5, 6)),
    "Dense-3d": Case(lambda: Dense(6, 4, bias=False), _normal(3, 2, 6)),
    "Sigmoid": Case(Sigmoid, _normal(4, 5, scale=3)),
    "Tanh": Case(Tanh, _normal(4, 5)),
    "ReLU": Case(ReLU, _normal(4, 5, kink=0.0)),
    "LeakyReLU": Case(lambda: LeakyReLU(0.1), _normal(4, 5, kink=0.0)),
    "ELU": Case(lambda: ELU(0.7), _normal(4, 5, kink=0.0)),
    "SELU": Case(SELU, _normal(4, 5, kink=0.0)),
    "Softplus": Case(Softplus, _normal(4, 5, scale=3)),
    "Softmax": Case(Softmax, _normal(4, 5)),
    "SigmoidGenerator": Case(lambda: SigmoidGenerator(5, alpha=0.4), _normal(4, 5)),
    "SigmoidGenerator-4d": Case(lambda: SigmoidGenerator(3, alpha=0.4), _normal(2, 3, 2, 2)),
    "NonlinearityGenerator": Case(lambda: NonlinearityGenerator(5, b=-0.2),
                                  _normal(4, 5, kink=-0.2)),
    "Dropout": Case(lambda: Dropout(0.3), _normal(6, 7)),
    "Dropout-eval": Case(lambda: Dropout(0.3), _normal(6, 7), training=False),
    "Flatten": Case(Flatten, _normal(2, 3, 2, 2)),
    "Sum": Case(lambda: Sum("tanh"), lambda g: [g.normal(size=(3, 4)) for _ in range(3)]),
    "Concat": Case(Concat, lambda g: [g.normal(size=(2, 3, 2)), g.normal(size=(2, 1, 2))]),
    "BatchNorm-2d": Case(lambda: BatchNorm(37), _normal(9, 37)),
    "BatchNorm-4d": Case(lambda: BatchNorm(3), _normal(4, 3, 5, 7)),
    "BatchNorm-eval": Case(lambda: BatchNorm(3), _normal(4, 3, 2, 2), training=False),
    "Sequential": Case(lambda: Sequential([Dense(6, 8), ReLU(), Dense(8, 3)]), _normal(4, 6)),
    "Graph": Case(_residual, _normal(4, 6)),
    # convolution and pooling: strides, padding, non-square kernels, a batch of one
    "Conv2D": Case(lambda: Conv2D(2, 3, 3, padding=1), _normal(2, 2, 5, 5)),
    "Conv2D-strided": Case(lambda: Conv2D(3, 2, (3, 2), stride=(2, 1), padding=(1, 0)),
                           _normal(2, 3, 6, 5)),
    "Conv2D-batch1": Case(lambda: Conv2D(1, 2, (2, 3), stride=2, padding="valid", bias=False),
                          _normal(1, 1, 7, 6)),
    "Conv2D-same": Case(lambda: Conv2D(2, 2, 5, padding="same"), _normal(1, 2, 4, 3)),
    "MaxPool2D": Case(lambda: MaxPool2D(2), _normal(2, 3, 4, 6)),
    "MaxPool2D-overlap": Case(lambda: MaxPool2D(3, stride=2, padding=1), _normal(1, 2, 7, 6)),
    "MaxPool2D-rect": Case(lambda: MaxPool2D((2, 3), stride=(1, 2)), _normal(2, 1, 5, 7)),
    "AvgPool2D": Case(lambda: AvgPool2D(2), _normal(2, 2, 4, 5)),
    "AvgPool2D-overlap": Case(lambda: AvgPool2D((3, 2), stride=(2, 1), padding=1),
                              _normal(1, 2, 5, 6)),
    "Subsampling2D": Case(lambda: Subsampling2D(3, 2), _normal(2, 3, 4, 6)),
    "Upscale2D": Case(lambda: Upscale2D(2), _normal(2, 2, 3, 2)),
    "GlobalAvgPool2D": Case(GlobalAvgPool2D, _normal(3, 4, 3, 2)),
    # sequences (T, N, F): several steps, batch > 1; "-state" cases pass initial states
    "RNN": Case(lambda: RNN(3, 5), _normal(4, 3, 3)),
    "RNN-sigmoid-state": Case(lambda: RNN(3, 4, activation="sigmoid"),
                              lambda g: [g.normal(size=(3, 2, 3)), g.normal(size=(2, 4))]),
    "LSTM": Case(lambda: LSTM(3, 5), _normal(4, 3, 3)),
    "LSTM-state": Case(lambda: LSTM(4, 6), lambda g: [g.normal(size=(5, 45, 4)),  # 270 units:
                                                      g.normal(size=(45, 6)),  # two blocks
                                                      g.normal(size=(45, 6))]),
    "GRU": Case(lambda: GRU(3, 5), _normal(4, 3, 3)),
    "GRU-state": Case(lambda: GRU(2, 4), lambda g: [g.normal(size=(3, 2, 2)),
                                                    g.normal(size=(2, 4))]),
    "MultiplicativeRNN": Case(lambda: MultiplicativeRNN(3, 5, factors=4), _normal(4, 3, 3)),
    "MultiplicativeRNN-2": Case(lambda: MultiplicativeRNN([3, 2], 4),
                                lambda g: [g.normal(size=(4, 2, 3)), g.normal(size=(4, 2, 2)),
                                           g.normal(size=(2, 4))]),
    "Recurrent2D": Case(lambda: Recurrent2D(3, 4), _normal(2, 3, 3, 4)),
    "AvgPoolTime": Case(AvgPoolTime, _normal(7, 2, 3)),
    "AvgPoolTime-5-3": Case(lambda: AvgPoolTime(5, 3), _normal(8, 2, 3)),
    "LastStep": Case(LastStep, _normal(4, 2, 3)),
    "TimeMajor": Case(TimeMajor, _normal(2, 4, 3)),
    # transposed convolution: strides, padding, output_padding, non-square kernels, no bias
    "ConvTranspose2D": Case(lambda: ConvTranspose2D(2, 3, 3, padding=1), _normal(2, 2, 4, 4)),
    "ConvTranspose2D-strided": Case(lambda: ConvTranspose2D(3, 2, (3, 2), stride=(2, 1),
                                                            padding=(1, 0), output_padding=(1, 0)),
                                    _normal(2, 3, 3, 4)),
    "ConvTranspose2D-up2": Case(lambda: ConvTranspose2D(2, 2, 2, stride=2, bias=False),
                                _normal(1, 2, 3, 2)),
    "ConvTranspose2D-gaps": Case(lambda: ConvTranspose2D(1, 2, (2, 3), stride=3, padding=(0, 1),
                                                         output_padding=2),  # stride > kernel
                                 _normal(2, 1, 2, 3)),
    # both directions of a recurrent layer, concatenated or summed, with initial states
    "Bidirectional-RNN": Case(lambda: Bidirectional(RNN(3, 4)), _normal(4, 2, 3)),
    "Bidirectional-LSTM-sum": Case(lambda: Bidirectional(LSTM(3, 4), merge="sum"),
                                   _normal(4, 2, 3)),
    "Bidirectional-LSTM-state": Case(lambda: Bidirectional(LSTM(2, 3)),
                                     lambda g: [g.normal(size=(3, 2, 2)),
                                                g.normal(size=(2, 2, 3)),
                                                g.normal(size=(2, 2, 3))]),
    "Bidirectional-GRU": Case(lambda: Bidirectional(GRU(3, 4)), _normal(4, 2, 3)),
    "Bidirectional-GRU-sum-h0": Case(lambda: Bidirectional(GRU(2, 3), merge="sum"),
                                     lambda g: [g.normal(size=(3, 2, 2)),
                                                g.normal(size=(2, 2, 3))]),
    # layer normalisation: (N, E) over several warps' rows, (T, N, E), two trailing axes, no
    # parameters, and a row long enough for one block per row (kernel_ops.layernorm_grid)
    "LayerNorm": Case(lambda: LayerNorm(6), _normal(11, 6, scale=2)),
    "LayerNorm-3d": Case(lambda: LayerNorm(5, eps=1e-3), _normal(4, 3, 5)),
    "LayerNorm-2axes": Case(lambda: LayerNorm((3, 4)), _normal(2, 5, 3, 4)),
    "LayerNorm-noaffine": Case(lambda: LayerNorm(7, elementwise_affine=False), _normal(3, 2, 7)),
    "LayerNorm-long": Case(lambda: LayerNorm(1040), _normal(2, 1040)),
    # attention: self and cross, padding and causal masks (no query left without a key),
    # batch-first, dropout on the weights (the same host draws on every device)
    "MultiHeadAttention": Case(lambda: MultiHeadAttention(6, 2), _normal(3, 2, 6)),
    "MultiHeadAttention-cross": Case(lambda: MultiHeadAttention(6, 3, bias=False),
                                     lambda g: [g.normal(size=(3, 2, 6)),
                                                g.normal(size=(4, 2, 6)),
                                                g.normal(size=(4, 2, 6))]),
    "MultiHeadAttention-masked": Case(
        lambda: _Masked(MultiHeadAttention(4, 2), [[False, False, True, True],
                                                   [False, True, False, False]]),
        lambda g: [g.normal(size=(2, 2, 4)), g.normal(size=(4, 2, 4)),
                   g.normal(size=(4, 2, 4))]),
    "MultiHeadAttention-causal": Case(lambda: MultiHeadAttention(4, 2, causal=True),
                                      _normal(4, 2, 4)),
    "MultiHeadAttention-causal-masked": Case(
        lambda: _Masked(MultiHeadAttention(4, 1, causal=True), [[False, True, False, True],
                                                                [False, False, False, True]]),
        _normal(4, 2, 4)),
    "MultiHeadAttention-batch-first": Case(
        lambda: MultiHeadAttention(4, 2, batch_first=True), _normal(2, 3, 4)),
    "MultiHeadAttention-dropout": Case(lambda: MultiHeadAttention(4, 2, dropout=0.3),
                                       _normal(3, 2, 4)),
    "AdditiveAttention": Case(lambda: AdditiveAttention(3, 4, 5),
                              lambda g: [g.normal(size=(3, 2, 3)), g.normal(size=(4, 2, 4)),
                                         g.normal(size=(4, 2, 2))]),
    "AdditiveAttention-masked": Case(
        lambda: _Masked(AdditiveAttention(3, 4, 5), [[False, False, True, True],
                                                     [True, False, False, False]]),
        lambda g: [g.normal(size=(3, 2, 3)), g.normal(size=(4, 2, 4)),
                   g.normal(size=(4, 2, 2))]),
    # embeddings (integer inputs: indices with repeats, a padding row) and positions
    "Embedding": Case(lambda: Embedding(7, 4), lambda g: g.integers(0, 7, size=(5, 3))),
    # (padding_idx -2 is row 4, read by no index: the gradient check of every case in
    # tests/test_layers.py would see that row's zero gradient as wrong; tests/test_embedding.py
    # checks padding positions on every device)
    "Embedding-padding": Case(lambda: Embedding(6, 3, padding_idx=-2),
                              lambda g: np.array([[1, 3, 3, 0], [2, 1, 5, 3]], dtype=np.int32)),
    "PositionEmbedding": Case(lambda: PositionEmbedding(6, 4), _normal(5, 2, 4)),
    "PositionEmbedding-batch-first": Case(lambda: PositionEmbedding(5, 3, batch_first=True),
                                          _normal(2, 4, 3)),
    "PositionalEncoding": Case(lambda: PositionalEncoding(5, max_len=9), _normal(6, 2, 5)),
    "PositionalEncoding-dropout": Case(lambda: PositionalEncoding(4, dropout=0.3,
                                                                  batch_first=True),
                                       _normal(2, 5, 4)),
    "GELU": Case(GELU, _normal(4, 5, scale=2)),
    "GELU-tanh": Case(lambda: GELU("tanh"), _normal(4, 5, scale=2)),
    "Identity": Case(Identity, _normal(3, 4)),
    "Reshape": Case(lambda: Reshape((3, -1)), _normal(2, 6, 2)),
    "Gram": Case(Gram, _normal(2, 3, 4, 5)),
    # blocks: identity and strided-projection shortcuts (odd size), the four Inception branches
    "ResidualBlock": Case(lambda: ResidualBlock(3, 3), _normal(2, 3, 4, 4)),
    "ResidualBlock-projection": Case(lambda: ResidualBlock(2, 4, stride=2), _normal(2, 2, 5, 5)),
    "Inception": Case(lambda: Inception(3, 2, 2, 3, 1, 2, 2), _normal(2, 3, 5, 4)),
    # similarity: along the last axis and along a middle one; unit vectors
    "CosineSimilarity": Case(CosineSimilarity, lambda g: [g.normal(size=(5, 4)),
                                                          g.normal(size=(5, 4))]),
    "CosineSimilarity-axis1": Case(lambda: CosineSimilarity(axis=1),
                                   lambda g: [g.normal(size=(2, 3, 4)), g.normal(size=(2, 3, 4))]),
    "L2Normalize": Case(L2Normalize, _normal(4, 6)),
    "L2Normalize-axis1": Case(lambda: L2Normalize(axis=1), _normal(2, 3, 2, 2)),
}


@dataclass
class Result:
    case: str
    device: str
    dtype: str
    errors: dict[str, float] = field(default_factory=dict)  # worst error / tolerance, per array
    message: str = ""

    @property
    def ok(self) -> bool:
        return not self.message and all(e <= 1.0 for e in self.errors.values())


def _score(got: Any, want: np.ndarray, tol: dict[str, float]) -> float:
    """Worst ``|got - want| / (atol + rtol * |want|)``: at most 1 passes; inf on a shape
    mismatch or a NaN."""
    got = to_numpy(got).astype(np.float64)
    if got.shape != want.shape:
        return float("inf")
    err = np.abs(got - want) / (tol["atol"] + tol["rtol"] * np.abs(want))
    return float(np.nan_to_num(err, nan=np.inf).max(initial=0.0))


def _is_indices(a: Any) -> bool:
    """Whether a case's input is an integer array (indices, kept as they are, never cast)."""
    return isinstance(a, np.ndarray) and a.dtype.kind in "iu"


def _run(layer: Layer, xs: list[np.ndarray], multi: bool, dy: np.ndarray, training: bool,
         device: Backend, dtype: Any) -> tuple[Any, list[Any], dict[str, Any]]:
    layer.to(device, dtype)
    x = [asarray(a, device, dtype=None if _is_indices(a) else dtype) for a in xs]
    rng.seed(0)  # the same dropout draws on every device: from the host stream
    with rng.host_draws():
        y = layer.forward(x if multi else x[0], training)
    dx = layer.backward(asarray(dy, device, dtype=dtype))
    return y, (dx if multi else [dx]), {k: p.grad for k, p in layer.params().items()}


def run_case(name: str, device: Backend, dtype: Any, seed: int = 0) -> Result:
    """Compare ``CASES[name]`` on ``device`` in ``dtype`` with the float64 CPU reference."""
    case, dtype = CASES[name], np.dtype(dtype)
    result = Result(name, device.label, dtype.name)
    g = np.random.default_rng(seed)
    raw = case.inputs(g)
    multi = isinstance(raw, list)
    xs = raw if multi else [raw]
    # Inputs and weights are rounded to dtype first, so both sides start from the same numbers;
    # integer inputs (indices) stay as they are.
    xs = [a if _is_indices(a) else np.asarray(a, dtype).astype(np.float64) for a in xs]
    reference, layer = case.build(), case.build()
    for p_ref, p in zip(reference.params().values(), layer.params().values()):
        # perturbed so zero-initialised biases take part too, then rounded to dtype
        p_ref.data[...] = p.data[...] = (to_numpy(p_ref.data) + g.normal(size=p.shape) * 0.1
                                         ).astype(dtype)
    try:
        reference.to(dtype=np.float64)
        rng.seed(0)
        y_ref = reference.forward(xs if multi else xs[0], case.training)
        dy = np.asarray(g.normal(size=y_ref.shape), dtype).astype(np.float64)
        dx_ref = reference.backward(dy)
        dx_ref = dx_ref if multi else [dx_ref]
        y, dx, grads = _run(layer, xs, multi, dy, case.training, device, dtype)
    except Exception as e:  # a crash on one device is a failed row, not a stopped suite
        result.message = f"{type(e).__name__}: {e}"
        return result
    tol = TOLERANCES[dtype.name]
    result.errors["forward"] = _score(y, y_ref, tol)
    for i, (a, b) in enumerate(zip(dx, dx_ref)):
        if a is None and b is None:  # an input without a gradient (integer indices)
            continue
        result.errors["dx" if not multi else f"dx{i}"] = (
            float("inf") if a is None or b is None else _score(a, b, tol))
    for k, p in reference.params().items():
        result.errors[f"d{k}"] = _score(grads[k], p.grad, tol)
    return result


def run(devices: Sequence[Backend] | None = None,
        dtypes: Sequence[str] = ("float32", "float64"),
        cases: Sequence[str] | None = None) -> list[Result]:
    """Every case on every device in every dtype."""
    devices = list(devices) if devices is not None else available_devices()
    return [run_case(name, device, dtype)
            for name in (cases or CASES) for device in devices for dtype in dtypes]


def table(results: Sequence[Result]) -> str:
    """Results as a text table: case, device, dtype, worst error per array, verdict."""
    lines = [f"{'case':<24} {'device':<24} {'dtype':<8} {'worst':>9}  {'verdict':<7} detail"]
    for r in results:
        worst = max(r.errors.values(), default=float("inf"))
        detail = r.message or " ".join(f"{k}={v:.2g}" for k, v in r.errors.items())
        lines.append(f"{r.case:<24} {r.device:<24} {r.dtype:<8} {worst:>9.3g}  "
                     f"{'pass' if r.ok else 'FAIL':<7} {detail}")
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed "
                 f"(errors in units of the tolerance: {TOLERANCES})")
    return "\n".join(lines)
