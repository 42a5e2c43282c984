"""The layer protocol: ``Parameter`` and ``Layer``.

A layer computes ``y = forward(x)`` and keeps what its ``backward`` needs; ``backward(dy)``
returns ``dx`` and adds each parameter's gradient into ``Parameter.grad``. Layers with several
inputs take and return lists. Layers are built on the CPU, in float32; ``to(device, dtype)``
moves them.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Iterator, Sequence

import numpy as np

from ..backends import (FLOAT_DTYPES, Array, Backend, device_of, get_device, is_device_array,
                        to_numpy)
from ..backends.base import on_device
from ..errors import DTypeError, DeviceError, ShapeError, StateError

#: Every concrete layer class by name; save/load and the parity suite look layers up here.
LAYERS: dict[str, type["Layer"]] = {}


class Parameter:
    """A trainable array and the gradient accumulated for it (same shape, same device)."""

    __slots__ = ("data", "grad")

    def __init__(self, data: Array) -> None:
        self.data = data
        self.grad = device_of(data).zeros_like(data)  # on the data's device, not the current one

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.data.dtype})"


def feature_axis(ndim: int) -> int:
    """The axis of per-unit parameters: 1 for (N, F) and (N, C, H, W), last for (T, N, F)."""
    return ndim - 1 if ndim == 3 else 1


def _releasing(backward: Any) -> Any:
    """Wrap a layer's ``backward``: refuse it without a forward, then free what forward kept.
    A backward that raises (a bad ``dy``) keeps it, so the call can be retried."""
    def wrapped(self: "Layer", dy: Any) -> Any:
        if self._saved is None:
            raise StateError(f"{self.name}: backward called before forward "
                             "(or twice for one forward)")
        dx = backward(self, dy)
        self._saved = None
        return dx
    wrapped.__doc__, wrapped.__name__ = backward.__doc__, backward.__name__
    return wrapped


def _where(a: Any) -> str:
    return f"cuda:{a.device.id}" if is_device_array(a) else "cpu"


class Layer:
    """Base class of every layer and container.

    Subclasses implement ``forward(x, training=True) -> y`` and ``backward(dy) -> dx``.
    The constructor's arguments are recorded, so ``config()`` can rebuild the layer.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            LAYERS[cls.__name__] = cls
        # forward and backward run with the layer's device current (on_device), whoever calls
        if "forward" in cls.__dict__:
            cls.forward = on_device(cls.__dict__["forward"])
        if "backward" in cls.__dict__:
            cls.backward = _releasing(on_device(cls.__dict__["backward"]))

    def __new__(cls, *args: Any, **kwargs: Any) -> "Layer":
        obj = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(obj, *args, **kwargs)
        except TypeError:  # copy.deepcopy calls __new__ bare and restores _args itself;
            obj._args = {}  # a real call with bad arguments fails in __init__ with its message
            return obj
        bound.apply_defaults()
        obj._args = {k: v for k, v in list(bound.arguments.items())[1:]}
        return obj

    #: Attributes a copy leaves as None instead of copying.
    _uncopied: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.ops: Backend = get_device("cpu")
        self.dtype = np.dtype(np.float32)
        self._params: dict[str, Parameter] = {}
        self._buffers: dict[str, Array] = {}
        self._saved: Any = None
        self.input_grad = True

    # -- the protocol -------------------------------------------------------------------
    def forward(self, x: Any, training: bool = True) -> Any:
        raise NotImplementedError

    def backward(self, dy: Any) -> Any:
        raise NotImplementedError

    def set_input_grad(self, needed: bool) -> "Layer":
        """Whether ``backward`` must return the input gradient (it must by default). Nobody
        uses the gradient of the data a model's first layer reads: the Trainer turns it off
        on its model, and a layer that can skip that work (Dense, Conv2D, ConvTranspose2D,
        RNN, LSTM, GRU, Bidirectional, MultiHeadAttention, AdditiveAttention) then returns
        None, as PyTorch does for an input that does not require grad."""
        self.input_grad = bool(needed)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> "Layer":
        """A copy on this layer's device (CuPy would copy each array onto the current one)."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        with self.device.scope():
            for k, v in self.__dict__.items():
                setattr(clone, k, None if k in self._uncopied else copy.deepcopy(v, memo))
        return clone

    def __call__(self, x: Any, training: bool = True) -> Any:
        return self.forward(x, training)

    @property
    def name(self) -> str:
        return type(self).__name__

    def children(self) -> dict[str, "Layer"]:
        """Sub-layers by name (containers override this)."""
        return {}

    def params(self) -> dict[str, Parameter]:
        """Every trainable parameter, containers' with dotted names such as ``"0.weight"``."""
        out = dict(self._params)
        for prefix, child in self.children().items():
            out.update({f"{prefix}.{k}": p for k, p in child.params().items()})
        return out

    def state(self) -> dict[str, Array]:
        """Non-trainable arrays saved with the model (such as running statistics)."""
        out = dict(self._buffers)
        for prefix, child in self.children().items():
            out.update({f"{prefix}.{k}": v for k, v in child.state().items()})
        return out

    def walk(self) -> Iterator["Layer"]:
        """This layer and every layer below it."""
        yield self
        for child in self.children().values():
            yield from child.walk()

    def check(self) -> None:
        """Raise an input error this layer, or one inside it, found on a GPU without reading
        it back (an :class:`~gpunet.layers.Embedding` index out of range): such a layer makes
        its output NaN meanwhile, and the Trainer calls this when the loss is not finite."""
        for layer in self.walk():
            pending = layer.__dict__.get("_pending")
            if pending is not None:
                pending.take()

    @on_device
    def zero_grad(self) -> None:
        for p in self.params().values():
            p.grad[...] = 0

    def to(self, device: str | Backend | None = None, dtype: Any = None) -> "Layer":
        """Move parameters and state to ``device`` and/or cast them to ``dtype``; returns self."""
        ops = self.ops if device is None else get_device(device)
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise DTypeError(f"{self.name}.to: expected dtype float32 or float64, got {dtype}")
        move = (lambda a: a.astype(dtype)) if ops == self.ops else \
            (lambda a: ops.asarray(to_numpy(a), dtype=dtype))
        with ops.scope():  # the copies land on the target device
            for p in self._params.values():
                p.data, p.grad = move(p.data), move(p.grad)
            self._buffers = {k: move(v) for k, v in self._buffers.items()}
        self.ops, self.dtype, self._saved = ops, dtype, None
        for child in self.children().values():
            child.to(ops, dtype)
        return self

    @property
    def device(self) -> Backend:
        return self.ops

    def config(self) -> dict[str, Any]:
        """A JSON-able description that rebuilds this layer: ``{"type": ..., "args": ...}``;
        layers among the arguments (a container's) are described the same way."""
        return {"type": self.name, "args": _describe(self._args)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args.items())
        return f"{self.name}({args})"

    # -- helpers for subclasses ---------------------------------------------------------
    def add_param(self, name: str, value: np.ndarray) -> Parameter:
        """Register a parameter from a host array (cast to the layer's dtype and device)."""
        p = Parameter(self.ops.asarray(value, dtype=self.dtype))
        self._params[name] = p
        return p

    def add_buffer(self, name: str, value: np.ndarray) -> None:
        self._buffers[name] = self.ops.asarray(value, dtype=self.dtype)

    def save_for_backward(self, *arrays: Any) -> None:
        """Keep what ``backward`` needs; released once ``backward`` has succeeded."""
        self._saved = arrays

    def saved(self) -> Any:
        return self._saved

    def forget(self) -> None:
        """Drop what forward kept, for a backward that will not come."""
        self._saved = None

    def check_input(self, x: Any, shape: Sequence[int | None] | None = None,
                    ndims: Sequence[int] | None = None, what: str = "input") -> None:
        """Raise a clear error unless ``x`` is a float array on this layer's device whose
        shape matches ``shape`` (``None`` entries match any size) or whose rank is in ``ndims``.
        Layers with parameters also require their own dtype."""
        if not (isinstance(x, np.ndarray) or is_device_array(x)):
            raise DTypeError(f"{self.name}: expected {what} to be an array, got {type(x).__name__}")
        if not self.ops.owns(x):
            raise DeviceError(f"{self.name}: expected {what} on device {self.ops.name}, "
                              f"got an array on {_where(x)}")
        if x.dtype not in FLOAT_DTYPES or (self._params and x.dtype != self.dtype):
            want = self.dtype if self._params else "float32 or float64"
            raise DTypeError(f"{self.name}: expected {what} of dtype {want}, got {x.dtype}")
        if shape is not None:
            if len(x.shape) != len(shape) or any(
                    s is not None and s != n for s, n in zip(shape, x.shape)):
                want = ", ".join("*" if s is None else str(s) for s in shape)
                raise ShapeError(f"{self.name}: expected {what} of shape ({want}), "
                                 f"got {tuple(x.shape)}")
        if ndims is not None and x.ndim not in ndims:
            want = " or ".join(f"{n}-D" for n in ndims)
            raise ShapeError(f"{self.name}: expected {want} {what}, got shape {tuple(x.shape)}")

    def check_grad(self, dy: Any, shape: Sequence[int], what: str = "output gradient") -> None:
        """Raise unless ``dy`` is an array of the forward output's shape on this device."""
        self.check_input(dy, tuple(shape), what=what)

    def check_inputs(self, xs: Any, count: int | None = None) -> list[Any]:
        """Check the list a multi-input layer takes; returns it as a list."""
        if not isinstance(xs, (list, tuple)):
            raise ShapeError(f"{self.name}: expected a list of input arrays, "
                             f"got {type(xs).__name__}")
        if count is not None and len(xs) != count or len(xs) == 0:
            want = count if count is not None else "at least 1"
            raise ShapeError(f"{self.name}: expected {want} inputs, got {len(xs)}")
        for i, x in enumerate(xs):
            self.check_input(x, what=f"input {i}")
        return list(xs)


def _describe(v: Any) -> Any:
    if isinstance(v, Layer):
        return v.config()
    if isinstance(v, (list, tuple)):
        return [_describe(i) for i in v]
    if isinstance(v, dict):
        return {k: _describe(i) for k, i in v.items()}
    return v


def from_config(config: dict[str, Any]) -> Layer:
    """Rebuild a layer (and any layers inside it) from ``Layer.config()``. Only registered
    layer classes are built, so a description cannot name arbitrary code."""
    def build(v: Any) -> Any:
        if isinstance(v, dict) and set(v) == {"type", "args"}:
            cls = LAYERS.get(v["type"]) if isinstance(v["type"], str) else None
            if cls is None or not isinstance(v["args"], dict):
                raise ValueError(f"unknown layer type {v['type']!r} in model description")
            return cls(**{k: build(a) for k, a in v["args"].items()})
        if isinstance(v, list):
            return [build(i) for i in v]
        if isinstance(v, dict):
            return {k: build(i) for k, i in v.items()}
        return v
    layer = build(config)
    if not isinstance(layer, Layer):
        raise ValueError("model description does not describe a layer")
    return layer
