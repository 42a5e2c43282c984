"""Datasets and a reproducible mini-batch loader, all on the host in NumPy.

A :class:`Dataset` holds inputs ``x`` (float32, samples on the first axis) and targets ``y``
(int64 class labels, or float32 regression targets). Every loader here returns a fixed
``(train, test)`` pair:

- :func:`digits`: the UCI optical-recognition handwritten digits (1797 images of 8x8), shipped
  inside gpunet so it works offline;
- :func:`mnist`: MNIST read from the four standard IDX files in a directory you supply
  (nothing is downloaded);
- :func:`spirals` and :func:`blobs`: small synthetic classification sets.

Splits use their own fixed seeds, never gpunet's global stream, so the test set is the same
whatever ``gpunet.seed`` says. :class:`DataLoader` shuffles with an order that depends only on
``(seed, epoch)``, so a run resumed at epoch ``k`` sees the batches an uninterrupted run would.
"""
from __future__ import annotations

import gzip
import importlib.resources
import math
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import rng
from .augment import Transform, check_images

# Seed of the digits train/test split: fixed so the test set never changes.
_DIGITS_SPLIT_SEED = 0

# IDX type byte -> big-endian element dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_MNIST_SOURCE = ("https://ossci-datasets.s3.amazonaws.com/mnist/ (the mirror torchvision uses) "
                 "or http://yann.lecun.com/exdb/mnist/")


