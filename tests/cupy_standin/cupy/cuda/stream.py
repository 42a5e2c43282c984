"""Streams and events of the stand-in (CuPy: ``cupy/cuda/stream.pyx``).

Work runs synchronously when it is issued, so every stream is idle, with one exception, the
hook the NCCL stand-in uses for a collective that never completes: ``stream._block()`` hangs
a stream and ``stream._unblock()`` releases it. While a stream is blocked, an event recorded on
it (or on a stream that waits for it) is not done, and ``Event.synchronize``,
``Stream.synchronize``, ``Device.synchronize`` and host reads of that device's arrays wait,
for at most ``cupy._standin.HANG_LIMIT_S`` seconds before TimeoutError.

A hardware queue is ``(device, handle)``. As in CuPy, ``Stream.null`` (handle 0, the legacy
default stream) and ``Stream.ptds`` (the per-thread default stream) are single objects with
``device_id == -1`` that mean "this stream of whichever device is current"; a stream made with
``Stream()`` belongs to the device current at its creation. CUDA's legacy default stream waits
for, and is waited for by, every blocking stream of its device; non-blocking streams wait only
for themselves.
"""
from __future__ import annotations

import itertools
import threading
import time
import weakref
from typing import Any, ClassVar, FrozenSet, Tuple

from .. import _standin
from . import runtime

NULL_PTR = 0  # the legacy default stream
PER_THREAD_PTR = 2  # cudaStreamPerThread

Queue = Tuple[int, int]  # (device, stream handle)
Dependencies = FrozenSet[Tuple[Queue, int]]  # (queue, epoch of a block on it)

_state = threading.Condition()  # guards the tables below; notified when a block is released
_blocked: dict[Queue, int] = {}  # each blocked queue -> the epoch of its block
_carried: dict[Queue, Dependencies] = {}  # blocks a queue waits for through wait_event
_non_blocking: set[int] = set()  # handles of streams made with non_blocking=True
_epochs = itertools.count(1)
_handles = itertools.count(0x7E0000000000, 0x100)  # made-up handles of streams and events
_streams: weakref.WeakValueDictionary[int, Stream] = weakref.WeakValueDictionary()


def _syncs_with(a: int, b: int) -> bool:
    """Whether work on stream handle ``a`` waits for earlier work on handle ``b`` of the same
    device."""
    return a == b or ((a == NULL_PTR or b == NULL_PTR)
                      and a not in _non_blocking and b not in _non_blocking)


def _dependencies(queue: Queue) -> Dependencies:
    """The blocks that work issued on ``queue`` now would wait for."""
    device, handle = queue
    with _state:
        deps = {(q, e) for q, e in _blocked.items() if q[0] == device and _syncs_with(handle, q[1])}
        for q, carried in _carried.items():
            if q[0] == device and _syncs_with(handle, q[1]):
                deps |= carried
        return _still_blocked(deps)


def _device_dependencies(device: int) -> Dependencies:
    """The blocks on any stream of ``device`` (what ``cudaDeviceSynchronize`` waits for)."""
    with _state:
        deps = {(q, e) for q, e in _blocked.items() if q[0] == device}
        for q, carried in _carried.items():
            if q[0] == device:
                deps |= carried
        return _still_blocked(deps)


def _still_blocked(deps: set[tuple[Queue, int]]) -> Dependencies:
    return frozenset((q, e) for q, e in deps if _blocked.get(q) == e)


def _done(deps: Dependencies) -> bool:
    return all(_blocked.get(q) != e for q, e in deps)


def _wait(deps: Dependencies, what: str) -> None:
    if not deps:
        return
    with _state:
        if not _state.wait_for(lambda: _done(deps), timeout=_standin.HANG_LIMIT_S):
            raise TimeoutError(f"CuPy stand-in: {what} waited {_standin.HANG_LIMIT_S:g} s for a "
                               f"blocked stream (a collective that never completes)")


def _queue(stream: Stream, device: int | None = None) -> Queue:
    """The queue ``stream`` means on ``device`` (default: the current device); a stream made
    with ``Stream()`` always means its own device's."""
    if stream.device_id >= 0:
        return stream.device_id, stream.ptr
    return (runtime.getDevice() if device is None else runtime._check_device(device)), stream.ptr


def _wait_for_read(device: int, stream: Stream | None = None) -> None:
    """Wait as a device-to-host copy of ``device``'s memory does: CuPy's ``ndarray.get``
    copies on the given (else the current) stream with the array's device current, then
    synchronises that stream (``cupy/_core/core.pyx``)."""
    stream = get_current_stream() if stream is None else stream
    _wait(_dependencies(_queue(stream, device)), f"a host read of device {device}'s memory")


def _from_ptr(ptr: int) -> Stream:
    if ptr == NULL_PTR:
        return Stream.null
    if ptr == PER_THREAD_PTR:
        return Stream.ptds
    stream = _streams.get(ptr)
    if stream is None:
        raise ValueError(f"CuPy stand-in: no live stream has handle {ptr:#x}")
    return stream


class _ThreadStreams(threading.local):
    """Each thread's current stream per device, and the stacks ``with stream:`` pushes onto
    (CuPy's ``_ThreadLocal``: ``use()`` sets the current stream, leaving a ``with`` block
    goes back to the stream below on the stack)."""

    def __init__(self) -> None:
        self.current: dict[int, Stream] = {}
        self.stacks: dict[int, list[Stream]] = {}
        self.devices: list[int] = []


