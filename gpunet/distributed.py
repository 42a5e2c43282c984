"""Data-parallel training across processes, GPUs and machines, on MPI and NCCL.

Processes are started by MPI (``mpirun -np N gpunet train ... --distributed``); mpi4py
coordinates them. Gradients are averaged with NCCL between CUDA devices (through CuPy's
bindings, the NCCL id broadcast over MPI) and with MPI itself for CPU and emulated arrays.
Arrays are packed into one flat buffer per call, so a step costs a few large reductions rather
than one per parameter.

Nothing waits forever. Every MPI collective is polled against ``timeout`` seconds; NCCL
collectives are asynchronous (they return once queued on the GPU), so a watchdog thread per
NCCL communicator watches a CUDA event recorded after each one and, past ``timeout``, aborts
the NCCL communicator and the MPI job: a rank that died or hangs makes every other rank stop
with a message naming the timeout. Before any NCCL work the ranks agree that NCCL is usable
on all of them; where it is not, every rank raises :class:`~gpunet.errors.DeviceError` saying
what to install, instead of some ranks failing and the others waiting for them.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, NoReturn, Sequence

import numpy as np

from .backends import Backend, to_numpy
from .errors import DeviceError

#: Variables MPI launchers set in every process they start.
_LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


class DistributedError(RuntimeError):
    """A collective operation failed or timed out (a rank died or hangs)."""


class Communicator:
    """One process alone: every collective is the identity. The base of the real ones."""

    rank, size = 0, 1

    def allreduce_mean(self, arrays: Sequence[Any]) -> None:
        """Replace each array, in place, by its mean over the ranks."""

    def allreduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sums of host scalars over the ranks (metrics)."""
        return [float(v) for v in values]

    def broadcast(self, arrays: Sequence[Any], root: int = 0) -> None:
        """Overwrite each array, in place, with ``root``'s."""

    def barrier(self) -> None:
        """Wait until every rank arrives."""

    def abort(self, message: str) -> None:
        raise DistributedError(message)

    def close(self) -> None:
        """Release what the communicator holds (NCCL's communicator and watchdog)."""


def _pack(arrays: Sequence[Any], xp: Any) -> Any:
    return xp.concatenate([a.reshape(-1) for a in arrays]) if arrays else xp.zeros(0)


def _unpack(flat: Any, arrays: Sequence[Any]) -> None:
    offset = 0
    for a in arrays:
        a[...] = flat[offset:offset + a.size].reshape(a.shape)
        offset += a.size


def _end_job(mpi: Any, comm: Any) -> NoReturn:
    """End every rank of the job, from any thread: MPI Abort where MPI allows calls from
    several threads, else this process alone (mpirun then stops the others, as it does for any
    rank that exits before MPI_Finalize)."""
    try:
        if mpi.Query_thread() == mpi.THREAD_MULTIPLE:
            comm.Abort(1)
    finally:
        os._exit(1)


class MPICommunicator(Communicator):
    """MPI collectives on host buffers (CPU and emulated arrays, or any array copied to the
    host). Non-blocking operations polled against ``timeout`` make a dead or hung peer a clear
    error."""

    def __init__(self, timeout: float = 300.0) -> None:
        from mpi4py import MPI
        self.MPI, self.comm, self.timeout = MPI, MPI.COMM_WORLD, timeout
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def _wait(self, request: Any, what: str) -> None:
        # Spin first (a step's collectives usually finish within microseconds), then poll
        # gently until the deadline.
        for _ in range(2000):
            if request.Test():
                return
        deadline = time.monotonic() + self.timeout
        while not request.Test():
            if time.monotonic() > deadline:
                self.abort(f"rank {self.rank}: {what} did not complete within {self.timeout:g} s; "
                           "another rank has died or hangs")
            time.sleep(0.0002)

    def _allreduce_host(self, flat: np.ndarray, what: str) -> np.ndarray:
        out = np.empty_like(flat)
        self._wait(self.comm.Iallreduce(flat, out, op=self.MPI.SUM), what)
        return out

    def allreduce_mean(self, arrays: Sequence[Any]) -> None:
        if not arrays:
            return
        flat = np.ascontiguousarray(to_numpy(_pack(arrays, _xp(arrays[0]))))
        total = self._allreduce_host(flat, "gradient allreduce") / self.size
        _unpack(_xp(arrays[0]).asarray(total, dtype=arrays[0].dtype), arrays)

    def allreduce_sum(self, values: Sequence[float]) -> list[float]:
        flat = self._allreduce_host(np.asarray(values, dtype=np.float64), "metric allreduce")
        return [float(v) for v in flat]

    def broadcast(self, arrays: Sequence[Any], root: int = 0) -> None:
        if not arrays:
            return
        flat = np.ascontiguousarray(to_numpy(_pack(arrays, _xp(arrays[0]))))
        self._wait(self.comm.Ibcast(flat, root=root), "broadcast")
        _unpack(_xp(arrays[0]).asarray(flat, dtype=arrays[0].dtype), arrays)

    def barrier(self) -> None:
        self._wait(self.comm.Ibarrier(), "barrier")

    def abort(self, message: str) -> None:
        print(f"gpunet distributed: {message}", file=sys.stderr, flush=True)
        self.comm.Abort(1)
        raise DistributedError(message)  # not reached when Abort ends the process


