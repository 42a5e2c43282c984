"""gpunet's CUDA kernels: where their sources live and what each file defines.

The ``.cu`` files are kept in the repository's top-level ``kernels/`` folder; the wheel ships
them as ``gpunet/_kernels``. Each kernel is a template over the element type, looked up by
``(name, dtype)`` as the name expression ``name<float>`` or ``name<double>``. Nothing is
compiled at import: a backend compiles a file the first time one of its kernels is launched.

The operations that launch them are :class:`gpunet.backends.KernelOps`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Each kernel file and the templated kernels it defines.
KERNELS: dict[str, tuple[str, ...]] = {
    "batchnorm.cu": ("bn_sum_nchw", "bn_sum_nc", "bn_sq_dev_nchw", "bn_sq_dev_nc",
                     "bn_reduce_nchw", "bn_reduce_nc", "bn_finish", "bn_backward_dx"),
    "conv.cu": ("conv_im2col", "conv_col2im", "conv_bias_grad", "conv_bias_grad_finish"),
    "pooling.cu": ("maxpool_forward", "maxpool_backward"),
    "lstm.cu": ("lstm_forward", "lstm_backward"),
    "layernorm.cu": ("ln_forward_warp", "ln_forward_block", "ln_backward_warp",
                     "ln_backward_block", "ln_param_grads", "ln_finish"),
    "embedding.cu": ("embedding_backward",),
    "gelu.cu": ("gelu_forward", "gelu_backward"),
}

#: Element types the kernels are instantiated for, with their C++ names.
CTYPES: dict[np.dtype, str] = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def kernel_dir() -> Path:
    """The folder holding the ``.cu`` and ``.cuh`` files."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_kernels", here.parent / "kernels"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"gpunet's CUDA kernel sources are missing: looked in "
                            f"{here / '_kernels'} and {here.parent / 'kernels'}")


def kernel_files() -> list[Path]:
    """Every kernel source file, sorted by name."""
    d = kernel_dir()
    return sorted([*d.glob("*.cu"), *d.glob("*.cuh")])


def read_kernel(name: str) -> str:
    """The source text of ``kernels/<name>``."""
    path = kernel_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"no kernel source {name!r} in {kernel_dir()}")
    return path.read_text()


def expanded_source(file: str, _seen: set[str] | None = None) -> str:
    """The source of ``file`` with its local ``#include "..."`` lines replaced by the files'
    text, each header once (``#line`` keeps compiler messages pointing at the real file and
    line). Compilers that cache by source text (CuPy) then see a change to a header."""
    seen = set() if _seen is None else _seen
    lines = []
    path = kernel_dir() / file
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith('#include "') and stripped.endswith('"'):
            header = stripped[len('#include "'):-1]
            if header not in seen:
                seen.add(header)
                lines += [f'#line 1 "{kernel_dir() / header}"', expanded_source(header, seen)]
            lines.append(f'#line {number + 1} "{path}"')
        else:
            lines.append(line)
    return "\n".join(lines)


def file_of(kernel: str) -> str:
    for file, names in KERNELS.items():
        if kernel in names:
            return file
    raise KeyError(f"no kernel named {kernel!r} in gpunet's kernels")


def name_expressions(file: str) -> list[str]:
    """Every instantiation of the kernels in ``file``, e.g. ``bn_backward_dx<float>``."""
    return [f"{k}<{t}>" for k in KERNELS[file] for t in CTYPES.values()]


def name_expression(kernel: str, dtype: Any) -> str:
    try:
        return f"{kernel}<{CTYPES[np.dtype(dtype)]}>"
    except KeyError:
        raise TypeError(f"kernel {kernel}: expected float32 or float64 data, got {dtype}") from None
