"""``cupy.cuda.memory`` of the stand-in: the accounting of CuPy's memory pool (CuPy:
``cupy/cuda/memory.pyx``), so that gpunet's GPU peak-memory code runs before a GPU is seen.

As in CuPy, where ``cupy.get_default_memory_pool().malloc`` is the allocator, every array the
stand-in allocates (``cupy._standin._register``) takes a block of the default pool's
:class:`SingleDeviceMemoryPool` of its device, and gives it back when the array is collected:

- a request is rounded up to a multiple of 512 bytes (``_round_size``); size 0 takes nothing;
- the pool takes the smallest free block at least that large and splits off the rest as a
  free block; with none, it acquires a new block (``cudaMalloc``), growing ``total_bytes``;
- a freed block goes back to the pool and merges with free neighbours it was split from;
  frees are staged without a lock and committed by the next pool operation (CuPy's
  ``_pending_free``), since they come from garbage collection on any thread;
- ``free_all_blocks`` releases the free blocks that are whole acquisitions; a block split
  off a larger one stays until its parts merge back (CuPy's "split ones cannot").

:class:`MemoryPool` answers for the current device (``device_pool()``), as CuPy's does.
Not modelled: ``malloc`` (the stand-in's memory is NumPy's, not a pointer to hand out),
``set_allocator``, memory hooks, limits and ``OutOfMemoryError``, and one arena per stream
(the stand-in runs everything in order, so one arena serves all streams).
"""
from __future__ import annotations

import bisect
import collections
import itertools
import threading
from typing import Any

from . import runtime

#: cudaMalloc aligns to at least 512 bytes; CuPy rounds every request up to a multiple.
ALLOCATION_UNIT_SIZE = 512


def _round_size(size: int) -> int:
    return -(-int(size) // ALLOCATION_UNIT_SIZE) * ALLOCATION_UNIT_SIZE


class SingleDeviceMemoryPool:
    """The blocks of one device. A block is ``(segment, offset)``: ``segment`` numbers one
    acquisition from the device, ``offset`` a chunk of it."""

    def __init__(self, device_id: int) -> None:
        self._device_id = device_id
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[int, int]] = collections.deque()
        self._segments: dict[int, int] = {}  # segment -> its size
        self._chunks: dict[int, dict[int, int]] = {}  # segment -> {offset: size}, every chunk
        self._free: set[tuple[int, int]] = set()
        self._free_by_size: dict[int, set[tuple[int, int]]] = {}
        self._free_sizes: list[int] = []  # sorted keys of _free_by_size
        self._ids = itertools.count()
        self._in_use = 0
        self._total = 0

    # -- the index of free chunks ---------------------------------------------------------
    def _add_free(self, block: tuple[int, int], size: int) -> None:
        self._free.add(block)
        if size not in self._free_by_size:
            self._free_by_size[size] = set()
            bisect.insort(self._free_sizes, size)
        self._free_by_size[size].add(block)

    def _remove_free(self, block: tuple[int, int], size: int) -> None:
        self._free.discard(block)
        same = self._free_by_size[size]
        same.discard(block)
        if not same:
            del self._free_by_size[size]
            del self._free_sizes[bisect.bisect_left(self._free_sizes, size)]

    def _commit(self) -> None:
        """Give back the blocks whose arrays were collected since the last operation, merging
        each with free neighbours of its acquisition (call with the lock held)."""
        while self._pending:
            segment, offset = self._pending.popleft()
            chunks = self._chunks[segment]
            size = chunks[offset]
            self._in_use -= size
            after = offset + size
            if (segment, after) in self._free:
                self._remove_free((segment, after), chunks[after])
                size += chunks.pop(after)
            before = next((o for o, s in chunks.items() if o + s == offset
                           and (segment, o) in self._free), None)
            if before is not None:
                self._remove_free((segment, before), chunks[before])
                del chunks[offset]
                offset, size = before, chunks[before] + size
            chunks[offset] = size
            self._add_free((segment, offset), size)

    # -- what the stand-in's allocations call ---------------------------------------------
    def _malloc(self, size: int) -> tuple[int, int] | None:
        """Take a block for ``size`` bytes; returns it (None for size 0)."""
        size = _round_size(size)
        if size == 0:
            return None
        with self._lock:
            self._commit()
            i = bisect.bisect_left(self._free_sizes, size)
            if i < len(self._free_sizes):
                found = self._free_sizes[i]
                block = next(iter(self._free_by_size[found]))
                self._remove_free(block, found)
                segment, offset = block
                if found > size:  # split: the rest stays free
                    self._chunks[segment][offset] = size
                    self._chunks[segment][offset + size] = found - size
                    self._add_free((segment, offset + size), found - size)
            else:
                segment, offset = next(self._ids), 0
                self._segments[segment] = size
                self._chunks[segment] = {0: size}
                self._total += size
            self._in_use += size
            return segment, offset

    def _free_block(self, block: tuple[int, int]) -> None:
        """Stage ``block`` for return; safe without the lock, from any thread."""
        self._pending.append(block)

    # -- CuPy's API -----------------------------------------------------------------------
    def used_bytes(self) -> int:
        with self._lock:
            self._commit()
            return self._in_use

    def free_bytes(self) -> int:
        with self._lock:
            self._commit()
            return self._total - self._in_use

    def total_bytes(self) -> int:
        with self._lock:
            self._commit()
            return self._total

    def n_free_blocks(self) -> int:
        with self._lock:
            self._commit()
            return len(self._free)

    def free_all_blocks(self, stream: Any = None) -> None:
        """Release every free block that is a whole acquisition (not a split part)."""
        with self._lock:
            self._commit()
            for segment, size in list(self._segments.items()):
                if self._chunks[segment] == {0: size} and (segment, 0) in self._free:
                    self._remove_free((segment, 0), size)
                    del self._segments[segment], self._chunks[segment]
                    self._total -= size


