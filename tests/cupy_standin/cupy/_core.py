"""The stand-in's ``ndarray`` and the rules every array operation follows.

A stand-in array wraps a NumPy array (its "device memory") and the id of the device that
holds it. NumPy computes every result; what the stand-in adds are CuPy's rules, each from the
CuPy file named where it is applied:

- placement: a view keeps its base's device; every new array lands on the calling thread's
  current device. Generically: a NumPy result that shares its buffer with an input is a view
  of that input, anything else is new (:func:`_convert`);
- an operation that runs a kernel on an array of another device raises CuPy's ValueError
  (peer access is not modelled); metadata-only views do not check (:func:`_check_devices`);
- host NumPy arrays are refused where CuPy refuses them, and implicit conversion to NumPy
  raises TypeError; reads to the host and uploads are counted in ``cupy._standin.counters``.
"""
from __future__ import annotations

import functools
import sys
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import _standin
from .cuda import runtime
from .cuda import stream as _stream
from .cuda.device import Device

# cupy/_core/_kernel.pyx, _check_peer_access (without peer access between the devices)
_PEER_ACCESS = ("The device where the array resides ({}) is different from the current device "
                "({}). Peer access is unavailable between these devices.")
# cupy/_core/core.pyx, ndarray.__array__
_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
             "construct a NumPy array explicitly.")
# cupy/_core/_scalar.pyx, _python_scalar_type_set: exact types (an int subclass is refused)
_PY_SCALARS = (bool, int, float, complex)


def _is_scalar(x: Any) -> bool:
    return type(x) in _PY_SCALARS or isinstance(x, np.generic)


def _unsupported(x: Any) -> TypeError:
    """CuPy's refusal of a kernel argument that is neither a device array nor a scalar
    (``CScalar`` in cupy/_core/_scalar.pyx), a host NumPy array included."""
    return TypeError(f"Unsupported type {type(x)}")


def _check_devices(arrays: Iterable[ndarray], device: int) -> None:
    for x in arrays:
        if x._device != device:
            raise ValueError(_PEER_ACCESS.format(x._device, device))


def _read_back(device: int) -> None:
    """A device-to-host copy an operation itself needs (CuPy reads a count back for
    boolean-mask indexing and ``nonzero``): it waits for the device and is counted."""
    _stream._wait_for_read(device)
    _standin._count("host_reads")


# -- making stand-in arrays ---------------------------------------------------------------
def _make(a: np.ndarray, device: int, base: ndarray | None) -> ndarray:
    x = ndarray.__new__(ndarray)
    x._a, x._device, x._base = a, device, base
    return x


def _new(a: np.ndarray, device: int) -> ndarray:
    """``a`` (memory no other stand-in array uses) as a new array of ``device``."""
    return _make(_standin._register(a, device), device, None)


def _view(a: np.ndarray, of: ndarray) -> ndarray:
    """``a``, a view of ``of``'s memory, as a view of ``of`` (CuPy: ``base`` is the array
    that owns the memory)."""
    return _make(a, of._device, of if of._base is None else of._base)


def _poisoned(a: np.ndarray) -> np.ndarray:
    """``a`` with every byte 0xFF (NaN for floats, -1 for signed integers), as gpunet's
    emulator fills fresh outputs: uninitialised memory that a test notices when read. Other
    dtypes (bool) are left alone: 0xFF is no valid bool."""
    if a.dtype.kind in "fciu" and a.size:
        a.reshape(-1, order="A").view(np.uint8).fill(0xFF)
    return a


def _root(a: Any) -> Any:
    """The object at the end of ``a``'s chain of bases: the same for ``a`` and its views
    (NumPy's ``as_strided`` puts a non-array between them, hence ``getattr``)."""
    while (base := getattr(a, "base", None)) is not None:
        a = base
    return a