# -- NCCL ---------------------------------------------------------------------------------
#: What NCCLCommunicator uses from ``cupy.cuda.nccl``. When CuPy finds no NCCL library, that
#: module keeps ``available = False`` and none of these (its ``from cupy_backends.cuda.libs.nccl
#: import *`` failed), so checking ``available`` alone would not do on a CuPy that lies.
_NCCL_NAMES = ("get_unique_id", "NcclCommunicator", "NCCL_SUM", "NCCL_FLOAT32", "NCCL_FLOAT64")

#: Why a rank cannot use NCCL, by the code the ranks exchange (0: it can).
_NCCL_PROBLEMS = {
    1: "cupy.cuda.nccl does not import",
    2: "cupy.cuda.nccl.available is False: CuPy found no NCCL library",
    3: "cupy.cuda.nccl lacks what gpunet calls (CuPy too old?)",
}

#: ncclUniqueId is 128 bytes (NCCL_UNIQUE_ID_BYTES); room to spare.
_NCCL_ID_ROOM = 255  # the length is one byte of the header
#: Before the id: status (1: rank 0 has one), form (0: bytes, 1: signed chars, 2: unsigned
#: chars), length.
_ID_HEADER = 3


def _encode_unique_id(uid: Any) -> np.ndarray:
    """The broadcast buffer for NCCL id ``uid``. CuPy 14 gives the id as bytes, CuPy 13 as a
    tuple of C ``char`` values (signed on x86-64, unsigned on Arm), and each CuPy's
    NcclCommunicator takes only its own form: the buffer records which one rank 0 got."""
    if isinstance(uid, (bytes, bytearray)):
        raw, form = bytes(uid), 0
    else:
        values = np.asarray(uid, dtype=np.int64)
        form = 2 if values.size and values.max() > 127 else 1
        raw = values.astype(np.uint8 if form == 2 else np.int8).tobytes()
    if len(raw) > _NCCL_ID_ROOM:
        raise ValueError(f"an NCCL id of {len(raw)} bytes; gpunet has room for {_NCCL_ID_ROOM}")
    buf = np.zeros(_ID_HEADER + _NCCL_ID_ROOM, dtype=np.uint8)
    buf[:_ID_HEADER] = (1, form, len(raw))
    buf[_ID_HEADER:_ID_HEADER + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return buf


def _decode_unique_id(buf: np.ndarray) -> Any:
    """The id :func:`_encode_unique_id` packed, in the form rank 0's CuPy gave it."""
    form, length = int(buf[1]), int(buf[2])
    raw = buf[_ID_HEADER:_ID_HEADER + length].tobytes()
    if form == 0:
        return raw
    return tuple(np.frombuffer(raw, dtype=np.int8 if form == 1 else np.uint8).tolist())


def _load_nccl() -> tuple[Any, int, str]:
    """``(cupy.cuda.nccl, 0, "")`` when this process can use NCCL, else ``(None, code,
    detail)`` with a code of :data:`_NCCL_PROBLEMS`."""
    try:
        from cupy.cuda import nccl
    except Exception as e:  # ImportError, or CuPy failing to initialise
        return None, 1, f"{type(e).__name__}: {e}"
    if not getattr(nccl, "available", False):
        return None, 2, ""
    missing = [n for n in _NCCL_NAMES if not hasattr(nccl, n)]
    if not hasattr(getattr(nccl, "NcclCommunicator", None), "abort"):
        missing.append("NcclCommunicator.abort")
    if missing:
        return None, 3, "missing " + ", ".join(missing)
    return nccl, 0, ""


def _nccl_install_hint() -> str:
    """The extra that brings NCCL for the CuPy wheel installed here."""
    from importlib import metadata
    for cuda in ("12", "13"):
        try:
            metadata.distribution(f"cupy-cuda{cuda}x")
        except metadata.PackageNotFoundError:
            continue
        return (f"pip install 'gpunet[distributed-cuda{cuda}]' (CuPy loads NCCL from the "
                f"nvidia-nccl-cu{cuda} wheel it adds)")
    return ("pip install 'gpunet[distributed-cuda12]' (or 'gpunet[distributed-cuda13]' for "
            "CUDA 13), which add the nvidia-nccl-cu12 / -cu13 wheel CuPy loads NCCL from")


class _Done:
    """A stand-in for a CUDA event around a blocking host call: done once the call returned."""
    done = False


class _Watchdog:
    """Bounds asynchronous work by a deadline without the caller waiting for it.

    The design of PyTorch's ProcessGroupNCCL watchdog: NCCL collectives return as soon as they
    are queued on a stream, so the training thread never waits for them (the GPU orders the
    work that follows). The caller records a CUDA event after each one and hands it to
    :meth:`track`; a daemon thread polls the oldest outstanding event (``event.done``, CUDA's
    ``cudaEventQuery``, which never blocks) and, past its deadline, calls ``on_timeout(what)``,
    which ends the process. ``check`` (NCCL's asynchronous error, when given) runs at each poll
    while work is outstanding, so a peer's failure that NCCL does report ends the job sooner.
    """

    def __init__(self, timeout: float, on_timeout: Callable[[str, BaseException | None], None],
                 scope: Callable[[], ContextManager[Any]] = nullcontext,
                 check: Callable[[], None] | None = None, poll: float = 0.05) -> None:
        self.timeout = timeout
        self._on_timeout, self._scope, self._check, self._poll = on_timeout, scope, check, poll
        self._pending: deque[tuple[str, Any, float]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gpunet-nccl-watchdog",
                                        daemon=True)
        self._thread.start()

    def track(self, what: str, work: Any) -> None:
        """Watch ``work`` (anything with a ``done`` attribute: a CUDA event recorded after a
        collective). Returns at once."""
        with self._cond:
            self._pending.append((what, work, time.monotonic() + self.timeout))
            self._cond.notify()

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Bound a blocking host call (NCCL's communicator setup, which waits for every rank)
        by the same deadline."""
        call = _Done()
        self.track(what, call)
        try:
            yield
        finally:
            call.done = True

    @property
    def outstanding(self) -> int:
        with self._cond:
            return len(self._pending)

    def stop(self, wait: float | None = None) -> None:
        """Let the thread end once the work it tracks is done (still under its deadline), and
        wait up to ``wait`` seconds for that."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(wait)

    def _run(self) -> None:
        failure = self._watch()
        if failure is not None:
            self._on_timeout(*failure)

    def _watch(self) -> tuple[str, BaseException | None] | None:
        """Poll until stopped with nothing outstanding (None), or until the oldest work is
        late or something reports an error: ``(what, error)``."""
        what = "watchdog"
        try:
            # The thread makes the communicator's device current once: CUDA calls on events
            # and on NCCL's communicator then act on that GPU, whatever other threads use.
            with self._scope():
                while True:
                    with self._cond:
                        while not self._pending and not self._stopping:
                            self._cond.wait()  # idle: nothing outstanding, no polling
                        if not self._pending:
                            return None  # stopping, and all work completed
                        what, work, deadline = self._pending[0]
                    if work.done:  # a stream completes its work in order: the oldest decides
                        with self._cond:
                            self._pending.popleft()
                        continue
                    if self._check is not None:
                        self._check()
                    if time.monotonic() > deadline:
                        return what, None
                    time.sleep(self._poll)
        except Exception as e:  # CUDA or NCCL reporting an error: the work failed
            return what, e


class _NcclFailure:
    """What the watchdog does when NCCL work did not complete in time (or failed): say so on
    stderr, abort the NCCL communicator (which releases the GPU kernels still waiting for
    peers) and end the MPI job, so every rank exits non-zero as with
    :meth:`MPICommunicator.abort`. Holds no reference to the communicator object, so the
    watchdog does not keep it alive."""

    def __init__(self, rank: int, timeout: float, mpi: Any, comm: Any) -> None:
        self.rank, self.timeout, self.mpi, self.comm = rank, timeout, mpi, comm
        self.nccl_comm: Any = None  # set once NCCL's communicator exists

    def message(self, what: str, error: BaseException | None = None) -> str:
        if error is not None:
            return f"rank {self.rank}: NCCL {what} failed ({type(error).__name__}: {error})"
        return (f"rank {self.rank}: NCCL {what} did not complete within {self.timeout:g} s; "
                "another rank has died or hangs")

    def check(self) -> None:
        """Raise NCCL's asynchronous error, if any (ncclCommGetAsyncError)."""
        check = getattr(self.nccl_comm, "check_async_error", None)
        if check is not None:
            check()

    def __call__(self, what: str, error: BaseException | None = None) -> None:
        # The message first: NCCL's abort must not be able to swallow it.
        print(f"gpunet distributed: {self.message(what, error)}", file=sys.stderr, flush=True)
        if self.nccl_comm is not None:
            try:
                self.nccl_comm.abort()
            except Exception:  # the job ends below whatever NCCL says
                pass
        _end_job(self.mpi, self.comm)


class NCCLCommunicator(MPICommunicator):
    """NCCL between CUDA devices for arrays (one GPU per rank), MPI for the rest (host arrays
    and metrics).

    Setting up checks before it waits: every rank finds out whether NCCL is usable and the
    ranks exchange that over MPI, so all of them raise :class:`~gpunet.errors.DeviceError` when
    one cannot (none is left waiting for the others). The NCCL id goes to every rank by a
    bounded MPI broadcast, NCCL's communicator setup is bounded by the watchdog, and so is every
    collective afterwards, without the training thread ever waiting on the GPU."""

    def __init__(self, device: Backend, timeout: float = 300.0) -> None:
        super().__init__(timeout)
        self.device = device
        nccl, code, detail = _load_nccl()
        self._agree_on_nccl(code, detail)
        self.nccl = nccl
        uid = self._broadcast_unique_id()
        self._failure = _NcclFailure(self.rank, timeout, self.MPI, self.comm)
        self._watchdog = _Watchdog(timeout, self._failure, scope=device.scope,
                                   check=self._failure.check)
        # At exit, the watchdog still sees the last collectives through (or ends the job if a
        # peer died meanwhile) rather than being cut off with the interpreter.
        self._finalizer = weakref.finalize(self, self._watchdog.stop, timeout + 1.0)
        with device.scope(), self._watchdog.guard("communicator setup"):
            try:
                self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
            except Exception as e:
                # The other ranks wait inside NCCL's setup for this one: end the job now.
                self.abort(f"rank {self.rank}: NCCL communicator setup failed "
                           f"({type(e).__name__}: {e})")
        self._failure.nccl_comm = self.nccl_comm

    def _agree_on_nccl(self, code: int, detail: str) -> None:
        """Every rank learns every rank's NCCL status (a bounded allgather) and all raise the
        same DeviceError when one cannot use NCCL."""
        codes = np.zeros(self.size, dtype=np.int32)
        self._wait(self.comm.Iallgather(np.array([code], dtype=np.int32), codes),
                   "NCCL availability check")
        if not codes.any():
            return
        groups: dict[int, list[int]] = {}
        for r, c in enumerate(codes.tolist()):
            if c:
                groups.setdefault(c, []).append(r)
        reasons = "; ".join(
            f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: "
            f"{_NCCL_PROBLEMS.get(c, 'unusable')}"
            + (f" (here: {detail})" if self.rank in ranks and detail else "")
            for c, ranks in groups.items())
        lacking = sum(len(ranks) for ranks in groups.values())
        raise DeviceError(
            f"rank {self.rank}: NCCL is not available on {lacking} of {self.size} ranks "
            f"({reasons}), so no rank can average gradients on the GPU. Install it with "
            f"{_nccl_install_hint()}, or train on --device cpu.")

    def _broadcast_unique_id(self) -> Any:
        """Rank 0's NCCL id, on every rank, by a bounded MPI broadcast (not pickle's blocking
        ``comm.bcast``)."""
        buf = np.zeros(_ID_HEADER + _NCCL_ID_ROOM, dtype=np.uint8)
        error: Exception | None = None
        if self.rank == 0:
            try:
                buf = _encode_unique_id(self.nccl.get_unique_id())
            except Exception as e:  # the others still get the broadcast, with status 0
                error = e
        self._wait(self.comm.Ibcast(buf, root=0), "NCCL id broadcast")
        if buf[0] != 1:
            raise DeviceError(f"rank {self.rank}: rank 0 could not create the NCCL id"
                              + (f" ({type(error).__name__}: {error})" if error else
                                 "; see rank 0's error")) from error
        return _decode_unique_id(buf)

    def _nccl_type(self, dtype: Any) -> int:
        return {np.dtype(np.float32): self.nccl.NCCL_FLOAT32,
                np.dtype(np.float64): self.nccl.NCCL_FLOAT64}[np.dtype(dtype)]

    def _enqueue(self, what: str, launch: Callable[[int], None]) -> None:
        """Queue an NCCL collective on this device's current stream (``launch(stream_ptr)``)
        and hand the watchdog an event recorded right after it. Returns without waiting: the
        stream orders whatever reads the result after the collective."""
        cuda = self.device.xp.cuda
        stream = cuda.get_current_stream()
        launch(stream.ptr)
        event = cuda.Event(disable_timing=True)  # no timing: a cheaper event
        event.record(stream)
        self._watchdog.track(what, event)

    def allreduce_mean(self, arrays: Sequence[Any]) -> None:
        if not arrays or isinstance(arrays[0], np.ndarray):
            return super().allreduce_mean(arrays)
        with self.device.scope():
            flat = _pack(arrays, self.device.xp)
            self._enqueue("allreduce", lambda stream: self.nccl_comm.allReduce(
                flat.data.ptr, flat.data.ptr, flat.size, self._nccl_type(flat.dtype),
                self.nccl.NCCL_SUM, stream))
            flat /= self.size
            _unpack(flat, arrays)

    def broadcast(self, arrays: Sequence[Any], root: int = 0) -> None:
        if not arrays or isinstance(arrays[0], np.ndarray):
            return super().broadcast(arrays, root)
        with self.device.scope():
            flat = _pack(arrays, self.device.xp)
            self._enqueue("broadcast", lambda stream: self.nccl_comm.bcast(
                flat.data.ptr, flat.size, self._nccl_type(flat.dtype), root, stream))
            _unpack(flat, arrays)

    def close(self) -> None:
        """Wait (bounded by the timeout) for the outstanding collectives, stop the watchdog
        and free NCCL's communicator. Called at exit too, for the watchdog part."""
        self._finalizer()
        if getattr(self, "nccl_comm", None) is not None:
            with self.device.scope():
                self.nccl_comm.destroy()
            self.nccl_comm = self._failure.nccl_comm = None


def _xp(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy


def launched_by_mpi() -> bool:
    """Whether this process was started by an MPI launcher with more than one rank."""
    return any(int(os.environ.get(v, "1") or 1) > 1 for v in _LAUNCHER_SIZE_VARS)


def local_rank() -> int:
    """This process's index among the ranks on its machine (one GPU each)."""
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def init(device: Backend, timeout: float | None = None) -> Communicator:
    """The communicator for this process: NCCL when the ranks run on CUDA devices, MPI for CPU
    and emulated arrays, and a single-process one when mpi4py is missing and no launcher
    started several ranks. ``timeout`` (default ``$GPUNET_DIST_TIMEOUT`` or 300 s) bounds
    every collective, NCCL's included. On CUDA, every rank raises
    :class:`~gpunet.errors.DeviceError` when NCCL is missing on any of them."""
    if timeout is None:
        timeout = float(os.environ.get("GPUNET_DIST_TIMEOUT", "300"))
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        if launched_by_mpi():
            raise DistributedError("this process was started by mpirun, but mpi4py is not "
                                   "installed: pip install mpi4py") from e
        return Communicator()
    if device.type == "cuda":
        return NCCLCommunicator(device, timeout)
    return MPICommunicator(timeout)
