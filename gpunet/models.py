"""Named models for the command line. Later work registers more (``lenet``, ``unet``, ...).

A model entry builds the network for a dataset's input shape and number of classes, names
its loss and the training defaults under which it reaches its documented accuracy.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .layers import (Concat, Conv2D, Dense, Flatten, Graph, MaxPool2D, ReLU, Sequential,
                     Sigmoid, Upscale2D)
from .layers.base import Layer
from .losses import DiceLoss, Loss, SoftmaxCrossEntropy, dice
from .layers import GRU, LSTM, LastStep, TimeMajor
from .layers import GELU, Embedding, LayerNorm, MultiHeadAttention, PositionalEncoding, Sum
from .layers import ConvTranspose2D
from .losses import MSE
from .layers import BatchNorm, GlobalAvgPool2D, ResidualBlock
from .embeddings import batch_nn_accuracy, nn_test_accuracy, plot_embeddings
from .layers import L2Normalize
from .losses import BatchTripletLoss


@dataclass
class ModelSpec:
    name: str
    build: Callable[[tuple[int, ...], int | None], Layer]
    loss: Callable[[], Loss]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    #: the Trainer's metric (``metric(pred, target) -> float | None``); None: its accuracy
    metric: Callable[[Any, Any], float | None] | None = None
    #: more test metrics from the trained model, ``evaluate(trainer, train, test) -> dict``,
    #: merged over the command's (``embed``: the 1-nearest-neighbour ``test_accuracy``)
    evaluate: Callable[[Any, Any, Any], dict[str, Any]] | None = None
    #: ``plot(trainer, test, path)``: a PNG of the trained model (``gpunet train --plot``)
    plot: Callable[[Any, Any, str], None] | None = None

    def make_loss(self, num_classes: int | None) -> Loss:
        """The entry's loss for a dataset: ``loss(num_classes=...)`` when the entry's loss
        takes the number of classes (None for regression targets), else ``loss()``."""
        if "num_classes" in inspect.signature(self.loss).parameters:
            return self.loss(num_classes=num_classes)
        return self.loss()


MODELS: dict[str, ModelSpec] = {}


def register(name: str, loss: Callable[[], Loss], description: str = "",
             metric: Callable[[Any, Any], float | None] | None = None,
             evaluate: Callable[[Any, Any, Any], dict[str, Any]] | None = None,
             plot: Callable[[Any, Any, str], None] | None = None,
             **defaults: Any) -> Callable[[Callable[..., Layer]], Callable[..., Layer]]:
    """Decorator: register ``build(input_shape, num_classes) -> Layer`` under ``name``."""
    def wrap(build: Callable[..., Layer]) -> Callable[..., Layer]:
        MODELS[name] = ModelSpec(name, build, loss, defaults, description, metric, evaluate,
                                 plot)
        return build
    return wrap


def get(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}") from None


@register("mlp", SoftmaxCrossEntropy, "multi-layer perceptron: two hidden ReLU layers of 256",
          epochs=20, batch_size=32, lr=1e-3, optimizer="adam")
def mlp(input_shape: tuple[int, ...], num_classes: int | None, hidden: int = 256) -> Layer:
    features = math.prod(input_shape)
    return Sequential([Flatten(), Dense(features, hidden), ReLU(),
                       Dense(hidden, hidden), ReLU(), Dense(hidden, num_classes or 1)])


@register("lenet", SoftmaxCrossEntropy, "LeNet-5: conv 5x5 (6), max-pool, conv 5x5 (16), "
          "max-pool, dense 120, 84, classes; ReLU", epochs=40, batch_size=32, lr=2e-3,
          optimizer="adam")
def lenet(input_shape: tuple[int, ...], num_classes: int | None) -> Layer:
    """LeNet-5 for images ``(C, H, W)``. The paddings adapt to the input size: the first
    convolution keeps ``H x W`` below 32x32 (MNIST 28x28 -> 28, as the original's 32x32
    -> 28), the second is unpadded (``valid``) when its input is at least 10x10 and ``same``
    otherwise, so digits 8x8 give 8 -> 4 -> 4 -> 2 and MNIST 28 -> 14 -> 10 -> 5."""
    if len(input_shape) != 3 or min(input_shape[1:]) < 4:
        raise ValueError(f"lenet: expected images of shape (C, H, W) of at least 4x4, got "
                         f"input shape {tuple(input_shape)}")
    c, h, w = input_shape
    pad1 = 2 if min(h, w) < 32 else 0
    h1, w1 = (h + 2 * pad1 - 4) // 2, (w + 2 * pad1 - 4) // 2
    pad2 = 0 if min(h1, w1) >= 10 else 2
    h2, w2 = (h1 + 2 * pad2 - 4) // 2, (w1 + 2 * pad2 - 4) // 2
    return Sequential([
        Conv2D(c, 6, 5, padding=pad1, init="he_uniform"), ReLU(), MaxPool2D(2),
        Conv2D(6, 16, 5, padding=pad2, init="he_uniform"), ReLU(), MaxPool2D(2),
        Flatten(), Dense(16 * h2 * w2, 120, init="he_uniform"), ReLU(),
        Dense(120, 84, init="he_uniform"), ReLU(), Dense(84, num_classes or 1)])


def _conv_block(g: Graph, name: str, source: str, cin: int, cout: int) -> str:
    """Two 3x3 ``same`` convolutions with ReLU; returns the last node's name."""
    g.add(f"{name}_conv1", Conv2D(cin, cout, 3, padding="same", init="he_uniform"), source)
    g.add(f"{name}_relu1", ReLU(), f"{name}_conv1")
    g.add(f"{name}_conv2", Conv2D(cout, cout, 3, padding="same", init="he_uniform"),
          f"{name}_relu1")
    g.add(f"{name}_relu2", ReLU(), f"{name}_conv2")
    return f"{name}_relu2"


