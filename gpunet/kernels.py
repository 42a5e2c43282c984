"""Where the CUDA kernel sources live, in a checkout and in an installed wheel.

The ``.cu`` files are kept in the repository's top-level ``kernels/`` folder; the wheel ships
them as ``gpunet/_kernels``. Nothing here compiles anything.
"""
from __future__ import annotations

from pathlib import Path


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
