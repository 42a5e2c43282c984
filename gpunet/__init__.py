"""gpunet: neural-network layers with explicit forward and backward passes that run the same
on NumPy (CPU) and CuPy (NVIDIA GPU).

Importing gpunet imports NumPy only; CuPy is imported the first time a CUDA device is asked for.
"""
from . import data, init, models, optim
from .backends import asarray, available_devices, to_numpy
from .backends import get_device as device
from .errors import (CheckpointError, DeviceError, DTypeError, KernelCompileError, ShapeError,
                     StateError, TrainingDiverged)
from .gradcheck import gradcheck
from .interop import export_onnx, from_dlpack, load_safetensors, save_safetensors
from .layers import Graph, Layer, Parameter, Sequential
from .losses import (MSE, BinaryCrossEntropy, BinaryCrossEntropyWithLogits,
                     NegativeLogProbability, SoftmaxCrossEntropy)
from .losses import DiceLoss, FocalLoss
from . import ops
from .losses import ContentLoss, StyleLoss
from .rng import seed
from .serialize import load, save
from .stopping import EarlyStopping
from .trainer import Trainer
from .threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "device", "available_devices", "asarray", "to_numpy", "seed", "Layer", "Parameter",
    "Sequential", "Graph", "save", "load", "gradcheck", "Trainer", "EarlyStopping", "data", "init", "models", "optim",
    "MSE", "BinaryCrossEntropy", "BinaryCrossEntropyWithLogits", "NegativeLogProbability",
    "SoftmaxCrossEntropy", "ShapeError", "DTypeError", "DeviceError", "StateError",
    "CheckpointError", "KernelCompileError", "TrainingDiverged", "__version__",
    "FocalLoss", "DiceLoss",
    "ops", "ContentLoss", "StyleLoss",
    "save_safetensors", "load_safetensors", "export_onnx", "from_dlpack",
    "get_num_threads", "set_num_threads",
]
