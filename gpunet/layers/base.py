"""The layer protocol: ``Parameter`` and ``Layer``.

A layer computes ``y = forward(x)`` and keeps what its ``backward`` needs; ``backward(dy)``
returns ``dx`` and adds each parameter's gradient into ``Parameter.grad``. Layers with several
inputs take and return lists. Layers are built on the CPU, in float32; ``to(device, dtype)``
moves them.
"""
from __future__ import annotations

import copy
import functools
import inspect
import threading
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from ..backends import (FLOAT_DTYPES, Array, Backend, device_name, device_of, get_device,
                        is_device_array, to_numpy)
from ..backends.base import on_device
from ..errors import DTypeError, DeviceError, ShapeError, StateError
from .args import checked_init

#: Every concrete layer class by name; save/load and the parity suite look layers up here.
LAYERS: dict[str, type["Layer"]] = {}


class Parameter:
    """A trainable array and the gradient accumulated for it (same shape, same device).

    ``requires_grad=False`` (or :meth:`Layer.freeze`) freezes it: backward accumulates
    nothing into ``grad`` and the optimizers leave it, and its slots, unchanged. One
    Parameter may sit in several layers (weight sharing, :meth:`Layer.share`): each adds its
    gradient into the same ``grad``, and an optimizer updates it once."""

    __slots__ = ("data", "grad", "requires_grad")

    def __init__(self, data: Array, requires_grad: bool = True) -> None:
        self.data = data
        self.grad = device_of(data).zeros_like(data)  # on the data's device, not the current one
        self.requires_grad = bool(requires_grad)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        frozen = "" if self.requires_grad else ", requires_grad=False"
        return f"Parameter(shape={self.shape}, dtype={self.data.dtype}{frozen})"


def feature_axis(ndim: int) -> int:
    """The axis of per-unit parameters: 1 for (N, F) and (N, C, H, W), last for (T, N, F)."""
    return ndim - 1 if ndim == 3 else 1


#: ``own`` is True while a forward called without ``training`` runs (per thread: ranks may
#: be threads): every layer below then uses its own mode, whatever its container passes.
_modes = threading.local()


def _moded(forward: Any) -> Any:
    """Wrap a layer's ``forward``: ``training=None`` (the default) means each layer's own
    mode, ``layer.training`` (:meth:`Layer.train`, :meth:`Layer.eval`), down to the last
    sub-layer, as in PyTorch; an explicit ``training`` applies to the layer and everything
    inside it (the Trainer's calls). A container hands its children a bool either way, so
    the outermost call decides, through ``_modes``."""
    @functools.wraps(forward)
    def wrapped(self: "Layer", x: Any, training: bool | None = None, *args: Any,
                **kwargs: Any) -> Any:
        if getattr(_modes, "own", False):
            return forward(self, x, self.training, *args, **kwargs)
        if training is not None:
            return forward(self, x, bool(training), *args, **kwargs)
        _modes.own = True
        try:
            return forward(self, x, self.training, *args, **kwargs)
        finally:
            _modes.own = False
    return wrapped


def _releasing(backward: Any) -> Any:
    """Wrap a layer's ``backward``: refuse it without a forward, then free what forward kept.
    A backward that raises (a bad ``dy``) keeps it, so the call can be retried. A frozen
    parameter's ``grad`` is swapped for a scratch array meanwhile, so the layer's own code
    need not know about freezing and the real ``grad`` is left exactly as it was."""
    def wrapped(self: "Layer", dy: Any) -> Any:
        if self._saved is None:
            raise StateError(f"{self.name}: backward called before forward "
                             "(or twice for one forward)")
        frozen = [p for p in self._params.values() if not p.requires_grad]
        kept = [p.grad for p in frozen]
        for p in frozen:
            p.grad = device_of(p.data).zeros_like(p.data)
        try:
            dx = backward(self, dy)
        finally:
            for p, g in zip(frozen, kept):
                p.grad = g
        self._saved = None
        return dx
    wrapped.__doc__, wrapped.__name__ = backward.__doc__, backward.__name__
    return wrapped


class IncompatibleKeys(NamedTuple):
    """What :meth:`Layer.load_state_dict` with ``strict=False`` left out, as PyTorch's."""
    missing_keys: list[str]
    unexpected_keys: list[str]



