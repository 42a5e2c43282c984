"""Attention over sequences: the Transformer's multi-head scaled dot-product attention and
Bahdanau's additive attention.

Sequences are time-major, ``(L, N, E)``: ``L`` steps of a batch of ``N`` (gpunet's and
PyTorch's default; ``MultiHeadAttention(batch_first=True)`` takes ``(N, L, E)``). Queries have
``L`` steps, keys and values ``S``.

Masks, in both layers:

- ``forward(x, training, key_padding_mask=mask)`` takes a boolean ``(N, S)`` array on the
  layer's device; ``True`` marks a key to ignore (PyTorch's meaning), such as padding.
- ``MultiHeadAttention(causal=True)`` ignores the keys after each query: key ``j`` for query
  ``i`` where ``j > i``.
- An ignored key gets exactly zero weight: its score becomes ``-inf`` before the softmax, so
  the row maximum the softmax subtracts is the maximum over the keys that count, and
  ``exp(-inf) = 0``. Its gradient is zero as well.
- A query whose every key is ignored has no weights to give: a ``ValueError`` names the batch
  entry and the query, instead of a row of NaN. Finding that reads a flag back from the
  device, so on a GPU a forward with a ``key_padding_mask`` waits for the GPU once; without a
  mask nothing is read (``causal`` alone always leaves key 0).

After every forward, ``layer.attention_weights`` holds the softmax weights.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import init as initializers
from .. import rng
from ..backends import Array, Backend, device_name, is_device_array, to_numpy
from ..errors import DTypeError, DeviceError, ShapeError
from .base import Layer
from .dense import Dense


def _uniform(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """PyTorch's ``nn.Linear`` weight init: uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``."""
    k = 1.0 / math.sqrt(fan_in)
    return rng.generator().uniform(-k, k, size=shape)


def _ignored(layer: Layer, mask: Any, causal: bool, batch: int, queries: int,
             keys: int) -> Array | None:
    """The scores to ignore, boolean, broadcastable to ``(N, L, S)``: ``(N, 1, S)`` for a
    key-padding mask, ``(L, S)`` for a causal one, ``(N, L, S)`` for both; None for neither.
    Raises unless ``mask`` is a boolean ``(N, S)`` array on the layer's device and every query
    keeps at least one key."""
    ops = layer.ops
    ignored = ops.causal_mask(queries, keys) if causal else None
    if mask is None:
        return ignored
    if not (isinstance(mask, np.ndarray) or is_device_array(mask)):
        raise DTypeError(f"{layer.name}: expected key_padding_mask to be a boolean array, "
                         f"got {type(mask).__name__}")
    if not ops.owns(mask):
        raise DeviceError(f"{layer.name}: expected key_padding_mask on device {ops.name}, "
                          f"got an array on {device_name(mask)}")
    if mask.dtype != np.bool_:
        raise DTypeError(f"{layer.name}: expected key_padding_mask of dtype bool "
                         f"(True = ignore that key), got {mask.dtype}")
    if tuple(mask.shape) != (batch, keys):
        raise ShapeError(f"{layer.name}: expected key_padding_mask of shape (N, S) = "
                         f"({batch}, {keys}), got {tuple(mask.shape)}")
    padded = mask[:, None, :]
    ignored = padded if ignored is None else padded | ignored
    empty = ignored.all(axis=-1)  # (N, L) or (N, 1): queries left without a key
    if bool(empty.any()):  # the one host read (a wait on a GPU), and only with a mask
        n, i = (int(v) for v in np.argwhere(to_numpy(empty))[0])
        if causal:
            raise ValueError(f"{layer.name}: key_padding_mask and causal=True leave query {i} "
                             f"of batch entry {n} no key to attend to (it may only see keys "
                             f"0..{min(i, keys - 1)}, all masked)")
        raise ValueError(f"{layer.name}: key_padding_mask masks every key of batch entry {n}; "
                         "each query needs at least one key to attend to")
    return ignored


