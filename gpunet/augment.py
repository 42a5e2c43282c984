"""Data augmentation for batches of images ``(N, C, H, W)`` on the host, as torchvision's
transforms: :class:`RandomHorizontalFlip`, :class:`RandomCrop` (with zero padding) and
:class:`Compose`.

A transform is split in two, so that a loader can draw for a whole epoch and each process of
a data-parallel run apply its share: ``draw(n, generator)`` picks every sample's random
parameters (an array with one row per sample, or a list of them), ``take(params, rows)``
selects rows of them, and ``apply(x, params)`` transforms a batch. ``transform(x)`` does both
with gpunet's stream. ``DataLoader(..., augment=t)`` draws from a generator seeded by its seed
and the epoch, so a seed gives the same augmented batches and a resumed run continues as an
uninterrupted one would. Use::

    augment = Compose([RandomCrop(8, padding=1), RandomHorizontalFlip(p=0.5)])
    trainer.fit(train, epochs=20, augment=augment)        # evaluation is never augmented
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import rng
from .errors import ShapeError


def check_images(x: Any, who: str, what: str = "input") -> None:
    """Raise a ShapeError naming ``who`` unless ``x`` is an array of images ``(N, C, H, W)``."""
    shape = getattr(x, "shape", None)
    if not isinstance(x, np.ndarray) or len(shape) != 4:
        got = f"shape {tuple(shape)}" if shape is not None else type(x).__name__
        raise ShapeError(f"{who}: expected {what} of images (N, C, H, W), got {got}")


class Transform:
    """A random transformation of images ``(N, C, H, W)``, drawn per sample."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def draw(self, n: int, generator: np.random.Generator) -> Any:
        """The random parameters of ``n`` samples, one row each."""
        raise NotImplementedError

    def take(self, params: Any, rows: Any) -> Any:
        """The parameters of the samples ``rows`` (an index array or slice)."""
        return params[rows]

    def apply(self, x: np.ndarray, params: Any) -> np.ndarray:
        """``x`` transformed sample by sample with ``params`` (as many rows as samples); a new
        array, ``x`` is left alone."""
        raise NotImplementedError

    def __call__(self, x: np.ndarray, generator: np.random.Generator | None = None
                 ) -> np.ndarray:
        """``x`` transformed with fresh draws from ``generator`` (default: gpunet's stream)."""
        check_images(x, self.name)
        return self.apply(x, self.draw(len(x), generator or rng.generator()))


class RandomHorizontalFlip(Transform):
    """Mirror each image left to right (``x[..., ::-1]``, the width axis) with probability
    ``p``, as ``torchvision.transforms.RandomHorizontalFlip(p)``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: expected p in [0, 1], got {p!r}")
        self.p = float(p)

    def draw(self, n: int, generator: np.random.Generator) -> np.ndarray:
        return generator.random(n) < self.p  # (n,) bool: flip this sample

    def apply(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        check_images(x, self.name)
        out = x.copy()
        out[params] = x[params, :, :, ::-1]
        return out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomCrop(Transform):
    """Pad each image with ``padding`` zeros on every side, then cut out a ``size`` window
    (an int for a square, or ``(height, width)``) at a position drawn uniformly, as
    ``torchvision.transforms.RandomCrop(size, padding)``. ``RandomCrop(H, padding=p)`` on
    ``H x H`` images shifts each image by up to ``p`` pixels in each direction, filling with
    zeros; output ``(N, C, size_h, size_w)``."""

    def __init__(self, size: int | Sequence[int], padding: int = 0) -> None:
        pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
        if len(pair) != 2 or any(int(s) != s or s < 1 for s in pair):
            raise ValueError(f"RandomCrop: expected size a positive int or (height, width), "
                             f"got {size!r}")
        if int(padding) != padding or padding < 0:
            raise ValueError(f"RandomCrop: expected padding a non-negative int, got {padding!r}")
        self.size = (int(pair[0]), int(pair[1]))
        self.padding = int(padding)

    def draw(self, n: int, generator: np.random.Generator) -> np.ndarray:
        # uniform in [0, 1) per axis; apply scales them to the positions the image allows,
        # so the draws do not depend on the image size
        return generator.random((n, 2))

    def apply(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        check_images(x, self.name)
        p, (h, w) = self.padding, self.size
        padded_h, padded_w = x.shape[2] + 2 * p, x.shape[3] + 2 * p
        if h > padded_h or w > padded_w:
            raise ShapeError(f"{self.name}: expected images of at least {h - 2 * p}x"
                             f"{w - 2 * p} for a {h}x{w} crop with padding {p}, got "
                             f"{x.shape[2]}x{x.shape[3]}")
        padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        top = (params[:, 0] * (padded_h - h + 1)).astype(np.intp)
        left = (params[:, 1] * (padded_w - w + 1)).astype(np.intp)
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))
        # windows[n, c, i, j] is the h x w window at (i, j): pick each sample's own
        return np.ascontiguousarray(windows[np.arange(len(x)), :, top, left])

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class Compose(Transform):
    """The transforms one after another, as ``torchvision.transforms.Compose``."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)
        for i, t in enumerate(self.transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"Compose: expected a Transform at position {i}, got "
                                f"{type(t).__name__}")

    def draw(self, n: int, generator: np.random.Generator) -> list[Any]:
        return [t.draw(n, generator) for t in self.transforms]

    def take(self, params: list[Any], rows: Any) -> list[Any]:
        return [t.take(p, rows) for t, p in zip(self.transforms, params)]

    def apply(self, x: np.ndarray, params: list[Any]) -> np.ndarray:
        for t, p in zip(self.transforms, params):
            x = t.apply(x, p)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


#: What ``gpunet train --augment`` can name.
RECIPES = ("crop", "flip")


def recipe(names: str, image_shape: Sequence[int]) -> Transform:
    """The augmentation ``gpunet train --augment NAMES`` turns on for images ``(C, H, W)``:
    ``crop`` is ``RandomCrop((H, W), padding=max(1, min(H, W) // 8))`` (shifts of up to 1
    pixel on the 8x8 digits, 3 on MNIST; CIFAR's customary 4 on 32x32), ``flip`` is
    ``RandomHorizontalFlip(0.5)``; ``"crop,flip"`` is both, crop first."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(RECIPES))
    if unknown or not chosen:
        raise ValueError(f"--augment: expected a comma-separated choice of {', '.join(RECIPES)},"
                         f" got {names!r}")
    if len(image_shape) != 3:
        raise ValueError(f"--augment: expected a dataset of images (N, C, H, W), got samples "
                         f"of shape {tuple(image_shape)}")
    h, w = int(image_shape[1]), int(image_shape[2])
    make = {"crop": lambda: RandomCrop((h, w), padding=max(1, min(h, w) // 8)),
            "flip": lambda: RandomHorizontalFlip(0.5)}
    return Compose([make[n]() for n in RECIPES if n in chosen])
