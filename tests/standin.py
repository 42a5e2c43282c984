"""Running gpunet's CUDA backend on the CuPy stand-in (``tests/cupy_standin``), in this process
(:func:`standin_cupy`) or in a subprocess (:func:`standin_env`)."""
from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

#: The folder that makes the stand-in importable as top-level ``cupy``.
STANDIN_PATH = Path(__file__).resolve().parent / "cupy_standin"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_NCCL_MODES = ("ok", "missing", "hang")


def _settings(gpus: int, nccl: str) -> dict[str, str]:
    if not isinstance(gpus, int) or gpus < 0:
        raise ValueError(f"gpus must be a count of GPUs (0 or more), got {gpus!r}")
    if nccl not in _NCCL_MODES:
        raise ValueError(f"nccl must be one of {', '.join(_NCCL_MODES)}, got {nccl!r}")
    return {"GPUNET_STANDIN_GPUS": str(gpus), "GPUNET_STANDIN_NCCL": nccl}


def _is_cupy_module(name: str) -> bool:
    """``cupy``, its submodules and its siblings (``cupyx``, ``cupy_backends``): a real
    ``cupyx`` left behind would import the real CuPy again."""
    return name.split(".")[0].startswith("cupy")


def _clear_gpunet_cuda_devices() -> None:
    """Forget gpunet's cached ``cuda:N`` devices, which hold the ``cupy`` module they were
    made with. The cache is ``_devices`` of the device-selection module, ``gpunet.backends``
    (formerly ``gpunet.backend``); one not imported yet has nothing cached."""
    for name in ("gpunet.backends", "gpunet.backend"):
        devices = getattr(sys.modules.get(name), "_devices", None)
        if isinstance(devices, dict):
            for key in [k for k in devices if k.startswith("cuda")]:
                del devices[key]


@contextmanager
def standin_cupy(gpus: int = 2, nccl: str = "ok") -> Iterator[ModuleType]:
    """Make ``import cupy`` give the stand-in, freshly imported (its counters, devices and
    loaded modules new), with ``gpus`` GPUs and NCCL mode ``nccl``; yields the module. On exit
    ``sys.modules``, ``sys.path`` and the environment are as they were, so a machine with real
    CuPy gets it back. gpunet's cached CUDA devices are cleared on entry and on exit."""
    settings = _settings(gpus, nccl)
    saved_modules = {k: v for k, v in sys.modules.items() if _is_cupy_module(k)}
    saved_path = list(sys.path)
    saved_env = {k: os.environ.get(k) for k in settings}
    for name in saved_modules:
        del sys.modules[name]
    sys.path.insert(0, str(STANDIN_PATH))
    os.environ.update(settings)  # the stand-in reads its settings when imported
    _clear_gpunet_cuda_devices()
    try:
        cupy = importlib.import_module("cupy")
        if not getattr(cupy, "GPUNET_STANDIN", False):
            raise RuntimeError(f"import cupy gave {cupy.__file__}, not the stand-in")
        yield cupy
    finally:
        for name in [k for k in sys.modules if _is_cupy_module(k)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_gpunet_cuda_devices()


def standin_env(gpus: int = 2, nccl: str = "ok") -> dict[str, str]:
    """The environment (a copy of this process's) for a subprocess whose ``import cupy`` gives
    the stand-in: the stand-in and then the repository (where gpunet, which the stand-in's
    RawModule uses, lives) prepended to ``PYTHONPATH``, and the stand-in's settings."""
    env = {**os.environ, **_settings(gpus, nccl)}
    paths = [str(STANDIN_PATH), str(_REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
