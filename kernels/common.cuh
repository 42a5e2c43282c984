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

// -- Deterministic per-channel reductions ----------------------------------------------------
// Sums over every axis but the channel axis of (N, C, HW) data, in two stages and without
// atomics, so the result depends on the data and the launch shape only, never on the order in
// which blocks or threads run:
//   stage 1: a grid of (channel blocks) x (chunks) blocks; block (c, k) reduces chunk k of
//            channel c's values in a fixed order (each thread sums its own values in sequence,
//            then a fixed shuffle tree) and writes partials[(q*C + c)*chunks + k] for each of
//            the K quantities q it computes. chunks is gridDim.y.
//   stage 2: gpunet_sum_partials adds each row of `chunks` partials in a fixed order.
// With gridDim.y = 1 the partials are the final sums ([K][C]) and stage 2 is not needed.

// The items [begin, end) of chunk `chunk` of `chunks` over `count` items: equal shares rounded
// up to a multiple of `align` (a power of two), so every chunk but the last starts aligned.
__device__ __forceinline__ void gpunet_chunk(long long count, int chunk, int chunks, int align,
                                             long long& begin, long long& end) {
    long long share = (count + chunks - 1) / chunks;
    share = (share + align - 1) & ~(long long)(align - 1);
    begin = min(count, share * chunk);
    end = min(count, begin + share);
}

// Each of v[0..K) summed over the block, result in thread 0 (other threads: partial values).
// blockDim = (multiple of 32, 1, 1), at most 1024 threads. Call once per kernel (the shared
// slots are not guarded against a second use).
template <int K, typename T>
__device__ __forceinline__ void gpunet_block_sum(T (&v)[K]) {
    __shared__ T slot[K][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int q = 0; q < K; ++q) v[q] = gpunet_warp_sum(v[q]);
    if (lane == 0)
        for (int q = 0; q < K; ++q) slot[q][warp] = v[q];
    __syncthreads();  // every warp's partial sum is written before warp 0 reads them
    if (warp == 0)
        for (int q = 0; q < K; ++q) v[q] = gpunet_warp_sum(lane < warps ? slot[q][lane] : T(0));
}

// Stage 1 over (N, C, HW) data, HW > 1: block (c, k) of a (C, chunks) grid of 1-D blocks.
// Channel c's values are i = n*HW + hw (at (n*C + c)*HW + hw in memory); thread t takes
// i = begin + t, begin + t + blockDim.x, ... of its chunk, so a warp reads consecutive
// addresses within a row. The walk steps (n, hw) without a division per value.
// add(at, acc) adds the value(s) at memory position `at` to acc[0..K).
template <int K, typename T, typename F>
__device__ __forceinline__ void gpunet_reduce_nchw(int N, int C, int HW, const F& add,
                                                   T* __restrict__ partials) {
    const int c = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
    long long begin, end;
    gpunet_chunk((long long)N * HW, chunk, chunks, 32, begin, end);  // 32-value pieces
    T acc[K];
    for (int q = 0; q < K; ++q) acc[q] = T(0);
    long long i = begin + threadIdx.x;
    if (i < end) {
        const long long plane = (long long)C * HW;  // from (n, c, hw) to (n + 1, c, hw)
        const long long n = i / HW;
        int hw = (int)(i - n * HW);
        long long row = (n * C + c) * HW;  // position of (n, c, 0)
        const int step_n = (int)(blockDim.x / HW), step_hw = (int)(blockDim.x % HW);
        const long long row_step = step_n * plane;
        for (; i < end; i += blockDim.x) {
            add(row + hw, acc);
            hw += step_hw;
            row += row_step;
            if (hw >= HW) {
                hw -= HW;
                row += plane;
            }
        }
    }
    gpunet_block_sum<K>(acc);
    if (threadIdx.x == 0)
        for (int q = 0; q < K; ++q) partials[((long long)q * C + c) * chunks + chunk] = acc[q];
}

// Stage 1 over (N, C) data: a (ceil(C/32), chunks) grid of 32 x 8 blocks. threadIdx.x picks
// the channel c = 32*blockIdx.x + threadIdx.x (a warp reads 32 consecutive values of a row),
// threadIdx.y strides over the rows of chunk blockIdx.y, and the 8 partial sums of each
// channel meet in shared memory in row order. add(at, acc) as above; it is only called for
// c < C.
template <int K, typename T, typename F>
__device__ __forceinline__ void gpunet_reduce_nc(int N, int C, const F& add,
                                                 T* __restrict__ partials) {
    __shared__ T part[K][8][33];  // 33: row padding keeps the column reads conflict-free
    const int c = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
    long long begin, end;
    gpunet_chunk(N, chunk, chunks, 1, begin, end);
    T acc[K];
    for (int q = 0; q < K; ++q) acc[q] = T(0);
    if (c < C)
        for (long long n = begin + threadIdx.y; n < end; n += 8) add(n * C + c, acc);
    for (int q = 0; q < K; ++q) part[q][threadIdx.y][threadIdx.x] = acc[q];
    __syncthreads();  // all 8 rows of partial sums are written before row 0 adds them up
    if (threadIdx.y == 0 && c < C) {
        for (int r = 1; r < 8; ++r)
            for (int q = 0; q < K; ++q) acc[q] += part[q][r][threadIdx.x];
        for (int q = 0; q < K; ++q) partials[((long long)q * C + c) * chunks + chunk] = acc[q];
    }
}

// Stage 2: out[r] = sum of partials[r*chunks .. r*chunks + chunks) for r < rows, in a fixed
// order (lane l adds chunks l, l + 32, ... in sequence, then the shuffle tree). A grid of
// ceil(rows/8) blocks of 32 x 8 threads, one warp per row; no shared memory, no barrier.
template <typename T>
__device__ __forceinline__ void gpunet_sum_partials(const T* __restrict__ partials, int rows,
                                                    int chunks, T* __restrict__ out) {
    const int r = blockIdx.x * 8 + threadIdx.y;  // the same for the whole warp
    if (r >= rows) return;
    T s = 0;
    for (int k = threadIdx.x; k < chunks; k += 32) s += partials[(long long)r * chunks + k];
    s = gpunet_warp_sum(s);
    if (threadIdx.x == 0) out[r] = s;
}