@register("unet", DiceLoss, "U-Net: two down and two up levels, Concat skips, Upscale2D, "
          "sigmoid output; Dice loss; reports the Dice coefficient", metric=dice,
          epochs=6, batch_size=16, lr=3e-3, optimizer="adam")
def unet(input_shape: tuple[int, ...], num_classes: int | None, width: int = 8,
         upsample: str = "upscale") -> Layer:
    """A small U-Net for images ``(C, H, W)`` with ``H`` and ``W`` divisible by 4: encoder
    blocks of ``width`` and ``2 width`` channels, each followed by 2x2 max pooling, a
    bottleneck of ``4 width``, then per level Upscale2D(2), Concat with the encoder's skip
    and a block; a 1x1 convolution to ``num_classes`` (default 1) maps and a sigmoid.
    ``upsample="transpose"`` upsamples with a learnable ``ConvTranspose2D(k, k, 2, stride=2)``
    instead of the nearest-neighbour ``Upscale2D(2)``."""
    if len(input_shape) != 3 or input_shape[1] % 4 or input_shape[2] % 4:
        raise ValueError(f"unet: expected images of shape (C, H, W) with H and W divisible "
                         f"by 4, got input shape {tuple(input_shape)}")
    if upsample not in ("upscale", "transpose"):
        raise ValueError(f"unet: expected upsample 'upscale' or 'transpose', got {upsample!r}")

    def up(channels: int) -> Layer:  # doubles H and W, keeps the channels
        if upsample == "transpose":
            return ConvTranspose2D(channels, channels, 2, stride=2)
        return Upscale2D(2)

    c = input_shape[0]
    g = Graph("x")
    e1 = _conv_block(g, "enc1", "x", c, width)
    g.add("pool1", MaxPool2D(2), e1)
    e2 = _conv_block(g, "enc2", "pool1", width, 2 * width)
    g.add("pool2", MaxPool2D(2), e2)
    b = _conv_block(g, "mid", "pool2", 2 * width, 4 * width)
    g.add("up2", up(4 * width), b)
    g.add("cat2", Concat(axis=1), ["up2", e2])
    d2 = _conv_block(g, "dec2", "cat2", 6 * width, 2 * width)
    g.add("up1", up(2 * width), d2)
    g.add("cat1", Concat(axis=1), ["up1", e1])
    d1 = _conv_block(g, "dec1", "cat1", 3 * width, width)
    g.add("head", Conv2D(width, num_classes or 1, 1, init="glorot_uniform"), d1)
    g.add("out", Sigmoid(), "head")
    return g