class Layer:
    """Base class of every layer and container.

    Subclasses implement ``forward(x, training) -> y`` and ``backward(dy) -> dx``.
    The constructor's arguments are recorded, so ``config()`` can rebuild the layer.

    Modes, as PyTorch's: a layer is built in training mode (``layer.training`` is True);
    ``model.eval()`` and ``model.train()`` set the mode of a layer and every layer inside it,
    and ``forward(x)`` without ``training`` runs each layer in its own mode (so
    ``model[1].eval()`` keeps that one BatchNorm on its running statistics). An explicit
    ``training=`` applies to the whole call instead; the Trainer passes it, so ``fit`` trains
    and ``evaluate``/``predict`` evaluate whatever the modes are::

        model.eval()
        y = model(x)          # no dropout, BatchNorm uses its running statistics
        model.train()
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            LAYERS[cls.__name__] = cls
        # forward and backward run with the layer's device current (on_device), whoever calls
        if "forward" in cls.__dict__:
            cls.forward = _moded(on_device(cls.__dict__["forward"]))
        if "backward" in cls.__dict__:
            cls.backward = _releasing(on_device(cls.__dict__["backward"]))
        if "__init__" in cls.__dict__:  # wrong argument types named in gpunet's words
            cls.__init__ = checked_init(cls.__dict__["__init__"])

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
        self.training = True

    # -- the protocol -------------------------------------------------------------------
    def forward(self, x: Any, training: bool | None = None) -> Any:
        """Compute the layer's output ``y`` from ``x`` and keep what :meth:`backward` needs.

        ``x``: an array on the layer's device, float in the layer's dtype (integer indices
        for :class:`~gpunet.layers.Embedding`), batch first (``(N, F)``, ``(N, C, H, W)``;
        recurrent layers are time-major, ``(T, N, F)``); each layer's docstring gives its
        shapes. A multi-input layer (``Sum``, ``Concat``, attention, a ``Graph`` with several
        inputs) takes a list of arrays, and a layer with several outputs returns a list.
        ``training``: True (dropout drops, BatchNorm uses and updates batch statistics) or
        False (inference); None, the default, uses each layer's own mode (:meth:`train`,
        :meth:`eval`). Returns ``y``, a new array on the same device; ``layer(x)`` is the
        same call.

        >>> import numpy as np
        >>> from gpunet.layers import Dense
        >>> Dense(3, 2).forward(np.ones((4, 3), np.float32), training=False).shape
        (4, 2)
        """
        raise NotImplementedError

    def backward(self, dy: Any) -> Any:
        """Given ``dy = dL/dy`` (the shape of the last forward's output; a list for several
        outputs), ADD each parameter's gradient ``dL/dp`` into ``p.grad`` (so gradients of
        several backward passes accumulate until :meth:`zero_grad`; frozen parameters get
        nothing) and return ``dx = dL/dx`` (the input's shape; a list for a multi-input layer;
        None after ``set_input_grad(False)`` on layers that can skip it). One backward per
        forward: what forward kept is released after it, and a second call raises StateError.

        >>> import numpy as np
        >>> from gpunet.layers import Dense
        >>> layer = Dense(3, 2)
        >>> y = layer(np.ones((4, 3), np.float32))
        >>> dx = layer.backward(np.ones_like(y))      # dx: (4, 3)
        >>> layer.bias.grad.tolist()                  # sum of dy over the batch
        [4.0, 4.0]
        """
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

    def __call__(self, x: Any, training: bool | None = None) -> Any:
        return self.forward(x, training)

    @property
    def name(self) -> str:
        return type(self).__name__

    def children(self) -> dict[str, "Layer"]:
        """Sub-layers by name (containers override this)."""
        return {}

    def params(self) -> dict[str, Parameter]:
        """Every parameter, containers' with dotted names such as ``"0.weight"``, frozen ones
        included. A Parameter shared by several layers is listed once, under its first name
        (as PyTorch's ``named_parameters()``), so an optimizer updates it once."""
        out: dict[str, Parameter] = {}
        seen: set[int] = set()
        for name, p in self._named_params():
            if id(p) not in seen:
                seen.add(id(p))
                out[name] = p
        return out

    def _named_params(self) -> Iterator[tuple[str, Parameter]]:
        """Every (dotted name, Parameter), a shared one under each of its names."""
        yield from self._params.items()
        for prefix, child in self.children().items():
            for k, p in child._named_params():
                yield f"{prefix}.{k}", p

    def shared(self) -> dict[str, str]:
        """``{name: first name}`` for each name under which a shared Parameter appears again
        (these names are left out of :meth:`params`); ``{}`` without sharing."""
        first: dict[int, str] = {}
        out: dict[str, str] = {}
        for name, p in self._named_params():
            if id(p) in first:
                out[name] = first[id(p)]
            else:
                first[id(p)] = name
        return out

    def share(self, name: str, param: Parameter) -> "Layer":
        """Weight sharing: make the parameter called ``name`` (a dotted name of
        :meth:`params`, e.g. ``"1.weight"``) be ``param`` itself, of the same shape. The
        layers that hold it then read the same array and add their gradients into the same
        ``grad``; :meth:`params` lists it once; a saved model keeps the tie. Returns self::

            tied = Sequential([Dense(8, 8), ReLU(), Dense(8, 8)])
            tied.share("2.weight", tied[0].weight)
        """
        if not isinstance(param, Parameter):
            raise TypeError(f"{self.name}.share: expected a Parameter, got {type(param).__name__}")
        owner, _, leaf = name.rpartition(".")
        layer: Layer = self
        for part in owner.split(".") if owner else []:
            kids = layer.children()
            if part not in kids:
                raise KeyError(f"{self.name}.share: no parameter {name!r}; known: "
                               f"{sorted(n for n, _ in self._named_params())}")
            layer = kids[part]
        old = layer._params.get(leaf)
        if old is None:
            raise KeyError(f"{self.name}.share: no parameter {name!r}; known: "
                           f"{sorted(n for n, _ in self._named_params())}")
        if old.shape != param.shape or old.data.dtype != param.data.dtype \
                or not layer.ops.owns(param.data):
            raise ValueError(f"{self.name}.share: parameter {name!r} is {old.shape} "
                             f"{old.data.dtype} on {layer.ops.name}, got {param.shape} "
                             f"{param.data.dtype} on {device_name(param.data)}")
        layer._params[leaf] = param
        for attr, value in list(layer.__dict__.items()):  # the layer's own handle (self.weight)
            if value is old:
                object.__setattr__(layer, attr, param)
        return self

    def train(self, mode: bool = True) -> "Layer":
        """Set training mode (``mode=False``: eval mode) on this layer and every layer inside
        it; ``forward`` without ``training`` uses it. Returns self."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"{self.name}.train: expected mode to be True or False, "
                            f"got {mode!r}")
        for layer in self.walk():
            layer.training = bool(mode)
        return self

    def eval(self) -> "Layer":
        """Eval mode, as ``train(False)``: dropout off, BatchNorm on its running statistics."""
        return self.train(False)

    def freeze(self) -> "Layer":
        """Freeze every parameter of this layer and the layers inside it
        (``requires_grad = False``): backward accumulates no gradient into them (it still
        returns input gradients) and the optimizers leave them and their state unchanged.
        Returns self, e.g. ``model[0].freeze()``."""
        for p in self.params().values():
            p.requires_grad = False
        return self

    def unfreeze(self) -> "Layer":
        """Undo :meth:`freeze`: every parameter here trains again. Returns self."""
        for p in self.params().values():
            p.requires_grad = True
        return self

    def state(self) -> dict[str, Array]:
        """Non-trainable arrays saved with the model (such as running statistics)."""
        out = dict(self._buffers)
        for prefix, child in self.children().items():
            out.update({f"{prefix}.{k}": v for k, v in child.state().items()})
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host NumPy copies of every parameter and state array, by the names of
        :meth:`params` and :meth:`state` (``"0.weight"``, ``"1.running_mean"``); a shared
        parameter appears once. Read back from the device in one pass."""
        out = {k: to_numpy(p.data).copy() for k, p in self.params().items()}
        out.update({k: to_numpy(v).copy() for k, v in self.state().items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True
                        ) -> IncompatibleKeys:
        """Copy ``state`` (a :meth:`state_dict`, from any device and float dtype) into this
        layer in place, onto its device and dtype. ``strict``: every name must match, or
        ValueError names the missing and unexpected ones. ``strict=False`` loads the names
        that match and returns ``(missing_keys, unexpected_keys)``. A wrong shape raises
        either way. On error nothing is changed::

            other.load_state_dict(model.state_dict())
        """
        owner = f"{self.name}.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{owner}: expected a dict of names to arrays, "
                            f"got {type(state).__name__}")
        want = {k: p.data for k, p in self.params().items()}
        want.update(self.state())
        missing = [k for k in want if k not in state]
        unexpected = [k for k in state if k not in want]
        if strict and (missing or unexpected):
            raise ValueError(f"{owner}: the names do not match (missing {missing}, "
                             f"unexpected {unexpected})")
        arrays: dict[str, np.ndarray] = {}
        for k, target in want.items():
            if k not in state:
                continue
            value = state[k]
            a = to_numpy(value) if is_device_array(value) else np.asarray(value)
            if a.dtype.kind not in "fiu":
                raise ValueError(f"{owner}: expected {k!r} to be a numeric array, got dtype "
                                 f"{a.dtype}")
            if a.shape != tuple(target.shape):
                raise ValueError(f"{owner}: expected {k!r} of shape {tuple(target.shape)}, "
                                 f"got {a.shape}")
            arrays[k] = a
        with self.device.scope():  # every check passed: only now write
            for k, a in arrays.items():
                want[k][...] = self.ops.asarray(a, dtype=want[k].dtype)
        return IncompatibleKeys(missing, unexpected)

    def summary(self, input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
                input_dtype: Any = None) -> str:
        """A text table of this layer and every layer inside it: dotted name, type, output
        shape and parameter count (each layer counts the parameters it holds itself, a
        shared one once), then the totals, trainable and frozen.

        ``input_shape`` is one sample's shape, without the batch axis (a list of shapes for
        a multi-input graph): the output shapes come from a forward of zeros of batch 1 on
        the layer's own device, in eval mode (``training=False``), shown as they come (the
        batch axis is 1, first or, for time-major layers, second). That forward changes
        nothing: no dropout mask, no BatchNorm update, and what it kept for backward is
        dropped. ``input_dtype`` defaults to the layer's dtype (give
        ``"int64"`` for token indices). Without ``input_shape`` the shapes column is left
        empty. ``print(model.summary((1, 28, 28)))``."""
        shapes: dict[int, str] = {}
        if input_shape is not None:
            shapes = self._output_shapes(input_shape, input_dtype)
        rows = [("name", "type", "output shape (batch 1)", "params")]
        seen: set[int] = set()
        total = trainable = 0

        def visit(layer: "Layer", name: str, depth: int) -> None:
            nonlocal total, trainable
            count = 0
            for p in layer._params.values():
                if id(p) not in seen:
                    seen.add(id(p))
                    size = int(np.prod(p.shape))
                    count += size
                    trainable += size if p.requires_grad else 0
            total += count
            rows.append(("  " * depth + name, layer.name, shapes.get(id(layer), ""),
                         f"{count:,}"))
            for k, child in layer.children().items():
                visit(child, k, depth + 1)

        visit(self, "(model)", 0)
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.rjust(w) if i == 3 else c.ljust(w)
                           for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"total parameters: {total:,} (trainable {trainable:,}, "
                     f"frozen {total - trainable:,})")
        return "\n".join(lines)

    def _output_shapes(self, input_shape: Sequence[Any], input_dtype: Any) -> dict[int, str]:
        """Each layer's output shape (by id) for one eval forward of zeros; see summary."""
        multi = len(input_shape) > 0 and not isinstance(input_shape[0], (int, np.integer))
        dtype = self.dtype if input_dtype is None else np.dtype(input_dtype)
        with self.device.scope():
            xs = [self.ops.zeros((1, *map(int, s)), dtype)
                  for s in (input_shape if multi else [input_shape])]
        shapes: dict[int, str] = {}

        def show(y: Any) -> str:
            if isinstance(y, (list, tuple)):
                return ", ".join(show(v) for v in y)
            return str(tuple(int(n) for n in y.shape))

        def recording(layer: "Layer") -> Any:
            forward = layer.forward  # the class's, bound; the instance attribute shadows it

            def record(x: Any, training: bool | None = None, *args: Any, **kwargs: Any) -> Any:
                y = forward(x, training, *args, **kwargs)
                shapes[id(layer)] = show(y)
                return y
            return record

        layers = list(self.walk())
        try:
            for layer in layers:
                layer.__dict__["forward"] = recording(layer)
            self.forward(xs if multi else xs[0], False)
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)
                layer.forget()
        return shapes

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
                              f"got an array on {device_name(x)}")
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
