"""Data-parallel training across processes, GPUs and machines, on MPI and NCCL.

Processes are started by MPI (``mpirun -np N gpunet train ... --distributed``); mpi4py
coordinates them. Gradients are averaged with NCCL between CUDA devices (through CuPy's
bindings, the NCCL id broadcast over MPI) and with MPI itself for CPU and emulated arrays.
Arrays are packed into one flat buffer per call, so a step costs a few large reductions rather
than one per parameter. Every collective waits at most ``timeout`` seconds: a rank that died or
hangs makes the others stop with :class:`DistributedError` (and abort the MPI job) instead of
waiting forever.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np

from .backends import Backend, to_numpy

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


def _pack(arrays: Sequence[Any], xp: Any) -> Any:
    return xp.concatenate([a.reshape(-1) for a in arrays]) if arrays else xp.zeros(0)


def _unpack(flat: Any, arrays: Sequence[Any]) -> None:
    offset = 0
    for a in arrays:
        a[...] = flat[offset:offset + a.size].reshape(a.shape)
        offset += a.size


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
        import sys
        print(f"gpunet distributed: {message}", file=sys.stderr, flush=True)
        self.comm.Abort(1)
        raise DistributedError(message)  # not reached when Abort ends the process


class NCCLCommunicator(MPICommunicator):
    """NCCL between CUDA devices for arrays (one GPU per rank), MPI for the rest."""

    def __init__(self, device: Backend, timeout: float = 300.0) -> None:
        super().__init__(timeout)
        from cupy.cuda import nccl
        self.nccl, self.device = nccl, device
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        with device.xp.cuda.Device(device.index):
            self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def _nccl_type(self, dtype: Any) -> int:
        return {np.dtype(np.float32): self.nccl.NCCL_FLOAT32,
                np.dtype(np.float64): self.nccl.NCCL_FLOAT64}[np.dtype(dtype)]

    def allreduce_mean(self, arrays: Sequence[Any]) -> None:
        if not arrays or isinstance(arrays[0], np.ndarray):
            return super().allreduce_mean(arrays)
        xp = self.device.xp
        flat = _pack(arrays, xp)
        stream = xp.cuda.get_current_stream()
        self.nccl_comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size,
                                 self._nccl_type(flat.dtype), self.nccl.NCCL_SUM, stream.ptr)
        flat /= self.size
        _unpack(flat, arrays)

    def broadcast(self, arrays: Sequence[Any], root: int = 0) -> None:
        if not arrays or isinstance(arrays[0], np.ndarray):
            return super().broadcast(arrays, root)
        xp = self.device.xp
        flat = _pack(arrays, xp)
        stream = xp.cuda.get_current_stream()
        self.nccl_comm.bcast(flat.data.ptr, flat.size, self._nccl_type(flat.dtype), root,
                             stream.ptr)
        _unpack(flat, arrays)


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
    every collective."""
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
