"""How many threads gpunet's CPU work uses: NumPy's BLAS and the CPU device's element-wise pool.

On a shared machine a fixed count is wrong as soon as a neighbour keeps a core busy: OpenBLAS
cuts every GEMM into as many equal parts as it has threads (which busy-wait for each other),
and :meth:`gpunet.backends.CpuBackend._parallel` cuts ReLU and BatchNorm the same way, so
every call waits for the part whose thread shares a core with the neighbour (on a 2-core VM
with one core busy, a LeNet training step went from 21 to 61 ms).

The default policy (``adaptive``) therefore uses::

    min(maximum, free cores), at least 1

- ``maximum``: ``$GPUNET_NUM_THREADS`` if set, else the CPUs this process may run on; for the
  BLAS, if ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set, the
  count the BLAS reported at start (never more than the user asked for).
- free cores: the CPUs this process may run on minus the CPU time that OTHER processes used
  over the last interval (``/proc/stat``'s busy time of those CPUs minus this process's own CPU
  time, which includes its own BLAS threads' spinning), in cores, counted from
  :data:`NEIGHBOUR_CORE` of a core (a neighbour that shares a core with one of our threads gets
  only about half of it).

The load is sampled at most every :data:`INTERVAL` seconds (the second time after
:data:`FIRST_INTERVAL`), by :func:`current`, which the CPU
device calls before its GEMMs and its split element-wise work; between samples it costs one
``time.monotonic()`` and a comparison. The BLAS's thread count is set (through threadpoolctl)
only when it changes. Without ``/proc/stat`` (not Linux) the count is the maximum.

``GPUNET_THREAD_POLICY=fixed`` turns the adaptation off (the count is then the maximum);
:func:`set_num_threads` fixes the count from code, as ``torch.set_num_threads``.
"""
from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, NamedTuple

from .errors import DeviceError

__all__ = ["get_num_threads", "set_num_threads", "current", "reset", "free_cores", "Sample"]

#: seconds between two samples of the machine's load (at most once per interval)
INTERVAL = 0.5
#: ... and between the first two, so that a short run adapts too: with a neighbour keeping
#: one of two cores busy, LeNet's first 0.5 s of training steps (about 35 of them) ran on two
#: threads at 12-13 ms instead of 9.6 ms on one (``/proc/stat`` counts 100 ticks a second per
#: CPU: 10 over 0.1 s, well within the 0.4 of a core that decides)
FIRST_INTERVAL = 0.1
#: the share of a core another process must use, over an interval, to take that core
NEIGHBOUR_CORE = 0.4
#: the environment variables that set the BLAS's threads at its start-up
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
POLICIES = ("adaptive", "fixed")


class Sample(NamedTuple):
    """One reading of the load: ``wall`` (``time.monotonic()``), ``busy`` (CPU seconds that all
    processes spent on the CPUs we may use) and ``own`` (this process's CPU seconds)."""
    wall: float
    busy: float
    own: float


def free_cores(allowed: int, s0: Sample, s1: Sample) -> int:
    """The cores of ``allowed`` that other processes left free between ``s0`` and ``s1``, in
    ``[1, allowed]``: another process's use counts as a core from :data:`NEIGHBOUR_CORE` of one
    (``allowed - floor(others + 1 - NEIGHBOUR_CORE)``)."""
    wall = s1.wall - s0.wall
    if wall <= 0:
        return allowed
    others = max(0.0, (s1.busy - s0.busy) - (s1.own - s0.own)) / wall
    return max(1, min(allowed, allowed - math.floor(others + 1.0 - NEIGHBOUR_CORE)))


