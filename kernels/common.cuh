// Device helpers shared by gpunet's kernels (included by every .cu file in this folder).
// Kept free of CUDA-toolkit headers so NVRTC and the CPU emulator can both compile it.
#pragma once

// Visit i = first, first + stride, ... < n: one thread may cover many elements, so any grid
// size is correct and the launch can be sized for occupancy rather than for n.
#define GPUNET_GRID_STRIDE_LOOP(i, n)                                              \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// Sum of v over the 32 lanes of a warp, returned to every lane (butterfly shuffle).
template <typename T>
__device__ __forceinline__ T gpunet_warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Dynamic shared memory (the launch's shared_mem bytes) as `T* name`, 16-byte aligned. On the
// GPU every kernel declares the same untyped array, so kernels templated over T do not declare
// one extern symbol with two types; the CPU emulator, where `extern __shared__` cannot be
// expressed, hands out its per-block arena instead.
#ifdef GPUNET_EMULATOR
#define GPUNET_DYNAMIC_SHARED(T, name) T* name = gpunet_emu::dynamic_shared<T>()
#else
#define GPUNET_DYNAMIC_SHARED(T, name)                                        \
    extern __shared__ __align__(16) unsigned char gpunet_dynamic_shared_[];   \
    T* name = reinterpret_cast<T*>(gpunet_dynamic_shared_)
#endif
