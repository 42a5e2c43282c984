"""Layers. Every class here follows the protocol in :mod:`gpunet.layers.base`."""
from .activations import (ELU, SELU, LeakyReLU, NonlinearityGenerator, ReLU, Sigmoid,
                          SigmoidGenerator, Softmax, Softplus, Tanh)
from .base import LAYERS, Layer, Parameter, from_config
from .containers import Graph, Sequential
from .dense import Dense
from .dropout import Dropout
from .merge import Concat, Sum
from .normalization import BatchNorm
from .reshape import Flatten

__all__ = [
    "LAYERS", "Layer", "Parameter", "from_config", "Dense", "Sigmoid", "Tanh", "ReLU",
    "LeakyReLU", "ELU", "SELU", "Softplus", "Softmax", "SigmoidGenerator",
    "NonlinearityGenerator", "BatchNorm", "Dropout", "Flatten", "Sum", "Concat", "Sequential", "Graph",
]
