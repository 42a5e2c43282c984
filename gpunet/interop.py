"""Weights in and out of other frameworks: safetensors files and DLPack arrays here, and, from
their own modules, PyTorch modules (:func:`from_torch`, :func:`to_torch`,
:mod:`gpunet.torch_convert`) and ONNX files (:func:`export_onnx`, :mod:`gpunet.onnx_export`).

:func:`save_safetensors` writes a model as a ``.safetensors`` file, the format of model hubs:
its tensors under PyTorch's ``state_dict`` names for the equivalent ``torch.nn`` model
(``"0.weight"``, ``"1.running_mean"``; BatchNorm's ``gamma``/``beta`` as ``weight``/``bias``,
the recurrent layers' weights as ``weight_ih_l0``...: :data:`_TORCH_NAMES`), and gpunet's
architecture (``model.config()``), dtype and a format marker in the file's string metadata, so
:func:`load_safetensors` rebuilds the whole model. Loading never runs code: safetensors holds
raw arrays and JSON, and layers are built only from gpunet's layer registry
(:func:`~gpunet.layers.base.from_config`).

:func:`from_dlpack` takes an array from any object implementing ``__dlpack__`` (a PyTorch
tensor, a JAX array, a CuPy or NumPy array) without a copy. gpunet's arrays are NumPy or CuPy
arrays, which implement ``__dlpack__`` themselves: ``torch.from_dlpack(array)`` shares their
memory.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Array, Backend, _import_cupy, get_device, is_device_array
from .onnx_export import export_onnx
from .torch_convert import from_torch, to_torch
from .errors import CheckpointError, DeviceError
from .layers.base import Layer, from_config
from .serialize import _check_model_arrays, _put_model_arrays

__all__ = ["save_safetensors", "load_safetensors", "from_dlpack", "from_torch", "to_torch",
           "export_onnx"]

#: the metadata value of ``"format"`` that marks a safetensors file gpunet wrote
FORMAT = "gpunet"
VERSION = 1


def _safetensors(owner: str) -> Any:
    """``safetensors.numpy``, or an ImportError that says how to install it."""
    try:
        import safetensors.numpy
    except ImportError as e:
        raise ImportError(f"gpunet.{owner} needs the safetensors package ({e}); install it "
                          'with pip install -e ".[interop]" (or pip install safetensors)') from e
    return safetensors.numpy


#: Parameter names PyTorch spells otherwise, by gpunet layer class (the layouts are the same).
#: gpunet's LSTM and RNN keep one bias where PyTorch has two (``b = bias_ih + bias_hh``): it is
#: written as ``bias_ih_l0`` beside a zero ``bias_hh_l0``, and read back as their sum.
_TORCH_NAMES: dict[str, dict[str, str]] = {
    "BatchNorm": {"gamma": "weight", "beta": "bias"},
    "LSTM": {"W_x": "weight_ih_l0", "W_h": "weight_hh_l0", "b": "bias_ih_l0"},
    "RNN": {"W_x": "weight_ih_l0", "W_h": "weight_hh_l0", "b": "bias_ih_l0"},
    "GRU": {"W_x": "weight_ih_l0", "W_h": "weight_hh_l0", "b_x": "bias_ih_l0",
            "b_h": "bias_hh_l0"},
}
_SUMMED_BIAS = ("LSTM", "RNN")


def _torch_names(model: Layer) -> dict[str, tuple[str, Layer, str]]:
    """Each :meth:`~gpunet.Layer.state_dict` name of ``model`` mapped to ``(PyTorch's name,
    the layer holding it, its name in that layer)``."""
    layers: dict[str, Layer] = {}

    def visit(layer: Layer, prefix: str) -> None:
        layers[prefix] = layer
        for name, child in layer.children().items():
            visit(child, f"{prefix}{name}.")
    visit(model, "")
    names = {}
    for key in model.state_dict():
        prefix, _, local = key.rpartition(".")
        prefix = f"{prefix}." if prefix else ""
        layer = layers[prefix]
        names[key] = (prefix + _TORCH_NAMES.get(layer.name, {}).get(local, local), layer, local)
    return names


def save_safetensors(model: Layer, path: str | os.PathLike) -> None:
    """Write ``model``'s parameters and state to ``path`` as a safetensors file under
    PyTorch's ``state_dict`` names (:data:`_TORCH_NAMES`: BatchNorm's ``gamma``/``beta`` as
    ``weight``/``bias`` with a ``num_batches_tracked`` of 0, the recurrent layers'
    ``weight_ih_l0``...), so the equivalent ``torch.nn`` model loads it with
    ``load_state_dict``, and with gpunet's architecture in the metadata::

        gpunet.save_safetensors(model, "model.safetensors")
    """
    st = _safetensors("save_safetensors")
    metadata = {"format": FORMAT, "version": str(VERSION),
                "architecture": json.dumps(model.config()), "dtype": str(model.dtype)}
    if model.shared():  # the config rebuilds separate layers: record which weights are one
        metadata["shared"] = json.dumps(model.shared())
    state = model.state_dict()
    tensors = {}
    for key, (torch_name, layer, local) in _torch_names(model).items():
        tensors[torch_name] = np.ascontiguousarray(state[key])
        if layer.name in _SUMMED_BIAS and local == "b":
            tensors[torch_name.replace("bias_ih", "bias_hh")] = np.zeros_like(state[key])
        if layer.name == "BatchNorm" and local == "running_mean":
            tensors[torch_name.replace("running_mean", "num_batches_tracked")] = np.zeros(
                (), np.int64)  # PyTorch's buffer; gpunet's momentum never needs the count
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:  # a temporary name, renamed when complete: a crash never leaves half a file
        st.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path: str | os.PathLike, st: Any) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and arrays of a safetensors file gpunet wrote; CheckpointError otherwise."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a safetensors file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        from safetensors import safe_open
        with safe_open(os.fspath(path), framework="np") as f:
            metadata = f.metadata()
        arrays = st.load_file(os.fspath(path))
    except Exception as e:  # SafetensorError (header, truncation), OSError, ...
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or "
                              f"corrupted?): {type(e).__name__}: {e}") from e
    if not metadata or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file without gpunet's metadata (no "
                              "architecture to rebuild the model from); load its tensors with "
                              "safetensors.numpy.load_file and Layer.load_state_dict")
    if metadata.get("version") != str(VERSION):
        raise CheckpointError(f"{path}: gpunet safetensors version {metadata.get('version')!r}, "
                              f"this gpunet reads version {VERSION}")
    return metadata, arrays


def load_safetensors(path: str | os.PathLike, device: str | Backend = "cpu") -> Layer:
    """Rebuild the model :func:`save_safetensors` wrote to ``path``, on ``device``. A damaged
    or foreign file raises :class:`~gpunet.CheckpointError`; nothing in it runs code."""
    st = _safetensors("load_safetensors")
    metadata, tensors = _read(path, st)
    try:
        model = from_config(json.loads(metadata["architecture"])).to(dtype=metadata["dtype"])
        shared = json.loads(metadata.get("shared", "{}"))
        if not isinstance(shared, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
            raise ValueError("the shared weights are not a map of names to names")
        for alias, first in shared.items():  # tie again what was one Parameter when saved
            model.share(alias, model.params()[first])
    except (KeyError, TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: the model description cannot be built: "
                              f"{type(e).__name__}: {e}") from e
    params, arrays, used = model.params(), {}, set()
    for key, (torch_name, layer, local) in _torch_names(model).items():
        if torch_name not in tensors:
            raise CheckpointError(f"{path}: the file's tensors do not fit the model (missing "
                                  f"{torch_name!r}, gpunet's {key!r})")
        value = tensors[torch_name]
        if value.dtype.kind != "f":
            raise CheckpointError(f"{path}: {torch_name} is {value.dtype} in the file, the "
                                  "model expects floating-point values")
        used.add(torch_name)
        if layer.name in _SUMMED_BIAS and local == "b":  # PyTorch's two biases are gpunet's b
            partner = torch_name.replace("bias_ih", "bias_hh")
            if partner in tensors and tensors[partner].shape == value.shape:
                value = value + tensors[partner]
                used.add(partner)
        arrays[f"param/{key}" if key in params else f"state/{key}"] = value
    extra = sorted(k for k in set(tensors) - used if not k.endswith("num_batches_tracked"))
    if extra:
        raise CheckpointError(f"{path}: the file's tensors do not fit the model (unexpected "
                              f"{extra})")
    _check_model_arrays(model, arrays, path)
    _put_model_arrays(model, arrays)
    return model.to(get_device(device))


# DLPack device types (dlpack.h's DLDeviceType)
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def from_dlpack(obj: Any, device: str | Backend | None = None) -> Array:
    """``obj`` (any object with ``__dlpack__``: a PyTorch tensor, a JAX array, a CuPy or NumPy
    array) as a gpunet array on its own device, sharing its memory: NumPy's ``from_dlpack``
    for host memory, CuPy's for a CUDA GPU's. ``device`` given and different: a copy there::

        x = gpunet.from_dlpack(torch.arange(4.0))        # a NumPy array on the tensor's memory
    """
    if is_device_array(obj):  # a CuPy array is a gpunet array already: taken as it is
        a: Any = obj
    elif not hasattr(obj, "__dlpack__"):
        raise TypeError(f"gpunet.from_dlpack: expected an object implementing __dlpack__ "
                        f"(a PyTorch tensor, JAX array, CuPy or NumPy array), got "
                        f"{type(obj).__name__}")
    else:
        kind, index = (obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__")
                       else (_DL_CPU, 0))
        if kind == _DL_CPU:
            a = np.from_dlpack(obj)
        elif kind in (_DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED):
            cupy = _import_cupy()
            with cupy.cuda.Device(int(index)):
                a = cupy.from_dlpack(obj)
        else:
            raise DeviceError(f"gpunet.from_dlpack: the object lives on DLPack device type "
                              f"{int(kind)}, which gpunet cannot use (host memory or CUDA "
                              "only)")
    if device is not None:
        target = get_device(device)
        if not target.owns(a):
            with target.scope():
                a = target.asarray(a)
    return a