def by_target(num_classes: int | None) -> Loss:
    """SoftmaxCrossEntropy for class labels, MSE for float (regression) targets."""
    return SoftmaxCrossEntropy() if num_classes else MSE()


def _sequence_model(cell: type[LSTM] | type[GRU], input_shape: tuple[int, ...],
                    num_classes: int | None, hidden: int) -> Layer:
    if len(input_shape) != 2:
        raise ValueError(f"{cell.__name__.lower()}: expected sequences of shape (T, F) per "
                         f"sample, got input shape {tuple(input_shape)}")
    return Sequential([TimeMajor(), cell(input_shape[1], hidden), LastStep(),
                       Dense(hidden, num_classes or 1)])


_SEQUENCE_DEFAULTS = dict(epochs=30, batch_size=32, lr=5e-3, optimizer="adam", clip_norm=1.0)


@register("lstm", by_target, "LSTM of 64 on sequences (N, T, F) stored batch-major; "
          "classes or one regression output from the last step", **_SEQUENCE_DEFAULTS)
def lstm(input_shape: tuple[int, ...], num_classes: int | None, hidden: int = 64) -> Layer:
    """``TimeMajor``, ``LSTM(F, hidden)``, ``LastStep``, ``Dense(hidden, classes or 1)``
    for samples ``(T, F)``: logits for SoftmaxCrossEntropy, or one value for MSE."""
    return _sequence_model(LSTM, input_shape, num_classes, hidden)


@register("gru", by_target, "GRU of 64, otherwise as lstm", **_SEQUENCE_DEFAULTS)
def gru(input_shape: tuple[int, ...], num_classes: int | None, hidden: int = 64) -> Layer:
    """As :func:`lstm` with a ``GRU``."""
    return _sequence_model(GRU, input_shape, num_classes, hidden)


def _transformer_block(embed_dim: int, heads: int, hidden: int, dropout: float,
                       causal: bool) -> Graph:
    """One pre-LayerNorm Transformer block on ``(T, N, E)``:
    ``h = x + Attention(LN(x))``, ``y = h + W2 GELU(W1 LN(h))``."""
    g = Graph("x")
    g.add("ln1", LayerNorm(embed_dim), "x")
    g.add("attn", MultiHeadAttention(embed_dim, heads, dropout=dropout, causal=causal), "ln1")
    g.add("h", Sum(), ["attn", "x"])
    g.add("ln2", LayerNorm(embed_dim), "h")
    g.add("fc1", Dense(embed_dim, hidden), "ln2")
    g.add("gelu", GELU(), "fc1")
    g.add("fc2", Dense(hidden, embed_dim), "gelu")
    g.add("y", Sum(), ["fc2", "h"])
    return g


@register("transformer", SoftmaxCrossEntropy, "Transformer encoder on token sequences (N, T): "
          "embedding plus sinusoidal positions, 2 pre-LayerNorm blocks (4 heads, E 64, GELU "
          "MLP 128), per-token logits", epochs=12, batch_size=64, lr=3e-3, optimizer="adam")
