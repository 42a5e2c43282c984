"""Weight initialisers: He, Glorot and LeCun, normal and uniform.

Each takes a shape and returns a float64 NumPy array drawn from gpunet's seeded host stream
(``gpunet.seed``), so one seed gives the same weights on every device. Fans follow PyTorch:
for a weight of shape ``(out, in, *kernel)``, ``fan_in = in * prod(kernel)`` and
``fan_out = out * prod(kernel)``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from . import rng


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of this shape."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _normal(shape: Sequence[int], std: float) -> np.ndarray:
    return rng.generator().normal(0.0, std, size=tuple(shape))


def _uniform(shape: Sequence[int], limit: float) -> np.ndarray:
    return rng.generator().uniform(-limit, limit, size=tuple(shape))


def he_normal(shape: Sequence[int]) -> np.ndarray:
    """N(0, 2/fan_in), for ReLU networks (He et al. 2015)."""
    return _normal(shape, math.sqrt(2.0 / fans(shape)[0]))


def he_uniform(shape: Sequence[int]) -> np.ndarray:
    """U(-sqrt(6/fan_in), sqrt(6/fan_in))."""
    return _uniform(shape, math.sqrt(6.0 / fans(shape)[0]))


def glorot_normal(shape: Sequence[int]) -> np.ndarray:
    """N(0, 2/(fan_in+fan_out)) (Glorot and Bengio 2010)."""
    fan_in, fan_out = fans(shape)
    return _normal(shape, math.sqrt(2.0 / (fan_in + fan_out)))


def glorot_uniform(shape: Sequence[int]) -> np.ndarray:
    """U(-sqrt(6/(fan_in+fan_out)), +sqrt(6/(fan_in+fan_out)))."""
    fan_in, fan_out = fans(shape)
    return _uniform(shape, math.sqrt(6.0 / (fan_in + fan_out)))


def lecun_normal(shape: Sequence[int]) -> np.ndarray:
    """N(0, 1/fan_in), the initialiser SELU networks need (LeCun et al. 1998)."""
    return _normal(shape, math.sqrt(1.0 / fans(shape)[0]))


def lecun_uniform(shape: Sequence[int]) -> np.ndarray:
    """U(-sqrt(3/fan_in), sqrt(3/fan_in))."""
    return _uniform(shape, math.sqrt(3.0 / fans(shape)[0]))


def zeros(shape: Sequence[int]) -> np.ndarray:
    return np.zeros(tuple(shape))


INITIALIZERS: dict[str, Callable[[Sequence[int]], np.ndarray]] = {
    f.__name__: f for f in (he_normal, he_uniform, glorot_normal, glorot_uniform,
                            lecun_normal, lecun_uniform, zeros)}


def get(name: str) -> Callable[[Sequence[int]], np.ndarray]:
    """The initialiser called ``name``."""
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown initialiser {name!r}; expected one of "
                         f"{sorted(INITIALIZERS)}") from None
