"""The training loop: batches, progress, validation, history, checkpoints and resume."""
from __future__ import annotations

import math
import os
import time
from typing import IO, Any, Callable

import numpy as np

from . import rng
from .augment import Transform
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
from .stopping import EarlyStopping

#: ``metric(pred, target)``: a 0-d array on the prediction's device (or a float), or None
#: when it does not apply to these targets.
Metric = Callable[[Any, Any], Any]


def accuracy(pred: Any, target: Any) -> Any:
    """Share of positions whose arg-max class equals an integer label, as a 0-d array on the
    prediction's device; None for other targets (regression, one-hot or soft targets)."""
    if target.dtype.kind not in "iu" or pred.ndim != target.ndim + 1:
        return None
    return (pred.argmax(axis=-1) == target).mean()


class _Totals:
    """Sums over the steps of an epoch (loss and metric, each weighted by its batch size),
    kept on the device and read back in one copy when wanted: a GPU step then never waits for
    the host to look at its loss."""

    def __init__(self, device: Backend) -> None:
        self.device = device
        self.loss: Any = 0.0
        self.metric: Any = 0.0
        self.seen = self.metric_seen = 0

    def add(self, loss: Any, metric: Any, n: int) -> None:
        xp = self.device.xp
        self.loss = self.loss + xp.asarray(loss, dtype=np.float64) * n
        self.seen += n
        if metric is not None:
            self.metric = self.metric + xp.asarray(metric, dtype=np.float64) * n
            self.metric_seen += n

    def read(self) -> tuple[float, float]:
        """``(loss sum, metric sum)``, one device-to-host copy (none once they are host
        numbers)."""
        if isinstance(self.loss, float) and isinstance(self.metric, float):
            return self.loss, self.metric
        xp = self.device.xp
        both = xp.stack([xp.asarray(self.loss, dtype=np.float64),
                         xp.asarray(self.metric, dtype=np.float64)])
        loss, metric = to_numpy(both).tolist()
        return loss, metric

    def means(self) -> dict[str, float | None]:
        loss, metric = self.read()
        return {"loss": loss / max(self.seen, 1),
                "metric": metric / self.metric_seen if self.metric_seen else None}


