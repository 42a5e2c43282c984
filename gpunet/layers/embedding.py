"""Embeddings: a lookup table of learned vectors for integer indices, and the two ways a
Transformer tells positions apart, a learned table of position vectors and the fixed sinusoids
of Vaswani et al. 2017.

Sequences are time-major, ``(T, N, E)``, as everywhere in gpunet (and as in PyTorch's
``nn.Transformer`` by default); the position layers take ``batch_first=True`` for
``(N, T, E)``. A token model starts ``Embedding`` on ``(T, N)`` indices, giving ``(T, N, E)``,
then adds positions::

    model = Sequential([Embedding(10000, 64), PositionalEncoding(64), ...])
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import rng
from ..backends import device_name, is_device_array
from ..backends.base import Pending
from ..errors import DTypeError, DeviceError, ShapeError
from .base import Layer


class Embedding(Layer):
    """``y[..., :] = weight[indices[...], :]``: a vector per integer index.

    Shapes: ``indices`` any shape ``(*)`` of integers in ``[0, num_embeddings)``, weight
    ``(num_embeddings, embedding_dim)``, y ``(*, embedding_dim)`` in the layer's dtype.
    Backward adds each row of ``dy`` into the weight row its index picked (an index used
    several times gets the sum) and returns None: integer indices have no gradient. The row
    ``padding_idx`` (negative counts from the end, as in PyTorch) starts at zero and gets no
    gradient, so it stays what it is: the vector of padding positions.
    The weight starts N(0, 1), as PyTorch's ``nn.Embedding``::

        emb = Embedding(1000, 32, padding_idx=0)
        y = emb.forward(np.array([[5, 7, 0]]))  # (1, 3, 32); y[0, 2] is zero

    An index out of range is an error, not a silent read of another row. On the host devices
    it is raised at once. On ``cuda`` reading the check back would make every step wait for
    the GPU, so the index is flagged on the device instead: the lookup stays within the table,
    the output turns NaN (so a loss built on it is not finite) and :meth:`~Layer.check`, which
    the Trainer calls when the loss is not finite, raises the IndexError.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        for what, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Embedding: expected {what} to be a positive integer, got {v!r}")
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"Embedding: expected padding_idx in [{-num_embeddings}, "
                             f"{num_embeddings}), got {padding_idx}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = None if padding_idx is None else int(padding_idx) % num_embeddings
        weight = rng.generator().standard_normal((num_embeddings, embedding_dim))
        if self.padding_idx is not None:
            weight[self.padding_idx] = 0
        self.weight = self.add_param("weight", weight)
        self._pending = Pending()  # an index out of range found on a GPU

    def check_indices(self, indices: Any) -> None:
        """Raise a clear error unless ``indices`` is an integer array on this layer's device;
        flag an entry outside ``[0, num_embeddings)`` (:class:`Pending`)."""
        if not (isinstance(indices, np.ndarray) or is_device_array(indices)):
            raise DTypeError(f"{self.name}: expected an integer array of indices, "
                             f"got {type(indices).__name__}")
        if not self.ops.owns(indices):
            where = device_name(indices)
            raise DeviceError(f"{self.name}: expected indices on device {self.ops.name}, "
                              f"got an array on {where}")
        if indices.dtype.kind not in "iu":
            raise DTypeError(f"{self.name}: expected integer indices, got dtype "
                             f"{indices.dtype}")
        if indices.size:
            self._pending.flag(self.ops, (indices < 0) | (indices >= self.num_embeddings),
                               indices, lambda v: IndexError(
                                   f"{self.name}: expected indices in "
                                   f"[0, {self.num_embeddings}), got {v}"))

    def forward(self, indices: Any, training: bool | None = None) -> Any:
        self.check_indices(indices)
        if not self.ops.on_host:  # a bad index is only flagged: keep lookup and scatter inside
            indices = self.ops.clip(indices, 0, self.num_embeddings - 1)
        self.save_for_backward(indices.reshape(-1), indices.shape)
        y = self.weight.data[indices]
        if not self.ops.on_host and y.size:  # one NaN is enough to make the loss NaN
            first = y.reshape(-1)[:1]
            first[...] = self._pending.poisoned(self.ops, first)
        return y

    def backward(self, dy: Any) -> Any:
        flat, shape = self.saved()
        self.check_grad(dy, (*shape, self.embedding_dim))
        self.ops.embedding_backward(self.weight.grad, flat, dy.reshape(-1, self.embedding_dim),
                                    self.padding_idx)
        return None


