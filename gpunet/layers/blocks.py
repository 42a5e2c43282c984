"""Convolutional building blocks as graphs: the residual basic block (He et al. 2016) and the
Inception module (Szegedy et al. 2015), both on images ``(N, C, H, W)``."""
from __future__ import annotations

from typing import Any

from .base import _describe
from .containers import Graph
from .conv import Conv2D
from .merge import Concat, Sum
from .normalization import BatchNorm
from .pooling import MaxPool2D
from .activations import ReLU


class _Block(Graph):
    """A :class:`Graph` whose constructor builds its nodes. It is described (``config``,
    ``repr``, saved models) by the constructor's arguments, not by the nodes, so
    ``from_config`` rebuilds it by calling the constructor again."""

    def __init__(self) -> None:
        own = dict(self._args)  # Graph.__init__ records its nodes in _args; keep ours
        super().__init__("x")
        self._block_args = own

    def config(self) -> dict[str, Any]:
        return {"type": self.name, "args": _describe(self._block_args)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._block_args.items())
        return f"{self.name}({args})"


def _positive(name: str, **sizes: int) -> None:
    bad = {k: v for k, v in sizes.items() if int(v) != v or v < 1}
    if bad:
        raise ValueError(f"{name}: expected positive integer sizes, got "
                         + ", ".join(f"{k}={v!r}" for k, v in bad.items()))


class ResidualBlock(_Block):
    """The basic block of a ResNet (He et al. 2016; torchvision's ``BasicBlock``)::

        y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))

    ``conv1`` is 3x3 with ``stride`` (which downsamples), ``conv2`` 3x3, both padded by 1 and
    without bias (BatchNorm follows). ``shortcut`` is the identity when the shape is kept
    (``stride == 1`` and ``in_channels == out_channels``), else a 1x1 projection
    ``bn(conv1x1(x))`` with the same stride. Shapes: ``(N, in_channels, H, W)`` to
    ``(N, out_channels, ceil(H / stride), ceil(W / stride))``. Nodes (parameter prefixes):
    ``conv1 bn1 relu1 conv2 bn2`` and, with a projection, ``proj proj_bn``; ``out`` is the
    sum with its ReLU.

    Use: ``Sequential([ResidualBlock(16, 16), ResidualBlock(16, 32, stride=2)])``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        _positive(self.name, in_channels=in_channels, out_channels=out_channels, stride=stride)
        self.add("conv1", Conv2D(in_channels, out_channels, 3, stride, 1, bias=False,
                                 init="he_normal"), "x")
        self.add("bn1", BatchNorm(out_channels), "conv1")
        self.add("relu1", ReLU(), "bn1")
        self.add("conv2", Conv2D(out_channels, out_channels, 3, 1, 1, bias=False,
                                 init="he_normal"), "relu1")
        self.add("bn2", BatchNorm(out_channels), "conv2")
        shortcut = "x"
        if stride != 1 or in_channels != out_channels:
            self.add("proj", Conv2D(in_channels, out_channels, 1, stride, bias=False,
                                    init="he_normal"), "x")
            self.add("proj_bn", BatchNorm(out_channels), "proj")
            shortcut = "proj_bn"
        self.add("out", Sum("relu"), ["bn2", shortcut])


class Inception(_Block):
    """GoogLeNet's Inception module (Szegedy et al. 2015, "inception (3a)" and its kin): four
    parallel branches on one input, concatenated on the channel axis::

        y = concat([relu(conv1x1_c1(x)),
                    relu(conv3x3_c3(relu(conv1x1_c3r(x)))),
                    relu(conv5x5_c5(relu(conv1x1_c5r(x)))),
                    relu(conv1x1_pool_proj(maxpool3x3_stride1(x)))], axis=1)

    Every convolution and the pooling keep ``H x W`` (padding 1 for 3x3, 2 for 5x5), so
    ``(N, in_channels, H, W)`` becomes ``(N, c1 + c3 + c5 + pool_proj, H, W)``. The 1x1
    reductions ``c3r`` and ``c5r`` make the 3x3 and 5x5 convolutions cheap. As in the paper
    every convolution has a bias and a ReLU (torchvision's version adds BatchNorm). Nodes:
    ``b1``, ``b3_reduce``, ``b3``, ``b5_reduce``, ``b5``, ``pool``, ``pool_proj`` (each
    convolution followed by ``<name>_relu``) and ``out``.

    Use: GoogLeNet's 3a is ``Inception(192, 64, 96, 128, 16, 32, 32)`` (256 channels out).
    """

    def __init__(self, in_channels: int, c1: int, c3r: int, c3: int, c5r: int, c5: int,
                 pool_proj: int) -> None:
        super().__init__()
        _positive(self.name, in_channels=in_channels, c1=c1, c3r=c3r, c3=c3, c5r=c5r, c5=c5,
                  pool_proj=pool_proj)

        def conv(name: str, cin: int, cout: int, kernel: int, source: str) -> str:
            self.add(name, Conv2D(cin, cout, kernel, padding=kernel // 2, init="he_uniform"),
                     source)
            self.add(f"{name}_relu", ReLU(), name)
            return f"{name}_relu"

        b1 = conv("b1", in_channels, c1, 1, "x")
        b3 = conv("b3", c3r, c3, 3, conv("b3_reduce", in_channels, c3r, 1, "x"))
        b5 = conv("b5", c5r, c5, 5, conv("b5_reduce", in_channels, c5r, 1, "x"))
        self.add("pool", MaxPool2D(3, stride=1, padding=1), "x")
        bp = conv("pool_proj", in_channels, pool_proj, 1, "pool")
        self.add("out", Concat(axis=1), [b1, b3, b5, bp])
        self.out_channels = c1 + c3 + c5 + pool_proj
