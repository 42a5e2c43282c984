"""The CuPy stand-in's NCCL (``cupy.cuda.nccl``), for testing gpunet's NCCL communicator
without a GPU. The collectives run through mpi4py on the host memory behind the stand-in's
device pointers.

``GPUNET_STANDIN_NCCL`` (or the stand-in's ``cupy._standin.NCCL_MODE``, when set) picks the
behaviour:

- ``ok`` (default): NCCL that works. ``get_unique_id`` gives what the emulated CuPy gives
  (CuPy 14: ``bytes``; CuPy 13: a tuple of 128 C ``char`` values) and
  ``NcclCommunicator(ndev, commId, rank)`` takes only that form, as CuPy's Cython signature
  does; the ranks check they were handed the same id.
- ``missing``: CuPy without the NCCL library: ``cupy/cuda/nccl.py`` sets ``available = False``
  when ``from cupy_backends.cuda.libs.nccl import *`` fails, so the module has nothing else,
  no ``get_unique_id``, no ``NcclCommunicator``, no constants.
- ``hang``: collectives are queued and never complete, as when a peer died: each blocks the
  stream it was given (``stream._block()``: events recorded after it stay not done, and
  synchronisations and host reads wait) and returns at once; ``abort()`` unblocks them.
"""
from __future__ import annotations

import os as _os


def _mode() -> str:
    try:
        from cupy import _standin
        mode = getattr(_standin, "NCCL_MODE", None)
    except ImportError:
        mode = None
    mode = mode or _os.environ.get("GPUNET_STANDIN_NCCL", "ok")
    if mode not in ("ok", "missing", "hang"):
        raise ValueError(f"GPUNET_STANDIN_NCCL={mode!r}: expected ok, missing or hang")
    return mode


available = _mode() != "missing"