class Trainer:
    """Trains ``model`` on ``loss`` with ``optimizer`` on ``device`` (the model's, by default).

    ``fit`` runs epochs of shuffled mini-batches; after each epoch it evaluates on ``val``,
    appends a row to ``history`` and, given ``checkpoint``, writes model, optimizer, schedule,
    random state and history there atomically. ``fit(..., resume=True)`` continues from that
    file to the same result an uninterrupted run gives. A NaN or infinite loss stops training
    with :class:`~gpunet.TrainingDiverged`; the last good checkpoint stays as it was. On the
    host devices each step is checked before it is applied. On a GPU a step never waits for
    the host: the loss and metric sums stay on the device and are read when the progress bar
    redraws (a few times a second) and at the end of an epoch, so a non-finite loss is seen
    there, after the steps before it were applied.

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
        # history, evaluate and the progress bar name the metric after what it is: "accuracy",
        # "dice", ... (its __name__; "metric" for a lambda)
        name = getattr(metric, "__name__", "")
        self.metric_name = name if name.isidentifier() else "metric"
        self.comm = comm if comm is not None else Communicator()
        for layer in self.model.walk():  # synchronised BatchNorm reduces over these ranks
            if isinstance(layer, BatchNorm):
                layer.comm = self.comm
        self.progress, self.log = progress and self.comm.rank == 0, log
        self.history: list[dict[str, Any]] = []
        self._early_stopping: EarlyStopping | None = None  # fit's, for its checkpoints
        #: seconds spent in ``fit`` over the whole run, resumed parts included (kept in the
        #: checkpoint, so a resumed run reports the time of all its epochs)
        self.seconds = 0.0

    def _batch(self, xb: np.ndarray, yb: np.ndarray) -> tuple[Any, Any]:
        # float inputs take the model's dtype; integer ones (token indices) stay integers
        dtype = self.model.dtype if xb.dtype.kind == "f" else None
        return self.device.asarray(xb, dtype=dtype), self.device.asarray(yb)

    @on_device
    def check_data(self, data: Dataset, samples: int = 2) -> None:
        """Run the model and the loss on the first ``samples`` samples of ``data`` in eval
        mode, so that a model, loss and dataset that do not fit together (logits for labels
        given float targets, a mask for a classifier) raise the loss's or a layer's error
        before any step is taken, rather than in the first step or, worse, never. Nothing
        changes: no gradient, no update, no random draw, and no read of a GPU. :meth:`fit`
        calls it on its training and validation data::

            trainer.check_data(train)   # ShapeError: SoftmaxCrossEntropy: expected ...
        """
        if len(data) == 0:
            return
        x, y = self._batch(data.x[:samples], data.y[:samples])
        self.loss.forward(self.model.forward(x, training=False), y)

    @on_device
    def fit(self, train: Dataset, epochs: int, batch_size: int = 32, val: Dataset | None = None,
            checkpoint: str | os.PathLike | None = None, resume: bool = False,
            seed: int | None = None, augment: Transform | None = None,
            early_stopping: EarlyStopping | None = None) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are done in all (counting resumed ones); returns the
        history, one dict per epoch. ``augment`` (:mod:`gpunet.augment`) transforms the
        training batches, drawn from the loader's seed and the epoch (so a resumed run
        continues identically); ``val`` and :meth:`evaluate` are never augmented.

        ``early_stopping`` (:class:`~gpunet.stopping.EarlyStopping`) ends training sooner
        when its monitored history entry stops improving; the last row then has a
        ``"stopped"`` entry saying why. A schedule with a ``monitor``
        (:class:`~gpunet.optim.ReduceLROnPlateau`) is stepped with that entry."""
        for what, watcher in (("schedule", self.schedule), ("early_stopping", early_stopping)):
            monitor = getattr(watcher, "monitor", None)
            if monitor is not None and monitor.startswith("val_") and val is None:
                raise ValueError(f"Trainer.fit: {what} {type(watcher).__name__} monitors "
                                 f"{monitor!r}: pass val= (a validation Dataset)")
        self._early_stopping = early_stopping
        for data in (train, val):  # a mismatch fails here, before the first step
            if data is not None:
                self.check_data(data)
        loader = DataLoader(train, batch_size, shuffle=True, seed=seed, rank=self.comm.rank,
                            world=self.comm.size, augment=augment)
        start, before, fit_started = 0, 0.0, time.perf_counter()
        if resume:
            if checkpoint is None or not os.path.exists(checkpoint):
                raise FileNotFoundError(f"Trainer: nothing to resume from at {checkpoint!r}")
            extra: dict[str, np.ndarray] = {}
            meta = load_checkpoint(checkpoint, self.model, self.optimizer, extra)
            start, self.history, loader.seed = meta["epoch"], meta["history"], meta["loader_seed"]
            rng.set_state(meta["rng"])
            before = float(meta.get("seconds", 0.0))  # 0 in checkpoints older than the key
            if self.schedule is not None:
                self.schedule.load_state_dict(meta["schedule"])
            if early_stopping is not None:
                early_stopping.reset()
                if meta.get("early_stopping") is not None:  # else: saved without one
                    early_stopping.load_state_dict(meta["early_stopping"], extra, self.model)
                if early_stopping.stopped_epoch:  # the run had stopped: nothing to add
                    start = epochs
        else:
            self.history = []
            if early_stopping is not None:
                early_stopping.reset()
        if self.comm.size > 1:  # every rank starts from rank 0's weights and shuffling seed
            seed_box = np.array([loader.seed], dtype=np.int64)
            self.comm.broadcast([seed_box])
            loader.seed = int(seed_box[0])
            self.comm.broadcast([p.data for p in self.model.params().values()]
                                + list(self.model.state().values()))
        for epoch in range(start, epochs):
            self._epoch(loader, epoch, epochs, val)
            if self.schedule is not None:
                if getattr(self.schedule, "monitor", None) is None:
                    self.schedule.step()
                else:
                    self.schedule.step(self._monitored(self.schedule))
            stop = early_stopping is not None and early_stopping.update(
                self._monitored(early_stopping), epoch + 1, self.model)
            if stop:  # the same on every rank: the history's metrics are reduced
                early_stopping.restore(self.model)
                self.history[-1]["stopped"] = early_stopping.reason()
            if checkpoint is not None:
                self.seconds = before + time.perf_counter() - fit_started
                self._save(checkpoint, epoch + 1, loader.seed)
            if stop:
                break
        self.seconds = before + time.perf_counter() - fit_started
        return self.history

    def _monitored(self, watcher: Any) -> float:
        """The last history row's entry that ``watcher`` (a schedule or EarlyStopping)
        monitors: a host number, read at the epoch's end with the others."""
        value = self.history[-1].get(watcher.monitor)
        if value is None:
            known = sorted(k for k, v in self.history[-1].items() if v is not None)
            raise ValueError(f"Trainer.fit: {type(watcher).__name__} monitors "
                             f"{watcher.monitor!r}, which this run's history does not have "
                             f"(it has {known})")
        return float(value)

    def _epoch(self, loader: DataLoader, epoch: int, epochs: int, val: Dataset | None) -> None:
        started = time.perf_counter()
        loader.set_epoch(epoch)
        bar = ProgressBar(len(loader), f"epoch {epoch + 1}/{epochs}", file=self.log,
                          enabled=self.progress)
        totals, checked = _Totals(self.device), 0
        # A non-finite loss must stop training. On the host reading it costs nothing, so each
        # step is checked before it is applied; on a GPU that read would make every step wait,
        # so the loss sum is checked when it is read anyway (progress, epoch end).
        every_step = self.device.on_host

        def shown() -> dict[str, Any]:
            nonlocal checked
            means = totals.means()
            if self.comm.size == 1:  # with several ranks only rank 0 draws: check in step
                self._check_finite(means["loss"], epoch, checked, step + 1)
                checked = step + 1
            return self._shown({"loss": means["loss"], self.metric_name: means["metric"]})

        for step, (xb, yb) in enumerate(loader):
            n = len(xb)
            self.optimizer.zero_grad()
            loss, m = 0.0, None
            if n:  # a rank's share of a last, partial step can be empty
                x, y = self._batch(xb, yb)
                pred = self.model.forward(x, training=True)
                loss = self.loss.forward(pred, y)
                m = self.metric(pred, y)
                self.model.backward(self.loss.backward())
            step_loss = loss
            if self.comm.size > 1:  # the step's loss summed over the ranks, the same on all
                step_loss = self._average_gradients(n, loader.step_size(step), loss * n)
            if every_step:  # so all ranks stop together
                self._check_finite(float(step_loss), epoch, step, step + 1)
            if self.clip_norm is not None:
                clip_grad_norm(self.optimizer.params, self.clip_norm)
            self.optimizer.step()
            totals.add(loss, m, n)
            bar.update(1, shown)
        self._reduce_totals(totals)
        means = totals.means()
        self._check_finite(means["loss"], epoch, checked, len(loader))
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": means["loss"],
                               self.metric_name: means["metric"], "lr": self.optimizer.lr}
        if val is not None:
            scores = self.evaluate(val)
            row.update({"val_loss": scores["loss"],
                        f"val_{self.metric_name}": scores[self.metric_name]})
        row["seconds"] = time.perf_counter() - started
        self.history.append(row)
        bar.close(**self._shown(row))

    def _shown(self, row: dict[str, Any]) -> dict[str, Any]:
        """The progress bar's figures from a history row: loss and the metric, as trained
        and validated (accuracy shown as ``acc``, other metrics by name: ``dice``)."""
        label = "acc" if self.metric_name == "accuracy" else self.metric_name
        return {"loss": row["loss"], label: row.get(self.metric_name),
                "val_loss": row.get("val_loss"),
                f"val_{label}": row.get(f"val_{self.metric_name}")}

    def _check_finite(self, loss: float, epoch: int, first: int, last: int) -> None:
        """Stop with TrainingDiverged if ``loss`` (of steps ``first + 1`` to ``last``) is not
        finite; a target the loss found bad on a GPU is reported first (:meth:`Loss.check`)."""
        if math.isfinite(loss):
            return
        self.loss.check()  # a bad label or index found on a GPU is the reason: say so
        self.model.check()
        if last == first + 1:
            where = f"step {last}; the step was not applied"
        else:
            where = (f"one of steps {first + 1} to {last}; those steps were applied (on a GPU "
                     "the loss is read a few times a second, not every step)")
        raise TrainingDiverged(f"Trainer: the loss became {loss} at epoch {epoch + 1}, "
                               f"{where}, and the last checkpoint written (if any) is the last "
                               "good one")

    def _reduce_totals(self, totals: _Totals) -> None:
        """Sum an epoch's totals over the ranks (one host reduction at the epoch's end)."""
        if self.comm.size == 1:
            return
        loss, metric = totals.read()
        loss, totals.seen, metric, totals.metric_seen = self.comm.allreduce_sum(
            [loss, totals.seen, metric, totals.metric_seen])
        totals.loss, totals.metric = loss, metric
        totals.seen, totals.metric_seen = int(totals.seen), int(totals.metric_seen)

    def _average_gradients(self, n: int, step_total: int, loss_sum: Any) -> Any:
        """Replace each gradient by the mean over all ranks' samples of this step (a rank's
        gradient is the mean over its ``n`` samples, so it weighs ``n * size / step_total``);
        returns the step's summed loss over the ranks, reduced in the same call and left on
        the device."""
        grads = [p.grad for p in self.optimizer.params.values()]
        weight = n * self.comm.size / step_total
        if weight != 1.0:
            for g in grads:
                g *= weight
        loss_box = self.device.xp.asarray(loss_sum, dtype=grads[0].dtype).reshape(1)
        self.comm.allreduce_mean([*grads, loss_box])
        return loss_box[0] * self.comm.size

    def _save(self, path: str | os.PathLike, epochs_done: int, loader_seed: int) -> None:
        params = self.model.params()
        xp = self.device.xp
        finite = to_numpy(xp.stack([xp.isfinite(p.data).all() for p in params.values()]))
        if not finite.all():  # one read for all parameters
            name = list(params)[int(np.argmin(finite))]
            raise TrainingDiverged(f"Trainer: parameter {name} is no longer finite after "
                                   f"epoch {epochs_done}; the last good checkpoint is kept")
        if self.comm.rank == 0:
            meta = {"epoch": epochs_done, "history": self.history, "loader_seed": loader_seed,
                    "rng": rng.get_state(), "seconds": self.seconds,
                    "schedule": None if self.schedule is None else self.schedule.state_dict()}
            extra = None
            if self._early_stopping is not None:
                meta["early_stopping"] = self._early_stopping.state_dict()
                extra = self._early_stopping.best_weights
            save_checkpoint(path, self.model, self.optimizer, meta, extra)
        self.comm.barrier()  # no rank reads the checkpoint before it is whole

    @on_device
    def evaluate(self, data: Dataset, batch_size: int = 256) -> dict[str, float | None]:
        """Mean loss and metric over ``data`` in eval mode (no dropout, no updates); with
        several ranks each evaluates its share and the sums are reduced. The sums stay on the
        device until the end: one read per call."""
        totals = _Totals(self.device)
        for xb, yb in DataLoader(data, batch_size, shuffle=False, seed=0, rank=self.comm.rank,
                                 world=self.comm.size):
            if not len(xb):
                continue
            x, y = self._batch(xb, yb)
            pred = self.model.forward(x, training=False)
            totals.add(self.loss.forward(pred, y), self.metric(pred, y), len(xb))
        self._reduce_totals(totals)
        loss, metric = totals.read()
        if not math.isfinite(loss):  # a bad target found on a GPU: say so, not NaN
            self.loss.check()
            self.model.check()
        return {"loss": loss / len(data),
                self.metric_name: metric / totals.metric_seen if totals.metric_seen else None}

    @on_device
    def predict(self, x: np.ndarray | Dataset, batch_size: int = 256) -> np.ndarray:
        """Model outputs for ``x`` (an array of inputs, or a Dataset, whose targets are not
        used) in eval mode, as a NumPy array (read back once)."""
        x = x.x if isinstance(x, Dataset) else np.asarray(x)
        dtype = self.model.dtype if x.dtype.kind == "f" else None
        outs = [self.model.forward(self.device.asarray(x[i:i + batch_size], dtype=dtype),
                                   training=False)
                for i in range(0, len(x), batch_size)]
        return to_numpy(self.device.concat(outs, axis=0))