def _softmax(ops: Backend, scores: Array, ignored: Array | None) -> Array:
    """Softmax over the last axis, exactly zero where ``ignored``."""
    if ignored is not None:
        scores = ops.where(ignored, scores.dtype.type(-np.inf), scores)
    return ops.softmax(scores, axis=-1)


def _time_major(layer: Layer, x: Any, size: int, what: str, steps: str,
                batch_first: bool = False) -> Any:
    """Check a sequence of ``size`` features; return it as ``(steps, N, size)`` (a view)."""
    layer.check_input(x, what=what)
    layout = f"(N, {steps}, {size})" if batch_first else f"({steps}, N, {size})"
    if x.ndim != 3 or x.shape[2] != size or 0 in x.shape:
        raise ShapeError(f"{layer.name}: expected {what} of shape {layout}, "
                         f"got {tuple(x.shape)}")
    return x.swapaxes(0, 1) if batch_first else x


class MultiHeadAttention(Layer):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017), as PyTorch's
    ``nn.MultiheadAttention``.

    With ``H = num_heads`` heads of ``d = embed_dim / H`` features and ``E = embed_dim``::

        q, k, v = query W_q^T + b_q,  key W_k^T + b_k,  value W_v^T + b_v      (L|S, N, E)
        weights = softmax(q_h k_h^T / sqrt(d))  over the keys, per head h      (N, H, L, S)
        y = concat_h(dropout(weights) v_h) W_o^T + b_o                          (L, N, E)

    ``W_q, W_k, W_v`` are the row blocks of ``in_proj_weight (3E, E)``, ``b_q, b_k, b_v`` of
    ``in_proj_bias (3E,)``; ``W_o, b_o`` are ``out_proj.weight (E, E)`` and
    ``out_proj.bias (E,)`` (a :class:`Dense` child), so a PyTorch state dict copies over name
    for name. Initialised as PyTorch: ``in_proj_weight`` Glorot-uniform, ``out_proj.weight``
    uniform in ``[-1/sqrt(E), 1/sqrt(E)]``, biases zero. ``bias=False`` drops both biases.

    ``forward(x)`` is self-attention (query, key and value are ``x``, ``(L, N, E)``);
    ``forward([query, key, value])`` attends from ``query (L, N, E)`` to ``key`` and
    ``value (S, N, E)``, and ``backward`` then returns ``[dquery, dkey, dvalue]``, three
    separate arrays (passing one array three times, add them up). ``batch_first=True``:
    every sequence and the output are ``(N, L, E)``. ``dropout`` zeroes attention weights
    in training (gpunet's seeded stream). Masks: see :mod:`gpunet.layers.attention`;
    ``causal=True`` ignores key ``j > i`` for query ``i``. ``attention_weights`` holds the
    ``(N, H, L, S)`` softmax after each forward (before dropout; not averaged over heads).
    Use::

        mha = MultiHeadAttention(16, num_heads=4, causal=True)
        y = mha.forward(x)                        # x (L, N, 16) -> y (L, N, 16)
        y = mha.forward(x, key_padding_mask=pad)  # pad (N, L) bool, True = padding
    """

    _uncopied = ("attention_weights",)

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, causal: bool = False) -> None:
        super().__init__()
        for what, v in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"MultiHeadAttention: expected {what} to be a positive "
                                 f"integer, got {v!r}")
        if embed_dim % num_heads:
            raise ValueError(f"MultiHeadAttention: expected embed_dim divisible by num_heads, "
                             f"got embed_dim={embed_dim} and num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiHeadAttention: expected dropout in [0, 1), got {dropout}")
        e = self.embed_dim = int(embed_dim)
        self.num_heads, self.head_dim = int(num_heads), e // num_heads
        self.dropout = float(dropout)
        self.batch_first, self.causal = bool(batch_first), bool(causal)
        self.in_proj_weight = self.add_param("in_proj_weight",
                                             initializers.glorot_uniform((3 * e, e)))
        self.in_proj_bias = (self.add_param("in_proj_bias", initializers.zeros((3 * e,)))
                             if bias else None)
        self.out_proj = Dense(e, e, bias=bias, init="zeros")
        self.out_proj.weight.data[...] = _uniform((e, e), e)
        self.attention_weights: Array | None = None

    def children(self) -> dict[str, Layer]:
        return {"out_proj": self.out_proj}

    def _inputs(self, x: Any) -> tuple[list[Any], bool]:
        """The time-major ``[query, key, value]`` (one array three times for self-attention)
        and whether they were given as a list."""
        e, bf = self.embed_dim, self.batch_first
        if not isinstance(x, (list, tuple)):
            return [_time_major(self, x, e, "input", "L", bf)] * 3, False
        xs = self.check_inputs(x, 3)
        query, key, value = (_time_major(self, a, e, what, steps, bf) for a, what, steps
                             in zip(xs, ("query", "key", "value"), "LSS"))
        layout = "(N, S, {})" if bf else "(S, N, {})"
        if key.shape[:2] != value.shape[:2]:
            raise ShapeError(f"{self.name}: expected key and value of one shape "
                             f"{layout.format(e)}, got {tuple(xs[1].shape)} and "
                             f"{tuple(xs[2].shape)}")
        if key.shape[1] != query.shape[1]:
            raise ShapeError(f"{self.name}: expected key and value with the batch size of "
                             f"the query, {query.shape[1]}, got shape {tuple(xs[1].shape)}")
        return [query, key, value], True

    def _project(self, x: Any, rows: slice) -> tuple[Any, Any]:
        """``(x2, heads)``: ``x (T, N, E)`` flattened to ``(T N, E)``, and its projection by
        the row block ``rows`` of the in-projection, split into heads ``(k, N, H, T, d)``
        (``k`` blocks of ``E`` rows)."""
        steps, batch, e = x.shape
        x2 = x.reshape(-1, e)
        y = self.ops.gemm(x2, self.in_proj_weight.data[rows], trans_b=True)
        if self.in_proj_bias is not None:
            y += self.in_proj_bias.data[rows]
        heads = y.reshape(steps, batch, -1, self.num_heads, self.head_dim)
        return x2, heads.transpose(2, 1, 3, 0, 4)

    def forward(self, x: Any, training: bool | None = None, key_padding_mask: Any = None) -> Any:
        (query, key, value), cross = self._inputs(x)
        (steps, batch, e), keys = query.shape, key.shape[0]
        ignored = _ignored(self, key_padding_mask, self.causal, batch, steps, keys)
        if ignored is not None and ignored.ndim == 3:
            ignored = ignored[:, None]  # (N, 1, L, S): the same for every head
        if cross:
            x2s, qkv = zip(*(self._project(a, slice(i * e, (i + 1) * e))
                             for i, a in enumerate((query, key, value))))
            q, k, v = (h[0] for h in qkv)
        else:
            x2, (q, k, v) = self._project(query, slice(None))
            x2s = (x2,)
        scale = 1.0 / math.sqrt(self.head_dim)
        weights = _softmax(self.ops, self.ops.bmm(q * scale, k, trans_b=True), ignored)
        drop = (self.ops.dropout_mask(weights.shape, self.dropout, weights.dtype)
                if training and self.dropout > 0 else None)
        attn = weights if drop is None else weights * drop
        context = self.ops.bmm(attn, v)  # (N, H, L, d)
        y = self.out_proj.forward(context.transpose(2, 0, 1, 3).reshape(steps, batch, e),
                                  training)
        self.attention_weights = weights
        self.save_for_backward(x2s, q, k, v, weights, attn, drop, cross, (steps, batch, keys))
        return self._layout(y)

    def backward(self, dy: Any) -> Any:
        x2s, q, k, v, weights, attn, drop, cross, (steps, batch, keys) = self.saved()
        e, ops = self.embed_dim, self.ops
        self.check_grad(dy, (batch, steps, e) if self.batch_first else (steps, batch, e))
        dy = dy.swapaxes(0, 1) if self.batch_first else dy
        dcontext = self.out_proj.backward(dy).reshape(steps, batch, self.num_heads, -1)
        dcontext = dcontext.transpose(1, 2, 0, 3)  # (N, H, L, d)
        dv = ops.bmm(attn, dcontext, trans_a=True)  # (N, H, S, d)
        dattn = ops.bmm(dcontext, v, trans_b=True)  # (N, H, L, S)
        dweights = dattn if drop is None else dattn * drop
        # scores = (q / sqrt(d)) k^T: with ds = dL/dscores / sqrt(d), dq = ds k, dk = ds^T q
        ds = ops.backprop_softmax(dweights, weights) * (1.0 / math.sqrt(self.head_dim))
        dq, dk = ops.bmm(ds, k), ops.bmm(ds, q, trans_a=True)
        # back to time-major (T, N, E), the layout of the in-projection's rows
        dqkv = [g.transpose(2, 0, 1, 3).reshape(-1, batch, e) for g in (dq, dk, dv)]
        if cross:
            dxs = [self._backprop_projection(g, x2, slice(i * e, (i + 1) * e))
                   for i, (g, x2) in enumerate(zip(dqkv, x2s))]
        else:  # dW and dx in one GEMM each, over [dq, dk, dv] side by side (all 3E rows)
            dxs = [self._backprop_projection(ops.concat(dqkv, axis=2), x2s[0], slice(None))]
        dxs = [None if dx is None else self._layout(dx.reshape(-1, batch, e)) for dx in dxs]
        return dxs if cross else dxs[0]

    def _layout(self, x: Any) -> Any:
        """A time-major ``(T, N, E)`` array in the caller's layout (a copy when batch-first)."""
        return x.swapaxes(0, 1).copy() if self.batch_first else x

    def _backprop_projection(self, g: Any, x2: Any, rows: slice) -> Any:
        """Add the gradients of the in-projection's ``rows`` for output gradient
        ``g (T, N, k E)`` and input ``x2 (T N, E)``; return ``dx2 (T N, E)`` (None without
        ``input_grad``)."""
        g2 = g.reshape(x2.shape[0], -1)
        self.in_proj_weight.grad[rows] += self.ops.gemm(g2, x2, trans_a=True)
        if self.in_proj_bias is not None:
            self.in_proj_bias.grad[rows] += self.ops.sum(g2, axis=0)
        return self.ops.gemm(g2, self.in_proj_weight.data[rows]) if self.input_grad else None


class AdditiveAttention(Layer):
    """Additive attention (Bahdanau et al. 2015): a small network scores each key for each
    query::

        e[n, t, s] = v . tanh(W_q query[t, n] + W_k key[s, n])
        alpha[n, t, s] = exp(e[n, t, s]) / sum_s' exp(e[n, t, s'])
        context[t, n] = sum_s alpha[n, t, s] value[s, n]

    ``forward([query (T, N, Dq), key (S, N, Dk), value (S, N, Dv)])`` returns
    ``context (T, N, Dv)``; ``backward`` returns ``[dquery, dkey, dvalue]``. Parameters:
    ``query_weight`` (W_q, ``(hidden_dim, query_dim)``), ``key_weight`` (W_k,
    ``(hidden_dim, key_dim)``) and ``v`` (``(hidden_dim,)``), each uniform in
    ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` as the bias-free ``nn.Linear`` layers of the usual
    PyTorch implementation (Dive into Deep Learning's ``AdditiveAttention``). The optional
    ``key_padding_mask`` ``(N, S)`` is as in :mod:`gpunet.layers.attention`;
    ``attention_weights`` holds ``alpha (N, T, S)`` after each forward. The scores take
    ``N T S hidden_dim`` values of memory. Use::

        att = AdditiveAttention(query_dim=32, key_dim=64, hidden_dim=16)
        context = att.forward([decoder_states, encoder_states, encoder_states])
    """

    _uncopied = ("attention_weights",)

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int) -> None:
        super().__init__()
        for what, v in (("query_dim", query_dim), ("key_dim", key_dim),
                        ("hidden_dim", hidden_dim)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"AdditiveAttention: expected {what} to be a positive "
                                 f"integer, got {v!r}")
        self.query_dim, self.key_dim = int(query_dim), int(key_dim)
        self.hidden_dim = int(hidden_dim)
        self.query_weight = self.add_param("query_weight",
                                           _uniform((hidden_dim, query_dim), query_dim))
        self.key_weight = self.add_param("key_weight", _uniform((hidden_dim, key_dim), key_dim))
        self.v = self.add_param("v", _uniform((hidden_dim,), hidden_dim))
        self.attention_weights: Array | None = None

    def _inputs(self, x: Any) -> tuple[Any, Any, Any]:
        query, key, value = self.check_inputs(x, 3)
        _time_major(self, query, self.query_dim, "query", "T")
        _time_major(self, key, self.key_dim, "key", "S")
        self.check_input(value, what="value")
        if value.ndim != 3 or value.shape[:2] != key.shape[:2] or value.shape[2] == 0:
            raise ShapeError(f"{self.name}: expected value of shape (S, N, Dv) with the S and N "
                             f"of the key {tuple(key.shape)}, got {tuple(value.shape)}")
        if key.shape[1] != query.shape[1]:
            raise ShapeError(f"{self.name}: expected key and value with the batch size of "
                             f"the query, {query.shape[1]}, got shape {tuple(key.shape)}")
        return query, key, value

    def forward(self, x: Any, training: bool | None = None, key_padding_mask: Any = None) -> Any:
        query, key, value = self._inputs(x)
        (steps, batch, _), keys, h, ops = query.shape, key.shape[0], self.hidden_dim, self.ops
        ignored = _ignored(self, key_padding_mask, False, batch, steps, keys)
        q2, k2 = query.reshape(-1, self.query_dim), key.reshape(-1, self.key_dim)
        pq = ops.gemm(q2, self.query_weight.data, trans_b=True).reshape(steps, batch, h)
        pk = ops.gemm(k2, self.key_weight.data, trans_b=True).reshape(keys, batch, h)
        # z[n, t, s] = tanh(W_q q[t, n] + W_k k[s, n]): every query against every key
        z = ops.tanh(pq.swapaxes(0, 1)[:, :, None, :] + pk.swapaxes(0, 1)[:, None, :, :])
        scores = ops.gemm(z.reshape(-1, h), self.v.data.reshape(h, 1)).reshape(batch, steps, keys)
        alpha = _softmax(ops, scores, ignored)
        values = value.swapaxes(0, 1)  # (N, S, Dv)
        context = ops.bmm(alpha, values)  # (N, T, Dv)
        self.attention_weights = alpha
        self.save_for_backward(q2, k2, values, z, alpha)
        return context.swapaxes(0, 1).copy()

    def backward(self, dy: Any) -> Any:
        q2, k2, values, z, alpha = self.saved()
        (batch, steps, keys), h, ops = alpha.shape, self.hidden_dim, self.ops
        self.check_grad(dy, (steps, batch, values.shape[2]))
        dcontext = dy.swapaxes(0, 1)  # (N, T, Dv)
        dscores = ops.backprop_softmax(ops.bmm(dcontext, values, trans_b=True), alpha)
        self.v.grad += ops.gemm(z.reshape(-1, h), dscores.reshape(-1, 1), trans_a=True
                                ).reshape(h)
        dpre = ops.backprop_tanh(dscores[..., None] * self.v.data, z)  # (N, T, S, h)
        dpq = ops.sum(dpre, axis=2).swapaxes(0, 1).reshape(-1, h)  # (T N, h), rows of q2
        dpk = ops.sum(dpre, axis=1).swapaxes(0, 1).reshape(-1, h)  # (S N, h), rows of k2
        ops.gemm_acc(self.query_weight.grad, dpq, q2, trans_a=True)
        ops.gemm_acc(self.key_weight.grad, dpk, k2, trans_a=True)
        if not self.input_grad:
            return [None, None, None]
        return [ops.gemm(dpq, self.query_weight.data).reshape(steps, batch, self.query_dim),
                ops.gemm(dpk, self.key_weight.data).reshape(keys, batch, self.key_dim),
                ops.bmm(alpha, dcontext, trans_a=True).swapaxes(0, 1).copy()]
