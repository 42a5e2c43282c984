"""Named models for the command line. Later work registers more (``lenet``, ``unet``, ...).

A model entry builds the network for a dataset's input shape and number of classes, names
its loss and the training defaults under which it reaches its documented accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .layers import Dense, Flatten, ReLU, Sequential
from .layers.base import Layer
from .losses import Loss, SoftmaxCrossEntropy


@dataclass
class ModelSpec:
    name: str
    build: Callable[[tuple[int, ...], int | None], Layer]
    loss: Callable[[], Loss]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


MODELS: dict[str, ModelSpec] = {}


def register(name: str, loss: Callable[[], Loss], description: str = "",
             **defaults: Any) -> Callable[[Callable[..., Layer]], Callable[..., Layer]]:
    """Decorator: register ``build(input_shape, num_classes) -> Layer`` under ``name``."""
    def wrap(build: Callable[..., Layer]) -> Callable[..., Layer]:
        MODELS[name] = ModelSpec(name, build, loss, defaults, description)
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
