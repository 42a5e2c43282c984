"""The CuPy stand-in (tests/cupy_standin) follows CuPy's rules: one test per rule that could
fail. Each test installs a fresh stand-in with :func:`standin.standin_cupy`."""
from __future__ import annotations

import gc
import operator
import os
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

import gpunet
from gpunet import kernels
from standin import STANDIN_PATH, standin_cupy, standin_env

PEER = r"The device where the array resides \(0\) is different from the current device \(1\)"


@pytest.fixture
def cp():
    with standin_cupy() as cupy:
        yield cupy


# -- placement --------------------------------------------------------------------------
def test_new_arrays_land_on_the_current_device_views_on_their_base(cp):
    a = cp.arange(12, dtype=np.float32).reshape(3, 4)  # device 0
    with cp.cuda.Device(1):
        b = a.copy()
        new = {"zeros": cp.zeros(3), "empty": cp.empty(3), "full": cp.full(3, 2.0),
               "zeros_like": cp.zeros_like(a), "asarray": cp.asarray([1.0, 2.0]),
               "copy": b, "arith": b * 2, "ufunc": cp.exp(b), "sum": b.sum(),
               "astype": b.astype(np.float64), "concat": cp.concatenate([b, b]),
               "matmul": b @ b.T, "einsum": cp.einsum("ij->i", b), "where": cp.where(b > 1, b, 0),
               "argmax": cp.argmax(b, axis=1, keepdims=True)}
        views = {"reshape": a.reshape(4, 3), "T": a.T, "slice": a[1:, ::2], "int": a[1, 2],
                 "split": cp.split(a, 2, axis=1)[1], "broadcast": cp.broadcast_to(a[0], (2, 4)),
                 "as_strided": cp.lib.stride_tricks.as_strided(a, (2, 2), a.strides),
                 "ascontiguous": cp.ascontiguousarray(a)}
    assert {k: v.device.id for k, v in new.items()} == dict.fromkeys(new, 1)
    assert {k: v.device.id for k, v in views.items()} == dict.fromkeys(views, 0)
    assert views["ascontiguous"] is a and views["T"].base is a.base
    assert isinstance(a, cp.ndarray) and gpunet.backends.is_device_array(a)
    assert a.data.device_id == 0 and views["slice"].data.ptr == a.data.ptr + 4 * 4


@pytest.mark.parametrize("op", [
    lambda cp, a: a + 1, lambda cp, a: cp.exp(a), lambda cp, a: a.sum(axis=0),
    lambda cp, a: a.astype(np.float64), lambda cp, a: a.fill(0),
    lambda cp, a: a.__setitem__(0, 1.0), lambda cp, a: cp.concatenate([a, a]),
    lambda cp, a: a @ a.T, lambda cp, a: cp.einsum("ij,ij->i", a, a),
    lambda cp, a: a[cp.asarray([0, 1])], lambda cp, a: cp.ascontiguousarray(a.T),
    lambda cp, a: cp.multiply(cp.ones(4, dtype=np.float32), 2, out=a[0])],
    ids=["add", "exp", "sum", "astype", "fill", "setitem", "concatenate", "matmul", "einsum",
         "take", "copying ascontiguousarray", "out="])
def test_reading_another_devices_array_raises_cupys_error(cp, op):
    a = cp.arange(8, dtype=np.float32).reshape(2, 4)
    before = a.get()
    with cp.cuda.Device(1), pytest.raises(ValueError, match=PEER):
        op(cp, a)
    np.testing.assert_array_equal(a.get(), before)  # refused before anything was written


def test_copies_cross_devices_as_cupy_does(cp):
    a = cp.arange(6, dtype=np.float32).reshape(2, 3)
    with cp.cuda.Device(1):
        b, c = a.copy(), cp.asarray(a)  # memory to memory: no peer access needed
        assert (b.device.id, c.device.id) == (1, 1)
        np.testing.assert_array_equal(c.get(), a.get())
        with pytest.raises(NotImplementedError, match="non-contiguous"):
            cp.asarray(a[:, ::2])  # order='K' keeps the layout, which CuPy cannot copy across
        b[...] = a  # same layout: a device-to-device copy, allowed
        with pytest.raises(ValueError, match=PEER):
            b[...] = a[::-1]  # any other layout needs a kernel reading device 0


