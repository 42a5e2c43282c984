"""Exceptions raised by gpunet. Each names the layer, what it expected and what it got."""


class ShapeError(ValueError):
    """An array has the wrong rank or size for the layer it was given to."""


class DTypeError(TypeError):
    """An array has a dtype the layer cannot take (gpunet computes in float32 or float64)."""


class DeviceError(ValueError):
    """A device cannot be used, or an array lives on another device than the layer."""


class StateError(RuntimeError):
    """A call came out of order, such as ``backward`` before ``forward``."""


class CheckpointError(ValueError):
    """A saved model or checkpoint is truncated, tampered with, or does not fit the model."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class KernelCompileError(RuntimeError):
    """A CUDA kernel did not compile; the message carries the compiler's log (file and line)."""