def _source(a: np.ndarray, inputs: Sequence[ndarray]) -> tuple[ndarray | None, bool]:
    """``(x, same)``: the input ``a`` is (``same``) or is a view of, else ``(None, False)``."""
    for x in inputs:
        if a is x._a:
            return x, True
    root = _root(a)
    for x in inputs:
        if _root(x._a) is root:
            return x, False
    return None, False


def _makes_new(result: Any, inputs: Sequence[ndarray]) -> bool:
    if isinstance(result, np.ndarray):
        return _source(result, inputs)[0] is None
    if isinstance(result, np.generic):
        return True
    if type(result) in (list, tuple):
        return any(_makes_new(r, inputs) for r in result)
    return False


def _convert(result: Any, inputs: Sequence[ndarray], device: int) -> Any:
    """NumPy's ``result`` as stand-in arrays: an input itself, a view of one, or new arrays
    on ``device``. NumPy scalars become 0-d arrays, as CuPy returns them."""
    if isinstance(result, np.ndarray):
        x, same = _source(result, inputs)
        if x is None:
            return _new(result, device)
        return x if same else _view(result, x)
    if isinstance(result, np.generic):
        return _new(np.asarray(result), device)
    if type(result) in (list, tuple):
        return type(result)(_convert(r, inputs, device) for r in result)
    return result


def _unwrap(x: Any, found: list[ndarray]) -> Any:
    """``x`` with stand-in arrays replaced by their NumPy arrays (collected in ``found``),
    through lists and tuples; a host NumPy array is refused."""
    if isinstance(x, ndarray):
        found.append(x)
        return x._a
    if isinstance(x, np.ndarray):
        raise _unsupported(x)
    if type(x) in (list, tuple):
        return type(x)(_unwrap(v, found) for v in x)
    return x


def _call(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], *,
          extra: Sequence[ndarray] = (), eager: bool = False, metadata: bool = False,
          reads_back: bool = False) -> Any:
    """``func`` (NumPy) on the arrays behind the stand-in arrays in ``args``/``kwargs`` (and
    ``extra``, the array a method is bound to), under CuPy's rules. The device check comes
    first when the call writes into existing memory (``eager``, or ``out=``), else only when
    the call made a new array (a pure view runs no kernel in CuPy). ``metadata``: a Python
    number result is metadata (``ndim``), not data that CuPy would return as a 0-d array.
    ``reads_back``: CuPy reads a count back to size the result (``nonzero``)."""
    device = runtime.getDevice()
    inputs = list(extra)
    args = [_unwrap(a, inputs) for a in args]
    kwargs = {k: _unwrap(v, inputs) for k, v in kwargs.items()}
    checked = eager or kwargs.get("out") is not None
    if checked:
        _check_devices(inputs, device)
    result = func(*args, **kwargs)
    if type(result) in _PY_SCALARS and inputs and not metadata:
        result = np.asarray(result)
    if not checked and _makes_new(result, inputs):
        _check_devices(inputs, device)
    if reads_back:
        _read_back(device)
    return _convert(result, inputs, device)


# NumPy functions that write into an argument without out= (checked before they run)
_WRITES_IN_PLACE = frozenset({"copyto", "put", "place", "putmask", "fill_diagonal",
                              "put_along_axis"})
# NumPy functions whose Python-number answer is metadata, not a 0-d array in CuPy
_METADATA = frozenset({"ndim", "size", "shape", "isscalar", "iscomplexobj", "isrealobj",
                       "may_share_memory", "shares_memory", "result_type", "can_cast",
                       "min_scalar_type", "iterable", "isfortran", "broadcast_shapes"})
# CuPy reads the number of nonzero elements back (_ndarray_argwhere in
# cupy/_core/_routines_indexing.pyx)
_READS_BACK = frozenset({"nonzero", "flatnonzero", "argwhere"})
# CuPy implements these on the host, through ndarray.get (cupy/_io)
_VIA_HOST = frozenset({"array2string", "array_repr", "array_str", "save", "savez",
                       "savez_compressed", "savetxt"})