def env_maximum() -> int:
    """``$GPUNET_NUM_THREADS``, else the CPUs this process may run on (read now)."""
    value = os.environ.get("GPUNET_NUM_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise DeviceError(f"GPUNET_NUM_THREADS must be a positive integer, got {value!r}")
        return int(value)
    return _allowed_cpus()[0]


def _allowed_cpus() -> tuple[int, set[int] | None]:
    if hasattr(os, "sched_getaffinity"):
        cpus = os.sched_getaffinity(0)
        return len(cpus), cpus
    return os.cpu_count() or 1, None


def _env_policy() -> str:
    value = os.environ.get("GPUNET_THREAD_POLICY", "").strip().lower() or "adaptive"
    if value not in POLICIES:
        raise DeviceError(f"GPUNET_THREAD_POLICY must be one of {', '.join(POLICIES)}, "
                          f"got {value!r}")
    return value


class _Policy:
    """The state behind :func:`current`, made on its first call (or after :func:`reset`)."""

    def __init__(self) -> None:
        self.maximum = env_maximum()
        self.adaptive = _env_policy() == "adaptive"
        self.allowed, cpus = _allowed_cpus()
        # /proc/stat's "cpu" line sums every CPU; with a narrower affinity read those CPUs' lines
        self.cpu_lines = (None if cpus is None or len(cpus) >= (os.cpu_count() or 0)
                          else {f"cpu{c}" for c in cpus})
        try:
            self.tick = float(os.sysconf("SC_CLK_TCK"))
        except (AttributeError, ValueError, OSError):
            self.tick = 100.0
        self.blas: Any = None  # threadpoolctl's controller of NumPy's BLAS (None: absent)
        self.blas_start = 0  # the BLAS's threads at start (0: unknown)
        try:
            import threadpoolctl
            self.blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
            counts = [lib["num_threads"] for lib in self.blas.info()]
            self.blas_start = max(counts) if counts else 0
            if not counts:
                self.blas = None
        except Exception:  # not installed, or a BLAS it cannot drive: leave the BLAS alone
            self.blas = None
        user_set = any(os.environ.get(v, "").strip() for v in BLAS_ENV)
        self.blas_max = self.blas_start if user_set and self.blas_start else self.maximum
        self.blas_now = self.blas_start
        self.sample: Sample | None = None

    def read(self) -> Sample | None:
        """The load now, or None where ``/proc/stat`` cannot be read."""
        try:
            with open("/proc/stat", "rb") as f:
                text = f.read(1 << 16)
        except OSError:
            return None
        own = time.process_time()
        wall = time.monotonic()
        busy = 0
        for line in text.split(b"\n"):
            if not line.startswith(b"cpu"):
                break
            fields = line.split()
            name = fields[0].decode()
            if self.cpu_lines is None and name != "cpu":
                break
            if self.cpu_lines is not None and name not in self.cpu_lines:
                continue
            v = [int(x) for x in fields[1:9]]
            v += [0] * (8 - len(v))
            busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
        return Sample(wall, busy / self.tick, own)

    def set_blas(self, n: int) -> None:
        if _blas_pinned:  # gpunet's own pool cuts the GEMMs: NumPy's BLAS stays on 1 thread
            return
        if self.blas is not None and n != self.blas_now:
            self.blas.limit(limits=n)
            self.blas_now = n


_lock = threading.Lock()
_policy: _Policy | None = None
_blas_pinned = False  # see pin_blas


def pin_blas() -> None:
    """From now on NumPy's BLAS runs on one thread and the policy no longer sets its count:
    called when the CPU device's compiled pool starts, which cuts every GEMM of gpunet's
    among its own threads (:mod:`gpunet.backends.native`)."""
    global _blas_pinned
    _blas_pinned = True
_count = 1  # the count in use
_next = -math.inf  # time.monotonic() of the next sample; inf when the count is fixed
_monotonic = time.monotonic


def current() -> int:
    """The threads to use now; samples the load (at most every :data:`INTERVAL` s) and sets
    the BLAS's threads when the count changes."""
    if _monotonic() < _next:
        return _count
    return _update()


def _update() -> int:
    global _policy, _count, _next
    if not _lock.acquire(blocking=False):  # another thread is sampling
        return _count
    try:
        p = _policy
        if p is None:
            p = _policy = _Policy()
            _count = p.maximum
            p.set_blas(min(p.blas_max, _count))
        if not p.adaptive:
            _next = math.inf
            return _count
        s = p.read()
        if s is None:  # no /proc/stat: the maximum, always
            _count, _next = p.maximum, math.inf
            p.set_blas(min(p.blas_max, _count))
            return _count
        first = p.sample is None
        if not first:
            free = free_cores(p.allowed, p.sample, s)
            _count = min(p.maximum, free)
            p.set_blas(min(p.blas_max, free))
        p.sample = s
        _next = s.wall + (FIRST_INTERVAL if first else INTERVAL)
        return _count
    finally:
        _lock.release()


def get_num_threads() -> int:
    """The threads gpunet's CPU work uses now (as ``torch.get_num_threads``)."""
    return current()


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for NumPy's BLAS and the CPU device's element-wise work, from now on
    (as ``torch.set_num_threads``); the count no longer follows the load. :func:`reset` goes
    back to the policy of the environment."""
    global _count, _next, _policy
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads expects an int >= 1, got {n!r}")
    with _lock:
        if _policy is None:
            _policy = _Policy()
        _policy.set_blas(n)
        _count, _next = n, math.inf


def reset() -> None:
    """Forget :func:`set_num_threads` and the samples: the BLAS gets back the threads it had
    at start, and the next :func:`current` reads the environment again."""
    global _policy, _count, _next
    with _lock:
        if _policy is not None and _policy.blas_start:
            _policy.set_blas(_policy.blas_start)
        _policy, _count, _next = None, 1, -math.inf


def _after_fork() -> None:  # a child's process_time starts again at 0: take a new baseline
    global _lock, _next
    _lock = threading.Lock()  # a thread of the parent may have held it
    if _policy is not None and _next != math.inf:
        _policy.sample, _next = None, -math.inf


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