# -- host arrays ----------------------------------------------------------------------------
@pytest.mark.parametrize("op", [
    lambda cp, d, h: d + h, lambda cp, d, h: h + d, lambda cp, d, h: np.add(h, d),
    lambda cp, d, h: cp.add(d, h), lambda cp, d, h: np.concatenate([d, h]),
    lambda cp, d, h: d * np.float64(2) + np.array(1.0)],
    ids=["dev+host", "host+dev", "np.add", "cp.add", "np.concatenate", "0-d host"])
def test_host_arrays_in_device_operations_raise(cp, op):
    d, h = cp.ones(3), np.ones(3)
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        op(cp, d, h)


def test_numpy_dispatch_and_scalars_work(cp):
    d = cp.arange(3, dtype=np.float32)
    assert isinstance(np.concatenate([d, d]), cp.ndarray)
    assert isinstance(np.float32(2) * d + 1, cp.ndarray)
    assert (d > np.array(0.5)).tolist() == [False, True, True]  # CuPy compares 0-d by value


@pytest.mark.parametrize("convert", [np.asarray, np.array, lambda a: np.array([a, a])])
def test_implicit_conversion_to_numpy_raises(cp, convert):
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        convert(cp.ones((2, 2)))


def test_setitem_refuses_host_arrays_for_slices_and_uploads_them_for_indices(cp):
    d = cp.zeros(4)
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        d[:2] = np.ones(2)
    d[:2] = np.array(3.0)  # a 0-d host array is a scalar
    cp._standin.counters.reset()
    d[cp.asarray([2, 3])] = np.array([5.0, 6.0])
    assert cp._standin.counters.uploads == 2 and d.tolist() == [3, 3, 5, 6]


# -- counters -------------------------------------------------------------------------------
def test_host_reads_are_counted_exactly(cp):
    a = cp.arange(4, dtype=np.float32)
    s = a.sum()
    cp._standin.counters.reset()
    float(s), a.get(), bool(s)
    assert cp._standin.counters.host_reads == 3
    int(s), s.item(), a.tolist(), repr(a), str(a), f"{s:.1f}", cp.asnumpy(a)
    assert cp._standin.counters.host_reads == 10
    a[a > 1]  # CuPy reads the mask's count back
    assert cp._standin.counters.as_dict()["host_reads"] == 11
    with pytest.raises(TypeError):
        operator.index(s)  # CuPy's ndarray has no __index__
    assert cp._standin.counters.uploads == 0


def test_uploads_are_counted(cp):
    cp.asarray(np.ones(3)), cp.array([1, 2]), cp.zeros(3)[[0, 1]]
    cp.zeros(2).set(np.ones(2))
    assert cp._standin.counters.uploads == 4


# -- devices --------------------------------------------------------------------------------
def test_device_contexts_nest_restore_and_are_per_thread(cp):
    seen = []
    with cp.cuda.Device(1):
        with cp.cuda.Device(0):
            assert cp.cuda.Device().id == 0
        assert cp.cuda.runtime.getDevice() == 1
        worker = threading.Thread(target=lambda: seen.append(cp.cuda.Device().id))
        worker.start()
        worker.join()
    assert seen == [0] and cp.cuda.Device() == cp.cuda.Device(0)
    d = cp.cuda.Device(2)  # not checked until used, as in CuPy
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError,
                       match="cudaErrorInvalidDevice: invalid device ordinal"):
        d.use()
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError):
        with d:
            pass
    assert cp.cuda.runtime.getDevice() == 0


