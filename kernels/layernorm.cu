// Layer normalisation: every row of an (R, M) array normalised over its own M values.
//
// Forward, per row r (two passes over the row, as BatchNorm: no E[x^2] - E[x]^2 cancellation):
//   mean[r] = sum_j x[r, j] / M
//   rstd[r] = 1 / sqrt(sum_j (x[r, j] - mean[r])^2 / M + eps)      (biased variance)
//   y[r, j] = (x[r, j] - mean[r]) * rstd[r] * weight[j] + bias[j]   (ln_forward_*)
// Backward, with xhat = (x - mean) * rstd and g = dy * weight:
//   dx[r, j]   = rstd[r] * (g - mean_j(g) - xhat * mean_j(g * xhat))    (ln_backward_*)
//   dweight[j] = sum_r dy * xhat,  dbias[j] = sum_r dy                (ln_param_grads, ln_finish)
//
// A row belongs to one warp (*_warp: blocks of 32 x 8 threads, row blockIdx.x * 8 + threadIdx.y)
// or to one block (*_block: 1-D blocks, row blockIdx.x), as
// gpunet.backends.kernel_ops.layernorm_grid chooses from M alone. Thread t of a row takes the
// values j = t, t + step, ... in sequence and the partial sums meet in a fixed tree, so a row's
// results depend on its values and on M only: not on R, nor on the order threads run in.
// dweight and dbias are sums over rows: the two-stage reduction of common.cuh (partial sums
// per chunk of rows, then gpunet_sum_partials in a fixed order), without atomics.
#include "common.cuh"

// Each of v[0..K) summed over the threads that share a row, the total returned to all of them:
// the 32 lanes of a warp or, PerBlock, the whole block (blockDim = (multiple of 32, 1, 1)).
// Every warp adds the per-warp sums in the same tree, so all threads hold the same bits.
// Use numbers the reductions of one kernel: each has its own shared slots, so a warp that runs
// ahead into the next reduction cannot overwrite sums a slower warp is still reading, and no
// barrier is needed between two reductions.
template <int Use, bool PerBlock, int K, typename T>
__device__ __forceinline__ void ln_row_sum(T (&v)[K]) {
    for (int q = 0; q < K; ++q) v[q] = gpunet_warp_sum(v[q]);
    if constexpr (PerBlock) {
        __shared__ T slot[K][32];
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
        if (lane == 0)
            for (int q = 0; q < K; ++q) slot[q][warp] = v[q];
        __syncthreads();  // every warp's sum is written before any warp reads them
        for (int q = 0; q < K; ++q) v[q] = gpunet_warp_sum(lane < warps ? slot[q][lane] : T(0));
    }
}

