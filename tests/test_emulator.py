"""The CPU emulator runs CUDA kernels from .cu files: grid-stride loops, barriers and shared
memory in every thread order, warp shuffles, dynamic shared memory, atomics, launch limits,
argument checks, compile errors and the compile cache. (gpunet's own kernels on the emulated
device: tests/test_batchnorm.py and the parity suite.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpunet import KernelCompileError, emulator, kernels, nvrtc
from gpunet.emulator import EmulatedModule, EmulatorError, LaunchError

KERNEL_DIR = kernels.kernel_dir()
ORDERS = ["forward", "reverse", "shuffled"]

SOURCE = r"""
#include "common.cuh"

template <typename T>
__global__ void vadd(const T* __restrict__ a, const T* __restrict__ b, long long n,
                     T* __restrict__ out) {
    GPUNET_GRID_STRIDE_LOOP(i, n) out[i] = a[i] + b[i];
}

// Tree sum of each block's blockDim.x values (a power of two, at most 256).
template <typename T, bool FirstBarrier>
__global__ void block_sum(const T* __restrict__ x, int n, T* __restrict__ out) {
    __shared__ T buf[256];
    const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    buf[t] = i < n ? x[i] : T(0);
    if (FirstBarrier) __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) buf[t] += buf[t + s];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = buf[0];
}

template <typename T>
__global__ void warp_sums(const T* __restrict__ x, T* __restrict__ out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const T v = gpunet_warp_sum(x[i]);
    if ((threadIdx.x & 31) == 0) out[blockIdx.x * ((blockDim.x + 31) / 32) + threadIdx.x / 32] = v;
}

__global__ void shuffles(const float* __restrict__ x, float* __restrict__ out,
                         unsigned* __restrict__ ballots) {
    const int t = threadIdx.x;
    const float v = x[t];
    out[4 * t + 0] = __shfl_sync(0xffffffffu, v, 3);
    out[4 * t + 1] = __shfl_down_sync(0xffffffffu, v, 5);
    out[4 * t + 2] = __shfl_up_sync(0xffffffffu, v, 2, 16);
    out[4 * t + 3] = __shfl_xor_sync(0xffffffffu, v, 9, 8);
    ballots[t] = __ballot_sync(0xffffffffu, v > 0.0f);
}

template <typename T>
__global__ void reverse_block(const T* __restrict__ x, T* __restrict__ out) {
    GPUNET_DYNAMIC_SHARED(T, tile);
    const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
    tile[t] = x[base + t];
    __syncthreads();
    out[base + t] = tile[blockDim.x - 1 - t];
}

template <typename T>
__global__ void atomic_total(const T* __restrict__ x, long long n, T* total, int* count) {
    GPUNET_GRID_STRIDE_LOOP(i, n) {
        atomicAdd(total, x[i]);
        atomicAdd(count, 1);
    }
}

// Block 0 writes the first half of s; every block reads all of it.
__global__ void read_shared(float* __restrict__ out) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    if (blockIdx.x == 0 && t < 32) s[t] = 1.0f;
    __syncthreads();
    out[blockIdx.x * 64 + t] = s[t];
}

__global__ void count_positive(const float* __restrict__ x, int* __restrict__ out) {
    const int c = __syncthreads_count(x[blockIdx.x * blockDim.x + threadIdx.x] > 0.0f);
    if (threadIdx.x == 0) out[blockIdx.x] = c;
}

