"""The training loop: batches, progress, validation, history, checkpoints and resume."""
from __future__ import annotations

import math
import os
import time
from typing import IO, Any, Callable

import numpy as np

from . import rng
from .backends import Backend, get_device, to_numpy
from .backends.base import on_device
from .data import DataLoader, Dataset
from .distributed import Communicator
from .errors import TrainingDiverged
from .layers.base import Layer
from .layers.normalization import BatchNorm
from .losses import Loss
from .optim import Optimizer, clip_grad_norm
from .progress import ProgressBar
from .serialize import load_checkpoint, save_checkpoint

Metric = Callable[[Any, Any], float]


def accuracy(pred: Any, target: Any) -> float | None:
    """Share of positions whose arg-max class equals an integer label; None for other targets
    (regression, one-hot or soft targets)."""
    if target.dtype.kind not in "iu" or pred.ndim != target.ndim + 1:
        return None
    return float((pred.argmax(axis=-1) == target).mean())


class Trainer:
    """Trains ``model`` on ``loss`` with ``optimizer`` on ``device`` (the model's, by default).

    ``fit`` runs epochs of shuffled mini-batches; after each epoch it evaluates on ``val``,
    appends a row to ``history`` and, given ``checkpoint``, writes model, optimizer, schedule,
    random state and history there atomically. ``fit(..., resume=True)`` continues from that
    file to the same result an uninterrupted run gives. A NaN or infinite loss stops training
    with :class:`~gpunet.TrainingDiverged` before the bad step is applied; the last good
    checkpoint stays as it was.

    With a ``comm`` of several ranks (:mod:`gpunet.distributed`) training is data-parallel:
    rank 0's weights are broadcast, each rank reads its share of every step's
    ``batch_size * size`` samples, gradients are averaged (weighted by each rank's share)
    before the optimizer step, metrics are reduced over the ranks, and only rank 0 shows
    progress and writes checkpoints. BatchNorm layers built with ``sync=True`` take their
    batch statistics over all ranks. The model's input is data: the Trainer turns its input
    gradient off (:meth:`~gpunet.layers.Layer.set_input_grad`).
    """

    def __init__(self, model: Layer, loss: Loss, optimizer: Optimizer,
                 device: str | Backend | None = None, schedule: Any = None,
                 clip_norm: float | None = None, metric: Metric = accuracy,
                 progress: bool = True, log: IO[str] | None = None,
                 comm: Communicator | None = None) -> None:
        self.device = model.ops if device is None else get_device(device)
        self.model = model.to(self.device).set_input_grad(False)  # its input is data
        self.loss, self.optimizer, self.schedule = loss, optimizer, schedule
        self.clip_norm, self.metric = clip_norm, metric
        self.comm = comm if comm is not None else Communicator()
        for layer in self.model.walk():  # synchronised BatchNorm reduces over these ranks
            if isinstance(layer, BatchNorm):
                layer.comm = self.comm
        self.progress, self.log = progress and self.comm.rank == 0, log
        self.history: list[dict[str, Any]] = []

    def _batch(self, xb: np.ndarray, yb: np.ndarray) -> tuple[Any, Any]:
        return self.device.asarray(xb, dtype=self.model.dtype), self.device.asarray(yb)

    @on_device
    def fit(self, train: Dataset, epochs: int, batch_size: int = 32, val: Dataset | None = None,
            checkpoint: str | os.PathLike | None = None, resume: bool = False,
            seed: int | None = None) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are done in all (counting resumed ones); returns the
        history, one dict per epoch."""
        loader = DataLoader(train, batch_size, shuffle=True, seed=seed, rank=self.comm.rank,
                            world=self.comm.size)
        start = 0
        if resume:
            if checkpoint is None or not os.path.exists(checkpoint):
                raise FileNotFoundError(f"Trainer: nothing to resume from at {checkpoint!r}")
            meta = load_checkpoint(checkpoint, self.model, self.optimizer)
            start, self.history, loader.seed = meta["epoch"], meta["history"], meta["loader_seed"]
            rng.set_state(meta["rng"])
            if self.schedule is not None:
                self.schedule.load_state_dict(meta["schedule"])
        else:
            self.history = []
        if self.comm.size > 1:  # every rank starts from rank 0's weights and shuffling seed
            seed_box = np.array([loader.seed], dtype=np.int64)
            self.comm.broadcast([seed_box])
            loader.seed = int(seed_box[0])
            self.comm.broadcast([p.data for p in self.model.params().values()]
                                + list(self.model.state().values()))
        for epoch in range(start, epochs):
            self._epoch(loader, epoch, epochs, val)
            if self.schedule is not None:
                self.schedule.step()
            if checkpoint is not None:
                self._save(checkpoint, epoch + 1, loader.seed)
        return self.history

    def _epoch(self, loader: DataLoader, epoch: int, epochs: int, val: Dataset | None) -> None:
        started = time.perf_counter()
        loader.set_epoch(epoch)
        bar = ProgressBar(len(loader), f"epoch {epoch + 1}/{epochs}", file=self.log,
                          enabled=self.progress)
        total_loss, total_metric, seen, metric_seen = 0.0, 0.0, 0, 0
        for step, (xb, yb) in enumerate(loader):
            n = len(xb)
            self.optimizer.zero_grad()
            loss, m = 0.0, None
            if n:  # a rank's share of a last, partial step can be empty
                x, y = self._batch(xb, yb)
                pred = self.model.forward(x, training=True)
                loss = self.loss.forward(pred, y)
                m = self.metric(pred, y)
            if n:
                self.model.backward(self.loss.backward())
            step_loss = loss * n
            if self.comm.size > 1:
                step_loss = self._average_gradients(n, loader.step_size(step), step_loss)
            if not math.isfinite(step_loss):  # the same on every rank: all stop together
                raise TrainingDiverged(
                    f"Trainer: the loss became {loss} at epoch {epoch + 1}, "
                    f"step {step + 1}; the step was not applied, and the last checkpoint "
                    "written (if any) is the last good one")
            if self.clip_norm is not None:
                clip_grad_norm(self.optimizer.params, self.clip_norm)
            self.optimizer.step()
            total_loss, seen = total_loss + loss * n, seen + n
            if m is not None:
                total_metric, metric_seen = total_metric + m * n, metric_seen + n
            bar.update(1, loss=total_loss / max(seen, 1),
                       acc=total_metric / metric_seen if metric_seen else None)
        total_loss, seen, total_metric, metric_seen = self.comm.allreduce_sum(
            [total_loss, seen, total_metric, metric_seen])
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": total_loss / max(seen, 1),
                               "accuracy": total_metric / metric_seen if metric_seen else None,
                               "lr": self.optimizer.lr}
        if val is not None:
            scores = self.evaluate(val)
            row.update({"val_loss": scores["loss"], "val_accuracy": scores["accuracy"]})
        row["seconds"] = time.perf_counter() - started
        self.history.append(row)
        bar.close(loss=row["loss"], acc=row["accuracy"], val_loss=row.get("val_loss"),
                  val_acc=row.get("val_accuracy"))

    def _average_gradients(self, n: int, step_total: int, loss_sum: float) -> float:
        """Replace each gradient by the mean over all ranks' samples of this step (a rank's
        gradient is the mean over its ``n`` samples, so it weighs ``n * size / step_total``);
        returns the step's summed loss over the ranks, reduced in the same call."""
        grads = [p.grad for p in self.optimizer.params.values()]
        weight = n * self.comm.size / step_total
        if weight != 1.0:
            for g in grads:
                g *= weight
        loss_box = self.device.asarray([loss_sum], dtype=grads[0].dtype)
        self.comm.allreduce_mean([*grads, loss_box])
        return float(loss_box[0]) * self.comm.size

    def _save(self, path: str | os.PathLike, epochs_done: int, loader_seed: int) -> None:
        for name, p in self.model.params().items():
            if not self.device.isfinite_all(p.data):
                raise TrainingDiverged(f"Trainer: parameter {name} is no longer finite after "
                                       f"epoch {epochs_done}; the last good checkpoint is kept")
        if self.comm.rank == 0:
            meta = {"epoch": epochs_done, "history": self.history, "loader_seed": loader_seed,
                    "rng": rng.get_state(),
                    "schedule": None if self.schedule is None else self.schedule.state_dict()}
            save_checkpoint(path, self.model, self.optimizer, meta)
        self.comm.barrier()  # no rank reads the checkpoint before it is whole

    @on_device
    def evaluate(self, data: Dataset, batch_size: int = 256) -> dict[str, float | None]:
        """Mean loss and metric over ``data`` in eval mode (no dropout, no updates); with
        several ranks each evaluates its share and the sums are reduced."""
        total_loss, total_metric, metric_seen = 0.0, 0.0, 0
        for xb, yb in DataLoader(data, batch_size, shuffle=False, seed=0, rank=self.comm.rank,
                                 world=self.comm.size):
            if not len(xb):
                continue
            x, y = self._batch(xb, yb)
            pred = self.model.forward(x, training=False)
            total_loss += self.loss.forward(pred, y) * len(xb)
            m = self.metric(pred, y)
            if m is not None:
                total_metric, metric_seen = total_metric + m * len(xb), metric_seen + len(xb)
        total_loss, total_metric, metric_seen = self.comm.allreduce_sum(
            [total_loss, total_metric, metric_seen])
        return {"loss": total_loss / len(data),
                "accuracy": total_metric / metric_seen if metric_seen else None}

    @on_device
    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Model outputs for ``x`` in eval mode, as a NumPy array."""
        outs = [to_numpy(self.model.forward(self.device.asarray(x[i:i + batch_size],
                                                                dtype=self.model.dtype),
                                            training=False))
                for i in range(0, len(x), batch_size)]
        return np.concatenate(outs)