def transformer(input_shape: tuple[int, ...], num_classes: int | None, embed_dim: int = 64,
                heads: int = 4, blocks: int = 2, hidden: int = 128, dropout: float = 0.0,
                causal: bool = False) -> Layer:
    """A Transformer encoder for token sequences ``(N, T)`` (integers in
    ``[0, num_classes)``: inputs and outputs share one vocabulary) to per-token logits
    ``(N, T, num_classes)``: ``Embedding``, sinusoidal ``PositionalEncoding``, ``blocks``
    pre-LayerNorm blocks of multi-head self-attention and a GELU MLP with residual
    connections (:func:`_transformer_block`), a final ``LayerNorm`` and a ``Dense`` read-out.
    ``causal=True`` lets position t attend to positions up to t only (a language model)."""
    if len(input_shape) != 1 or not num_classes:
        raise ValueError(f"transformer: expected token sequences of shape (T,) per sample with "
                         f"class labels, got input shape {tuple(input_shape)} and "
                         f"num_classes={num_classes}")
    return Sequential([Embedding(num_classes, embed_dim), TimeMajor(),
                       PositionalEncoding(embed_dim, max_len=max(input_shape[0], 1)),
                       *[_transformer_block(embed_dim, heads, hidden, dropout, causal)
                         for _ in range(blocks)],
                       LayerNorm(embed_dim), Dense(embed_dim, num_classes), TimeMajor()])


@register("resnet", SoftmaxCrossEntropy, "ResNet for small images: conv 3x3 (16), BatchNorm, "
          "ReLU, three stages of basic residual blocks (16, 32, 64 channels, the last two "
          "downsampling by 2 with 1x1-projection shortcuts), global average pooling, dense",
          epochs=15, batch_size=32, lr=2e-3, optimizer="adam")
def resnet(input_shape: tuple[int, ...], num_classes: int | None,
           widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1) -> Layer:
    """A ResNet of He et al. (2016)'s CIFAR design for small images ``(C, H, W)`` (the 8x8
    digits, MNIST's 28x28): a 3x3 ``same`` convolution to ``widths[0]`` channels with
    BatchNorm and ReLU, then one stage per width of ``blocks`` :class:`ResidualBlock` s, the
    first block of every stage after the first halving ``H`` and ``W`` (stride 2, projection
    shortcut), then ``GlobalAvgPool2D`` and ``Dense(widths[-1], classes)``. The defaults
    make ResNet-8 (6 * blocks + 2 layers with weights): 8x8 -> 8, 4, 2; 28x28 -> 28, 14, 7."""
    if not widths or blocks < 1:
        raise ValueError(f"resnet: expected at least one width and blocks >= 1, got widths "
                         f"{widths} and blocks {blocks}")
    side = 2 ** (len(widths) - 1)  # the last stage sees at least 1x1
    if len(input_shape) != 3 or min(input_shape[1:]) < side:
        raise ValueError(f"resnet: expected images of shape (C, H, W) of at least "
                         f"{side}x{side}, got input shape {tuple(input_shape)}")
    layers: list[Layer] = [Conv2D(input_shape[0], widths[0], 3, padding=1, bias=False,
                                  init="he_normal"), BatchNorm(widths[0]), ReLU()]
    cin = widths[0]
    for stage, width in enumerate(widths):
        for b in range(blocks):
            layers.append(ResidualBlock(cin, width, stride=2 if stage and not b else 1))
            cin = width
    return Sequential([*layers, GlobalAvgPool2D(), Dense(cin, num_classes or 1)])


@register("embed", functools.partial(BatchTripletLoss, margin=0.2, mining="hard"),
          "embedding MLP (two hidden ReLU layers of 256) to 32-D unit vectors, trained with "
          "batch-hard triplet loss; reports 1-nearest-neighbour test accuracy",
          metric=batch_nn_accuracy, evaluate=nn_test_accuracy, plot=plot_embeddings,
          epochs=20, batch_size=64, lr=1e-3, optimizer="adam")
def embed(input_shape: tuple[int, ...], num_classes: int | None, dim: int = 32,
          hidden: int = 256) -> Layer:
    """An embedding network: ``Flatten``, two ``Dense(hidden)`` + ReLU, ``Dense(dim)`` and
    ``L2Normalize``, so embeddings lie on the unit sphere (FaceNet's), squared distances in
    [0, 4] and the triplet margin 0.2 means the same for every model. ``num_classes`` is not
    used: the classes only say which samples belong together."""
    return Sequential([Flatten(), Dense(math.prod(input_shape), hidden), ReLU(),
                       Dense(hidden, hidden), ReLU(), Dense(hidden, dim), L2Normalize()])