def test_device_count_and_properties_come_from_the_settings():
    with standin_cupy(gpus=3) as cp:
        assert cp.cuda.runtime.getDeviceCount() == 3 and cp.GPUNET_STANDIN
        assert b"stand-in" in cp.cuda.runtime.getDeviceProperties(2)["name"]
        assert cp._standin.NCCL_MODE == "ok"
    with standin_cupy(gpus=0) as cp:
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="cudaErrorNoDevice"):
            cp.cuda.runtime.getDeviceCount()
        assert not gpunet.backends._cuda_available()


# -- RawModule ------------------------------------------------------------------------------
def _conv_module(cp):
    return cp.RawModule(code=kernels.expanded_source("conv.cu"), options=("-std=c++17",),
                        name_expressions=kernels.name_expressions("conv.cu"))


def _bias_grad_args(cp, dy):
    n, o, h, w = dy.shape
    return dy, np.int32(n), np.int32(o), np.int32(h * w), cp.empty(o, dtype=dy.dtype)


def test_rawmodule_runs_gpunets_kernel_on_the_emulator(cp):
    host = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    args = _bias_grad_args(cp, cp.asarray(host))
    fn = _conv_module(cp).get_function("conv_bias_grad<float>")
    fn((3,), (256,), args)
    np.testing.assert_allclose(args[-1].get(), host.sum(axis=(0, 2, 3)), rtol=1e-5)
    counts = cp._standin.counters
    assert (counts.get_function_calls, counts.module_loads, counts.launches) == (1, 1, 1)


def test_kernels_load_per_device_and_a_function_stays_on_its_device(cp):
    kernel = _conv_module(cp).get_function("conv_bias_grad<float>")  # loaded on device 0
    function0 = kernel.kernel
    with cp.cuda.Device(1):
        args = _bias_grad_args(cp, cp.ones((1, 2, 3, 3), dtype=np.float32))
        kernel((2,), (64,), args)  # CuPy's RawKernel loads the module on device 1 too
        assert args[-1].tolist() == [9.0, 9.0] and cp._standin.counters.module_loads == 2
        with pytest.raises(cp.cuda.driver.CUDADriverError, match="CUDA_ERROR_INVALID_HANDLE"):
            function0((2,), (64,), args)  # a Function belongs to the device it was loaded on


