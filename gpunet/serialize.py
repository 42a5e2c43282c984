"""Saving and loading models and training checkpoints, without pickle.

A file is one ``.npz`` archive: the architecture and metadata as JSON (stored as bytes under
``__header__``) and every array as a plain NumPy array. Loading reads it with
``allow_pickle=False`` and rebuilds layers only from gpunet's layer registry, so an untrusted
file can never run code. The header carries a SHA-256 of the arrays: a truncated or tampered
file is refused with :class:`~gpunet.CheckpointError` before anything in a model changes.
Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, get_device, to_numpy
from .errors import CheckpointError
from .layers.base import Layer, from_config

FORMAT = "gpunet"
VERSION = 1
_HEADER = "__header__"


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write(path: str | os.PathLike, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    header = {"format": FORMAT, "version": VERSION, **header, "sha256": _digest(arrays)}
    blob = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_HEADER: blob}, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


#: the first bytes of a zip archive (a .npz file) and of a single NumPy array (.npy)
_ZIP_MAGIC, _NPY_MAGIC = b"PK\x03\x04", b"\x93NUMPY"


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and arrays of a gpunet file. A missing file raises FileNotFoundError;
    anything else that is not an intact gpunet file raises CheckpointError."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a gpunet model or checkpoint file")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read: {e}") from e
    if not magic.startswith(_ZIP_MAGIC):
        what = ("an empty file" if not magic else "a single NumPy array (.npy)"
                if magic == _NPY_MAGIC else "not a .npz archive")
        raise CheckpointError(f"{path}: not a gpunet file ({what}); gpunet.save and "
                              "checkpoints write .npz archives")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        blob = arrays.pop(_HEADER, None)
        header = None if blob is None else json.loads(blob.tobytes().decode())
    except Exception as e:
        # A damaged archive fails in whichever structure broke first, and the zip, zlib, npy
        # and JSON readers each raise their own exceptions (BadZipFile, zlib.error,
        # NotImplementedError for a garbled version field, ValueError, EOFError, ...)
        reason = ("it holds pickled (object) arrays, which gpunet neither writes nor loads"
                  if "pickle" in str(e) else f"{type(e).__name__}: {e}")
        raise CheckpointError(f"{path}: not a readable gpunet file (truncated or corrupted?): "
                              f"{reason}") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a gpunet file (no gpunet header)")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path}: file format version {header.get('version')!r}, "
                              f"this gpunet reads version {VERSION}")
    if header.get("sha256") != _digest(arrays):
        raise CheckpointError(f"{path}: the arrays do not match the checksum in the header "
                              "(the file was modified or damaged)")
    return header, arrays


def _model_arrays(model: Layer) -> dict[str, np.ndarray]:
    arrays = {f"param/{k}": to_numpy(p.data) for k, p in model.params().items()}
    arrays.update({f"state/{k}": to_numpy(v) for k, v in model.state().items()})
    return arrays


def _check_model_arrays(model: Layer, arrays: dict[str, np.ndarray], path: Any) -> None:
    """Raise unless the file holds exactly the model's arrays, with the model's shapes."""
    want = {f"param/{k}": p.data for k, p in model.params().items()}
    want.update({f"state/{k}": v for k, v in model.state().items()})
    got = {k for k in arrays if k.startswith(("param/", "state/"))}
    if got != set(want):
        missing, extra = sorted(set(want) - got), sorted(got - set(want))
        raise CheckpointError(f"{path}: the file's arrays do not fit the model "
                              f"(missing {missing}, unexpected {extra})")
    for k, target in want.items():
        if tuple(arrays[k].shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(arrays[k].shape)} in the file, "
                                  f"the model expects {tuple(target.shape)}")


def _put_model_arrays(model: Layer, arrays: dict[str, np.ndarray]) -> None:
    """Copy checked arrays into the model in place (references to parameters stay valid)."""
    with model.device.scope():
        for k, p in model.params().items():
            p.data[...] = model.ops.asarray(arrays[f"param/{k}"], dtype=p.data.dtype)
        for k, v in model.state().items():
            v[...] = model.ops.asarray(arrays[f"state/{k}"], dtype=v.dtype)


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def save(model: Layer, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
    """Write ``model`` (architecture, parameters and state) to ``path``, with ``meta``: JSON
    data that belongs with the model (a text model's vocabulary), read by :func:`read_meta`."""
    header = {"kind": "model", "architecture": model.config(), "dtype": str(model.dtype),
              "meta": _json(meta or {})}
    if model.shared():  # the config rebuilds separate layers: record which weights are one
        header["shared"] = model.shared()
    _write(path, header, _model_arrays(model))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` saved with a model or checkpoint (``{}`` when there is none); the file is
    checked as :func:`load` checks it."""
    header, _ = _read(path)
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the file's metadata is not a JSON object")
    return meta


def load(path: str | os.PathLike, device: str | Backend = "cpu") -> Layer:
    """Rebuild the model saved at ``path`` on ``device`` (any device, whichever saved it)."""
    header, arrays = _read(path)
    try:
        model = from_config(header["architecture"]).to(dtype=header["dtype"])
        shared = header.get("shared", {})
        if not isinstance(shared, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
            raise ValueError("the shared weights are not a map of names to names")
        for alias, first in shared.items():  # tie again what was one Parameter when saved
            model.share(alias, model.params()[first])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the model description cannot be built: {e}") from e
    _check_model_arrays(model, arrays, path)
    _put_model_arrays(model, arrays)
    return model.to(get_device(device))


def save_checkpoint(path: str | os.PathLike, model: Layer, optimizer: Any = None,
                    meta: dict[str, Any] | None = None,
                    extra: dict[str, np.ndarray] | None = None) -> None:
    """Write a training checkpoint: the model, the optimizer's state, JSON ``meta`` and
    ``extra`` host arrays by name (early stopping's best weights), read back by
    :func:`load_checkpoint`'s ``extra``."""
    arrays = _model_arrays(model)
    arrays.update({f"extra/{k}": v for k, v in (extra or {}).items()})
    opt_meta = None
    if optimizer is not None:
        state = optimizer.state_dict()
        arrays.update({f"optim/{k}": v for k, v in state["slots"].items()})
        opt_meta = {k: v for k, v in state.items() if k != "slots"}
    _write(path, {"kind": "checkpoint", "architecture": model.config(),
                  "dtype": str(model.dtype), "optimizer": opt_meta, "meta": meta or {}}, arrays)


def load_checkpoint(path: str | os.PathLike, model: Layer, optimizer: Any = None,
                    extra: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Restore ``model`` (and ``optimizer``) from a checkpoint; returns its ``meta``; a given
    ``extra`` dict receives the extra arrays saved with it. Nothing is changed unless the
    whole file checks out and fits."""
    header, arrays = _read(path)
    if header.get("architecture") != _json(model.config()):
        raise CheckpointError(f"{path}: the checkpoint was written for another architecture")
    _check_model_arrays(model, arrays, path)
    if optimizer is not None:
        if header.get("optimizer") is None:
            raise CheckpointError(f"{path}: the checkpoint holds no optimizer state")
        slots = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
        try:
            optimizer.load_state_dict({**header["optimizer"], "slots": slots})
        except ValueError as e:
            raise CheckpointError(f"{path}: optimizer state does not fit: {e}") from e
    _put_model_arrays(model, arrays)
    if extra is not None:
        extra.update({k[len("extra/"):]: v for k, v in arrays.items() if k.startswith("extra/")})
    return header.get("meta", {})