_threads = _ThreadStreams()


def _check_stream_device_match(device_id: int) -> int:
    current = runtime.getDevice()
    if device_id == -1:
        return current
    if device_id != current:
        raise RuntimeError(f"The device that the stream is created on ({device_id}) does not "
                           f"match with the current device ({current})")
    return device_id


def get_current_stream(device_id: int = -1) -> Stream:
    """The calling thread's current stream on ``device_id`` (default: the current device);
    ``Stream.null`` until one is made current."""
    device = runtime.getDevice() if device_id == -1 else device_id
    return _threads.current.get(device, Stream.null)


class Stream:
    """A CUDA stream. ``Stream()`` makes a new one on the current device; ``Stream(null=True)``
    and ``Stream(ptds=True)`` name the default streams (equal to ``Stream.null`` and
    ``Stream.ptds``)."""

    null: ClassVar[Stream]
    ptds: ClassVar[Stream]

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False,
                 priority: int | None = None) -> None:
        if null:
            self.ptr, self.device_id = NULL_PTR, -1
        elif ptds:
            self.ptr, self.device_id = PER_THREAD_PTR, -1
        else:
            self.ptr, self.device_id = next(_handles), runtime.getDevice()
            if non_blocking:
                _non_blocking.add(self.ptr)
            _streams[self.ptr] = self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and self.ptr == other.ptr

    def __hash__(self) -> int:
        return self.ptr

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ptr} (device {self.device_id})>"

    def __enter__(self) -> Stream:
        device = _check_stream_device_match(self.device_id)
        _threads.stacks.setdefault(device, [Stream.null]).append(self)
        _threads.devices.append(device)
        _threads.current[device] = self
        return self

    def __exit__(self, *exc: Any) -> None:
        device = _threads.devices.pop()
        stack = _threads.stacks[device]
        stack.pop()
        _threads.current[device] = stack[-1]

    def use(self) -> Stream:
        _threads.current[_check_stream_device_match(self.device_id)] = self
        return self

    @property
    def is_non_blocking(self) -> bool:
        return self.ptr in _non_blocking

    @property
    def done(self) -> bool:
        """True when all work queued on this stream has finished."""
        return _done(_dependencies(_queue(self)))

    def synchronize(self) -> None:
        """Wait for all work queued on this stream."""
        _wait(_dependencies(_queue(self)), f"{self!r}.synchronize()")

    def record(self, event: Event | None = None) -> Event:
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        """Later work on this stream waits for ``event`` (which matters only while the work
        before the event is blocked)."""
        queue = _queue(self)
        with _state:
            _carried[queue] = _carried.get(queue, frozenset()) | event._dependencies

    # -- the stand-in's hang hook (used by cupy.cuda.nccl's "hang" mode) ---------------------
    def _block(self, device_id: int | None = None) -> None:
        """Hang this stream: whatever is queued on it from now on does not complete until
        :meth:`_unblock`. ``Stream.null`` and ``Stream.ptds`` serve every device: they hang on
        ``device_id``, by default the current device."""
        queue = _queue(self, device_id)
        with _state:
            _blocked.setdefault(queue, next(_epochs))

    def _unblock(self, device_id: int | None = None) -> None:
        """Release what :meth:`_block` hung: on ``device_id`` only, or by default on every
        device this stream is blocked on. Safe to call from any thread."""
        with _state:
            for queue in [q for q in _blocked if q[1] == self.ptr
                          and (self.device_id < 0 or q[0] == self.device_id)
                          and (device_id is None or q[0] == device_id)]:
                del _blocked[queue]
            _state.notify_all()


Stream.null = Stream(null=True)
Stream.ptds = Stream(ptds=True)


class Event:
    """A CUDA event. As in CuPy, ``done`` says whether the work before it has finished
    (CuPy's Event has no ``query()``: ``runtime.eventQuery`` is behind ``done``). Unless made
    with ``disable_timing=True`` it keeps the time it was recorded, for
    :func:`get_elapsed_time`: the host's clock, since the stand-in's work runs when it is
    issued (its times are the emulator's, not a GPU's)."""

    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:
        if interprocess and not disable_timing:
            raise ValueError("Timing must be disabled for interprocess events")
        self.ptr = next(_handles)
        self._dependencies: Dependencies = frozenset()
        self._timing = not disable_timing
        self._recorded_at: float | None = None

    @property
    def done(self) -> bool:
        return _done(self._dependencies)

    def record(self, stream: Stream | None = None) -> None:
        """Mark the point after the work queued so far on ``stream`` (default: the current
        stream)."""
        stream = get_current_stream() if stream is None else stream
        self._dependencies = _dependencies(_queue(stream))
        self._recorded_at = time.perf_counter()

    def synchronize(self) -> None:
        _wait(self._dependencies, "Event.synchronize()")


def get_elapsed_time(start_event: Event, end_event: Event) -> float:
    """Milliseconds from ``start_event`` to ``end_event`` (``cudaEventElapsedTime``): an
    event never recorded or made with ``disable_timing=True`` raises
    ``cudaErrorInvalidResourceHandle``, one whose work has not completed
    ``cudaErrorNotReady``."""
    for event in (start_event, end_event):
        if not event._timing or event._recorded_at is None:
            raise runtime.CUDARuntimeError(400)
    for event in (start_event, end_event):
        if not event.done:
            raise runtime.CUDARuntimeError(600)
    return (end_event._recorded_at - start_event._recorded_at) * 1e3