class Dataset:
    """Inputs ``x`` of shape ``(N, *input_shape)`` (float32, or int64 token indices with
    ``tokens=True``) and targets ``y`` of shape ``(N, ...)``: int64 class labels in
    ``[0, num_classes)``, or float32 targets."""

    def __init__(self, x: Any, y: Any, name: str = "", num_classes: int | None = None,
                 vocabulary: str | None = None, tokens: bool = False) -> None:
        x = np.asarray(x)
        if tokens and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"dataset {name!r}: tokens=True needs integer x, got dtype "
                             f"{x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.int64 if tokens else np.float32)
        y = np.asarray(y)
        y = np.ascontiguousarray(y, dtype=np.int64 if np.issubdtype(y.dtype, np.integer)
                                 else np.float32)
        if x.ndim < 1 or y.ndim < 1:
            raise ValueError(f"dataset {name!r}: x and y need a sample axis, got shapes "
                             f"{x.shape} and {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"dataset {name!r}: x has {len(x)} samples but y has {len(y)}")
        if num_classes is not None:
            if y.dtype != np.int64:
                raise ValueError(f"dataset {name!r}: num_classes={num_classes} needs integer "
                                 f"labels, got y of dtype {y.dtype}")
            if y.size and (y.min() < 0 or y.max() >= num_classes):
                raise ValueError(f"dataset {name!r}: labels must lie in [0, {num_classes}), "
                                 f"got [{y.min()}, {y.max()}]")
        self.x = x
        self.y = y
        self.name = name
        self.num_classes = num_classes
        self.tokens = tokens
        #: For text: the characters the token indices stand for (index i is vocabulary[i]).
        #: The targets are then the inputs shifted by one position (next-token prediction),
        #: so a model must not look ahead.
        self.vocabulary = vocabulary

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(x[index], y[index])``; an integer index array gives contiguous copies."""
        return self.x[index], self.y[index]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``x.shape[1:]``."""
        return self.x.shape[1:]

    def split(self, fraction: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """``(rest, held_out)``: a seeded random ``fraction`` of the samples held out (for
        validation: never validate on the test set)."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"Dataset.split: expected a fraction in (0, 1), got {fraction}")
        order = np.random.default_rng(seed).permutation(len(self))
        n = int(round(len(self) * fraction))
        pick = lambda idx: Dataset(self.x[idx], self.y[idx], self.name, self.num_classes,
                                   self.vocabulary, self.tokens)
        return pick(np.sort(order[n:])), pick(np.sort(order[:n]))

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, n={len(self)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes})")


def _stratified_split(labels: np.ndarray, test_fraction: float,
                      generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train_indices, test_indices)`` for labels of shape ``(N,)``.

    The test set has ``ceil(test_fraction * N)`` samples (scikit-learn's convention), shared
    among the classes in proportion to their sizes, largest remainders first.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    n = len(labels)
    # The epsilon keeps 0.3 * 10 == 3.0000000000000004 from rounding up to 4.
    n_test = math.ceil(test_fraction * n - 1e-9)
    if not 0 < n_test < n:
        raise ValueError(f"test_fraction={test_fraction} of {n} samples leaves an empty "
                         f"train or test set")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = test_fraction * counts
    quota = np.floor(exact).astype(np.int64)
    short = n_test - int(quota.sum())
    quota[np.argsort(quota - exact, kind="stable")[:short]] += 1
    # Shuffle, then group by class (stable, so each class stays shuffled); a sample goes to
    # the test set when its rank within its class is below the class's quota.
    perm = generator.permutation(n)
    grouped = perm[np.argsort(inverse[perm], kind="stable")]
    starts = np.cumsum(counts) - counts
    rank = np.arange(n) - np.repeat(starts, counts)
    is_test = rank < np.repeat(quota, counts)
    return np.sort(grouped[~is_test]), np.sort(grouped[is_test])


def _split(x: np.ndarray, y: np.ndarray, name: str, num_classes: int, test_fraction: float,
           generator: np.random.Generator) -> tuple[Dataset, Dataset]:
    train, test = _stratified_split(y, test_fraction, generator)
    return (Dataset(x[train], y[train], name, num_classes),
            Dataset(x[test], y[test], name, num_classes))


def _read_digits_csv() -> np.ndarray:
    """The embedded digits table, int64 of shape (1797, 65): 64 pixels then the label."""
    resource = importlib.resources.files("gpunet.datasets").joinpath("digits.csv.gz")
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 65:
        raise ValueError(f"digits.csv.gz: expected 65 columns, got {table.shape[1]}")
    return table


def digits(flat: bool = True, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """The UCI handwritten digits as ``(train, test)``; 360 of the 1797 samples are test.

    ``x`` is float32 in [0, 1] (pixel counts 0..16 divided by 16), of shape ``(N, 64)`` when
    ``flat`` else ``(N, 1, 8, 8)``; ``y`` is int64 in 0..9. The split is stratified by class
    and seeded by a constant, so it does not depend on ``gpunet.seed``.
    """
    table = _read_digits_csv()
    x = table[:, :64].astype(np.float32) / np.float32(16.0)
    if not flat:
        x = x.reshape(-1, 1, 8, 8)
    return _split(x, table[:, 64], "digits", 10, test_fraction,
                  np.random.default_rng(_DIGITS_SPLIT_SEED))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST format), plain or gzip-compressed, as a native-endian array.

    Layout: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), a byte giving ndim, ndim big-endian uint32 sizes, then the
    big-endian data in C order. Raises ValueError naming the file when it is malformed.
    """
    path = Path(path)
    data = path.read_bytes()
    # Detect compression by content: downloaded files are often renamed or unpacked.
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) < expected:
        raise ValueError(f"{path}: truncated IDX data ({len(data)} bytes, shape {shape} "
                         f"needs {expected})")
    if len(data) > expected:
        raise ValueError(f"{path}: {len(data) - expected} trailing bytes after IDX data of "
                         f"shape {shape}")
    flat = np.frombuffer(data, dtype, math.prod(shape), header)
    return flat.astype(dtype.newbyteorder("=")).reshape(shape)


def _find_mnist_file(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MNIST file {stem} (or {stem}.gz) not found in {directory}; "
                            f"gpunet does not download it: get the four IDX files from "
                            f"{_MNIST_SOURCE}")


def _mnist_pair(directory: Path, images_stem: str, labels_stem: str, flat: bool,
                name: str) -> Dataset:
    images_path = _find_mnist_file(directory, images_stem)
    labels_path = _find_mnist_file(directory, labels_stem)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{images_path} and {labels_path}: expected images (N, H, W) and "
                         f"labels (N,), got shapes {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has "
                         f"{len(labels)} labels")
    x = images.astype(np.float32) / np.float32(255.0)
    x = x.reshape(len(x), -1) if flat else x[:, None]
    return Dataset(x, labels.astype(np.int64), name, 10)