def test_kernel_arguments_follow_cupys_conventions(cp):
    fn = _conv_module(cp).get_function("conv_bias_grad<float>")
    dy, n, o, hw, out = _bias_grad_args(cp, cp.ones((1, 2, 3, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="numpy.ndarray of shape"):
        fn((2,), (64,), (np.ones((1, 2, 3, 3), np.float32), n, o, hw, out))
    with pytest.raises(TypeError, match="Python scalars"):  # CuPy passes 1 as an int64
        fn((2,), (64,), (dy, 1, o, hw, out))
    with cp.cuda.Device(1):
        elsewhere = cp.empty(2, np.float32)
    with pytest.raises(cp.cuda.driver.CUDADriverError, match="CUDA_ERROR_ILLEGAL_ADDRESS"):
        fn((2,), (64,), (dy, n, o, hw, elsewhere))
    assert cp._standin.counters.launches == 1  # only the int reached the GPU (a silent bug there)


def test_a_size_one_host_array_passes_by_value_and_grid_must_be_a_tuple(cp):
    fn = _conv_module(cp).get_function("conv_bias_grad<float>")
    dy, n, o, hw, out = _bias_grad_args(cp, cp.ones((1, 2, 3, 3), dtype=np.float32))
    fn((2,), (64,), (dy, np.array([1], np.int32), o, hw, out))
    assert out.tolist() == [9.0, 9.0]
    with pytest.raises(TypeError, match="Argument 'grid' has incorrect type"):
        fn(2, (64,), (dy, n, o, hw, out))


def test_compiles_are_counted_and_cached(cp, tmp_path, monkeypatch):
    monkeypatch.setenv("GPUNET_CACHE_DIR", str(tmp_path))
    code = "template <typename T> __global__ void twice(T* x) { x[threadIdx.x] *= 2; }"
    module = cp.RawModule(code=code, name_expressions=["twice<float>"])
    x = cp.ones(4, dtype=np.float32)
    module.get_function("twice<float>")((1,), (4,), (x,))
    with cp.cuda.Device(1):
        y = cp.ones(4, dtype=np.float32)
        module.get_function("twice<float>")((1,), (4,), (y,))
    assert x.tolist() + y.tolist() == [2.0] * 8
    assert (cp._standin.counters.compiles, cp._standin.counters.module_loads) == (1, 2)


# -- streams --------------------------------------------------------------------------------
def test_a_blocked_stream_holds_its_events_and_synchronisations(cp):
    stream = cp.cuda.get_current_stream()
    a = cp.ones(3)
    stream._block()
    event = cp.cuda.Event()
    event.record()
    with cp.cuda.Device(1):
        other = cp.cuda.Event()
        other.record()  # device 1's default stream is not blocked
    assert not event.done and other.done and not stream.done
    assert cp._standin.stream_from_ptr(stream.ptr) is stream
    released = []
    waiter = threading.Thread(target=lambda: (a.get(), released.append(time.monotonic())))
    waiter.start()
    time.sleep(0.05)
    assert not released  # the host read waits for the blocked stream
    unblocked_at = time.monotonic()
    threading.Thread(target=stream._unblock).start()  # e.g. a watchdog's abort
    waiter.join(5)
    event.synchronize()
    cp.cuda.Device(0).synchronize()
    assert event.done and released and released[0] >= unblocked_at


def test_a_wait_on_a_blocked_stream_gives_up_after_the_limit(cp, monkeypatch):
    monkeypatch.setattr(cp._standin, "HANG_LIMIT_S", 0.05)
    stream = cp.cuda.Stream()
    stream._block()
    with pytest.raises(TimeoutError, match="blocked stream"):
        stream.synchronize()
    with pytest.raises(TimeoutError):
        cp.ones(2).get()  # on the legacy default stream, which waits for every blocking one
    stream._unblock()
    assert cp.cuda.Stream.null.done


def test_events_time_what_lies_between_them(cp):
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    time.sleep(0.02)
    end.record()
    end.synchronize()
    assert 15 <= cp.cuda.get_elapsed_time(start, end) < 1000  # milliseconds
    assert cp.cuda.get_elapsed_time is cp.cuda.stream.get_elapsed_time
    untimed, never = cp.cuda.Event(disable_timing=True), cp.cuda.Event()
    untimed.record()
    for a, b in ((start, untimed), (never, end)):  # cudaEventElapsedTime's refusals
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError,
                           match="cudaErrorInvalidResourceHandle"):
            cp.cuda.get_elapsed_time(a, b)
    stream = cp.cuda.Stream()
    stream._block()
    pending = stream.record()
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="cudaErrorNotReady"):
        cp.cuda.get_elapsed_time(start, pending)
    stream._unblock()
    assert cp.cuda.get_elapsed_time(start, pending) > 0


# -- the default memory pool ----------------------------------------------------------------
def test_the_memory_pool_counts_each_devices_arrays_in_512_byte_blocks(cp):
    pool = cp.get_default_memory_pool()
    assert pool is cp.get_default_memory_pool() and isinstance(pool, cp.cuda.MemoryPool)
    a = cp.empty(1000, dtype=np.float32)  # 4000 bytes -> 4096
    b = cp.ones(3)  # 24 -> 512
    views = (a[::2], a.reshape(10, 100), b.T)  # no memory of their own
    empty = cp.empty(0)  # none at all
    assert (pool.used_bytes(), pool.total_bytes(), pool.free_bytes()) == (4608, 4608, 0)
    with cp.cuda.Device(1):
        assert pool.used_bytes() == 0
        c = cp.zeros((10, 10))  # 800 -> 1024, on device 1
        assert pool.used_bytes() == 1024
    assert pool.used_bytes() == 4608
    del a, b, c, views, empty