// Forward pass of row `row` by the threads t = 0, 1, ..., step - 1 that share it.
template <bool PerBlock, typename T>
__device__ __forceinline__ void ln_forward_row(const T* __restrict__ x,
                                               const T* __restrict__ weight,
                                               const T* __restrict__ bias, long long row, int M,
                                               T eps, T* __restrict__ y, T* __restrict__ mean,
                                               T* __restrict__ rstd, int t, int step) {
    const T* xr = x + row * M;
    T sum[1] = {T(0)};
    for (int j = t; j < M; j += step) sum[0] += xr[j];
    ln_row_sum<0, PerBlock>(sum);
    const T mu = sum[0] / T(M);
    T sq_dev[1] = {T(0)};
    for (int j = t; j < M; j += step) {
        const T d = xr[j] - mu;
        sq_dev[0] += d * d;
    }
    ln_row_sum<1, PerBlock>(sq_dev);
    const T r = T(1) / sqrt(sq_dev[0] / T(M) + eps);
    T* yr = y + row * M;
    for (int j = t; j < M; j += step) yr[j] = (xr[j] - mu) * r * weight[j] + bias[j];
    if (t == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
}

// dx of row `row` by the threads t = 0, 1, ..., step - 1 that share it: one pass for the two
// row sums, one for dx.
template <bool PerBlock, typename T>
__device__ __forceinline__ void ln_backward_row(const T* __restrict__ dy, const T* __restrict__ x,
                                                const T* __restrict__ mean,
                                                const T* __restrict__ rstd,
                                                const T* __restrict__ weight, long long row,
                                                int M, T* __restrict__ dx, int t, int step) {
    const T* dyr = dy + row * M;
    const T* xr = x + row * M;
    const T mu = mean[row], r = rstd[row];
    T sums[2] = {T(0), T(0)};  // sum of g, sum of g * xhat
    for (int j = t; j < M; j += step) {
        const T g = dyr[j] * weight[j];
        sums[0] += g;
        sums[1] += g * ((xr[j] - mu) * r);
    }
    ln_row_sum<0, PerBlock>(sums);
    const T mean_g = sums[0] / T(M), mean_g_xhat = sums[1] / T(M);
    T* dxr = dx + row * M;
    for (int j = t; j < M; j += step) {
        const T xhat = (xr[j] - mu) * r;
        dxr[j] = r * (dyr[j] * weight[j] - mean_g - xhat * mean_g_xhat);
    }
}

// -- one row per warp: 32 x 8 blocks, ceil(R / 8) of them --------------------------------------
template <typename T>
__global__ void ln_forward_warp(const T* __restrict__ x, const T* __restrict__ weight,
                                const T* __restrict__ bias, int R, int M, T eps,
                                T* __restrict__ y, T* __restrict__ mean, T* __restrict__ rstd) {
    const long long row = (long long)blockIdx.x * 8 + threadIdx.y;  // the same for the warp
    if (row >= R) return;
    ln_forward_row<false>(x, weight, bias, row, M, eps, y, mean, rstd, (int)threadIdx.x, 32);
}

template <typename T>
__global__ void ln_backward_warp(const T* __restrict__ dy, const T* __restrict__ x,
                                 const T* __restrict__ mean, const T* __restrict__ rstd,
                                 const T* __restrict__ weight, int R, int M,
                                 T* __restrict__ dx) {
    const long long row = (long long)blockIdx.x * 8 + threadIdx.y;
    if (row >= R) return;
    ln_backward_row<false>(dy, x, mean, rstd, weight, row, M, dx, (int)threadIdx.x, 32);
}

// -- one row per block: R blocks -----------------------------------------------------------------
template <typename T>
__global__ void ln_forward_block(const T* __restrict__ x, const T* __restrict__ weight,
                                 const T* __restrict__ bias, int R, int M, T eps,
                                 T* __restrict__ y, T* __restrict__ mean, T* __restrict__ rstd) {
    ln_forward_row<true>(x, weight, bias, (long long)blockIdx.x, M, eps, y, mean, rstd,
                         (int)threadIdx.x, (int)blockDim.x);
}

template <typename T>
__global__ void ln_backward_block(const T* __restrict__ dy, const T* __restrict__ x,
                                  const T* __restrict__ mean, const T* __restrict__ rstd,
                                  const T* __restrict__ weight, int R, int M,
                                  T* __restrict__ dx) {
    ln_backward_row<true>(dy, x, mean, rstd, weight, (long long)blockIdx.x, M, dx,
                          (int)threadIdx.x, (int)blockDim.x);
}

// -- dweight and dbias: sums over rows, per column -----------------------------------------------
// Stage 1, laid out as common.cuh's gpunet_reduce_nc with the row index at hand (xhat needs the
// row's mean and rstd; no division per value): a (ceil(M/32), chunks) grid of 32 x 8 blocks.
// Column j = 32*blockIdx.x + threadIdx.x (a warp reads 32 consecutive values of a row),
// threadIdx.y strides over the rows of chunk blockIdx.y, and the 8 partial sums of each column
// meet in shared memory in row order. partials[(q*M + j)*chunks + chunk]: q = 0 is dweight,
// q = 1 dbias (with chunks = 1, the final sums).
template <typename T>
__global__ void ln_param_grads(const T* __restrict__ dy, const T* __restrict__ x,
                               const T* __restrict__ mean, const T* __restrict__ rstd, int R,
                               int M, T* __restrict__ partials) {
    __shared__ T part[2][8][33];  // 33: row padding keeps the column reads conflict-free
    const int j = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
    long long begin, end;
    gpunet_chunk(R, chunk, chunks, 1, begin, end);
    T acc[2] = {T(0), T(0)};
    if (j < M)
        for (long long r = begin + threadIdx.y; r < end; r += 8) {
            const long long at = r * M + j;
            acc[0] += dy[at] * ((x[at] - mean[r]) * rstd[r]);
            acc[1] += dy[at];
        }
    for (int q = 0; q < 2; ++q) part[q][threadIdx.y][threadIdx.x] = acc[q];
    __syncthreads();  // all 8 rows of partial sums are written before row 0 adds them up
    if (threadIdx.y == 0 && j < M) {
        for (int k = 1; k < 8; ++k)
            for (int q = 0; q < 2; ++q) acc[q] += part[q][k][threadIdx.x];
        for (int q = 0; q < 2; ++q) partials[((long long)q * M + j) * chunks + chunk] = acc[q];
    }
}

// Stage 2: out[i] = sum over k of partials[i][k], i < rows (= 2*M).
template <typename T>
__global__ void ln_finish(const T* __restrict__ partials, int rows, int chunks,
                          T* __restrict__ out) {
    gpunet_sum_partials(partials, rows, chunks, out);
}
