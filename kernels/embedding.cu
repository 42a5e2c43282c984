// The weight gradient of an embedding lookup, deterministic and without atomics.
//
// Forward gathered y[m] = weight[indices[m]] for the M flattened indices; backward adds each
// row dy[m] (D values) into dweight[indices[m]]. Equal indices must add up, so threads that
// handle them would collide; instead the host side (KernelOps.embedding_backward) sorts the
// indices once with a STABLE sort, which puts equal indices next to each other in order of m:
//   order  (M,): the positions m, sorted by index (stable: equal indices keep increasing m)
//   sorted (M,): indices[order], ascending
// One thread per (q, f), q a position in sorted order and f < D: the thread at the head of a
// run of equal indices (q == 0 or sorted[q - 1] != sorted[q]) walks the run and adds
// dy[order[q'], f] for each q' of it into dweight[sorted[q], f]; every other thread has nothing
// to do. Runs do not overlap, so each element of dweight has one writer, and its sum is taken
// in order of m, starting from dweight's value: the order of a plain loop over m (NumPy's
// np.add.at), so every device gets the same bits. The run of `skip` (padding_idx, or -1) is
// left alone. dy is (M, D) and dweight (V, D), both C-contiguous; consecutive threads take
// consecutive f, so a warp reads and writes contiguous rows.
#include "common.cuh"

template <typename T>
__global__ void embedding_backward(const T* __restrict__ dy, const long long* __restrict__ order,
                                   const long long* __restrict__ sorted, long long M, int D,
                                   long long skip, T* __restrict__ dweight) {
    const long long total = M * D;
    GPUNET_GRID_STRIDE_LOOP(k, total) {
        const long long q = k / D;
        const int f = (int)(k - q * D);
        const long long row = sorted[q];
        if (row == skip || (q > 0 && sorted[q - 1] == row)) continue;
        T acc = dweight[row * D + f];
        for (long long p = q; p < M && sorted[p] == row; ++p) acc += dy[order[p] * D + f];
        dweight[row * D + f] = acc;
    }
}
