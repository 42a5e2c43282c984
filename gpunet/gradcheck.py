"""Gradient checks: a layer's ``backward`` against central finite differences in float64."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import rng
from .backends import to_numpy
from .layers.base import Layer


@dataclass
class GradcheckReport:
    """Worst relative error per checked array (``"input"``, ``"input 1"``, parameter names).

    The relative error of one entry is ``|analytic - numeric| / max(|analytic|, |numeric|,
    atol / rtol)``: relative where gradients are large, absolute (scaled) near zero.
    """

    errors: dict[str, float] = field(default_factory=dict)
    rtol: float = 1e-5
    atol: float = 1e-7

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def ok(self) -> bool:
        return self.worst <= self.rtol

    def __str__(self) -> str:
        rows = [f"  {name:<24} {err:.3e}" for name, err in self.errors.items()]
        verdict = "ok" if self.ok else f"FAILED (rtol {self.rtol:g})"
        return "\n".join([f"gradcheck: worst relative error {self.worst:.3e}, {verdict}", *rows])


def gradcheck(layer: Layer, inputs: Any, dy: Any = None, *, eps: float = 1e-6,
              rtol: float = 1e-5, atol: float = 1e-7, training: bool = True,
              max_entries: int | None = 4096, seed: int = 0,
              raise_on_failure: bool = False) -> GradcheckReport:
    """Compare ``layer.backward`` with central differences of ``L = sum(forward(x) * dy)``.

    The layer is copied and cast to float64 (the original is untouched); ``inputs`` is an
    array or, for multi-input layers, a list of arrays, on any device. Integer arrays
    (indices) are passed as they are and have no gradient to check. ``dy`` defaults to a
    seeded random gradient. gpunet's random stream is reset before every forward, so layers
    that draw (dropout) see the same draws each time. At most ``max_entries`` entries of each
    array are perturbed (a seeded random subset; ``None``: all).
    """
    # the copy (deepcopy copies arrays onto the current device), the perturbed entries and the
    # products all stay on the layer's device
    with layer.device.scope():
        layer = copy.deepcopy(layer).to(dtype=np.float64)
        ops = layer.ops
        multi = isinstance(inputs, (list, tuple))
        hosts = [to_numpy(x) for x in (inputs if multi else [inputs])]
        xs = [ops.asarray(h, dtype=None if h.dtype.kind in "iu" else np.float64) for h in hosts]
        saved_state = rng.get_state()
        draws = np.random.default_rng(seed)

        def run() -> Any:
            rng.seed(seed)
            return layer.forward(xs if multi else xs[0], training)

        try:
            y = run()
            ys = y if isinstance(y, (list, tuple)) else [y]
            if dy is None:
                dys = [ops.asarray(draws.standard_normal(tuple(o.shape))) for o in ys]
            else:
                dys = [ops.asarray(to_numpy(d), dtype=np.float64)
                       for d in (dy if isinstance(dy, (list, tuple)) else [dy])]

            def objective() -> float:
                out = run()
                outs = out if isinstance(out, (list, tuple)) else [out]
                return float(sum(float((o * d).sum()) for o, d in zip(outs, dys)))

            layer.zero_grad()
            dx = layer.backward(dys if isinstance(y, (list, tuple)) else dys[0])
            analytic = {(f"input {i}" if multi else "input"): to_numpy(d)
                        for i, d in enumerate(dx if multi else [dx])}
            analytic.update({name: to_numpy(p.grad) for name, p in layer.params().items()})
            targets = {(f"input {i}" if multi else "input"): x for i, x in enumerate(xs)
                       if x.dtype.kind not in "iu"}
            targets.update({name: p.data for name, p in layer.params().items()})

            report = GradcheckReport(rtol=rtol, atol=atol)
            for name, array in targets.items():
                report.errors[name] = _worst_error(array, analytic[name], objective, eps,
                                                   atol / rtol, max_entries, draws)
        finally:
            rng.set_state(saved_state)
        if raise_on_failure and not report.ok:
            raise AssertionError(str(report))
        return report


def _worst_error(array: Any, analytic: np.ndarray, objective: Any, eps: float, floor: float,
                 max_entries: int | None, draws: np.random.Generator) -> float:
    """Perturb entries of ``array`` in place (restoring each) and return the worst error."""
    if analytic.shape != tuple(array.shape):
        return float("inf")
    flat = array.reshape(-1)  # a view: writes reach the array the layer reads
    n = flat.shape[0]
    entries: Sequence[int] = range(n)
    if max_entries is not None and n > max_entries:
        entries = draws.choice(n, max_entries, replace=False)
    worst = 0.0
    for i in entries:
        old = float(flat[i])
        flat[i] = old + eps
        up = objective()
        flat[i] = old - eps
        down = objective()
        flat[i] = old
        numeric = (up - down) / (2 * eps)
        a = float(analytic.reshape(-1)[i])
        worst = max(worst, abs(a - numeric) / max(abs(a), abs(numeric), floor))
    return worst