if available:  # what cupy_backends.cuda.libs.nccl adds when the library loads
    import ctypes as _ctypes
    from typing import Any as _Any

    import numpy as _np

    # CuPy's values (cupy_backends/cuda/libs/nccl.pxd)
    NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN, NCCL_AVG = 0, 1, 2, 3, 4
    NCCL_INT8 = NCCL_CHAR = 0
    NCCL_UINT8 = 1
    NCCL_INT32 = NCCL_INT = 2
    NCCL_UINT32 = 3
    NCCL_INT64 = 4
    NCCL_UINT64 = 5
    NCCL_FLOAT16 = NCCL_HALF = 6
    NCCL_FLOAT32 = NCCL_FLOAT = 7
    NCCL_FLOAT64 = NCCL_DOUBLE = 8

    _DTYPES = {NCCL_INT8: _np.int8, NCCL_UINT8: _np.uint8, NCCL_INT32: _np.int32,
               NCCL_UINT32: _np.uint32, NCCL_INT64: _np.int64, NCCL_UINT64: _np.uint64,
               NCCL_FLOAT16: _np.float16, NCCL_FLOAT32: _np.float32,
               NCCL_FLOAT64: _np.float64}
    _UNIQUE_ID_BYTES = 128
    _HANG = _mode() == "hang"

    class NcclError(RuntimeError):
        def __init__(self, status: int, message: str = "") -> None:
            self.status = status
            super().__init__(f"NCCL_ERROR {status}: {message}")

    def _cupy_major() -> int:
        import cupy
        try:
            return int(str(getattr(cupy, "__version__", "14")).split(".")[0])
        except ValueError:
            return 14

    def get_build_version() -> int:
        return 22707

    def get_version() -> int:
        return 22707

    def get_unique_id() -> _Any:
        """CuPy 14: bytes; CuPy 13: a tuple of the 128 bytes as C (signed) chars."""
        raw = _os.urandom(_UNIQUE_ID_BYTES)
        if _cupy_major() >= 14:
            return raw
        return tuple(_np.frombuffer(raw, dtype=_np.int8).tolist())

    def _host(ptr: int, count: int, datatype: int) -> _np.ndarray:
        """A NumPy view of ``count`` elements at the stand-in's device pointer ``ptr`` (the
        address of the host buffer behind a stand-in array)."""
        dtype = _np.dtype(_DTYPES[datatype])
        from cupy import _standin
        array_at = getattr(_standin, "array_at", None)
        if array_at is not None:
            return array_at(ptr, count, dtype)
        if count == 0:
            return _np.empty(0, dtype=dtype)
        raw = (_ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr)
        return _np.ctypeslib.as_array(raw).view(dtype)

    def _stream(ptr: int) -> _Any:
        """The stand-in's stream object with handle ``ptr``."""
        import cupy
        from cupy import _standin
        lookup = getattr(_standin, "stream_from_ptr", None)
        if lookup is not None:
            return lookup(ptr)
        current = cupy.cuda.get_current_stream()
        if current.ptr == ptr:
            return current
        raise NcclError(4, f"stand-in: no known stream has ptr {ptr:#x}")

    class NcclCommunicator:
        """One rank's communicator: an MPI communicator of its own (a duplicate of
        COMM_WORLD, so NCCL's traffic never mixes with gpunet's MPI calls)."""

        def __init__(self, ndev: int, commId: _Any, rank: int) -> None:
            want = bytes if _cupy_major() >= 14 else tuple
            if not isinstance(commId, want):
                raise TypeError(f"Argument 'commId' has incorrect type (expected "
                                f"{want.__name__}, got {type(commId).__name__})")
            if len(commId) != _UNIQUE_ID_BYTES:
                raise ValueError(f"commId length {len(commId)} != {_UNIQUE_ID_BYTES}.")
            from mpi4py import MPI
            world = MPI.COMM_WORLD
            if ndev != world.Get_size() or rank != world.Get_rank():
                raise NcclError(5, f"stand-in: rank {rank} of {ndev}, but MPI has rank "
                                   f"{world.Get_rank()} of {world.Get_size()}")
            self._mpi, self._comm = MPI, world.Dup()  # waits for every rank, as NCCL's setup
            ids = self._comm.allgather(commId)
            if any(i != ids[0] for i in ids):
                raise NcclError(5, "stand-in: the ranks were given different unique ids")
            self._rank, self._size = rank, ndev
            self._blocked: list[_Any] = []  # streams this communicator blocked ("hang")

        @property
        def comm(self) -> int:
            return id(self._comm) if self._comm is not None else 0

        def _live(self) -> _Any:
            if self._comm is None:
                raise NcclError(4, "stand-in: communicator destroyed or aborted")
            return self._comm

        def _never_completes(self, stream: int) -> None:
            s = _stream(stream)
            s._block()
            self._blocked.append(s)

        def allReduce(self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int,
                      stream: int) -> None:
            comm = self._live()
            if _HANG:
                return self._never_completes(stream)
            mpi_op = {NCCL_SUM: self._mpi.SUM, NCCL_PROD: self._mpi.PROD,
                      NCCL_MAX: self._mpi.MAX, NCCL_MIN: self._mpi.MIN,
                      NCCL_AVG: self._mpi.SUM}[op]
            recv = _host(recvbuf, count, datatype)
            send = self._mpi.IN_PLACE if sendbuf == recvbuf else _host(sendbuf, count, datatype)
            comm.Allreduce(send, recv, op=mpi_op)
            if op == NCCL_AVG:
                recv /= self._size

        def broadcast(self, sendbuff: int, recvbuff: int, count: int, datatype: int, root: int,
                      stream: int) -> None:
            if self._rank == root and sendbuff != recvbuff and not _HANG:
                _host(recvbuff, count, datatype)[...] = _host(sendbuff, count, datatype)
            self.bcast(recvbuff, count, datatype, root, stream)

        def bcast(self, buff: int, count: int, datatype: int, root: int, stream: int) -> None:
            comm = self._live()
            if _HANG:
                return self._never_completes(stream)
            comm.Bcast(_host(buff, count, datatype), root=root)

        def check_async_error(self) -> None:
            """NCCL reports no asynchronous error here: a hang is silent, as a dead peer's."""

        def abort(self) -> None:
            # not MPI's Free (collective): an abort must return whatever the peers do
            self._comm = None
            blocked, self._blocked = self._blocked, []
            for s in blocked:
                s._unblock()

        def destroy(self) -> None:
            self._comm = None

        def device_id(self) -> int:
            import cupy
            return cupy.cuda.Device().id

        def rank_id(self) -> int:
            return self._rank

        def size(self) -> int:
            return self._size