__global__ void deadlock(float* __restrict__ out) {
    float v = threadIdx.x;
    if ((threadIdx.x & 31) < 16) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

__global__ void trap_if(const int* __restrict__ flag) {
    if (*flag) __trap();
}

__global__ void votes(int* __restrict__ out) {
    const unsigned live = __activemask();
    __syncwarp(live);
    const int lane = threadIdx.x & 31;
    out[threadIdx.x] = __any_sync(live, lane == 3) + 2 * __all_sync(live, lane < 8)
                     + 4 * __syncthreads_and(lane < 8) + 8 * __syncthreads_or(lane == 40);
}

// Lanes 0..15 and 16..31 shuffle as two groups: fine.
__global__ void half_warps(float* __restrict__ out) {
    const float v = threadIdx.x;
    out[threadIdx.x] = __shfl_xor_sync(threadIdx.x < 16 ? 0x0000ffffu : 0xffff0000u, v, 1);
}

// Lanes 16..31 name lanes 0..15 in their mask, but those call another shuffle: undefined.
__global__ void mask_mismatch(float* __restrict__ out) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffffu, v, 1);
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}
"""

NAMES = ["vadd<float>", "vadd<double>", "block_sum<float, true>", "block_sum<float, false>",
         "warp_sums<float>", "warp_sums<double>", "shuffles", "reverse_block<float>",
         "atomic_total<float>", "atomic_total<double>", "read_shared", "count_positive",
         "deadlock", "trap_if", "votes", "half_warps", "mask_mismatch"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emulator-cache")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels") / "test_kernels.cu"
    path.write_text(SOURCE)
    return path


@pytest.fixture(scope="module")
def mod(source, cache):
    return EmulatedModule([source], NAMES, ("-I", str(KERNEL_DIR)), cache_dir=cache)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ORDERS)
def test_vector_add_with_grid_stride_loop(mod, rng, dtype, order):
    n = 1000  # 3 blocks of 128 threads: each thread visits 2 or 3 elements
    a, b = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    out = emulator.empty(n, dtype)
    name = f"vadd<{kernels.CTYPES[np.dtype(dtype)]}>"
    mod.launch(name, (3,), (128,), (a, b, np.int64(n), out), order=order, seed=1)
    np.testing.assert_array_equal(out, a + b)


@pytest.mark.parametrize("order,seed", [("forward", 0), ("reverse", 0), ("shuffled", 1),
                                        ("shuffled", 2)])
def test_block_reduction_in_shared_memory(mod, rng, order, seed):
    x = rng.standard_normal(1000).astype(np.float32)
    out = emulator.empty(4, np.float32)
    mod.launch("block_sum<float, true>", 4, 256, (x, np.int32(1000), out), order=order,
               seed=seed)
    expected = np.pad(x, (0, 24)).reshape(4, 256).sum(axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_a_missing_barrier_gives_a_wrong_result_in_some_order(mod, rng):
    x = rng.standard_normal(1024).astype(np.float32)
    expected = x.reshape(4, 256).sum(axis=1)
    wrong = []
    for order in ORDERS:
        out = emulator.empty(4, np.float32)
        mod.launch("block_sum<float, false>", 4, 256, (x, np.int32(1024), out), order=order)
        if not np.allclose(out, expected, rtol=1e-5, atol=1e-5):
            wrong.append(order)
    # thread 0 runs first in forward order and reads buf[128] before thread 128 wrote it
    assert "forward" in wrong


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_warp_shuffle_sum_from_common_cuh(mod, rng, dtype):
    x = rng.standard_normal(2 * 64).astype(dtype)
    out = emulator.empty(4, dtype)
    name = f"warp_sums<{kernels.CTYPES[np.dtype(dtype)]}>"
    mod.launch(name, 2, 64, (x, out), order="shuffled", seed=5)
    np.testing.assert_allclose(out, x.reshape(4, 32).sum(axis=1), rtol=1e-5)


def test_shuffle_from_a_lane_outside_the_block_reads_nan(mod, rng):
    # 48 threads: the second warp has lanes 0..15 only; the full-mask butterfly reads 16..31
    x = rng.standard_normal(48).astype(np.float32)
    out = emulator.empty(2, np.float32)
    mod.launch("warp_sums<float>", 1, 48, (x, out))
    np.testing.assert_allclose(out[0], x[:32].sum(), rtol=1e-5)
    assert np.isnan(out[1])


def test_shuffle_variants_and_ballot(mod, rng):
    x = rng.standard_normal(32).astype(np.float32)
    out = emulator.empty((32, 4), np.float32)
    ballots = emulator.empty(32, np.uint32)
    mod.launch("shuffles", 1, 32, (x, out, ballots), order="reverse")
    lane = np.arange(32)
    np.testing.assert_array_equal(out[:, 0], np.full(32, x[3]))
    down = np.minimum(lane + 5, 31)
    np.testing.assert_array_equal(out[:, 1], np.where(lane + 5 < 32, x[down], x))
    np.testing.assert_array_equal(out[:, 2], np.where(lane % 16 >= 2, x[lane - 2], x))
    src = lane ^ 9  # width 8: a lane may read earlier segments, not later ones
    np.testing.assert_array_equal(out[:, 3], np.where(src <= (lane & ~7) + 7, x[src % 32], x))
    assert (ballots == sum(1 << i for i in range(32) if x[i] > 0)).all()


def test_dynamic_shared_memory(mod, rng):
    x = rng.standard_normal(3 * 64).astype(np.float32)
    out = emulator.empty(3 * 64, np.float32)
    mod.launch("reverse_block<float>", 3, 64, (x, out), shared_mem=64 * 4, order="shuffled")
    np.testing.assert_array_equal(out, x.reshape(3, 64)[:, ::-1].ravel())
    # more than 48 KiB only with the opt-in, and that at most 227 KiB
    with pytest.raises(LaunchError, match="exceed the limit of 49152 bytes.*max_shared_mem"):
        mod.launch("reverse_block<float>", 1, 64, (x, out), shared_mem=64 * 1024)
    mod.launch("reverse_block<float>", 3, 64, (x, out), shared_mem=64 * 1024,
               max_shared_mem=64 * 1024)
    np.testing.assert_array_equal(out, x.reshape(3, 64)[:, ::-1].ravel())
    with pytest.raises(LaunchError, match="above the 232448 bytes"):
        mod.launch("reverse_block<float>", 1, 64, (x, out), shared_mem=1024,
                   max_shared_mem=228 * 1024)


def test_shared_memory_is_nan_at_each_block_start(mod):
    out = emulator.empty((2, 64), np.float32)
    mod.launch("read_shared", 2, 64, (out,))
    assert (out[0, :32] == 1).all()
    assert np.isnan(out[0, 32:]).all()  # never written
    assert np.isnan(out[1]).all()  # written by block 0 only: refilled before block 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_atomic_add(mod, rng, dtype):
    x = rng.random(5000).astype(dtype)
    total, count = np.zeros(1, dtype), np.zeros(1, np.int32)
    name = f"atomic_total<{kernels.CTYPES[np.dtype(dtype)]}>"
    mod.launch(name, 4, 256, (x, np.int64(x.size), total, count), order="shuffled", seed=9)
    assert count[0] == x.size
    np.testing.assert_allclose(total[0], x.sum(dtype=np.float64), rtol=1e-4)


def test_syncthreads_count(mod, rng):
    x = rng.standard_normal(3 * 96).astype(np.float32)
    out = emulator.empty(3, np.int32)
    mod.launch("count_positive", 3, 96, (x, out), order="shuffled")
    np.testing.assert_array_equal(out, (x.reshape(3, 96) > 0).sum(axis=1))


def test_votes_and_partial_masks(mod):
    out = emulator.empty(40, np.int32)  # a full warp and a warp of 8 lanes
    mod.launch("votes", 1, 40, (out,), order="shuffled")
    np.testing.assert_array_equal(out, [1] * 32 + [1 + 2] * 8)
    out = emulator.empty(32, np.float32)
    for order in ORDERS:
        mod.launch("half_warps", 1, 32, (out,), order=order)
        np.testing.assert_array_equal(out, np.arange(32) ^ 1)
    with pytest.raises(EmulatorError, match="lane 15 enters a warp-synchronous call with mask "
                                            "0x0000ffff while lane 16 waits for it"):
        mod.launch("mask_mismatch", 1, 32, (out,), order="reverse")


def test_launch_limits(mod):
    out = emulator.empty(2048, np.float32)
    args = (out, out, np.int64(0), out)
    with pytest.raises(LaunchError, match="1025 threads; a block has at most 1024"):
        mod.launch("vadd<float>", 1, 1025, args)
    with pytest.raises(LaunchError, match="1056 threads"):
        mod.launch("vadd<float>", 1, (33, 32), args)
    with pytest.raises(LaunchError, match=r"block \(1, 1, 65\) is larger than the limit"):
        mod.launch("vadd<float>", 1, (1, 1, 65), args)
    with pytest.raises(LaunchError, match=r"grid \(1, 65536, 1\) is larger than the limit"):
        mod.launch("vadd<float>", (1, 65536), 32, args)
    with pytest.raises(LaunchError, match="has a dimension below 1"):
        mod.launch("vadd<float>", 0, 32, args)
    with pytest.raises(LaunchError, match="no kernel 'vadd<int>'"):
        mod.launch("vadd<int>", 1, 32, args)
    with pytest.raises(ValueError, match="order must be one of"):
        mod.launch("vadd<float>", 1, 32, args, order="backward")
    mod.launch("vadd<float>", 1, (8, 8, 16), args)  # exactly 1024 threads is fine


def test_static_shared_memory_is_counted_per_kernel(mod):
    # each block_sum instantiation declares 256 floats; vadd declares none
    assert mod.static_shared["block_sum<float,true>"] == 1024
    assert mod.static_shared["vadd<float>"] == 0
    x, out = emulator.empty(256, np.float32), emulator.empty(1, np.float32)
    with pytest.raises(LaunchError, match="1024 bytes of static and 48129 bytes of dynamic"):
        mod.launch("block_sum<float, true>", 1, 256, (x, np.int32(256), out),
                   shared_mem=48 * 1024 - 1024 + 1)
    x[:] = 1
    mod.launch("block_sum<float, true>", 1, 256, (x, np.int32(256), out),
               shared_mem=48 * 1024 - 1024)  # exactly at the limit
    assert out[0] == 256


def test_arguments_are_checked(mod):
    a = np.ones(64, np.float32)
    out = emulator.empty(64, np.float32)
    with pytest.raises(TypeError, match=r"argument 2 is a bare Python int \(64\).*np.int64\(64\)"):
        mod.launch("vadd<float>", 1, 64, (a, a, 64, out))
    with pytest.raises(TypeError, match="argument 2 is a bare Python float"):
        mod.launch("vadd<float>", 1, 64, (a, a, 64.0, out))
    with pytest.raises(TypeError, match="argument 2 is np.int32, but the kernel takes np.int64"):
        mod.launch("vadd<float>", 1, 64, (a, a, np.int32(64), out))
    with pytest.raises(TypeError, match="argument 0 is a float64 array, but the kernel takes "
                                        "a float32 array"):
        mod.launch("vadd<float>", 1, 64, (a.astype(np.float64), a, np.int64(64), out))
    with pytest.raises(TypeError, match="argument 2 is an array"):
        mod.launch("vadd<float>", 1, 64, (a, a, a, out))
    with pytest.raises(ValueError, match="argument 1 is not C-contiguous"):
        mod.launch("vadd<float>", 1, 64, (a, np.ones(128, np.float32)[::2], np.int64(64), out))
    with pytest.raises(TypeError, match="vadd<float> takes 4 arguments"):
        mod.launch("vadd<float>", 1, 64, (a, a, out))
    with pytest.raises(TypeError, match="argument 0 is a list"):
        mod.launch("vadd<float>", 1, 64, ([1.0], a, np.int64(1), out))


def test_deadlock_and_trap_raise(mod):
    out = emulator.empty(32, np.float32)
    with pytest.raises(EmulatorError, match="deadlock in block .*16 thread.*__syncthreads"):
        mod.launch("deadlock", 1, 32, (out,))
    with pytest.raises(EmulatorError, match=r"__trap\(\) in block \(0, 0, 0\), thread \(0, 0, 0\)"):
        mod.launch("trap_if", 2, 4, (np.array([1], np.int32),))
    mod.launch("trap_if", 2, 4, (np.array([0], np.int32),))  # the module still works


def test_the_test_kernels_are_valid_cuda(source):
    try:
        nvrtc.library()
    except KernelCompileError as e:
        pytest.skip(str(e))
    ptx, lowered = nvrtc.compile_ptx(SOURCE, str(source), "compute_80",
                                     include_paths=[KERNEL_DIR], name_expressions=NAMES)
    assert set(lowered) == set(NAMES)


def test_compile_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("template <typename T>\n__global__ void k(T* x) {\n"
                   "    x[threadIdx.x] = undefined_name;\n}\n")
    with pytest.raises(KernelCompileError) as info:
        EmulatedModule([bad], ["k<float>"], cache_dir=tmp_path / "cache")
    assert f"{bad}:3:" in str(info.value)
    assert "undefined_name" in str(info.value)
    bad.write_text("__global__ void k(float* x) { x[threadIdx.x] = 1.0f; }\n")
    with pytest.raises(KernelCompileError, match="<name expression nope<float>>"):
        EmulatedModule([bad], ["nope<float>"], cache_dir=tmp_path / "cache")


def test_second_construction_hits_the_cache(mod, source, cache):
    assert mod.compiled
    before = mod.library_path.stat().st_mtime_ns
    again = EmulatedModule([source], NAMES, ("-I", str(KERNEL_DIR)), cache_dir=cache)
    assert not again.compiled
    assert again.library_path == mod.library_path
    assert mod.library_path.stat().st_mtime_ns == before


def test_changing_an_included_header_recompiles(tmp_path):
    (tmp_path / "value.cuh").write_text("#define VALUE 1.0f\n")
    src = tmp_path / "fill.cu"
    src.write_text('#include "value.cuh"\n__global__ void fill(float* out) '
                   '{ out[threadIdx.x] = VALUE; }\n')
    out = emulator.empty(4, np.float32)
    first = EmulatedModule([src], ["fill"], cache_dir=tmp_path / "cache")
    first.launch("fill", 1, 4, (out,))
    assert first.compiled and (out == 1).all()
    assert not EmulatedModule([src], ["fill"], cache_dir=tmp_path / "cache").compiled
    (tmp_path / "value.cuh").write_text("#define VALUE 2.0f\n")
    second = EmulatedModule([src], ["fill"], cache_dir=tmp_path / "cache")
    second.launch("fill", 1, 4, (out,))
    assert second.compiled and (out == 2).all()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUNET_CACHE_DIR", str(tmp_path))
    assert emulator.default_cache_dir() == tmp_path / "emulator"
    monkeypatch.delenv("GPUNET_CACHE_DIR")
    assert emulator.default_cache_dir() == Path.home() / ".cache" / "gpunet" / "emulator"


def test_empty_is_nan_filled():
    assert np.isnan(emulator.empty((3, 2), np.float64)).all()
    assert np.isnan(emulator.empty(5, np.float32)).all()
    assert (emulator.empty(4, np.int32) == -1).all()
