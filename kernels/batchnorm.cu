// Batch normalisation: the per-channel sums of the forward and backward passes, and the
// backward pass's elementwise dx.
//
// x and dy have shape (N, C, HW) in memory (HW = H*W, or 1 for (N, C) input); mean and invstd
// are per channel, invstd = 1/sqrt(var + eps); M = N*HW values per channel.
// Forward statistics, two passes (no E[x^2] - E[x]^2 cancellation):
//   sum[c]         = sum over n, hw of x                       (bn_sum_*; mean = sum/M)
//   sq_dev[c]      = sum over n, hw of (x - mean)^2            (bn_sq_dev_*; var = sq_dev/M)
// Backward, with xhat = (x - mean) * invstd:
//   sum_dy[c]      = sum over n, hw of dy                      (bn_reduce_*, quantity 0)
//   sum_dy_xhat[c] = sum over n, hw of dy * xhat               (bn_reduce_*, quantity 1)
//   dx             = gamma * invstd * (dy - sum_dy/M - xhat * sum_dy_xhat/M)
// dbeta = sum_dy and dgamma = sum_dy_xhat come out of the reduction for free.
//
// Every sum is the deterministic two-stage reduction of common.cuh: a *_nchw kernel (HW > 1,
// grid (C, chunks)) or a *_nc kernel ((N, C) input, grid (ceil(C/32), chunks), 32 x 8 blocks)
// writes partials[q][c][chunk], then bn_finish adds each channel's partials (skipped when
// chunks = 1: the partials are then the sums). gpunet.backends.kernel_ops.reduction_grid
// chooses chunks and the block size.
#include "common.cuh"

// -- forward statistics ------------------------------------------------------------------------
template <typename T>
__global__ void bn_sum_nchw(const T* __restrict__ x, int N, int C, int HW,
                            T* __restrict__ partials) {
    gpunet_reduce_nchw<1>(N, C, HW, [&](long long at, T (&acc)[1]) { acc[0] += x[at]; },
                          partials);
}

template <typename T>
__global__ void bn_sum_nc(const T* __restrict__ x, int N, int C, T* __restrict__ partials) {
    gpunet_reduce_nc<1>(N, C, [&](long long at, T (&acc)[1]) { acc[0] += x[at]; }, partials);
}

template <typename T>
__global__ void bn_sq_dev_nchw(const T* __restrict__ x, const T* __restrict__ mean, int N,
                               int C, int HW, T* __restrict__ partials) {
    const T m = mean[blockIdx.x];
    gpunet_reduce_nchw<1>(N, C, HW, [&](long long at, T (&acc)[1]) {
        const T d = x[at] - m;
        acc[0] += d * d;
    }, partials);
}

template <typename T>
__global__ void bn_sq_dev_nc(const T* __restrict__ x, const T* __restrict__ mean, int N, int C,
                             T* __restrict__ partials) {
    const int c = blockIdx.x * 32 + threadIdx.x;
    const T m = c < C ? mean[c] : T(0);
    gpunet_reduce_nc<1>(N, C, [&](long long at, T (&acc)[1]) {
        const T d = x[at] - m;
        acc[0] += d * d;
    }, partials);
}

// -- backward sums: quantity 0 is sum(dy), quantity 1 is sum(dy * xhat) ----------------------
template <typename T>
__global__ void bn_reduce_nchw(const T* __restrict__ dy, const T* __restrict__ x,
                               const T* __restrict__ mean, const T* __restrict__ invstd,
                               int N, int C, int HW, T* __restrict__ partials) {
    const T m = mean[blockIdx.x], s = invstd[blockIdx.x];
    gpunet_reduce_nchw<2>(N, C, HW, [&](long long at, T (&acc)[2]) {
        const T g = dy[at];
        acc[0] += g;
        acc[1] += g * (x[at] - m) * s;
    }, partials);
}

template <typename T>
__global__ void bn_reduce_nc(const T* __restrict__ dy, const T* __restrict__ x,
                             const T* __restrict__ mean, const T* __restrict__ invstd,
                             int N, int C, T* __restrict__ partials) {
    const int c = blockIdx.x * 32 + threadIdx.x;
    const T m = c < C ? mean[c] : T(0), s = c < C ? invstd[c] : T(0);
    gpunet_reduce_nc<2>(N, C, [&](long long at, T (&acc)[2]) {
        const T g = dy[at];
        acc[0] += g;
        acc[1] += g * (x[at] - m) * s;
    }, partials);
}

// Stage 2 for every kernel above: out[r] = sum over k of partials[r][k], r < rows (= K*C).
template <typename T>
__global__ void bn_finish(const T* __restrict__ partials, int rows, int chunks,
                          T* __restrict__ out) {
    gpunet_sum_partials(partials, rows, chunks, out);
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
