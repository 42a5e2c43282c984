"""Optimizers, learning-rate schedules and gradient clipping.

An optimizer takes ``model.params()`` (names to :class:`~gpunet.layers.base.Parameter`) and,
at each ``step()``, updates every ``p.data`` in place from ``p.grad`` by PyTorch's rule for
the same optimizer, so results can be compared with it number for number. Per-parameter state
("slots", such as a momentum buffer) lives on the parameter's device; ``state_dict()`` copies
it to the host for checkpoints and ``load_state_dict()`` puts it back.

- :class:`SGD`, with optional momentum, Nesterov momentum and L2 weight decay.
- :class:`RMSprop` and :class:`Adam`.
- :class:`AdamW` (decoupled weight decay).
- Schedules, stepped once per epoch: :class:`ExponentialDecay`, :class:`StepDecay`,
  :class:`InverseTimeDecay`, :class:`CosineAnnealing`, :class:`LinearWarmup` (wraps any of
  these) and :class:`ReduceLROnPlateau` (stepped with the validation metric).
- :func:`clip_grad_norm` and :func:`clip_grad_value`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from .backends import Array, Backend, device_of, to_numpy
from .backends.base import on_device
from .layers.base import Parameter


def _require(owner: str, name: str, value: Any, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"{owner}: expected {name} {want}, got {value!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(owner: str, name: str, value: Any) -> None:
    _require(owner, name, value, _is_number(value) and value > 0, "> 0")


def _non_negative(owner: str, name: str, value: Any) -> None:
    _require(owner, name, value, _is_number(value) and value >= 0, ">= 0")


def _fraction(owner: str, name: str, value: Any) -> None:
    _require(owner, name, value, _is_number(value) and 0 <= value < 1, "in [0, 1)")


class Optimizer:
    """Base class: holds the parameters, the learning rate ``lr``, the step count and each
    parameter's slots. A subclass declares its slots with ``add_slots`` and writes its rule
    in ``update(w, g, slots)``, changing ``w`` (the parameter's data) and its slots in place.
    """

    def __init__(self, params: dict[str, Parameter], lr: float) -> None:
        if not isinstance(params, dict) or not all(
                isinstance(p, Parameter) for p in params.values()):
            raise TypeError(f"{self.name}: expected params as a dict of names to Parameters "
                            f"(model.params()), got {type(params).__name__}")
        if not params:
            raise ValueError(f"{self.name}: expected at least one parameter, got none")
        first: dict[int, str] = {}
        for pname, p in params.items():  # a shared Parameter must be updated once per step
            if id(p) in first:
                raise ValueError(f"{self.name}: parameters {first[id(p)]!r} and {pname!r} are "
                                 "the same Parameter (pass model.params(), which lists a "
                                 "shared one once)")
            first[id(p)] = pname
        _positive(self.name, "lr", lr)
        self.params = params
        self.lr = float(lr)
        self.step_count = 0
        self.slots: dict[str, dict[str, Array]] = {name: {} for name in params}

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def device(self) -> Backend:
        """The parameters' device (that of the first; a model lives on one device)."""
        return device_of(next(iter(self.params.values())).data)

    @on_device
    def add_slots(self, *names: str) -> None:
        """Give every parameter zero-filled state arrays called ``names``."""
        for pname, p in self.params.items():
            for slot in names:
                self.slots[pname][slot] = device_of(p.data).zeros_like(p.data)

    def update(self, w: Array, g: Array, slots: dict[str, Array]) -> None:
        raise NotImplementedError

    @on_device
    def step(self) -> None:
        """Update every parameter once from its gradient. A frozen one
        (``requires_grad=False``) is skipped whole: no weight decay, and its slots (momentum,
        Adam's moments) stay as they are."""
        self.step_count += 1
        for pname, p in self.params.items():
            if p.requires_grad:
                self.update(p.data, p.grad, self._slots_of(pname, p))

    @on_device
    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad[...] = 0

    def _slots_of(self, pname: str, p: Parameter) -> dict[str, Array]:
        """The parameter's slots, moved along if the model was moved (``Trainer`` moves it to
        its device after the optimizer was built)."""
        ops, slots = device_of(p.data), self.slots[pname]
        for slot, a in slots.items():
            if not ops.owns(a) or a.dtype != p.data.dtype:
                slots[slot] = ops.asarray(to_numpy(a), dtype=p.data.dtype)
        return slots

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"lr", "step", "slots": {"<param>.<slot>": host array}}``, a snapshot."""
        return {"lr": self.lr, "step": self.step_count,
                "slots": {f"{pname}.{slot}": to_numpy(a).copy()  # the live slot keeps changing
                          for pname, slots in self.slots.items() for slot, a in slots.items()}}

    @on_device
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; raises ValueError, changing nothing, unless its names
        and shapes fit these parameters."""
        owner = f"{self.name}.load_state_dict"
        if not isinstance(state, dict) or not {"lr", "step", "slots"} <= state.keys():
            raise ValueError(f"{owner}: expected a dict with keys 'lr', 'step' and 'slots', "
                             f"got {sorted(state) if isinstance(state, dict) else state!r}")
        lr, step, given = state["lr"], state["step"], state["slots"]
        _require(owner, "slots", type(given).__name__, isinstance(given, dict), "to be a dict")
        _positive(owner, "lr", lr)
        _require(owner, "step", step, isinstance(step, int) and not isinstance(step, bool)
                 and step >= 0, "to be an integer >= 0")
        expected = {f"{pname}.{slot}": (pname, slot)
                    for pname, slots in self.slots.items() for slot in slots}
        missing, unexpected = expected.keys() - given.keys(), given.keys() - expected.keys()
        if missing or unexpected:
            raise ValueError(f"{owner}: slot names do not match the parameters: missing "
                             f"{sorted(missing)}, unexpected {sorted(unexpected)}")
        arrays = {key: to_numpy(a) for key, a in given.items()}
        for key, (pname, _) in expected.items():
            want = self.params[pname].shape
            if tuple(arrays[key].shape) != want:
                raise ValueError(f"{owner}: slot {key!r} should have shape {want}, "
                                 f"got {tuple(arrays[key].shape)}")
        for key, (pname, slot) in expected.items():
            data = self.params[pname].data
            # an own copy: the caller's arrays must not change as this optimizer steps
            self.slots[pname][slot] = device_of(data).asarray(arrays[key], data.dtype).copy()
        self.lr, self.step_count = float(lr), step


