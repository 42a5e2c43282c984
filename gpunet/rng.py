"""The one random stream behind weight initialisation, dropout masks and shuffling.

Weights and shuffling are drawn on the host from one NumPy generator, so a seed gives the same
model and batches on every device. Dropout masks are drawn where the data is: on the host
devices (``cpu``, ``emulated``) from that same stream; on a GPU from a generator of the GPU's
own (CuPy's), so a training step uploads nothing. Those device generators are seeded from the
host stream whenever it is seeded or restored, so a seed still fixes every draw. For runs
whose CPU and GPU numbers must agree bit for bit (the parity suite), :func:`host_draws` makes
every device draw its masks from the host stream and upload them, as PyTorch cannot.
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Any, Iterator

import numpy as np

_generator = np.random.Generator(np.random.PCG64(0))
_device_generators: dict[str, Any] = {}
_host_draws = False


def seed(n: int) -> None:
    """Reseed gpunet's random stream (initial weights, dropout masks, shuffling) and, from it,
    the GPUs' generators."""
    global _generator
    _generator = np.random.Generator(np.random.PCG64(int(n)))
    _device_generators.clear()


def generator() -> np.random.Generator:
    """The current host generator."""
    return _generator


def get_state() -> dict[str, Any]:
    """The generator's state, a JSON-friendly dict (stored in training checkpoints)."""
    return _generator.bit_generator.state


def set_state(state: dict[str, Any]) -> None:
    _generator.bit_generator.state = state
    _device_generators.clear()


def device_generator(device: Any) -> Any:
    """The generator a GPU draws with (``device.xp.random.default_rng``), made on first use
    after a :func:`seed` or :func:`set_state`: seeded from the host stream's state and the
    device's name, without drawing from the host stream (which would shift the weights and
    batches that follow on that device only)."""
    if device.name not in _device_generators:
        state = _generator.bit_generator.state["state"]
        entropy = [int(state["state"]) & (2**64 - 1), int(state["inc"]) & (2**64 - 1),
                   zlib.crc32(device.name.encode())]
        _device_generators[device.name] = device.xp.random.default_rng(
            int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))
    return _device_generators[device.name]


def draws_on_host() -> bool:
    """Whether every device draws its dropout masks from the host stream (:func:`host_draws`)."""
    return _host_draws


@contextlib.contextmanager
def host_draws(enabled: bool = True) -> Iterator[None]:
    """Within the block, GPUs draw dropout masks from the host stream too (and upload them),
    so a CPU and a GPU run of the same seed see the same masks."""
    global _host_draws
    before, _host_draws = _host_draws, enabled
    try:
        yield
    finally:
        _host_draws = before