class MemoryPool:
    """CuPy's memory pool for all devices: each method answers for the current device."""

    def __init__(self, allocator: Any = None) -> None:
        if allocator is not None:
            raise NotImplementedError("CuPy stand-in: MemoryPool(allocator) is not modelled")
        self._pools: dict[int, SingleDeviceMemoryPool] = {}
        self._pools_lock = threading.Lock()

    def _pool(self, device: int) -> SingleDeviceMemoryPool:
        with self._pools_lock:
            if device not in self._pools:
                self._pools[device] = SingleDeviceMemoryPool(runtime._check_device(device))
            return self._pools[device]

    def device_pool(self) -> SingleDeviceMemoryPool:
        return self._pool(runtime.getDevice())

    def used_bytes(self) -> int:
        """Bytes of the current device's blocks in use by arrays."""
        return self.device_pool().used_bytes()

    def free_bytes(self) -> int:
        """Bytes the pool holds on the current device that no array uses."""
        return self.device_pool().free_bytes()

    def total_bytes(self) -> int:
        """Bytes the pool holds on the current device: used plus free."""
        return self.device_pool().total_bytes()

    def n_free_blocks(self) -> int:
        return self.device_pool().n_free_blocks()

    def free_all_blocks(self, stream: Any = None) -> None:
        """Release the current device's free blocks (split ones stay until merged)."""
        self.device_pool().free_all_blocks(stream)


#: The pool the stand-in's arrays are allocated from (``cupy.get_default_memory_pool()``).
_default_pool = MemoryPool()


def _allocate(device: int, nbytes: int) -> Any:
    """A block of ``nbytes`` on ``device`` from the default pool, for :func:`_release`."""
    pool = _default_pool._pool(device)
    block = pool._malloc(nbytes)
    return None if block is None else (pool, block)


def _release(handle: Any) -> None:
    """Give back what :func:`_allocate` took (safe from a garbage-collection callback)."""
    if handle is not None:
        pool, block = handle
        pool._free_block(block)