def test_freed_blocks_stay_in_the_pool_until_free_all_blocks(cp):
    pool = cp.get_default_memory_pool()
    a = cp.empty(1024, dtype=np.float32)  # 4096 bytes
    keep = cp.empty(10, dtype=np.float32)  # 512
    del a  # back to the pool, which keeps it
    assert (pool.used_bytes(), pool.total_bytes(), pool.n_free_blocks()) == (512, 4608, 1)
    small = cp.empty(100, dtype=np.float32)  # 400 -> 512, split off the free 4096 block
    assert (pool.used_bytes(), pool.total_bytes(), pool.n_free_blocks()) == (1024, 4608, 1)
    pool.free_all_blocks()  # a split block is not released
    assert pool.total_bytes() == 4608
    del small  # merges back into one free 4096 block
    assert pool.n_free_blocks() == 1
    pool.free_all_blocks()
    assert (pool.used_bytes(), pool.total_bytes(), pool.n_free_blocks()) == (512, 512, 0)
    big = cp.empty(2048, dtype=np.float32)  # nothing free fits: new memory
    assert pool.total_bytes() == 512 + 8192
    del keep, big


def test_the_pool_sees_gpunets_work_on_its_gpu_only(cp):
    from gpunet.layers import Dense
    pool = cp.get_default_memory_pool()
    dev = gpunet.device("cuda:1")
    layer = Dense(300, 200).to(dev)
    with cp.cuda.Device(1):
        weights = pool.used_bytes()
        assert weights >= (300 * 200 + 200) * 4
        x = np.ones((64, 300), np.float32)
        y = layer.forward(gpunet.asarray(x, dev))
        assert pool.used_bytes() >= weights + y.nbytes
        del y
        layer.forward(gpunet.asarray(x, dev))  # while the layer still holds the first input
        gc.collect()
        before = pool.total_bytes()
        layer.forward(gpunet.asarray(x, dev))
        assert pool.total_bytes() == before  # the same sizes again: reused, nothing new
    assert pool.total_bytes() == 0  # GPU 0 untouched


def test_array_at_gives_the_memory_behind_a_device_pointer(cp):
    with cp.cuda.Device(1):
        a = cp.zeros((2, 3), dtype=np.float32)
    view = cp._standin.array_at(a[1].data.ptr, 3, np.float32)
    view[:] = 7
    assert a.tolist() == [[0, 0, 0], [7, 7, 7]]
    assert cp._standin.device_at(a.data.ptr) == 1
    with pytest.raises(ValueError, match="no live device allocation"):
        cp._standin.array_at(a.data.ptr, 100, np.float32)


# -- installing the stand-in ----------------------------------------------------------------
def test_standin_cupy_restores_modules_path_environment_and_gpunets_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))  # a "real" CuPy
    monkeypatch.setitem(sys.modules, "cupyx", types.ModuleType("cupyx"))
    monkeypatch.delenv("GPUNET_STANDIN_GPUS", raising=False)
    before = {k: v for k, v in sys.modules.items() if k.split(".")[0].startswith("cupy")}
    path = list(sys.path)
    with standin_cupy(gpus=1) as cp:
        import cupy
        assert cupy is cp and cp.GPUNET_STANDIN and "cupyx" not in sys.modules
        assert gpunet.device("cuda:0").xp is cp and "cuda:0" in gpunet.backends._devices
    after = {k: v for k, v in sys.modules.items() if k.split(".")[0].startswith("cupy")}
    assert after == before and sys.path == path and "GPUNET_STANDIN_GPUS" not in os.environ
    assert "cuda:0" not in gpunet.backends._devices


def test_standin_env_gives_subprocesses_the_standin():
    code = ("import cupy; print(cupy.GPUNET_STANDIN, cupy.cuda.runtime.getDeviceCount(), "
            "cupy._standin.NCCL_MODE)")
    done = subprocess.run([sys.executable, "-c", code], env=standin_env(gpus=3, nccl="hang"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "3", "hang"]
    assert standin_env()["PYTHONPATH"].startswith(str(STANDIN_PATH))