def _to_host(x: Any) -> Any:
    if isinstance(x, ndarray):
        return x.get()
    if type(x) in (list, tuple):
        return type(x)(_to_host(v) for v in x)
    return x


def wrap_function(func: Callable[..., Any], name: str) -> Callable[..., Any]:
    """NumPy function ``func`` as the stand-in's ``cupy.<name>``."""
    if name in _VIA_HOST:
        @functools.wraps(func)
        def via_host(*args: Any, **kwargs: Any) -> Any:
            return func(*_to_host(args), **{k: _to_host(v) for k, v in kwargs.items()})
        return via_host

    @functools.wraps(func)
    def standin(*args: Any, **kwargs: Any) -> Any:
        return _call(func, args, kwargs, eager=name in _WRITES_IN_PLACE,
                     metadata=name in _METADATA,
                     reads_back=name in _READS_BACK or (name == "where" and len(args) == 1))
    return standin


# -- ufuncs -------------------------------------------------------------------------------
class ufunc:
    """A NumPy ufunc under CuPy's kernel rules (``ufunc.__call__`` in cupy/_core/_kernel.pyx):
    inputs and outputs are stand-in arrays or Python/NumPy scalars, all on the current
    device, checked before anything is written."""

    _METHODS = frozenset({"reduce", "accumulate", "reduceat", "outer", "at"})

    def __init__(self, np_ufunc: np.ufunc) -> None:
        self._ufunc = np_ufunc
        self.__name__ = np_ufunc.__name__
        self.nin, self.nout, self.nargs = np_ufunc.nin, np_ufunc.nout, np_ufunc.nargs

    def __repr__(self) -> str:
        return f"<ufunc '{self.__name__}'>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        device = runtime.getDevice()
        inputs: list[ndarray] = []
        values = []
        for a in args:  # positional outputs too
            if isinstance(a, ndarray):
                inputs.append(a)
                values.append(a._a)
            elif _is_scalar(a):
                values.append(a)
            else:
                raise _unsupported(a)
        out = kwargs.pop("out", None)
        kwargs = {k: _unwrap(v, inputs) for k, v in kwargs.items()}
        if out is not None:
            outs = out if isinstance(out, tuple) else (out,)
            for o in outs:
                if o is not None and not isinstance(o, ndarray):
                    raise _unsupported(o)
            inputs += [o for o in outs if o is not None]
            kwargs["out"] = (tuple(None if o is None else o._a for o in outs)
                             if isinstance(out, tuple) else out._a)
        _check_devices(inputs, device)
        return _convert(self._ufunc(*values, **kwargs), inputs, device)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in self._METHODS:
            raise AttributeError(f"ufunc {self.__name__!r} has no attribute {name!r}")
        method = getattr(self._ufunc, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return _call(method, args, kwargs, eager=True)  # at() writes in place
        return call


_ufuncs: dict[str, ufunc] = {}


def get_ufunc(name: str) -> ufunc:
    """The stand-in's ``cupy.<name>`` for NumPy ufunc ``numpy.<name>`` (one object each)."""
    if name not in _ufuncs:
        _ufuncs[name] = ufunc(getattr(np, name))
    return _ufuncs[name]


def _defers_to(other: Any) -> bool:
    """CuPy's ``_should_use_rop`` (cupy/_core/core.pyx): leave a binary operator to ``other``
    when it opts out of ufuncs or outranks ndarray's ``__array_priority__``."""
    other_ufunc = getattr(other, "__array_ufunc__", _defers_to)
    if other_ufunc is not _defers_to:
        return other_ufunc is None
    return ndarray.__array_priority__ < getattr(other, "__array_priority__", 0)


def _operator(name: str, reflected: bool = False, inplace: bool = False) -> Callable:
    def op(self: ndarray, other: Any) -> Any:
        if not isinstance(other, ndarray) and _defers_to(other):
            return NotImplemented
        f = get_ufunc(name)
        if inplace:
            f(self, other, out=self)
            return self
        return f(other, self) if reflected else f(self, other)
    op.__name__ = f"__{'i' if inplace else 'r' if reflected else ''}{name}__"
    return op


def _comparison(name: str, default: Callable[..., Any] | None = None) -> Callable:
    """CuPy's ``__richcmp__``: a 0-d NumPy array compares as its value; ``==``/``!=`` with
    None or an object without its own ``__eq__`` is all False/True (``default``)."""
    def op(self: ndarray, other: Any) -> Any:
        if not isinstance(other, ndarray):
            if _defers_to(other):
                return NotImplemented
            if isinstance(other, np.ndarray) and other.ndim == 0:
                other = other.item()
            if default is not None and (other is None or type(other).__eq__ is object.__eq__):
                return _new(default(self.shape, dtype=bool), runtime.getDevice())
        return get_ufunc(name)(self, other)
    return op


# -- indexing -----------------------------------------------------------------------------
def _prepare_index(key: Any, inputs: list[ndarray]) -> tuple[Any, bool, bool]:
    """``(key, advanced, masked)``: ``key`` with stand-in index arrays unwrapped (added to
    ``inputs``) and host index arrays and lists uploaded, as CuPy's ``_prepare_slice_list``
    (cupy/_core/_routines_indexing.pyx) turns them into device arrays; whether an index array
    makes this advanced indexing (a kernel, a new array), and whether one is a non-empty
    boolean mask (CuPy then reads the count of True back)."""
    items = list(key) if isinstance(key, tuple) else [key]
    advanced = masked = False
    for i, s in enumerate(items):
        if s is None or s is Ellipsis or isinstance(s, slice):
            continue
        if isinstance(s, ndarray):
            inputs.append(s)
            items[i] = index = s._a
        elif isinstance(s, (list, tuple, np.ndarray, bool, np.bool_)):
            index = np.asarray(s)
            if isinstance(s, (list, tuple)) and index.size == 0:
                index = index.astype(np.int32)  # an empty list is no indices, not a mask
            _standin._count("uploads")
            items[i] = index
        else:
            continue  # an integer (a view), or something NumPy will refuse
        advanced = True
        masked |= index.dtype == np.bool_ and index.size > 0
    return (tuple(items) if isinstance(key, tuple) else items[0]), advanced, masked


def _basic(a: np.ndarray, key: Any) -> np.ndarray:
    """``a[key]`` for a basic index, always as a view (NumPy gives a scalar for a full
    integer index, CuPy a 0-d view; an Ellipsis makes NumPy give the view too)."""
    r = a[key]
    if not isinstance(r, np.ndarray):
        r = a[(*key, Ellipsis) if isinstance(key, tuple) else (key, Ellipsis)]
    return r


def _squeeze_leading_unit_dims(a: np.ndarray) -> np.ndarray:
    """As CuPy does to a value before assigning it (cupy/_core/_routines_indexing.pyx)."""
    i = 0
    while i < a.ndim and a.shape[i] == 1:
        i += 1
    return a.reshape(a.shape[i:]) if i else a


class _Flags:
    """``ndarray.flags`` (cupy/_core/flags.pyx): three flags, by attribute or by name."""

    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, c_contiguous: bool, f_contiguous: bool, owndata: bool) -> None:
        self.c_contiguous, self.f_contiguous, self.owndata = c_contiguous, f_contiguous, owndata

    def __getitem__(self, name: str) -> bool:
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[name]

    def __repr__(self) -> str:
        return "\n".join(f"  {k} : {self[k]}" for k in ("C_CONTIGUOUS", "F_CONTIGUOUS",
                                                        "OWNDATA"))


