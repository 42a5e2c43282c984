"""Layers. Every class here follows the protocol in :mod:`gpunet.layers.base`."""
from .activations import (ELU, SELU, LeakyReLU, NonlinearityGenerator, ReLU, Sigmoid,
                          SigmoidGenerator, Softmax, Softplus, Tanh)
from .base import LAYERS, Layer, Parameter, from_config
from .containers import Graph, Sequential
from .conv import Conv2D
from .dense import Dense
from .dropout import Dropout
from .merge import Concat, Sum
from .normalization import BatchNorm
from .pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D, Subsampling2D, Upscale2D
from .reshape import Flatten
from .recurrent import (GRU, LSTM, RNN, AvgPoolTime, LastStep, MultiplicativeRNN,
                        Recurrent2D, TimeMajor)
from .conv import ConvTranspose2D
from .recurrent import Bidirectional
from .normalization import LayerNorm
from .attention import AdditiveAttention, MultiHeadAttention
from .activations import GELU
from .embedding import Embedding, PositionalEncoding, PositionEmbedding
from .reshape import Identity, Reshape
from .style import Gram
from .blocks import Inception, ResidualBlock
from .similarity import CosineSimilarity, L2Normalize

__all__ = [
    "LAYERS", "Layer", "Parameter", "from_config", "Dense", "Sigmoid", "Tanh", "ReLU",
    "LeakyReLU", "ELU", "SELU", "Softplus", "Softmax", "SigmoidGenerator",
    "NonlinearityGenerator", "BatchNorm", "Dropout", "Flatten", "Sum", "Concat", "Sequential", "Graph",
    "Conv2D", "MaxPool2D", "AvgPool2D", "Subsampling2D", "Upscale2D", "GlobalAvgPool2D",
    "RNN", "LSTM", "GRU", "MultiplicativeRNN", "Recurrent2D", "AvgPoolTime", "LastStep",
    "TimeMajor",
    "ConvTranspose2D", "Bidirectional",
    "LayerNorm",
    "MultiHeadAttention", "AdditiveAttention",
    "GELU", "Embedding", "PositionEmbedding", "PositionalEncoding", "Identity", "Reshape",
    "Gram",
    "ResidualBlock", "Inception",
    "CosineSimilarity", "L2Normalize",
]
