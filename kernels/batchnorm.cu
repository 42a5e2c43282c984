// Batch normalisation backward pass.
//
// x and dy have shape (N, C, HW) in memory (HW = H*W, or 1 for (N, C) input); mean and invstd
// are per channel, invstd = 1/sqrt(var + eps); M = N*HW values per channel. With
// xhat = (x - mean) * invstd:
//   sum_dy[c]      = sum over n, hw of dy
//   sum_dy_xhat[c] = sum over n, hw of dy * xhat
//   dx             = gamma * invstd * (dy - sum_dy/M - xhat * sum_dy_xhat/M)
// dbeta = sum_dy and dgamma = sum_dy_xhat come out of the reduction for free.
#include "common.cuh"

// Sum a and b over the block, result in thread 0. blockDim.x must be a multiple of 32 and at
// most 1024 (so at most 32 warps, one shared slot each).
template <typename T>
__device__ __forceinline__ void bn_block_sum2(T& a, T& b) {
    __shared__ T partial[64];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    a = gpunet_warp_sum(a);
    b = gpunet_warp_sum(b);
    if (lane == 0) {
        partial[warp] = a;
        partial[32 + warp] = b;
    }
    __syncthreads();  // every warp's partial sum is written before warp 0 reads them
    if (warp == 0) {
        a = gpunet_warp_sum(lane < warps ? partial[lane] : T(0));
        b = gpunet_warp_sum(lane < warps ? partial[32 + lane] : T(0));
    }
}

// One block per channel. Threads walk the channel's (n, hw) positions with hw fastest, so a
// warp reads consecutive addresses whenever HW >= 32; x and dy are read once.
template <typename T>
__global__ void bn_reduce_nchw(const T* __restrict__ dy, const T* __restrict__ x,
                               const T* __restrict__ mean, const T* __restrict__ invstd,
                               int N, int C, int HW,
                               T* __restrict__ sum_dy, T* __restrict__ sum_dy_xhat) {
    const int c = blockIdx.x;
    const T m = mean[c], s = invstd[c];
    T a = 0, b = 0;
    const long long count = (long long)N * HW;
    for (long long i = threadIdx.x; i < count; i += blockDim.x) {
        const long long n = i / HW, hw = i - n * HW;
        const long long at = (n * C + c) * HW + hw;
        const T g = dy[at];
        a += g;
        b += g * (x[at] - m) * s;
    }
    bn_block_sum2(a, b);
    if (threadIdx.x == 0) {
        sum_dy[c] = a;
        sum_dy_xhat[c] = b;
    }
}

// For (N, C) input (HW = 1) a channel is a strided column, so one block per channel would read
// one value per 32-byte sector. Here a 32 x 8 block takes 32 neighbouring channels:
// threadIdx.x picks the channel (a warp reads 32 consecutive values of a row), threadIdx.y
// strides over rows, and the 8 partial sums of each channel meet in shared memory.
template <typename T>
__global__ void bn_reduce_nc(const T* __restrict__ dy, const T* __restrict__ x,
                             const T* __restrict__ mean, const T* __restrict__ invstd,
                             int N, int C,
                             T* __restrict__ sum_dy, T* __restrict__ sum_dy_xhat) {
    __shared__ T part_a[8][33];  // 33: row padding keeps the column reads conflict-free
    __shared__ T part_b[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    T a = 0, b = 0;
    if (c < C) {
        const T m = mean[c], s = invstd[c];
        for (int n = threadIdx.y; n < N; n += 8) {
            const T g = dy[(long long)n * C + c];
            a += g;
            b += g * (x[(long long)n * C + c] - m) * s;
        }
    }
    part_a[threadIdx.y][threadIdx.x] = a;
    part_b[threadIdx.y][threadIdx.x] = b;
    __syncthreads();  // all 8 rows of partial sums are written before row 0 adds them up
    if (threadIdx.y == 0 && c < C) {
        for (int r = 1; r < 8; ++r) {
            a += part_a[r][threadIdx.x];
            b += part_b[r][threadIdx.x];
        }
        sum_dy[c] = a;
        sum_dy_xhat[c] = b;
    }
}

// dx for every element, in a grid-stride loop: one read of x and dy, one write of dx.
template <typename T>
__global__ void bn_backward_dx(const T* __restrict__ dy, const T* __restrict__ x,
                               const T* __restrict__ mean, const T* __restrict__ invstd,
                               const T* __restrict__ gamma, const T* __restrict__ sum_dy,
                               const T* __restrict__ sum_dy_xhat, int C, int HW,
                               long long total, T inv_count, T* __restrict__ dx) {
    GPUNET_GRID_STRIDE_LOOP(i, total) {
        const int c = (int)((i / HW) % C);
        const T s = invstd[c];
        const T xhat = (x[i] - mean[c]) * s;
        dx[i] = gamma[c] * s * (dy[i] - inv_count * (sum_dy[c] + xhat * sum_dy_xhat[c]));
    }
}
