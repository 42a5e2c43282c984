"""The one random stream behind weight initialisation, dropout masks and shuffling.

Everything random is drawn on the host from a NumPy generator and only then moved to the
device, so a seed gives the same numbers on every device.
"""
from __future__ import annotations

from typing import Any

import numpy as np

_generator = np.random.Generator(np.random.PCG64(0))


def seed(n: int) -> None:
    """Reseed gpunet's random stream (initial weights, dropout masks, shuffling)."""
    global _generator
    _generator = np.random.Generator(np.random.PCG64(int(n)))


def generator() -> np.random.Generator:
    """The current host generator."""
    return _generator


def get_state() -> dict[str, Any]:
    """The generator's state, a JSON-friendly dict (stored in training checkpoints)."""
    return _generator.bit_generator.state


def set_state(state: dict[str, Any]) -> None:
    _generator.bit_generator.state = state
