"""Recurrent layers over time-major sequences ``(T, N, F)``, a wrapper that runs one of them in
both directions, the 2-D recurrent layer, average pooling in time, and two helpers that turn
batch-major data into what they take and back.

Initial and final states, as in PyTorch's ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` but in
gpunet's list convention for several inputs and outputs:

- ``forward(x)`` starts from zero states. ``forward([x, h0])`` starts from ``h0`` of shape
  ``(N, H)``; an LSTM also takes ``[x, h0, c0]`` (``[x, h0]`` leaves ``c0`` at zero). Given a
  list, ``backward`` returns a list of the same length: ``[dx, dh0]`` or ``[dx, dh0, dc0]``.
- The output is every hidden state, ``(T, N, H)``. With ``return_state=True`` the layer returns
  ``[y, h_T]`` (LSTM: ``[y, h_T, c_T]``), as PyTorch's ``output, h_n``, and ``backward`` takes
  ``[dy, dh_T]`` (``[dy, dh_T, dc_T]``); ``None`` in that list stands for a zero gradient.
  After every forward, ``layer.final_state`` holds ``(h_T,)`` or ``(h_T, c_T)`` either way.
- ``backward`` is full backpropagation through time: ``dy`` holds the gradient of every step.

Each layer projects the inputs of all time steps with one GEMM before its loop over time, runs
one GEMM per step for the recurrent part, and computes its weight gradients with one GEMM
each after the backward loop. The LSTM's pointwise work of a step is ``ops.lstm_cell_forward``
and ``ops.lstm_cell_backward``: fused kernels (``kernels/lstm.cu``) on ``cuda`` and
``emulated``, a compiled loop on ``cpu`` for float32 (NumPy for float64). The LSTM and GRU
multiply by ``W_h`` packed once per sequence (``ops.pack``, ``ops.gemm_packed``), and the
LSTM hands its whole step loop to ``ops.lstm_sequence_forward`` / ``lstm_sequence_backward``,
which the CPU device runs in one compiled call.

Initial weights follow PyTorch: every weight matrix uniform in ``[-1/sqrt(H), 1/sqrt(H)]``
(``H`` the hidden size). Biases and ``Recurrent2D``'s ``s0`` start at zero, as ``Dense``'s,
except the LSTM's forget-gate bias, which starts at 1 (Gers et al. 2000; Jozefowicz et al.
2015), so the cell remembers by default.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .. import rng
from ..errors import DTypeError, ShapeError
from .base import Layer, from_config

#: Activations of RNN, MultiplicativeRNN and Recurrent2D. Each backward is written from the
#: output y (for ReLU, y > 0 exactly where the input was), so only y is kept.
RECURRENT_ACTIVATIONS = ("tanh", "sigmoid", "relu")


def _uniform(shape: Sequence[int], hidden: int) -> np.ndarray:
    k = 1.0 / math.sqrt(hidden)
    return rng.generator().uniform(-k, k, size=tuple(shape))


def _check_sizes(name: str, **sizes: Any) -> None:
    for what, v in sizes.items():
        values = v if isinstance(v, (list, tuple)) else [v]
        if not values or any(not isinstance(s, (int, np.integer)) or s < 1 for s in values):
            raise ValueError(f"{name}: expected {what} to be a positive integer"
                             f"{' or a list of them' if what == 'input_size' else ''}, got {v!r}")


def _check_activation(name: str, activation: str) -> str:
    if activation not in RECURRENT_ACTIVATIONS:
        raise ValueError(f"{name}: expected activation one of {RECURRENT_ACTIVATIONS}, "
                         f"got {activation!r}")
    return activation



def _split_output_grad(layer: str, dy: Any, finals: list[str],
                       return_state: bool) -> tuple[Any, list[Any]]:
    """``(gradient of every step, [gradient of each final state])`` from a recurrent layer's
    output gradient: ``[dy, dh_T(, dc_T)]`` with ``return_state``, else ``dy`` alone (the
    final states' gradients then None, meaning zero)."""
    if not return_state:
        return dy, [None] * len(finals)
    if not isinstance(dy, (list, tuple)) or len(dy) != 1 + len(finals):
        got = f"a list of {len(dy)}" if isinstance(dy, (list, tuple)) else type(dy).__name__
        raise ShapeError(f"{layer}: expected the output gradient as a list "
                         f"[dy, {', '.join('d' + f for f in finals)}] "
                         f"(return_state=True), got {got}")
    return dy[0], list(dy[1:])

class _Recurrent(Layer):
    """What RNN, LSTM, GRU and MultiplicativeRNN share: reading the input sequences and
    initial states, returning the final state, reading the output gradient."""

    state_names: tuple[str, ...] = ("h",)
    input_sizes: list[int]
    hidden_size: int
    return_state: bool

    def _setup(self, input_size: int | Sequence[int], hidden_size: int,
               return_state: bool) -> None:
        _check_sizes(self.name, input_size=input_size, hidden_size=hidden_size)
        self.input_sizes = [int(s) for s in (input_size if isinstance(input_size, (list, tuple))
                                             else [input_size])]
        self.hidden_size, self.return_state = int(hidden_size), bool(return_state)
        self.final_state: tuple[Any, ...] = ()

    def _inputs(self, x: Any) -> tuple[list[Any], list[Any], tuple[bool, int]]:
        """``(sequences, initial states (None where not given), form)``; ``form`` tells
        ``backward`` whether to return a list, and of what length."""
        k, states = len(self.input_sizes), [f"{s}0" for s in self.state_names]
        want = (f"x, [x], or [x, {', '.join(states)}]" if k == 1 else
                f"a list of {k} input sequences, optionally followed by {', '.join(states)}")
        if len(states) == 2 and k == 1:
            want = f"x, [x], [x, {states[0]}] or [x, {', '.join(states)}]"
        if isinstance(x, (list, tuple)):
            items, multi = list(x), True
            if not k <= len(items) <= k + len(states):
                raise ShapeError(f"{self.name}: expected {want}, got a list of {len(items)}")
        elif k == 1:
            items, multi = [x], False
        else:
            raise ShapeError(f"{self.name}: expected {want}, got {type(x).__name__}")
        xs, given = items[:k], items[k:]
        steps = batch = 0
        for i, (xi, size) in enumerate(zip(xs, self.input_sizes)):
            what = "input" if k == 1 else f"input {i}"
            self.check_input(xi, what=what)
            if xi.ndim != 3 or xi.shape[2] != size:
                raise ShapeError(f"{self.name}: expected {what} of shape (T, N, {size}) "
                                 f"(time-major), got {tuple(xi.shape)}")
            if i == 0:
                steps, batch = xi.shape[:2]
                if steps == 0 or batch == 0:
                    raise ShapeError(f"{self.name}: expected at least one time step and one "
                                     f"sample, got input of shape {tuple(xi.shape)}")
            elif tuple(xi.shape[:2]) != (steps, batch):
                raise ShapeError(f"{self.name}: expected {what} of shape ({steps}, {batch}, "
                                 f"{size}) (the steps and batch of input 0), got "
                                 f"{tuple(xi.shape)}")
        for name, s in zip(states, given):
            self.check_input(s, (batch, self.hidden_size), what=f"initial state {name}")
        return xs, given + [None] * (len(states) - len(given)), (multi, len(items))

    def _output(self, y: Any, finals: tuple[Any, ...]) -> Any:
        self.final_state = finals
        return [y, *finals] if self.return_state else y

    def _output_grads(self, dy: Any, steps: int, batch: int) -> tuple[Any, list[Any]]:
        """The gradient of every step ``(T, N, H)`` and of each final state ``(N, H)``
        (zeros where not given)."""
        shape, finals = (steps, batch, self.hidden_size), [f"{s}_T" for s in self.state_names]
        seq, given = _split_output_grad(self.name, dy, finals, self.return_state)
        if seq is None:
            seq = self.ops.zeros(shape, self.dtype)
        else:
            self.check_grad(seq, shape)
        grads = []
        for name, g in zip(finals, given):
            if g is None:
                g = self.ops.zeros(shape[1:], self.dtype)
            else:
                self.check_grad(g, shape[1:], what=f"gradient of the final state {name}")
            grads.append(g)
        return seq, grads

    @staticmethod
    def _input_grads(dxs: list[Any], dstates: list[Any], form: tuple[bool, int]) -> Any:
        multi, count = form
        return (dxs + dstates)[:count] if multi else dxs[0]

    def _start(self, state: Any, steps: int, batch: int) -> Any:
        """A ``(T + 1, N, H)`` buffer of states whose entry 0 is the initial state."""
        hs = self.ops.empty((steps + 1, batch, self.hidden_size), self.dtype)
        hs[0] = 0 if state is None else state
        return hs


class RNN(_Recurrent):
    """Elman recurrent layer: ``h_t = g(W_x x_t + W_h h_{t-1} + b)``.

    Input ``(T, N, I)`` (or ``[x, h0]``), output every ``h_t``, ``(T, N, H)``; parameters
    ``"W_x"`` ``(H, I)``, ``"W_h"`` ``(H, H)``, ``"b"`` ``(H,)``; ``activation`` one of
    ``"tanh"``, ``"sigmoid"``, ``"relu"``. Backward: ``dz_t = g'(z_t) (dy_t + W_h^T dz_{t+1})``,
    ``dW_x = sum_t dz_t x_t^T``, ``dW_h = sum_t dz_t h_{t-1}^T``, ``db = sum_t dz_t``.
    """

    def __init__(self, input_size: int, hidden_size: int, activation: str = "tanh",
                 return_state: bool = False) -> None:
        super().__init__()
        self._setup(input_size, hidden_size, return_state)
        self.activation = _check_activation(self.name, activation)
        h, i = self.hidden_size, self.input_sizes[0]
        self.W_x = self.add_param("W_x", _uniform((h, i), h))
        self.W_h = self.add_param("W_h", _uniform((h, h), h))
        self.b = self.add_param("b", np.zeros(h))

    def forward(self, x: Any, training: bool | None = None) -> Any:
        (x,), (h0,), form = self._inputs(x)
        steps, batch, size = x.shape
        ops, act = self.ops, getattr(self.ops, self.activation)
        x2 = x.reshape(steps * batch, size)
        z = ops.gemm(x2, self.W_x.data, trans_b=True)  # every step's input projection at once
        z += self.b.data
        z = z.reshape(steps, batch, self.hidden_size)
        hs = self._start(h0, steps, batch)
        for t in range(steps):
            zt = z[t]
            zt += ops.gemm(hs[t], self.W_h.data, trans_b=True)
            hs[t + 1] = act(zt)
        self.save_for_backward(x2, hs, form)
        return self._output(hs[1:], (hs[steps],))

    def backward(self, dy: Any) -> Any:
        x2, hs, form = self.saved()
        steps, batch = hs.shape[0] - 1, hs.shape[1]
        dy, (dh,) = self._output_grads(dy, steps, batch)
        ops, backprop = self.ops, getattr(self.ops, f"backprop_{self.activation}")
        dz = ops.empty((steps, batch, self.hidden_size), self.dtype)
        for t in reversed(range(steps)):
            dz[t] = backprop(dy[t] + dh, hs[t + 1])
            dh = ops.gemm(dz[t], self.W_h.data)
        dz2 = dz.reshape(steps * batch, self.hidden_size)
        ops.gemm_acc(self.W_x.grad, dz2, x2, trans_a=True)
        ops.gemm_acc(self.W_h.grad, dz2, hs[:steps].reshape(steps * batch, -1), trans_a=True)
        self.b.grad += ops.sum(dz2, axis=0)
        dx = ops.gemm(dz2, self.W_x.data).reshape(steps, batch, -1) if self.input_grad else None
        return self._input_grads([dx], [dh], form)


class LSTM(_Recurrent):
    """Long short-term memory, gates in PyTorch's order i, f, g, o:
    ``[i, f, g, o] = W_x x_t + W_h h_{t-1} + b``; ``i, f, o`` through the sigmoid, ``g``
    through tanh; ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``.

    Input ``(T, N, I)`` (or ``[x, h0]``, ``[x, h0, c0]``), output every ``h_t``,
    ``(T, N, H)``; parameters ``"W_x"`` ``(4H, I)``, ``"W_h"`` ``(4H, H)``, ``"b"`` ``(4H,)``
    (one bias: PyTorch's ``b_ih + b_hh``). ``return_state=True`` returns
    ``[outputs, h_T, c_T]``. Time-major, as PyTorch's default; ``LastStep()`` keeps
    ``h_T`` for a classifier.

    >>> import numpy as np
    >>> lstm = LSTM(input_size=5, hidden_size=16)
    >>> h = lstm(np.zeros((10, 4, 5), np.float32))  # 10 steps, batch 4
    >>> h.shape
    (10, 4, 16)
    >>> lstm.backward(np.ones_like(h)).shape        # dx; adds into W_x, W_h, b grads
    (10, 4, 5)

    Implementation. One GEMM projects the inputs of all steps; then
    ``ops.lstm_sequence_forward`` runs the steps, each one GEMM and the cell
    (``ops.lstm_cell_forward``, a fused kernel on CUDA); ``ops.lstm_sequence_backward`` runs
    the cell's backward and one GEMM per step; then one GEMM per weight gradient. The step
    GEMMs take ``W_h`` packed once per sequence (``ops.pack``); the CPU device runs each whole
    loop in one compiled call. Buffers are allocated once per sequence; steps read and write
    views of them.
    """

    state_names = ("h", "c")

    def __init__(self, input_size: int, hidden_size: int, return_state: bool = False) -> None:
        super().__init__()
        self._setup(input_size, hidden_size, return_state)
        h, i = self.hidden_size, self.input_sizes[0]
        self.W_x = self.add_param("W_x", _uniform((4 * h, i), h))
        self.W_h = self.add_param("W_h", _uniform((4 * h, h), h))
        bias = np.zeros(4 * h)
        bias[h:2 * h] = 1.0  # forget gate open at the start
        self.b = self.add_param("b", bias)

    def forward(self, x: Any, training: bool | None = None) -> Any:
        (x,), (h0, c0), form = self._inputs(x)
        steps, batch, size = x.shape
        ops, h = self.ops, self.hidden_size
        x2 = x.reshape(steps * batch, size)
        xg = ops.gemm(x2, self.W_x.data, trans_b=True)  # every step's input projection at once
        xg += self.b.data
        xg = xg.reshape(steps, batch, 4 * h)
        acts = ops.empty((steps, batch, 4 * h), self.dtype)  # i, f, g, o after activation
        hs, cs = self._start(h0, steps, batch), self._start(c0, steps, batch)
        # every step: hg = h_{t-1} W_h^T, then the cell (acts, c_t, h_t)
        ops.lstm_sequence_forward(xg, ops.pack(self.W_h.data.T), hs, cs, acts)
        self.save_for_backward(x2, hs, cs, acts, form)
        return self._output(hs[1:], (hs[steps], cs[steps]))

    def backward(self, dy: Any) -> Any:
        x2, hs, cs, acts, form = self.saved()
        steps, batch, h = hs.shape[0] - 1, hs.shape[1], self.hidden_size
        dy, (dh, dc) = self._output_grads(dy, steps, batch)
        ops = self.ops
        dz = ops.empty((steps, batch, 4 * h), self.dtype)  # gate pre-activation gradients
        # from the last step: the cell's backward into dz_t, then dh_{t-1} = dz_t W_h
        dh, dc = ops.lstm_sequence_backward(dy, dh, dc, acts, cs, ops.pack(self.W_h.data), dz)
        dz2 = dz.reshape(steps * batch, 4 * h)
        ops.gemm_acc(self.W_x.grad, dz2, x2, trans_a=True)
        ops.gemm_acc(self.W_h.grad, dz2, hs[:steps].reshape(steps * batch, h), trans_a=True)
        self.b.grad += ops.sum(dz2, axis=0)
        dx = ops.gemm(dz2, self.W_x.data).reshape(steps, batch, -1) if self.input_grad else None
        return self._input_grads([dx], [dh, dc], form)


class GRU(_Recurrent):
    """Gated recurrent unit (Cho et al. 2014) as in PyTorch, gates in the order r, z, n:
    ``r = sigmoid(W_xr x + b_xr + W_hr h + b_hr)``, ``z`` likewise,
    ``n = tanh(W_xn x + b_xn + r (W_hn h + b_hn))``, ``h' = (1 - z) n + z h``.

    Input ``(T, N, I)`` (or ``[x, h0]``), output every ``h_t``, ``(T, N, H)``; parameters
    ``"W_x"`` ``(3H, I)``, ``"W_h"`` ``(3H, H)``, ``"b_x"`` ``(3H,)``, ``"b_h"`` ``(3H,)``.
    Backward, with ``dh`` the gradient reaching ``h'``: ``dn = dh (1 - z) (1 - n^2)``,
    ``dz = dh (h - n) z (1 - z)``, ``dr = dn (W_hn h + b_hn) r (1 - r)``; the input side gets
    ``[dr, dz, dn]``, the recurrent side ``[dr, dz, r dn]``, and ``dh_prev = z dh + W_h^T``
    of the latter.
    """

    def __init__(self, input_size: int, hidden_size: int, return_state: bool = False) -> None:
        super().__init__()
        self._setup(input_size, hidden_size, return_state)
        h, i = self.hidden_size, self.input_sizes[0]
        self.W_x = self.add_param("W_x", _uniform((3 * h, i), h))
        self.W_h = self.add_param("W_h", _uniform((3 * h, h), h))
        self.b_x = self.add_param("b_x", np.zeros(3 * h))
        self.b_h = self.add_param("b_h", np.zeros(3 * h))

    def forward(self, x: Any, training: bool | None = None) -> Any:
        (x,), (h0,), form = self._inputs(x)
        steps, batch, size = x.shape
        ops, h = self.ops, self.hidden_size
        x2 = x.reshape(steps * batch, size)
        xg = ops.gemm(x2, self.W_x.data, trans_b=True)
        xg += self.b_x.data
        xg = xg.reshape(steps, batch, 3 * h)
        acts = ops.empty((steps, batch, 3 * h), self.dtype)  # r, z, n
        hn = ops.empty((steps, batch, h), self.dtype)  # W_hn h + b_hn, which dr needs
        hs = self._start(h0, steps, batch)
        w_h = ops.pack(self.W_h.data.T)  # W_h^T laid out once for all the step GEMMs
        for t in range(steps):
            hg = ops.gemm_packed(hs[t], w_h)
            hg += self.b_h.data
            acts[t, :, :2 * h] = ops.sigmoid(xg[t, :, :2 * h] + hg[:, :2 * h])
            r, z = acts[t, :, :h], acts[t, :, h:2 * h]
            hn[t] = hg[:, 2 * h:]
            n = acts[t, :, 2 * h:]
            n[...] = ops.tanh(xg[t, :, 2 * h:] + r * hn[t])
            hs[t + 1] = n + z * (hs[t] - n)
        self.save_for_backward(x2, hs, acts, hn, form)
        return self._output(hs[1:], (hs[steps],))

    def backward(self, dy: Any) -> Any:
        x2, hs, acts, hn, form = self.saved()
        steps, batch, h = hs.shape[0] - 1, hs.shape[1], self.hidden_size
        dy, (dh,) = self._output_grads(dy, steps, batch)
        ops = self.ops
        dxg = ops.empty((steps, batch, 3 * h), self.dtype)  # input-side pre-activations
        dhg = ops.empty((steps, batch, 3 * h), self.dtype)  # recurrent-side pre-activations
        w_h = ops.pack(self.W_h.data)
        for t in reversed(range(steps)):
            r, z, n = acts[t, :, :h], acts[t, :, h:2 * h], acts[t, :, 2 * h:]
            g = dy[t] + dh
            dn = g * (1 - z) * (1 - n * n)
            dxg[t, :, :h] = dn * hn[t] * r * (1 - r)
            dxg[t, :, h:2 * h] = g * (hs[t] - n) * z * (1 - z)
            dxg[t, :, 2 * h:] = dn
            dhg[t, :, :2 * h] = dxg[t, :, :2 * h]
            dhg[t, :, 2 * h:] = dn * r
            dh = g * z + ops.gemm_packed(dhg[t], w_h)
        dxg2, dhg2 = dxg.reshape(steps * batch, 3 * h), dhg.reshape(steps * batch, 3 * h)
        ops.gemm_acc(self.W_x.grad, dxg2, x2, trans_a=True)
        ops.gemm_acc(self.W_h.grad, dhg2, hs[:steps].reshape(steps * batch, h), trans_a=True)
        self.b_x.grad += ops.sum(dxg2, axis=0)
        self.b_h.grad += ops.sum(dhg2, axis=0)
        dx = ops.gemm(dxg2, self.W_x.data).reshape(steps, batch, -1) if self.input_grad else None
        return self._input_grads([dx], [dh], form)


class MultiplicativeRNN(_Recurrent):
    """Multiplicative RNN (Sutskever, Martens and Hinton 2011): the input picks the
    recurrent weights through factors.
    ``f_t = (W_fx x_t) * (W_fh h_{t-1})``, ``z_t = W_x x_t + W_hf f_t + b``, ``h_t = g(z_t)``.

    Parameters ``"W_fx"`` ``(F, I)``, ``"W_fh"`` ``(F, H)``, ``"W_x"`` ``(H, I)``,
    ``"W_hf"`` ``(H, F)``, ``"b"`` ``(H,)``, with ``F = factors`` or ``H``. With several
    input sequences (``input_size`` a list ``[I_0, I_1, ...]``) the layer takes the list
    ``[x_0, x_1, ...]`` (all ``(T, N, I_k)``; ``h0`` may follow), each input has its own
    ``"W_fx.k"`` and ``"W_x.k"``, and ``f_t = (sum_k W_fx.k x_k,t) * (W_fh h_{t-1})``,
    ``z_t = sum_k W_x.k x_k,t + W_hf f_t + b``.
    """

    def __init__(self, input_size: int | Sequence[int], hidden_size: int,
                 factors: int | None = None, activation: str = "tanh",
                 return_state: bool = False) -> None:
        super().__init__()
        self._setup(input_size, hidden_size, return_state)
        if factors is not None:
            _check_sizes(self.name, factors=factors)
        self.activation = _check_activation(self.name, activation)
        h = self.hidden_size
        self.factors = f = int(factors) if factors is not None else h
        suffixes = ([""] if not isinstance(input_size, (list, tuple))
                    else [f".{k}" for k in range(len(self.input_sizes))])
        self.W_fx = [self.add_param(f"W_fx{s}", _uniform((f, i), h))
                     for s, i in zip(suffixes, self.input_sizes)]
        self.W_fh = self.add_param("W_fh", _uniform((f, h), h))
        self.W_x = [self.add_param(f"W_x{s}", _uniform((h, i), h))
                    for s, i in zip(suffixes, self.input_sizes)]
        self.W_hf = self.add_param("W_hf", _uniform((h, f), h))
        self.b = self.add_param("b", np.zeros(h))

    def forward(self, x: Any, training: bool | None = None) -> Any:
        xs, (h0,), form = self._inputs(x)
        steps, batch = xs[0].shape[:2]
        ops, act, h, f = self.ops, getattr(self.ops, self.activation), self.hidden_size, self.factors
        x2s = [xi.reshape(steps * batch, -1) for xi in xs]
        fx = sum(ops.gemm(xi, w.data, trans_b=True) for xi, w in zip(x2s, self.W_fx))
        zx = sum(ops.gemm(xi, w.data, trans_b=True) for xi, w in zip(x2s, self.W_x))
        zx += self.b.data
        fx, zx = fx.reshape(steps, batch, f), zx.reshape(steps, batch, h)
        fh = ops.empty((steps, batch, f), self.dtype)  # W_fh h_{t-1}
        fs = ops.empty((steps, batch, f), self.dtype)  # the factors f_t
        hs = self._start(h0, steps, batch)
        for t in range(steps):
            fh[t] = ops.gemm(hs[t], self.W_fh.data, trans_b=True)
            fs[t] = fx[t] * fh[t]
            zt = zx[t]
            zt += ops.gemm(fs[t], self.W_hf.data, trans_b=True)
            hs[t + 1] = act(zt)
        self.save_for_backward(x2s, hs, fx, fh, fs, form)
        return self._output(hs[1:], (hs[steps],))

    def backward(self, dy: Any) -> Any:
        x2s, hs, fx, fh, fs, form = self.saved()
        steps, batch, h, f = hs.shape[0] - 1, hs.shape[1], self.hidden_size, self.factors
        dy, (dh,) = self._output_grads(dy, steps, batch)
        ops, backprop = self.ops, getattr(self.ops, f"backprop_{self.activation}")
        dz = ops.empty((steps, batch, h), self.dtype)
        dfx = ops.empty((steps, batch, f), self.dtype)  # gradient of sum_k W_fx.k x_k,t
        dfh = ops.empty((steps, batch, f), self.dtype)  # gradient of W_fh h_{t-1}
        for t in reversed(range(steps)):
            dz[t] = backprop(dy[t] + dh, hs[t + 1])
            df = ops.gemm(dz[t], self.W_hf.data)
            dfx[t] = df * fh[t]
            dfh[t] = df * fx[t]
            dh = ops.gemm(dfh[t], self.W_fh.data)
        n = steps * batch
        dz2, dfx2, dfh2 = dz.reshape(n, h), dfx.reshape(n, f), dfh.reshape(n, f)
        ops.gemm_acc(self.W_hf.grad, dz2, fs.reshape(n, f), trans_a=True)
        ops.gemm_acc(self.W_fh.grad, dfh2, hs[:steps].reshape(n, h), trans_a=True)
        self.b.grad += ops.sum(dz2, axis=0)
        dxs = []
        for x2, w_fx, w_x in zip(x2s, self.W_fx, self.W_x):
            ops.gemm_acc(w_x.grad, dz2, x2, trans_a=True)
            ops.gemm_acc(w_fx.grad, dfx2, x2, trans_a=True)
            dx = ops.gemm(dz2, w_x.data)
            dx += ops.gemm(dfx2, w_fx.data)
            dxs.append(dx.reshape(steps, batch, -1))
        return self._input_grads(dxs, [dh], form)


class Recurrent2D(Layer):
    """A recurrent layer over a 2-D grid: input ``(N, I, T, U)``, output ``(N, H, T, U)``,
    ``S(t, u) = g(W_in X(t, u) + W_t S(t-1, u) + W_u S(t, u-1) + b)``.

    The learnable initial state ``s0`` stands in for ``S`` wherever ``t - 1`` or ``u - 1``
    falls off the grid (so it is the layer's initial state; the final state is
    ``y[:, :, -1, -1]``). Parameters ``"W_in"`` ``(H, I)``, ``"W_t"`` ``(H, H)``, ``"W_u"``
    ``(H, H)``, ``"b"`` ``(H,)``, ``"s0"`` ``(H,)``.

    Cells on one anti-diagonal (``t + u = d``) do not depend on each other, so forward runs
    diagonal by diagonal, each as one batch of GEMMs, and backward (the error at ``(t, u)``
    collects from ``(t+1, u)`` and ``(t, u+1)``) runs the diagonals in reverse. States are kept
    skewed, ``q[d + 1, t + 1] = S(t, d - t)`` and ``s0`` everywhere off the grid, so the
    neighbours of a diagonal are two contiguous slices of the one before.
    """

    def __init__(self, input_size: int, hidden_size: int, activation: str = "tanh") -> None:
        super().__init__()
        _check_sizes(self.name, input_size=input_size, hidden_size=hidden_size)
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.activation = _check_activation(self.name, activation)
        h, i = self.hidden_size, self.input_size
        self.W_in = self.add_param("W_in", _uniform((h, i), h))
        self.W_t = self.add_param("W_t", _uniform((h, h), h))
        self.W_u = self.add_param("W_u", _uniform((h, h), h))
        self.b = self.add_param("b", np.zeros(h))
        self.s0 = self.add_param("s0", np.zeros(h))

    @staticmethod
    def _diagonal(d: int, steps: int, width: int) -> tuple[int, int]:
        """First and last ``t`` of the cells ``(t, d - t)`` on the grid."""
        return max(0, d - width + 1), min(steps - 1, d)

    def _cells(self, steps: int, width: int) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
        """Indices into the skewed buffers ``(T + U, T + 1)``: of cell ``(t, u)``, at
        ``[t + u + 1, t + 1]``, as ``(T, U)`` arrays; and of every position off the grid."""
        t, u = np.meshgrid(np.arange(steps), np.arange(width), indexing="ij")
        off = np.ones((steps + width, steps + 1), bool)
        off[t + u + 1, t + 1] = False
        return (tuple(self.ops.asarray(i) for i in (t + u + 1, t + 1)),  # type: ignore
                tuple(self.ops.asarray(i) for i in np.nonzero(off)))

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        if x.ndim != 4 or x.shape[1] != self.input_size:
            raise ShapeError(f"{self.name}: expected input of shape (N, {self.input_size}, T, U), "
                             f"got {tuple(x.shape)}")
        batch, _, steps, width = x.shape
        if 0 in x.shape:
            raise ShapeError(f"{self.name}: expected a non-empty grid and batch, got input of "
                             f"shape {tuple(x.shape)}")
        ops, act, h = self.ops, getattr(self.ops, self.activation), self.hidden_size
        x2 = x.transpose(2, 3, 0, 1).reshape(steps * width * batch, self.input_size)
        xin = ops.gemm(x2, self.W_in.data, trans_b=True)  # every cell's input projection
        xin += self.b.data
        xin = xin.reshape(steps * width, batch, h)
        diagonals = steps + width - 1
        q = ops.empty((diagonals + 1, steps + 1, batch, h), self.dtype)
        q[...] = self.s0.data
        for d in range(diagonals):
            lo, hi = self._diagonal(d, steps, width)
            k = hi - lo + 1
            # cell (t, d - t) is row t (width - 1) + d of xin: one strided slice per diagonal
            pre = xin[lo * (width - 1) + d:hi * (width - 1) + d + 1:max(width - 1, 1)]
            pre = pre + (ops.gemm(q[d, lo:hi + 1].reshape(k * batch, h), self.W_t.data,
                                  trans_b=True)  # S(t - 1, u)
                         + ops.gemm(q[d, lo + 1:hi + 2].reshape(k * batch, h), self.W_u.data,
                                    trans_b=True)).reshape(k, batch, h)  # S(t, u - 1)
            q[d + 1, lo + 1:hi + 2] = act(pre)
        cells, off = self._cells(steps, width)
        self.save_for_backward(x2, q, cells, off, (batch, steps, width))
        y = q[cells].transpose(2, 3, 0, 1).copy()  # (T, U, N, H) -> (N, H, T, U)
        self.final_state = (y[:, :, -1, -1],)
        return y

    def backward(self, dy: Any) -> Any:
        x2, q, cells, off, (batch, steps, width) = self.saved()
        ops, h = self.ops, self.hidden_size
        self.check_grad(dy, (batch, h, steps, width))
        backprop = getattr(ops, f"backprop_{self.activation}")
        dq = ops.zeros(q.shape, self.dtype)  # gradient reaching each state (and s0 off-grid)
        dq[cells] = dy.transpose(2, 3, 0, 1)
        dpre = ops.zeros(q.shape, self.dtype)  # pre-activation gradients, zero off the grid
        for d in reversed(range(steps + width - 1)):
            lo, hi = self._diagonal(d, steps, width)
            k = hi - lo + 1
            g = backprop(dq[d + 1, lo + 1:hi + 2], q[d + 1, lo + 1:hi + 2])
            dpre[d + 1, lo + 1:hi + 2] = g
            g2 = g.reshape(k * batch, h)
            dq[d, lo:hi + 1] += ops.gemm(g2, self.W_t.data).reshape(k, batch, h)
            dq[d, lo + 1:hi + 2] += ops.gemm(g2, self.W_u.data).reshape(k, batch, h)
        # weight gradients, one GEMM each: cell [d + 1, t + 1] read q[d, t] and q[d, t + 1]
        p2 = dpre[1:, 1:].reshape(-1, h)
        ops.gemm_acc(self.W_t.grad, p2, q[:-1, :-1].reshape(-1, h), trans_a=True)
        ops.gemm_acc(self.W_u.grad, p2, q[:-1, 1:].reshape(-1, h), trans_a=True)
        self.s0.grad += ops.sum(dq[off], axis=(0, 1))  # s0 stood at every off-grid position
        dxin = dpre[cells].reshape(steps * width * batch, h)
        self.b.grad += ops.sum(dxin, axis=0)
        ops.gemm_acc(self.W_in.grad, dxin, x2, trans_a=True)
        dx = ops.gemm(dxin, self.W_in.data).reshape(steps, width, batch, self.input_size)
        return dx.transpose(2, 3, 0, 1).copy()


class AvgPoolTime(Layer):
    """Average pooling along time (axis 0 of ``(T, N, F)``, or of any ``(T, ...)``):
    ``y[s] = (1/window) sum_{i=-(window-1)/2}^{(window-1)/2} x[stride s + i]``, terms outside
    the sequence counting as zero; ``T_out = floor((T - 1) / stride) + 1``. ``window`` is odd
    (the window is centred on ``stride s``). Backward spreads each ``dy[s] / window`` over the
    steps of its window."""

    def __init__(self, window: int = 3, stride: int = 2) -> None:
        super().__init__()
        if not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0 \
                or not isinstance(stride, (int, np.integer)) or stride < 1:
            raise ValueError(f"AvgPoolTime: expected an odd window >= 1 and a stride >= 1, "
                             f"got window={window!r} and stride={stride!r}")
        self.window, self.stride = int(window), int(stride)

    def _taps(self, steps: int) -> tuple[int, list[slice]]:
        """Output length and, per tap j of the window, the slice of the zero-padded input
        (``window // 2`` zeros before and after) that tap reads for every output step."""
        out = (steps - 1) // self.stride + 1
        return out, [slice(j, j + self.stride * (out - 1) + 1, self.stride)
                     for j in range(self.window)]

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        if x.ndim < 2 or x.shape[0] == 0:
            raise ShapeError(f"{self.name}: expected a sequence of shape (T, N, ...) with T >= 1, "
                             f"got {tuple(x.shape)}")
        steps, r = x.shape[0], self.window // 2
        out, taps = self._taps(steps)
        padded = self.ops.zeros((steps + 2 * r, *x.shape[1:]), x.dtype)
        padded[r:r + steps] = x
        y = self.ops.zeros((out, *x.shape[1:]), x.dtype)
        for tap in taps:
            y += padded[tap]
        y *= 1.0 / self.window
        self.save_for_backward(x.shape, x.dtype)
        return y

    def backward(self, dy: Any) -> Any:
        shape, dtype = self.saved()
        steps, r = shape[0], self.window // 2
        out, taps = self._taps(steps)
        self.check_grad(dy, (out, *shape[1:]))
        padded = self.ops.zeros((steps + 2 * r, *shape[1:]), dtype)
        share = dy * (1.0 / self.window)
        for tap in taps:
            padded[tap] += share
        return padded[r:r + steps]


class LastStep(Layer):
    """The last time step of a sequence: ``(T, N, ...) -> (N, ...)``, ``y = x[T - 1]``; the
    gradient goes to that step, zero to the others. For a classifier or regressor on top of a
    recurrent layer."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        if x.ndim < 2 or x.shape[0] == 0:
            raise ShapeError(f"{self.name}: expected a sequence of shape (T, N, ...) with T >= 1, "
                             f"got {tuple(x.shape)}")
        self.save_for_backward(x.shape, x.dtype)
        return x[-1]

    def backward(self, dy: Any) -> Any:
        shape, dtype = self.saved()
        self.check_grad(dy, shape[1:])
        dx = self.ops.zeros(shape, dtype)
        dx[-1] = dy
        return dx


class TimeMajor(Layer):
    """Swap the first two axes: batch-major ``(N, T, ...)`` (how datasets store sequences,
    samples on axis 0) to time-major ``(T, N, ...)`` (what the recurrent layers take), or
    back. The output is a contiguous copy; the gradient is swapped back."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x)
        if x.ndim < 2:
            raise ShapeError(f"{self.name}: expected input of shape (N, T, ...) with at least "
                             f"2 axes, got {tuple(x.shape)}")
        self.save_for_backward(x.shape)
        return x.swapaxes(0, 1).copy()

    def backward(self, dy: Any) -> Any:
        (shape,) = self.saved()
        self.check_grad(dy, (shape[1], shape[0], *shape[2:]))
        return dy.swapaxes(0, 1).copy()


class Bidirectional(Layer):
    """A recurrent layer run in both directions, as PyTorch's ``bidirectional=True``: the given
    ``RNN``, ``LSTM`` or ``GRU`` reads the sequence forward in time, a second layer of the same
    configuration (its own weights, drawn from gpunet's seeded stream) reads it backward:
    ``y_fwd = layer(x)``, ``y_bwd = reverse(layer_bwd(reverse(x)))`` (reversed in time), and
    ``y = [y_fwd, y_bwd]`` along the features (``merge="concat"``, forward first, as PyTorch's
    output) or ``y = y_fwd + y_bwd`` (``merge="sum"``).

    Shapes: x ``(T, N, I)``, y ``(T, N, 2H)`` (concat) or ``(T, N, H)`` (sum). Parameters are
    the two layers' under ``"forward."`` and ``"backward."``, e.g. ``"forward.W_x"`` and
    ``"backward.W_x"`` (PyTorch's ``weight_ih_l0`` and ``weight_ih_l0_reverse``). Initial and
    final states take PyTorch's layout, one row per direction, forward first:
    ``forward([x, h0])`` (LSTM: ``[x, h0, c0]``) with ``h0`` of shape ``(2, N, H)``, and with
    ``return_state=True`` on the given layer the output is ``[y, h_n]`` (``[y, h_n, c_n]``),
    ``h_n`` of shape ``(2, N, H)``; ``backward`` takes and returns lists as the wrapped layer
    does. ``final_state`` holds ``(h_n,)`` or ``(h_n, c_n)`` after every forward. Backward
    runs each direction's backpropagation through time on its part of ``dy`` (reversed for
    the backward direction) and adds the two input gradients, the backward one reversed back.
    As a container's layers, the given layer moves to the wrapper's device and dtype (the
    CPU, float32, until ``to`` moves both directions).

    Example::

        bi = Bidirectional(LSTM(16, 32))  # (T, N, 16) -> (T, N, 64)
    """

    MERGES = ("concat", "sum")

    def __init__(self, layer: Layer, merge: str = "concat") -> None:
        super().__init__()
        if not isinstance(layer, (RNN, LSTM, GRU)):
            raise TypeError(f"Bidirectional: expected an RNN, LSTM or GRU layer, "
                            f"got {type(layer).__name__}")
        if merge not in self.MERGES:
            raise ValueError(f"Bidirectional: expected merge one of {self.MERGES}, got {merge!r}")
        self.merge = merge
        self.input_size, self.hidden_size = layer.input_sizes[0], layer.hidden_size
        self.state_names, self.return_state = layer.state_names, layer.return_state
        self.forward_layer = layer.to(self.ops, self.dtype)
        # rebuilt from its description: the same configuration, fresh weights
        self.backward_layer = from_config(layer.config()).to(self.ops, self.dtype)
        self.set_input_grad(layer.input_grad)
        self.final_state: tuple[Any, ...] = ()

    def children(self) -> dict[str, Layer]:
        return {"forward": self.forward_layer, "backward": self.backward_layer}

    def set_input_grad(self, needed: bool) -> "Bidirectional":
        for layer in (self.forward_layer, self.backward_layer):
            layer.set_input_grad(needed)
        return super().set_input_grad(needed)

    def forget(self) -> None:
        for layer in (self, self.forward_layer, self.backward_layer):
            Layer.forget(layer)

    def _inputs(self, x: Any) -> tuple[Any, list[Any], bool]:
        """``(x, initial states given, whether a list was given)``, checked."""
        states = [f"{s}0" for s in self.state_names]
        if isinstance(x, (list, tuple)):
            items, multi = list(x), True
            if not 1 <= len(items) <= 1 + len(states):
                raise ShapeError(f"{self.name}: expected x, [x] or [x, {', '.join(states)}] "
                                 f"(leading states optional), got a list of {len(items)}")
        else:
            items, multi = [x], False
        seq = items[0]
        self.check_input(seq)
        if seq.ndim != 3 or seq.shape[2] != self.input_size or 0 in seq.shape[:2]:
            raise ShapeError(f"{self.name}: expected input of shape (T, N, {self.input_size}) "
                             f"(time-major, T and N at least 1), got {tuple(seq.shape)}")
        if seq.dtype != self.dtype:
            raise DTypeError(f"{self.name}: expected input of dtype {self.dtype}, "
                             f"got {seq.dtype}")
        for name, s in zip(states, items[1:]):
            self.check_input(s, (2, seq.shape[1], self.hidden_size),
                             what=f"initial state {name} (forward direction first)")
        return seq, items[1:], multi

    def forward(self, x: Any, training: bool | None = None) -> Any:
        seq, states, multi = self._inputs(x)
        reverse = seq[::-1]
        out_f = self.forward_layer.forward([seq, *(s[0] for s in states)] if multi else seq,
                                           training)
        out_b = self.backward_layer.forward([reverse, *(s[1] for s in states)] if multi
                                            else reverse, training)
        y_f, y_b = (out_f[0], out_b[0]) if self.return_state else (out_f, out_b)
        y_b = y_b[::-1]  # back in forward time
        y = self.ops.concat([y_f, y_b], 2) if self.merge == "concat" else y_f + y_b
        self.final_state = tuple(  # (2, N, H): PyTorch's h_n of one bidirectional layer
            self.ops.concat([f[None], b[None]], 0)
            for f, b in zip(self.forward_layer.final_state, self.backward_layer.final_state))
        self.save_for_backward(tuple(seq.shape), multi)
        return [y, *self.final_state] if self.return_state else y

    def backward(self, dy: Any) -> Any:
        (steps, batch, _), multi = self.saved()
        h, finals = self.hidden_size, [f"{s}_T" for s in self.state_names]
        seq, given = _split_output_grad(self.name, dy, finals, self.return_state)
        width = 2 * h if self.merge == "concat" else h
        if seq is not None or not self.return_state:  # None: a zero gradient
            self.check_grad(seq, (steps, batch, width))
        for name, g in zip(finals, given):
            if g is not None:
                self.check_grad(g, (2, batch, h), what=f"gradient of the final state {name}")
        if seq is None:
            dy_f = dy_b = None
        elif self.merge == "concat":
            dy_f, dy_b = seq[:, :, :h], seq[:, :, h:][::-1]
        else:  # the sum passes dy to both
            dy_f, dy_b = seq, seq[::-1]
        if self.return_state:
            dy_f = [dy_f, *(None if g is None else g[0] for g in given)]
            dy_b = [dy_b, *(None if g is None else g[1] for g in given)]
        grads_f = self.forward_layer.backward(dy_f)
        grads_b = self.backward_layer.backward(dy_b)
        if not multi:
            return None if grads_f is None else grads_f + grads_b[::-1]
        dx = None if grads_f[0] is None else grads_f[0] + grads_b[0][::-1]
        return [dx, *(self.ops.concat([f[None], b[None]], 0)
                      for f, b in zip(grads_f[1:], grads_b[1:]))]