def mnist(path: str | os.PathLike, flat: bool = True) -> tuple[Dataset, Dataset]:
    """MNIST from the four standard IDX files (each optionally ``.gz``) in directory ``path``.

    Returns ``(train, test)``, 60000 and 10000 samples for the real set; ``x`` is float32 in
    [0, 1] of shape ``(N, 784)`` when ``flat`` else ``(N, 1, 28, 28)``, ``y`` int64 in 0..9.
    Raises FileNotFoundError naming the missing file; nothing is downloaded.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST directory {directory} does not exist; gpunet does not "
                                f"download MNIST: put the four IDX files from {_MNIST_SOURCE} "
                                f"there")
    f = _MNIST_FILES
    return (_mnist_pair(directory, f["train_images"], f["train_labels"], flat, "mnist"),
            _mnist_pair(directory, f["test_images"], f["test_labels"], flat, "mnist"))


def _check_synthetic(n: int, classes: int) -> None:
    if classes < 1:
        raise ValueError(f"classes must be at least 1, got {classes}")
    if n < 2 * classes:
        raise ValueError(f"n must be at least 2 * classes = {2 * classes}, got {n}")


def spirals(n: int = 600, classes: int = 3, noise: float = 0.2,
            seed: int = 0) -> tuple[Dataset, Dataset]:
    """``classes`` interleaved 2-D spiral arms, ``n`` points in all, as an 80/20 ``(train,
    test)`` split; ``x`` float32 of shape ``(N, 2)`` within [-1, 1], ``y`` int64.

    A point at radius ``t`` in [0, 1] on arm ``c`` has angle ``2*pi*c/classes + 4*t`` plus
    Gaussian noise of standard deviation ``noise`` (radians), as in CS231n's spiral set.
    """
    _check_synthetic(n, classes)
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    generator = np.random.default_rng(seed)
    y = np.arange(n) % classes
    t = generator.uniform(0.0, 1.0, n)
    angle = 2 * np.pi * y / classes + 4.0 * t + generator.normal(0.0, noise, n)
    x = np.stack([t * np.sin(angle), t * np.cos(angle)], axis=1)
    return _split(x, y, "spirals", classes, 0.2, generator)


def blobs(n: int = 600, classes: int = 4, features: int = 2,
          seed: int = 0) -> tuple[Dataset, Dataset]:
    """Isotropic Gaussian clusters as an 80/20 ``(train, test)`` split.

    Like scikit-learn's ``make_blobs``: centres uniform in [-10, 10]^features, unit standard
    deviation, ``n`` points shared evenly among ``classes``. ``x`` is float32 of shape
    ``(N, features)``, ``y`` int64 in ``[0, classes)``.
    """
    _check_synthetic(n, classes)
    if features < 1:
        raise ValueError(f"features must be at least 1, got {features}")
    generator = np.random.default_rng(seed)
    centres = generator.uniform(-10.0, 10.0, (classes, features))
    y = np.arange(n) % classes
    x = centres[y] + generator.normal(0.0, 1.0, (n, features))
    return _split(x, y, "blobs", classes, 0.2, generator)


def shapes(n: int = 800, size: int = 24, noise: float = 0.15,
           seed: int = 0) -> tuple[Dataset, Dataset]:
    """A synthetic segmentation set: ``n`` noisy grey images with 1 to 3 random discs and
    axis-aligned rectangles, as an 80/20 ``(train, test)`` split. ``x``: float32
    ``(N, 1, size, size)``; ``y``: float32 masks of the same shape, 1 inside a shape.

    Each image has a background level in [0, 0.4] with a random linear gradient of up to
    0.2 across it; every shape is brighter than the background by a contrast in
    [0.25, 0.6]; then Gaussian noise of standard deviation ``noise`` is added. Shapes have
    radii (or half-sides) between ``size/10`` and ``size/4``. Seeded by ``seed`` alone.
    """
    if n < 2 or size < 8 or noise < 0:
        raise ValueError(f"shapes: expected n >= 2, size >= 8 and noise >= 0, got n={n}, "
                         f"size={size}, noise={noise}")
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    yy, xx = yy[None], xx[None]  # (1, size, size), broadcast against per-image (n, 1, 1)
    col = lambda a: a[:, None, None]
    mask = np.zeros((n, size, size), dtype=bool)
    count = g.integers(1, 4, n)
    for k in range(3):  # shape slots: a loop over 3, vectorised over images and pixels
        lo, hi = size / 10, size / 4
        cy, cx = g.uniform(hi / 2, size - hi / 2, (2, n))
        ry, rx = g.uniform(lo, hi, (2, n))
        disc = g.random(n) < 0.5
        inside = np.where(col(disc),
                          (yy - col(cy)) ** 2 + (xx - col(cx)) ** 2 <= col(ry) ** 2,
                          (np.abs(yy - col(cy)) <= col(ry)) & (np.abs(xx - col(cx)) <= col(rx)))
        mask |= inside & col(count > k)
    level = g.uniform(0.0, 0.4, n)
    slope = g.uniform(-0.2, 0.2, (2, n)) / size
    background = col(level) + col(slope[0]) * (yy - size / 2) + col(slope[1]) * (xx - size / 2)
    contrast = g.uniform(0.25, 0.6, n)
    x = background + col(contrast) * mask + g.normal(0.0, noise, (n, size, size))
    x, y = x[:, None].astype(np.float32), mask[:, None].astype(np.float32)
    cut = n - max(1, n // 5)
    return Dataset(x[:cut], y[:cut], "shapes"), Dataset(x[cut:], y[cut:], "shapes")


def adding(seq_len: int = 50, n_train: int = 2000, n_test: int = 1000,
           seed: int = 0) -> tuple[Dataset, Dataset]:
    """The adding problem (Hochreiter and Schmidhuber 1997, in the form of Le et al. 2015) as
    ``(train, test)``: a regression task that needs memory over ``seq_len`` steps.

    Each sample is ``(seq_len, 2)``, batch-major like every dataset here: feature 0 is a
    value uniform in [0, 1] at every step, feature 1 marks exactly two steps with 1, one in
    the first half (``t < seq_len // 2``) and one in the second. The target ``(1,)`` is the
    sum of the two marked values, float32; always answering the mean (1) scores a mean
    squared error of 1/6 (about 0.167). Seeded by ``seed`` alone.
    """
    if seq_len < 2 or n_train < 1 or n_test < 1:
        raise ValueError(f"adding: expected seq_len >= 2, n_train >= 1 and n_test >= 1, got "
                         f"{seq_len}, {n_train} and {n_test}")
    g = np.random.default_rng(seed)
    n, half = n_train + n_test, seq_len // 2
    x = np.zeros((n, seq_len, 2))
    x[:, :, 0] = g.uniform(0.0, 1.0, (n, seq_len))
    rows, first, second = np.arange(n), g.integers(0, half, n), g.integers(half, seq_len, n)
    x[rows, first, 1] = x[rows, second, 1] = 1.0
    y = (x[rows, first, 0] + x[rows, second, 0])[:, None]
    return (Dataset(x[:n_train], y[:n_train], "adding"),
            Dataset(x[n_train:], y[n_train:], "adding"))


def digits_rows(test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """:func:`digits` read as sequences: each 8x8 image is 8 time steps (its rows) of 8
    features, ``x`` of shape ``(N, 8, 8)`` (batch-major), ``y`` int64 labels; the same
    train/test split as :func:`digits`."""
    train, test = digits(flat=False, test_fraction=test_fraction)
    rows = lambda d: Dataset(d.x.reshape(-1, 8, 8), d.y, "digits-rows", d.num_classes)
    return rows(train), rows(test)


def reverse(seq_len: int = 8, vocab: int = 10, n_train: int = 4000, n_test: int = 500,
            seed: int = 0) -> tuple[Dataset, Dataset]:
    """Sequences to be reversed, as ``(train, test)``: ``x`` int64 ``(N, seq_len)`` of tokens
    drawn uniformly from ``[0, vocab)``, ``y = x[:, ::-1]``, ``num_classes = vocab`` (one
    vocabulary for inputs and targets). A per-token task for a model whose output position
    ``t`` must read input position ``seq_len - 1 - t``: attention does that in one step, a
    left-to-right recurrence must carry the whole sequence. Seeded by ``seed`` alone."""
    if seq_len < 2 or vocab < 2 or n_train < 1 or n_test < 1:
        raise ValueError(f"reverse: expected seq_len >= 2, vocab >= 2, n_train >= 1 and "
                         f"n_test >= 1, got {seq_len}, {vocab}, {n_train} and {n_test}")
    x = np.random.default_rng(seed).integers(0, vocab, (n_train + n_test, seq_len))
    y = x[:, ::-1]
    return (Dataset(x[:n_train], y[:n_train], "reverse", vocab, tokens=True),
            Dataset(x[n_train:], y[n_train:], "reverse", vocab, tokens=True))


#: The most tokens :func:`text` puts in a dataset's windows (128 MiB of int64 inputs).
TEXT_MAX_TOKENS = 1 << 24


def text(path: str | os.PathLike, seq_len: int = 64,
         test_fraction: float = 0.1) -> tuple[Dataset, Dataset]:
    """Character-level language modelling of the UTF-8 text file ``path``, as ``(train,
    test)``: the vocabulary is the file's distinct characters (sorted), the first
    ``1 - test_fraction`` of the text is for training and the rest for testing, each read as
    windows of ``seq_len`` characters (``x``, int64 ``(N, seq_len)``) whose targets ``y`` are
    the next characters (``x`` shifted by one). Windows start at every character, so a model
    sees each piece of text at every position of its window (as a sampler that slides along
    the text will show it), unless that would hold more than :data:`TEXT_MAX_TOKENS` tokens:
    then they start every few characters, evenly spread. ``vocabulary`` is set on both."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text: no file {str(path)!r} (--data-file)")
    try:
        chars = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text: {path} is not UTF-8 text ({e})") from None
    if seq_len < 1 or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"text: expected seq_len >= 1 and test_fraction in (0, 1), got "
                         f"{seq_len} and {test_fraction}")
    vocabulary = "".join(sorted(set(chars)))
    ids = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(np.frombuffer(vocabulary.encode("utf-32-le"), dtype=np.uint32), ids)
    cut = int(len(ids) * (1 - test_fraction))

    def windows(part: np.ndarray) -> Dataset:
        starts = len(part) - seq_len  # windows and their shifted targets fit before the end
        if starts < 1:
            raise ValueError(f"text: {path} is too short for windows of {seq_len} characters "
                             f"in both the train and the test part ({len(ids)} characters)")
        stride = max(1, -(-starts * seq_len // TEXT_MAX_TOKENS))
        first = np.arange(0, starts, stride)[:, None] + np.arange(seq_len)
        return Dataset(part[first], part[first + 1], "text", len(vocabulary), vocabulary,
                       tokens=True)
    return windows(ids[:cut]), windows(ids[cut:])


DATASETS: dict[str, Callable[..., tuple[Dataset, Dataset]]] = {
    "adding": adding,
    "digits-rows": digits_rows,
    "digits": digits,
    "mnist": mnist,
    "spirals": spirals,
    "blobs": blobs,
    "shapes": shapes,
    "reverse": reverse,
    "text": text,
}


def load(name: str, **kwargs: Any) -> tuple[Dataset, Dataset]:
    """``(train, test)`` of the dataset registered as ``name`` in :data:`DATASETS`."""
    try:
        factory = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") \
            from None
    return factory(**kwargs)


class DataLoader:
    """Mini-batches ``(xb, yb)`` of a dataset, ``xb`` of shape ``(batch_size, *input_shape)``
    (the last batch may be smaller unless ``drop_last``).

    With ``shuffle`` the order is ``default_rng([seed, epoch]).permutation(N)``: it depends
    only on ``seed`` and the epoch. Each pass takes the loader's ``epoch`` and then advances
    it by one, so, as PyTorch's, every pass is shuffled anew; :meth:`set_epoch` chooses the
    epoch of the next pass (the Trainer sets it every epoch, so a resumed or data-parallel
    run sees the order an uninterrupted one does), and the ``k``-th pass of a loader equals
    a pass after ``set_epoch(k)`` (counting from 0). ``seed=None`` draws the seed from
    gpunet's stream once, here, so ``gpunet.seed(n)`` makes the shuffling reproducible.

    Data-parallel runs give each of ``world`` processes its ``rank``: every step takes the
    next ``batch_size * world`` positions of the shared order and each rank reads its own
    consecutive share, so the ranks together see exactly the batches one process would with
    ``batch_size * world``, disjoint, and the whole epoch.

    ``augment`` (a :class:`gpunet.augment.Transform`, images ``(N, C, H, W)`` only) transforms
    each batch on the host. Its draws come from ``default_rng([seed, epoch, 1])``, a stream
    apart from the order's, one row per position of the epoch's order: like the order they
    depend only on ``seed`` and the epoch, and the ranks of a data-parallel run together
    augment exactly as one process would. Targets with the images' ``(H, W)`` (segmentation
    masks) get the same flip and crop as their images.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 32, shuffle: bool = True,
                 drop_last: bool = False, seed: int | None = None, rank: int = 0,
                 world: int = 1, augment: Transform | None = None) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, world), got rank {rank} of {world}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if seed is None:
            seed = int(rng.generator().integers(2**63))
        elif seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.epoch = 0
        self.rank, self.world = rank, world
        if augment is not None:
            if not isinstance(augment, Transform):
                raise TypeError(f"DataLoader: expected augment to be a gpunet.augment."
                                f"Transform, got {type(augment).__name__}")
            check_images(dataset.x, "DataLoader: augment", what=f"dataset {dataset.name!r}")
        self.augment = augment
        y = dataset.y
        self._augment_targets = y.ndim == 4 and y.shape[2:] == dataset.x.shape[2:]

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order (and augmentation draws) the next pass uses."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, step = len(self.dataset), self.batch_size * self.world
        return n // step if self.drop_last else -(-n // step)

    def step_size(self, step: int) -> int:
        """How many samples all ranks together read at ``step`` (less than
        ``batch_size * world`` only for a last, partial batch)."""
        total = self.batch_size * self.world
        return min(total, len(self.dataset) - step * total)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n, total = len(self.dataset), self.batch_size * self.world
        epoch, self.epoch = self.epoch, self.epoch + 1  # the next pass is shuffled anew
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        drawn = (None if self.augment is None else
                 self.augment.draw(n, np.random.default_rng([self.seed, epoch, 1])))
        for start in range(0, len(self) * total, total):
            # equal shares of a full step; a last, partial step is split as evenly as it goes
            mine = np.array_split(np.arange(start, min(start + total, n)), self.world)[self.rank]
            xb, yb = self.dataset[order[mine]]
            if drawn is not None:
                params = self.augment.take(drawn, mine)
                xb = self.augment.apply(xb, params)
                yb = self.augment.apply(yb, params) if self._augment_targets else yb
            yield xb, yb
