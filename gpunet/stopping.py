"""Early stopping for :meth:`gpunet.Trainer.fit`: stop when a validation metric stops
improving, and put back the weights of its best epoch."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .backends import to_numpy
from .layers.base import Layer


class EarlyStopping:
    """Stop training once ``monitor`` (a key of the Trainer's history rows: ``"val_loss"``,
    ``"val_accuracy"``, ``"loss"``, ...) has not improved for ``patience`` epochs in a row.

    An epoch improves on the best value when ``value < best - min_delta`` (mode "min") or
    ``value > best + min_delta`` (mode "max"). With ``restore_best`` the model gets back the
    parameters and state (running statistics) of the best epoch when it stops training (as
    Keras's ``restore_best_weights``; a run that reaches ``epochs`` keeps its last weights, so
    that resuming it for more epochs continues it). Those are kept as host (NumPy) copies,
    taken at the end of an improving epoch: they cost no GPU memory, and go into the
    checkpoint as they are, so a resumed run stops and restores exactly as an uninterrupted
    one. The history row of the last epoch gets a ``"stopped"`` entry saying why.

    Several ranks decide together: the history's metrics are already reduced over the ranks,
    so every rank sees the same values and stops at the same epoch.

    >>> stopper = EarlyStopping(monitor="val_loss", patience=5)
    >>> # trainer.fit(train, epochs=100, val=val, early_stopping=stopper)
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 mode: str = "min", restore_best: bool = True) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"EarlyStopping: expected monitor to be a history key such as "
                             f"'val_loss', got {monitor!r}")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"EarlyStopping: expected patience to be an integer >= 1, "
                             f"got {patience!r}")
        if not isinstance(min_delta, (int, float)) or isinstance(min_delta, bool) \
                or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"EarlyStopping: expected min_delta >= 0, got {min_delta!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: expected mode 'min' or 'max', got {mode!r}")
        self.monitor, self.patience, self.min_delta = monitor, patience, float(min_delta)
        self.mode, self.restore_best = mode, bool(restore_best)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen: a new run starts."""
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = 0  # 1-based epoch of the best value; 0: none yet
        self.wait = 0  # epochs since the best one
        self.stopped_epoch = 0  # the epoch training stopped after; 0: it did not
        self.best_weights: dict[str, np.ndarray] | None = None

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, epoch: int, model: Layer) -> bool:
        """Record epoch ``epoch``'s (1-based) monitored ``value``; True when training must
        stop. A NaN never improves."""
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self.best_weights = _host_copy(model)
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def reason(self) -> str:
        """Why training stopped, for the history and the command line."""
        restored = (f"; restored the weights of epoch {self.best_epoch}"
                    if self.restore_best and self.best_weights is not None else "")
        return (f"early stopping: {self.monitor} did not improve for {self.patience} "
                f"epochs (best {self.best:.6g} at epoch {self.best_epoch}){restored}")

    def restore(self, model: Layer) -> bool:
        """Put the best epoch's weights back into ``model`` in place; False when there are
        none to restore (``restore_best`` off, or no epoch improved)."""
        if not self.restore_best or self.best_weights is None:
            return False
        with model.device.scope():
            for k, p in model.params().items():
                p.data[...] = model.ops.asarray(self.best_weights[f"param/{k}"], p.data.dtype)
            for k, v in model.state().items():
                v[...] = model.ops.asarray(self.best_weights[f"state/{k}"], v.dtype)
        return True

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The JSON part of the state; the best weights are :attr:`best_weights`."""
        return {"monitor": self.monitor, "best": self.best, "best_epoch": self.best_epoch,
                "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any],
                        weights: dict[str, np.ndarray] | None, model: Layer) -> None:
        """Restore a ``state_dict()`` and its best weights, checked against ``model``;
        raises ValueError, changing nothing, if they do not fit."""
        keys = {"monitor", "best", "best_epoch", "wait", "stopped_epoch"}
        if not isinstance(state, dict) or not keys <= state.keys():
            raise ValueError(f"EarlyStopping.load_state_dict: expected a dict with keys "
                             f"{sorted(keys)}, got {state!r}")
        if state["monitor"] != self.monitor:
            raise ValueError(f"EarlyStopping.load_state_dict: the run monitored "
                             f"{state['monitor']!r}, this EarlyStopping monitors "
                             f"{self.monitor!r}")
        for key in ("best_epoch", "wait", "stopped_epoch"):
            v = state[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"EarlyStopping.load_state_dict: expected {key} to be an "
                                 f"integer >= 0, got {v!r}")
        weights = weights or None
        if weights is not None:
            want = {f"param/{k}": p.shape for k, p in model.params().items()}
            want.update({f"state/{k}": tuple(v.shape) for k, v in model.state().items()})
            got = {k: tuple(a.shape) for k, a in weights.items()}
            if got != want:
                raise ValueError("EarlyStopping.load_state_dict: the best weights do not fit "
                                 "the model")
        self.best, self.best_epoch = float(state["best"]), state["best_epoch"]
        self.wait, self.stopped_epoch = state["wait"], state["stopped_epoch"]
        self.best_weights = weights


def _host_copy(model: Layer) -> dict[str, np.ndarray]:
    # own copies: on the CPU to_numpy returns the live array, which the next step changes
    out = {f"param/{k}": np.array(to_numpy(p.data)) for k, p in model.params().items()}
    out.update({f"state/{k}": np.array(to_numpy(v)) for k, v in model.state().items()})
    return out