class SGD(Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD`` (no dampening).

    ``g = grad + weight_decay w``; with momentum ``mu``: ``buf = mu buf + g`` (``buf = g`` on
    the first step) and ``g = g + mu buf`` (Nesterov) or ``g = buf``; then ``w -= lr g``.
    """

    def __init__(self, params: dict[str, Parameter], lr: float, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        _fraction(self.name, "momentum", momentum)
        _non_negative(self.name, "weight_decay", weight_decay)
        _require(self.name, "nesterov", nesterov, not nesterov or momentum > 0,
                 "only with momentum > 0")
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        if momentum:
            self.add_slots("momentum_buffer")

    def update(self, w: Array, g: Array, slots: dict[str, Array]) -> None:
        device_of(w).sgd_update(w, g, slots["momentum_buffer"] if self.momentum else None,
                                self.lr, self.momentum, self.weight_decay, self.nesterov)


class RMSprop(Optimizer):
    """RMSprop, as ``torch.optim.RMSprop`` (not centered).

    ``g = grad + weight_decay w``; ``sq = alpha sq + (1 - alpha) g^2``;
    ``avg = sqrt(sq) + eps``; with momentum ``mu``: ``buf = mu buf + g / avg``,
    ``w -= lr buf``; else ``w -= lr g / avg``.
    """

    def __init__(self, params: dict[str, Parameter], lr: float = 0.01, alpha: float = 0.99,
                 eps: float = 1e-8, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        _fraction(self.name, "alpha", alpha)
        _positive(self.name, "eps", eps)
        _fraction(self.name, "momentum", momentum)
        _non_negative(self.name, "weight_decay", weight_decay)
        self.alpha, self.eps, self.momentum = alpha, eps, momentum
        self.weight_decay = weight_decay
        self.add_slots("square_avg")
        if momentum:
            self.add_slots("momentum_buffer")

    def update(self, w: Array, g: Array, slots: dict[str, Array]) -> None:
        if self.weight_decay:
            g = g + self.weight_decay * w
        sq = slots["square_avg"]
        sq *= self.alpha
        sq += (1 - self.alpha) * g * g
        avg = sq ** 0.5 + self.eps
        if self.momentum:
            buf = slots["momentum_buffer"]
            buf *= self.momentum
            buf += g / avg
            w -= self.lr * buf
        else:
            w -= self.lr * (g / avg)


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (L2 weight decay, not AdamW's decoupled one).

    ``g = grad + weight_decay w``; ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
    at step ``t``: ``w -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)``.
    """

    def __init__(self, params: dict[str, Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        _require(self.name, "betas", betas, isinstance(betas, (tuple, list))
                 and len(betas) == 2, "to be a pair (beta1, beta2)")
        _fraction(self.name, "beta1", betas[0])
        _fraction(self.name, "beta2", betas[1])
        _positive(self.name, "eps", eps)
        _non_negative(self.name, "weight_decay", weight_decay)
        self.betas, self.eps, self.weight_decay = (betas[0], betas[1]), eps, weight_decay
        self.add_slots("exp_avg", "exp_avg_sq")

    def update(self, w: Array, g: Array, slots: dict[str, Array]) -> None:
        if self.weight_decay:
            g = g + self.weight_decay * w
        self._adam_step(w, g, slots)

    def _adam_step(self, w: Array, g: Array, slots: dict[str, Array]) -> None:
        """The moment updates and the bias-corrected step, shared with AdamW."""
        b1, b2 = self.betas
        m, v = slots["exp_avg"], slots["exp_avg_sq"]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        t = self.step_count
        denom = v ** 0.5 / math.sqrt(1 - b2 ** t) + self.eps
        w -= self.lr / (1 - b1 ** t) * (m / denom)


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay.

    The decay shrinks the weights directly instead of entering the gradient (so Adam's
    scaling does not weaken it): ``w -= lr weight_decay w``; then Adam's step without decay,
    ``m = b1 m + (1 - b1) grad``; ``v = b2 v + (1 - b2) grad^2``;
    ``w -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)``.

    >>> from gpunet.layers import Dense
    >>> opt = AdamW(Dense(4, 2).params(), lr=1e-3, weight_decay=0.01)
    """

    def __init__(self, params: dict[str, Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)

    def update(self, w: Array, g: Array, slots: dict[str, Array]) -> None:
        if self.weight_decay:
            w *= 1 - self.lr * self.weight_decay
        self._adam_step(w, g, slots)


#: Optimizers by the name the command line takes.
OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "rmsprop": RMSprop, "adam": Adam}


# -- learning-rate schedules --------------------------------------------------------------
class LRSchedule:
    """Sets ``optimizer.lr`` from the number of finished epochs: ``lr = lr_at(epoch)``.

    Call ``step()`` once at the end of each epoch. ``base_lr`` is the optimizer's ``lr``
    when the schedule is made.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.epoch = 0

    @property
    def name(self) -> str:
        return type(self).__name__

    def lr_at(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self) -> None:
        self.epoch += 1
        self.optimizer.lr = self.lr_at(self.epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "base_lr": self.base_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` and set the optimizer's ``lr`` for its epoch."""
        owner = f"{self.name}.load_state_dict"
        if not isinstance(state, dict) or not {"epoch", "base_lr"} <= state.keys():
            raise ValueError(f"{owner}: expected a dict with keys 'epoch' and 'base_lr', "
                             f"got {state!r}")
        epoch, base_lr = state["epoch"], state["base_lr"]
        _require(owner, "epoch", epoch, isinstance(epoch, int) and not isinstance(epoch, bool)
                 and epoch >= 0, "to be an integer >= 0")
        _positive(owner, "base_lr", base_lr)
        self.epoch, self.base_lr = epoch, float(base_lr)
        self.optimizer.lr = self.lr_at(epoch)


class ExponentialDecay(LRSchedule):
    """``lr = base_lr gamma^epoch``."""

    def __init__(self, optimizer: Optimizer, gamma: float) -> None:
        super().__init__(optimizer)
        _positive(self.name, "gamma", gamma)
        self.gamma = gamma

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** epoch


class StepDecay(LRSchedule):
    """``lr = base_lr gamma^(epoch // step_size)``: cut by ``gamma`` every ``step_size``
    epochs."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(optimizer)
        _require(self.name, "step_size", step_size, isinstance(step_size, int)
                 and not isinstance(step_size, bool) and step_size > 0, "to be an integer > 0")
        _positive(self.name, "gamma", gamma)
        self.step_size, self.gamma = step_size, gamma

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class InverseTimeDecay(LRSchedule):
    """``lr = base_lr / (1 + decay_rate epoch / decay_steps)``."""

    def __init__(self, optimizer: Optimizer, decay_rate: float, decay_steps: int = 1) -> None:
        super().__init__(optimizer)
        _non_negative(self.name, "decay_rate", decay_rate)
        _positive(self.name, "decay_steps", decay_steps)
        self.decay_rate, self.decay_steps = decay_rate, decay_steps

    def lr_at(self, epoch: int) -> float:
        return self.base_lr / (1 + self.decay_rate * epoch / self.decay_steps)


class CosineAnnealing(LRSchedule):
    """``lr = eta_min + (base_lr - eta_min) (1 + cos(pi epoch / t_max)) / 2``, the closed
    form of ``torch.optim.lr_scheduler.CosineAnnealingLR``: from ``base_lr`` down to
    ``eta_min`` at epoch ``t_max`` (and, as torch's, back up after it: pick ``t_max`` =
    the number of epochs).

    >>> from gpunet.layers import Dense
    >>> opt = SGD(Dense(4, 2).params(), lr=0.1)
    >>> schedule = CosineAnnealing(opt, t_max=10)  # Trainer(..., schedule=schedule)
    >>> schedule.step(); round(opt.lr, 6)
    0.097553
    """

    def __init__(self, optimizer: Optimizer, t_max: int, eta_min: float = 0.0) -> None:
        super().__init__(optimizer)
        _require(self.name, "t_max", t_max, isinstance(t_max, int)
                 and not isinstance(t_max, bool) and t_max > 0, "to be an integer > 0")
        _non_negative(self.name, "eta_min", eta_min)
        self.t_max, self.eta_min = t_max, float(eta_min)

    def lr_at(self, epoch: int) -> float:
        return self.eta_min + (self.base_lr - self.eta_min) * (
            1 + math.cos(math.pi * epoch / self.t_max)) / 2


class LinearWarmup(LRSchedule):
    """Linear warm-up before another schedule, as torch's ``SequentialLR`` of ``LinearLR``
    and that schedule with ``milestones=[warmup_epochs]``.

    For ``epoch < warmup_epochs``: ``lr = base_lr (start_factor + (1 - start_factor)
    epoch / warmup_epochs)``; from then on the wrapped schedule runs as if started at the
    end of the warm-up: ``lr = schedule.lr_at(epoch - warmup_epochs)``. Given an optimizer
    instead of a schedule, the rate stays at ``base_lr`` after the warm-up. The rate is set
    to ``start_factor base_lr`` at once, for the first epoch.

    >>> from gpunet.layers import Dense
    >>> opt = SGD(Dense(4, 2).params(), lr=0.1)
    >>> schedule = LinearWarmup(CosineAnnealing(opt, t_max=20), warmup_epochs=5)
    >>> round(opt.lr, 6)
    0.033333
    """

    def __init__(self, schedule: "LRSchedule | Optimizer", warmup_epochs: int,
                 start_factor: float = 1 / 3) -> None:
        if not isinstance(schedule, (LRSchedule, Optimizer)):
            raise TypeError(f"LinearWarmup: expected an optimizer or a schedule with a "
                            f"closed form (CosineAnnealing, StepDecay, ...), got "
                            f"{type(schedule).__name__}")
        self.inner = schedule if isinstance(schedule, LRSchedule) else None
        super().__init__(schedule.optimizer if self.inner else schedule)
        if self.inner is not None:
            self.base_lr = self.inner.base_lr
        _require(self.name, "warmup_epochs", warmup_epochs, isinstance(warmup_epochs, int)
                 and not isinstance(warmup_epochs, bool) and warmup_epochs > 0,
                 "to be an integer > 0")
        _require(self.name, "start_factor", start_factor, _is_number(start_factor)
                 and 0 < start_factor <= 1, "in (0, 1]")
        self.warmup_epochs, self.start_factor = warmup_epochs, float(start_factor)
        self.optimizer.lr = self.lr_at(0)

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.base_lr * (self.start_factor + (1 - self.start_factor)
                                   * epoch / self.warmup_epochs)
        return self.base_lr if self.inner is None else self.inner.lr_at(
            epoch - self.warmup_epochs)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.inner is not None:  # one base rate for both: the wrapped one warms up
            self.inner.base_lr = self.base_lr
            self.optimizer.lr = self.lr_at(self.epoch)


class ReduceLROnPlateau:
    """Cut the rate when a metric stops improving, as
    ``torch.optim.lr_scheduler.ReduceLROnPlateau``. ``step(value)`` once per epoch with
    the monitored value (the Trainer passes its history's ``monitor`` entry, default
    ``"val_loss"``, so ``fit`` needs ``val=``).

    A value is better than ``best`` when ``value < best (1 - threshold)`` (mode "min",
    threshold_mode "rel"; "abs": ``value < best - threshold``; mode "max" mirrors them).
    After more than ``patience`` epochs without a better value, ``lr = max(lr factor,
    min_lr)`` (skipped if that changes it by at most ``eps``), and ``cooldown`` epochs pass
    before bad epochs count again.

    >>> from gpunet.layers import Dense
    >>> opt = SGD(Dense(4, 2).params(), lr=0.1)
    >>> schedule = ReduceLROnPlateau(opt, patience=1)
    >>> for val_loss in [1.0, 1.0, 1.0]:
    ...     schedule.step(val_loss)
    >>> round(opt.lr, 6)
    0.01
    """

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: float = 0.0, eps: float = 1e-8,
                 monitor: str = "val_loss") -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{self.name}: expected an optimizer, got "
                            f"{type(optimizer).__name__}")
        _require(self.name, "mode", mode, mode in ("min", "max"), "'min' or 'max'")
        _require(self.name, "threshold_mode", threshold_mode,
                 threshold_mode in ("rel", "abs"), "'rel' or 'abs'")
        _require(self.name, "factor", factor, _is_number(factor) and 0 < factor < 1,
                 "in (0, 1)")
        for name, value in (("patience", patience), ("cooldown", cooldown)):
            _require(self.name, name, value, isinstance(value, int)
                     and not isinstance(value, bool) and value >= 0, "to be an integer >= 0")
        _non_negative(self.name, "threshold", threshold)
        _non_negative(self.name, "min_lr", min_lr)
        _non_negative(self.name, "eps", eps)
        _require(self.name, "monitor", monitor, isinstance(monitor, str),
                 "to be a history key such as 'val_loss'")
        self.optimizer, self.mode, self.factor, self.patience = optimizer, mode, factor, patience
        self.threshold, self.threshold_mode, self.cooldown = threshold, threshold_mode, cooldown
        self.min_lr, self.eps, self.monitor = float(min_lr), eps, monitor
        self.epoch = self.num_bad_epochs = self.cooldown_counter = 0
        self.best = math.inf if mode == "min" else -math.inf

    @property
    def name(self) -> str:
        return type(self).__name__

    def _better(self, value: float) -> bool:
        if self.threshold_mode == "rel":
            bound = self.best * (1 - self.threshold if self.mode == "min"
                                 else 1 + self.threshold)
        else:
            bound = self.best - self.threshold if self.mode == "min" else \
                self.best + self.threshold
        return value < bound if self.mode == "min" else value > bound

    def step(self, value: float) -> None:
        """Record one epoch's monitored ``value`` (a number) and cut the rate if due."""
        value = float(value)  # a NaN is never better, as in torch
        self.epoch += 1
        if self._better(value):
            self.best, self.num_bad_epochs = value, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            new_lr = max(self.optimizer.lr * self.factor, self.min_lr)
            if self.optimizer.lr - new_lr > self.eps:
                self.optimizer.lr = new_lr
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "best", "num_bad_epochs", "cooldown_counter"}``; the rate itself is
        the optimizer's (its ``state_dict`` holds it)."""
        return {"epoch": self.epoch, "best": self.best, "num_bad_epochs": self.num_bad_epochs,
                "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; raises ValueError, changing nothing, if it is not one."""
        owner = f"{self.name}.load_state_dict"
        keys = {"epoch", "best", "num_bad_epochs", "cooldown_counter"}
        if not isinstance(state, dict) or not keys <= state.keys():
            raise ValueError(f"{owner}: expected a dict with keys {sorted(keys)}, got {state!r}")
        for key in ("epoch", "num_bad_epochs", "cooldown_counter"):
            value = state[key]
            _require(owner, key, value, isinstance(value, int) and not isinstance(value, bool)
                     and value >= 0, "to be an integer >= 0")
        best = state["best"]
        _require(owner, "best", best, isinstance(best, (int, float))
                 and not isinstance(best, bool) and not math.isnan(best), "to be a number")
        self.epoch, self.best = state["epoch"], float(best)
        self.num_bad_epochs, self.cooldown_counter = state["num_bad_epochs"], \
            state["cooldown_counter"]


# -- gradient clipping --------------------------------------------------------------------
def _grads(params: dict[str, Parameter] | Iterable[Parameter]) -> list[Array]:
    return [p.grad for p in (params.values() if isinstance(params, dict) else params)]


def clip_grad_norm(params: dict[str, Parameter] | Iterable[Parameter],
                   max_norm: float) -> Array:
    """Scale all gradients together, in place, so that their joint L2 norm is at most
    ``max_norm``: by ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``.
    Returns the norm before, a 0-d array on the gradients' device: computed and applied there,
    so clipping never waits for a GPU (read the norm only if you need it)."""
    _positive("clip_grad_norm", "max_norm", max_norm)
    grads = _grads(params)
    if not grads:
        return 0.0
    ops = device_of(grads[0])
    with ops.scope():
        norm = ops.sqrt(sum(ops.sum(g * g) for g in grads))
        scale = ops.xp.minimum(max_norm / (norm + 1e-6), 1.0)
        for g in grads:
            g *= scale
    return norm


def clip_grad_value(params: dict[str, Parameter] | Iterable[Parameter],
                    clip_value: float) -> None:
    """Clip every gradient element, in place, to ``[-clip_value, clip_value]``."""
    _positive("clip_grad_value", "clip_value", clip_value)
    for g in _grads(params):
        ops = device_of(g)
        with ops.scope():
            g[...] = ops.clip(g, -clip_value, clip_value)