class MemoryPointer:
    """``ndarray.data``: ``ptr`` is the address of the array's first element (of the host
    buffer standing for device memory), ``device_id`` its device."""

    __slots__ = ("ptr", "device_id")

    def __init__(self, ptr: int, device_id: int) -> None:
        self.ptr, self.device_id = ptr, device_id

    @property
    def device(self) -> Device:
        return Device(self.device_id)

    def __repr__(self) -> str:
        return f"<MemoryPointer {self.ptr:#x} (device {self.device_id})>"


# ndarray methods that write into the array itself (checked before they run)
_INPLACE_METHODS = frozenset({"sort", "partition", "put", "resize", "setfield", "byteswap"})


class ndarray:
    """A stand-in for ``cupy.ndarray``: a NumPy array that lives on a device.

    ``ndarray(shape, dtype)`` allocates on the current device (uninitialised: 0xFF bytes).
    Methods NumPy's ndarray has and this class does not define run through :func:`_call`;
    reads to the host (``get``, ``item``, ``tolist``, ``float``, ``int``, ``bool``, printing)
    are explicit and counted."""

    __slots__ = ("_a", "_device", "_base", "__weakref__")
    __array_priority__ = 100  # cupy/_core/core.pyx

    def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None, strides: Any = None,
                 order: str = "C") -> None:
        if memptr is not None or strides is not None:
            raise NotImplementedError("CuPy stand-in: ndarray(memptr=..., strides=...) is not "
                                      "modelled")
        device = runtime.getDevice()
        self._a = _standin._register(_poisoned(np.empty(shape, dtype=dtype, order=order)),
                                     device)
        self._device, self._base = device, None

    # -- attributes -----------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: _view(self._a.T, self))
    mT = property(lambda self: _view(self._a.mT, self))
    base = property(lambda self: self._base)
    real = property(lambda self: _call(lambda: self._a.real, (), {}, extra=(self,)))
    imag = property(lambda self: _call(lambda: self._a.imag, (), {}, extra=(self,)))

    @property
    def flags(self) -> _Flags:
        return _Flags(self._a.flags.c_contiguous, self._a.flags.f_contiguous, self._base is None)

    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(self._a.ctypes.data, self._device)

    @property
    def device(self) -> Device:
        return Device(self._device)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # Only NumPy's methods: its other attributes (ctypes, flat, __array_interface__)
        # would hand out host memory, which a device array does not have.
        if name.startswith("_") or not callable(getattr(np.ndarray, name, None)):
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")
        method = getattr(self._a, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return _call(method, args, kwargs, extra=(self,), eager=name in _INPLACE_METHODS,
                         reads_back=name in _READS_BACK)
        call.__name__ = name
        return call

    # -- transfers ------------------------------------------------------------------------
    def get(self, stream: Any = None, order: str = "C", out: np.ndarray | None = None,
            blocking: bool = True) -> np.ndarray:
        """A host copy (cupy/_core/core.pyx ``get``): waits for the stream the copy runs on
        (``stream`` or the current one, on this array's device) unless ``blocking=False``;
        one host read."""
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained fromcupy.ndarray")  # sic
            if self.dtype != out.dtype:
                raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
            if self.shape != out.shape:
                raise ValueError(f"Shape mismatch. Expected shape: {self.shape}, actual shape: "
                                 f"{out.shape}")
        elif self.size == 0:
            return np.ndarray(self.shape, dtype=self.dtype)  # nothing to copy, no sync
        if blocking:
            _stream._wait_for_read(self._device, stream)
        _standin._count("host_reads")
        if out is not None:
            np.copyto(out, self._a)
            return out
        order = order.upper()
        if order == "A":
            order = "F" if self._a.flags.f_contiguous else "C"
        return np.array(self._a, order=order, copy=True)

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        """Copy host array ``arr`` in (one upload); a memory copy, so no device check."""
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not (self._a.flags.c_contiguous or self._a.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        _standin._count("uploads")
        np.copyto(self._a, arr)

    def copy(self, order: str = "C") -> ndarray:
        """A copy on the current device. From another device CuPy copies memory to memory
        (no kernel, hence no peer check: ``ndarray.copy`` in cupy/_core/core.pyx), which it
        cannot do for a non-contiguous array with ``order='K'``."""
        device = runtime.getDevice()
        if (self._device != device and self.size and order.upper() == "K"
                and not (self._a.flags.c_contiguous or self._a.flags.f_contiguous)):
            raise NotImplementedError("CuPy cannot copy non-contiguous array between devices.")
        return _new(np.array(self._a, order=order, copy=True), device)

    def astype(self, dtype: Any, order: str = "K", casting: Any = None, subok: Any = None,
               copy: bool = True) -> ndarray:
        if casting is not None:
            raise TypeError("casting is not supported yet")
        if subok is not None:
            raise TypeError("subok is not supported yet")
        return _call(self._a.astype, (dtype,), {"order": order, "copy": copy}, extra=(self,))

    def fill(self, value: Any) -> None:
        """As CuPy's ``fill``: a scalar, or a 0-d array (host or current device)."""
        inputs = [self]
        if isinstance(value, ndarray):
            if value.shape != ():
                raise ValueError("non-scalar cupy.ndarray cannot be used for fill")
            inputs.append(value)
            value = value._a
        else:
            value = np.asarray(value, dtype=self.dtype)
            if value.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        _check_devices(inputs, runtime.getDevice())
        self._a.fill(value)

    def item(self) -> Any:
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self.get().item()

    def tolist(self) -> Any:
        return self.get().tolist()

    def tobytes(self, order: str = "C") -> bytes:
        return self.get().tobytes(order)

    def tofile(self, fid: Any, sep: str = "", format: str = "%s") -> None:
        self.get().tofile(fid, sep, format)

    def dump(self, file: Any) -> None:
        self.get().dump(file)

    def dumps(self) -> bytes:
        return self.get().dumps()

    # -- conversions (cupy/_core/core.pyx: each reads through get) ------------------------
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(_IMPLICIT)

    def __bool__(self) -> bool:
        if self.size == 0:
            warnings.warn("The truth value of an empty array is ambiguous. Returning False, "
                          "but in future this will result in an error. Use `array.size > 0` "
                          "to check that an array is not empty.", DeprecationWarning,
                          stacklevel=2)
            return False
        if self.size == 1:
            return bool(self.get())
        raise ValueError("The truth value of an array with more than one element is "
                         "ambiguous. Use a.any() or a.all()")

    # CuPy defines no __index__: a device array is not a Python integer.
    def __int__(self) -> int:
        return int(self.get())

    def __float__(self) -> float:
        return float(self.get())

    def __complex__(self) -> complex:
        return complex(self.get())

    def __repr__(self) -> str:
        return repr(self.get())

    def __str__(self) -> str:
        return str(self.get())

    def __format__(self, format_spec: str) -> str:
        return format(self.get(), format_spec)

    def __reduce__(self) -> tuple[Any, ...]:
        return array, (self.get(order="A"),)

    def __copy__(self) -> ndarray:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> ndarray:
        with Device(self._device):  # a deep copy stays on the array's device
            return self.copy()

    # -- containers and indexing ----------------------------------------------------------
    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __iter__(self) -> Any:
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    def __getitem__(self, key: Any) -> ndarray:
        inputs = [self]
        key, advanced, masked = _prepare_index(key, inputs)
        if not advanced:
            return _view(_basic(self._a, key), self)
        device = runtime.getDevice()
        _check_devices(inputs, device)
        if masked:
            _read_back(device)
        result = self._a[key]
        if not isinstance(result, np.ndarray) or _root(result) is _root(self._a):
            result = np.array(result)  # a 0-d integer-array index: NumPy's view, CuPy's copy
        return _new(result, device)

    def __setitem__(self, key: Any, value: Any) -> None:
        """As CuPy's ``_scatter_op`` (cupy/_core/_routines_indexing.pyx): a device value of
        the target's exact layout is copied memory to memory (from any device); a host
        array is refused for basic indexing (gh-2079) and uploaded for advanced indexing."""
        inputs = [self]
        key, advanced, masked = _prepare_index(key, inputs)
        if isinstance(value, ndarray):
            if not advanced:
                target, source = _basic(self._a, key), _squeeze_leading_unit_dims(value._a)
                if (target.shape == source.shape and target.strides == source.strides
                        and target.dtype == source.dtype and target.flags.c_contiguous):
                    np.copyto(target, source)
                    return
            inputs.append(value)
            value = value._a
        elif advanced:
            _standin._count("uploads")  # core.array(value) in _scatter_op_single
        elif not _is_scalar(value):
            value = np.asarray(value, dtype=self.dtype)
            if value.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        device = runtime.getDevice()
        _check_devices(inputs, device)
        if masked:
            _read_back(device)
        self._a[key] = value

    # -- NumPy's dispatch (cupy/_core/core.pyx) -------------------------------------------
    def __array_ufunc__(self, np_ufunc: np.ufunc, method: str, *inputs: Any,
                        **kwargs: Any) -> Any:
        if method not in ("__call__", "outer", "at", "reduce", "accumulate", "reduceat"):
            return NotImplemented
        inout = inputs
        if "out" in kwargs:
            out = kwargs["out"]
            if len(out) != 1:
                raise ValueError("The 'out' parameter must have exactly one array value")
            inout += out
            kwargs["out"] = out[0]
        for x in inout:
            if not (_is_scalar(x) or isinstance(x, (ndarray, np.ndarray))):
                return NotImplemented
        func = get_ufunc(np_ufunc.__name__)
        if method != "__call__":
            func = getattr(func, method)
        if np_ufunc.__name__ in ("greater", "greater_equal", "less", "less_equal", "equal",
                                 "not_equal"):
            inputs = tuple(x.item() if isinstance(x, np.ndarray) and x.ndim == 0 else x
                           for x in inputs)
        return func(*inputs, **kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        module = sys.modules[__package__]
        try:
            for part in func.__module__.split(".")[1:]:
                module = getattr(module, part)
            standin_func = getattr(module, func.__name__)
        except AttributeError:
            return NotImplemented
        if standin_func is func or not all(issubclass(t, (ndarray, np.ndarray)) for t in types):
            return NotImplemented
        return standin_func(*args, **kwargs)

    # -- arithmetic -----------------------------------------------------------------------
    __neg__ = lambda self: get_ufunc("negative")(self)  # noqa: E731
    __pos__ = lambda self: get_ufunc("positive")(self)  # noqa: E731
    __abs__ = lambda self: get_ufunc("absolute")(self)  # noqa: E731
    __invert__ = lambda self: get_ufunc("invert")(self)  # noqa: E731
    __lt__ = _comparison("less")
    __le__ = _comparison("less_equal")
    __gt__ = _comparison("greater")
    __ge__ = _comparison("greater_equal")
    __eq__ = _comparison("equal", np.zeros)  # type: ignore[assignment]
    __ne__ = _comparison("not_equal", np.ones)  # type: ignore[assignment]
    __hash__ = None  # type: ignore[assignment]

    def __divmod__(self, other: Any) -> Any:
        return NotImplemented if _defers_to(other) else get_ufunc("divmod")(self, other)

    def __rdivmod__(self, other: Any) -> Any:
        return NotImplemented if _defers_to(other) else get_ufunc("divmod")(other, self)


for _name, _ufunc_name in (("add", "add"), ("sub", "subtract"), ("mul", "multiply"),
                           ("matmul", "matmul"), ("truediv", "true_divide"),
                           ("floordiv", "floor_divide"), ("mod", "remainder"),
                           ("pow", "power"), ("lshift", "left_shift"),
                           ("rshift", "right_shift"), ("and", "bitwise_and"),
                           ("or", "bitwise_or"), ("xor", "bitwise_xor")):
    setattr(ndarray, f"__{_name}__", _operator(_ufunc_name))
    setattr(ndarray, f"__r{_name}__", _operator(_ufunc_name, reflected=True))
    setattr(ndarray, f"__i{_name}__", _operator(_ufunc_name, inplace=True))


# -- creation and transfers ---------------------------------------------------------------
def _nested_device_arrays(obj: Any) -> list[ndarray] | None:
    """The leaves of a list/tuple nest when every leaf is a stand-in array, else None."""
    if isinstance(obj, ndarray):
        return [obj]
    if type(obj) not in (list, tuple) or not obj:
        return None
    leaves: list[ndarray] = []
    for item in obj:
        found = _nested_device_arrays(item)
        if found is None:
            return None
        leaves += found
    return leaves


def array(obj: Any, dtype: Any = None, copy: Any = True, order: str | None = "K",
          subok: bool = False, ndmin: int = 0, *, blocking: bool = False) -> ndarray:
    """``cupy.array`` (``array`` in cupy/_core/core.pyx), on the current device: a device
    array is converted there (copied memory to memory from another device); a nest of
    device arrays is joined by a kernel (device check); anything else is host data, uploaded
    once."""
    if subok:
        raise NotImplementedError
    order = "K" if order is None else order
    device = runtime.getDevice()
    if isinstance(obj, ndarray):
        if obj._device != device:
            obj = obj.copy(order=order)
            copy = None
        return _call(np.array, (obj,), {"dtype": dtype, "copy": copy, "order": order,
                                        "ndmin": ndmin})
    leaves = _nested_device_arrays(obj)
    if leaves is not None:
        _check_devices(leaves, device)
        joined = np.array(_unwrap(obj, []), dtype=dtype, ndmin=ndmin,
                          order="F" if order.upper() == "F" else "C")
        return _new(joined, device)
    if isinstance(obj, np.ndarray) and order.upper() in "KA":
        order = "F" if obj.flags.fnc else "C"
    host = np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    _standin._count("uploads")
    return _new(host, device)


def asarray(a: Any, dtype: Any = None, order: str | None = None, *, copy: Any = None,
            blocking: bool = False) -> ndarray:
    return array(a, dtype, copy, order, blocking=blocking)


def asanyarray(a: Any, dtype: Any = None, order: str | None = None, *, copy: Any = None,
               blocking: bool = False) -> ndarray:
    return array(a, dtype, copy, order, blocking=blocking)


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: np.ndarray | None = None, *,
            blocking: bool = True) -> np.ndarray:
    """A host copy of a device array (one host read); anything else through NumPy."""
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    if out is None:
        return np.asarray(a, order=order)
    out[...] = a
    return out


def copy(a: ndarray, order: str = "K") -> ndarray:
    return a.copy(order=order)


def get_array_module(*args: Any) -> Any:
    return sys.modules[__package__] if any(isinstance(a, ndarray) for a in args) else np


def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return ndarray(shape, dtype, order=order)


def _like(np_func: Callable[..., np.ndarray], poison: bool = False) -> Callable[..., ndarray]:
    """``cupy.<np_func>``: the template's shape and dtype only (no kernel reads it, so no
    device check), a new array on the current device."""
    @functools.wraps(np_func)
    def like(a: Any, *args: Any, **kwargs: Any) -> ndarray:
        result = np_func(a._a if isinstance(a, ndarray) else a, *args, **kwargs)
        return _new(_poisoned(result) if poison else result, runtime.getDevice())
    return like


empty_like = _like(np.empty_like, poison=True)
zeros_like = _like(np.zeros_like)
ones_like = _like(np.ones_like)
full_like = _like(np.full_like)