def _check_positions(layer: Layer, max_len: int, embedding_dim: int) -> None:
    for what, v in (("max_len", max_len), ("embedding_dim", embedding_dim)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{layer.name}: expected {what} to be a positive integer, got {v!r}")


class _Positions(Layer):
    """What both position layers share: a ``(T, N, E)`` input (``(N, T, E)`` with
    ``batch_first``) with at most ``max_len`` steps, and the ``(T, E)`` table broadcast along
    its batch axis."""

    max_len: int
    embedding_dim: int
    batch_first: bool

    def steps(self, x: Any) -> int:
        """Check ``x``; return its number of time steps T."""
        self.check_input(x, ndims=(3,))
        layout = "(N, T, E)" if self.batch_first else "(T, N, E)"
        if x.shape[2] != self.embedding_dim:
            raise ShapeError(f"{self.name}: expected input of shape {layout} with "
                             f"E = {self.embedding_dim}, got {tuple(x.shape)}")
        t = x.shape[1] if self.batch_first else x.shape[0]
        if t > self.max_len:
            raise ShapeError(f"{self.name}: expected at most max_len = {self.max_len} time "
                             f"steps in an input of shape {layout}, got {tuple(x.shape)}")
        return t

    def along_batch(self, table: Any) -> Any:
        """``table`` ``(T, E)`` as a view that broadcasts against the input."""
        return table[None] if self.batch_first else table[:, None]


class PositionEmbedding(_Positions):
    """``y[t, n] = x[t, n] + weight[t]``: a learned vector per position, added.

    Shapes: x and y ``(T, N, E)`` (``(N, T, E)`` with ``batch_first=True``), ``T <= max_len``;
    weight ``(max_len, E)``, N(0, 1) at the start, as ``nn.Embedding(max_len, E)`` applied to
    ``arange(T)`` in PyTorch (BERT's and GPT-2's position embeddings). Backward:
    ``dx = dy``, ``dweight[t] = sum over n of dy[t, n]``::

        pos = PositionEmbedding(512, 64)
        y = pos.forward(x)  # x (T, N, 64), T <= 512
    """

    def __init__(self, max_len: int, embedding_dim: int, batch_first: bool = False) -> None:
        super().__init__()
        _check_positions(self, max_len, embedding_dim)
        self.max_len, self.embedding_dim = int(max_len), int(embedding_dim)
        self.batch_first = bool(batch_first)
        self.weight = self.add_param("weight",
                                     rng.generator().standard_normal((max_len, embedding_dim)))

    def forward(self, x: Any, training: bool | None = None) -> Any:
        t = self.steps(x)
        self.save_for_backward(x.shape)
        return x + self.along_batch(self.weight.data[:t])

    def backward(self, dy: Any) -> Any:
        (shape,) = self.saved()
        self.check_grad(dy, shape)
        t = shape[1] if self.batch_first else shape[0]
        self.weight.grad[:t] += self.ops.sum(dy, axis=0 if self.batch_first else 1)
        return dy


def sinusoid_table(max_len: int, embedding_dim: int) -> np.ndarray:
    """The positional encodings of Vaswani et al. 2017, float64 ``(max_len, embedding_dim)``:
    ``pe[t, 2i] = sin(t / 10000^(2i/E))`` and ``pe[t, 2i+1] = cos(t / 10000^(2i/E))``
    (an odd E ends with a sine)."""
    position = np.arange(max_len, dtype=np.float64)[:, None]
    frequency = np.exp(np.arange(0, embedding_dim, 2) * (-math.log(10000.0) / embedding_dim))
    table = np.empty((max_len, embedding_dim))
    table[:, 0::2] = np.sin(position * frequency)
    table[:, 1::2] = np.cos(position * frequency[:embedding_dim // 2])
    return table


class PositionalEncoding(_Positions):
    """``y = dropout(x + pe[:T])`` with the fixed sinusoids ``pe`` of :func:`sinusoid_table`
    ("Attention is all you need", and PyTorch's Transformer tutorial).

    Shapes: x and y ``(T, N, E)`` (``(N, T, E)`` with ``batch_first=True``), ``T <= max_len``.
    No parameters, and nothing saved with the model: the table is a function of
    ``(max_len, E)``, made on the host once and copied to the input's device and dtype on
    first use. ``dropout`` (the tutorial uses 0.1) is inverted dropout after the sum, in
    training only. Backward: ``dx = dy`` (times the dropout mask)::

        pe = PositionalEncoding(64, dropout=0.1)
        y = pe.forward(x)  # x (T, N, 64)
    """

    _uncopied = ("_table",)

    def __init__(self, embedding_dim: int, max_len: int = 5000, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        _check_positions(self, max_len, embedding_dim)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"PositionalEncoding: expected dropout in [0, 1), got {dropout}")
        self.max_len, self.embedding_dim = int(max_len), int(embedding_dim)
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self._table: Any = None

    def table(self, dtype: Any) -> Any:
        """``pe`` ``(max_len, E)`` on this layer's device in ``dtype``."""
        if self._table is None or self._table.dtype != dtype or not self.ops.owns(self._table):
            self._table = self.ops.asarray(sinusoid_table(self.max_len, self.embedding_dim),
                                           dtype=dtype)
        return self._table

    def forward(self, x: Any, training: bool | None = None) -> Any:
        t = self.steps(x)
        y = x + self.along_batch(self.table(x.dtype)[:t])
        mask = None
        if training and self.dropout > 0.0:
            mask = self.ops.dropout_mask(y.shape, self.dropout, y.dtype)
            y *= mask
        self.save_for_backward(mask, x.shape)
        return y

    def backward(self, dy: Any) -> Any:
        mask, shape = self.saved()
        self.check_grad(dy, shape)
        return dy if mask is None else dy * mask
