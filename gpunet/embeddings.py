"""Judging and drawing embedding models (``gpunet train embed``): nearest-neighbour accuracy
in the embedding space, within a batch (a Trainer metric) and of test points against the
training set, and a 2-D PCA picture of the test embeddings."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .backends import device_of

if TYPE_CHECKING:
    from .data import Dataset
    from .trainer import Trainer

#: The one-line error when a plot is asked for without matplotlib (the ``bench`` extra).
NO_MATPLOTLIB = 'the plot needs matplotlib: pip install "gpunet[bench]"'


def _squared_distances(a: Any, b: Any) -> Any:
    """``||a_i - b_j||^2`` for rows ``a`` ``(M, D)`` and ``b`` ``(K, D)``: ``(M, K)``."""
    return (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2 * (a @ b.T)


def batch_nn_accuracy(pred: Any, target: Any) -> Any:
    """A :class:`~gpunet.Trainer` metric for embeddings ``(N, D)`` with integer labels
    ``(N,)``: the share of the batch's samples whose nearest other sample (Euclidean) has their
    label (leave-one-out 1-nearest-neighbour accuracy within the batch), as a 0-d array on
    the embeddings' device. None for other targets, or a batch of one."""
    if (target.dtype.kind not in "iu" or pred.ndim != 2 or len(pred) < 2
            or tuple(target.shape) != (len(pred),)):
        return None
    xp = device_of(pred).xp
    d = _squared_distances(pred, pred)
    d = xp.where(xp.eye(len(pred), dtype=bool), xp.inf, d)  # a sample is not its own neighbour
    return (target[d.argmin(axis=1)] == target).mean()


def nearest_neighbour_accuracy(train_emb: np.ndarray, train_y: np.ndarray,
                               test_emb: np.ndarray, test_y: np.ndarray) -> float:
    """1-nearest-neighbour accuracy: the share of test embeddings ``(M, D)`` whose nearest
    training embedding ``(K, D)`` (Euclidean) has the test point's label."""
    a, b = np.asarray(test_emb, np.float64), np.asarray(train_emb, np.float64)
    nearest = _squared_distances(a, b).argmin(axis=1)
    return float(np.mean(np.asarray(train_y)[nearest] == np.asarray(test_y)))


def nn_test_accuracy(trainer: "Trainer", train: "Dataset", test: "Dataset") -> dict[str, float]:
    """``{"test_accuracy": ...}``: the trained model's 1-nearest-neighbour accuracy of the test
    set against the training set's embeddings (a model entry's ``evaluate`` hook)."""
    return {"test_accuracy": nearest_neighbour_accuracy(
        trainer.predict(train.x), train.y, trainer.predict(test.x), test.y)}


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Rows ``(N, D)`` projected onto their first two principal axes, ``(N, 2)``: centred, then
    multiplied by the two leading right singular vectors (NumPy's SVD)."""
    centred = np.asarray(x, np.float64) - np.mean(x, axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def plot_embeddings(trainer: "Trainer", test: "Dataset", path: str) -> None:
    """Write to ``path`` (PNG) the test set's embeddings projected to 2-D by :func:`pca_2d`,
    one colour per class (a model entry's ``plot`` hook, ``gpunet train --plot``)."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(NO_MATPLOTLIB) from e
    xy = pca_2d(trainer.predict(test.x))
    fig = Figure(figsize=(6, 5.5))
    FigureCanvasAgg(fig)  # renders to a file without a display; pyplot's state is left alone
    ax = fig.add_subplot()
    classes = np.unique(test.y)
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for i, c in enumerate(classes):
        at = test.y == c
        ax.scatter(xy[at, 0], xy[at, 1], s=9, label=str(c), color=palette(i % palette.N))
    ax.set_xlabel("principal axis 1")
    ax.set_ylabel("principal axis 2")
    ax.set_title(f"test embeddings of {test.name or 'the test set'}, PCA to 2-D")
    ax.legend(title="class", fontsize=7, markerscale=1.5, loc="best")
    fig.savefig(path, dpi=120)
