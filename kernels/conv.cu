// 2-D convolution (cross-correlation, as in PyTorch): the im2col copy of the forward pass and
// the two kernels of the backward pass that are not a GEMM.
//
// x is (N, C, H, W), the output y and its gradient dy are (N, O, HO, WO), all C-contiguous.
// With kernel KH x KW, stride SH x SW and zero padding PH x PW, the column matrix is
//   cols[(c*KH + i)*KW + j][(n*HO + ho)*WO + wo] = x[n][c][ho*SH - PH + i][wo*SW - PW + j]
// (0 where that position falls in the padding), of shape (C*KH*KW, N*HO*WO). The forward pass
// is one GEMM, y = weight(O, C*KH*KW) @ cols; the weight gradient is one GEMM over the same
// columns, dweight = dy(O, N*HO*WO) @ cols^T; the input gradient is the GEMM
// dcols = weight^T @ dy followed by conv_col2im below. Both GEMMs are cuBLAS through CuPy.
#include "common.cuh"

// One thread per column-matrix entry, in the grid-stride loop: consecutive threads take
// consecutive wo, so the writes are contiguous and the reads are contiguous for SW = 1.
template <typename T>
__global__ void conv_im2col(const T* __restrict__ x, int N, int C, int H, int W, int KH, int KW,
                            int SH, int SW, int PH, int PW, int HO, int WO, long long total,
                            T* __restrict__ cols) {
    const long long L = (long long)N * HO * WO;
    GPUNET_GRID_STRIDE_LOOP(idx, total) {
        const long long row = idx / L, col = idx - row * L;
        const int wo = (int)(col % WO);
        const long long t = col / WO;
        const int ho = (int)(t % HO), n = (int)(t / HO);
        const int j = (int)(row % KW), i = (int)((row / KW) % KH), c = (int)(row / (KW * KH));
        const int h = ho * SH - PH + i, w = wo * SW - PW + j;
        cols[idx] = (h >= 0 && h < H && w >= 0 && w < W)
                        ? x[(((long long)n * C + c) * H + h) * W + w]
                        : T(0);
    }
}

// The input gradient as a gather, the adjoint of conv_im2col: one thread per input element
// (n, c, h, w) adds the column-gradient entries that im2col copied from it, i.e. the output
// positions (ho, wo) whose window covers it, each at its kernel offset (i, j). Every dx entry
// is written exactly once by one thread: no atomics, and a fixed summation order.
template <typename T>
__global__ void conv_col2im(const T* __restrict__ dcols, int N, int C, int H, int W, int KH,
                            int KW, int SH, int SW, int PH, int PW, int HO, int WO,
                            long long total, T* __restrict__ dx) {
    const long long L = (long long)N * HO * WO;
    GPUNET_GRID_STRIDE_LOOP(idx, total) {
        const int w = (int)(idx % W);
        long long t = idx / W;
        const int h = (int)(t % H);
        t /= H;
        const int c = (int)(t % C), n = (int)(t / C);
        const int hp = h + PH, wp = w + PW;  // position in the padded input
        // windows covering hp: ho*SH <= hp <= ho*SH + KH - 1, and 0 <= ho < HO
        const int ho0 = hp < KH ? 0 : (hp - KH) / SH + 1, ho1 = min(hp / SH + 1, HO);
        const int wo0 = wp < KW ? 0 : (wp - KW) / SW + 1, wo1 = min(wp / SW + 1, WO);
        T sum = 0;
        for (int ho = ho0; ho < ho1; ++ho) {
            const int i = hp - ho * SH;
            for (int wo = wo0; wo < wo1; ++wo) {
                const int j = wp - wo * SW;
                sum += dcols[((long long)(c * KH + i) * KW + j) * L + ((long long)n * HO + ho) * WO +
                             wo];
            }
        }
        dx[idx] = sum;
    }
}

// The bias gradient: dbias[o] = sum over n, ho, wo of dy[n][o][ho][wo], the deterministic
// two-stage reduction of common.cuh. Stage 1 on a (O, chunks) grid of 1-D blocks (blockDim.x
// a multiple of 32, at most 1024): block (o, k) sums chunk k of channel o's N*HW values, walking
// them with hw fastest (coalesced reads once HW >= 32), into partials[o][k]. With a 1-D grid
// (chunks = 1) that is dbias itself; otherwise conv_bias_grad_finish adds each channel's
// partials in a fixed order. gpunet.backends.kernel_ops.reduction_grid chooses the grid.
template <typename T>
__global__ void conv_bias_grad(const T* __restrict__ dy, int N, int O, int HW,
                               T* __restrict__ partials) {
    gpunet_reduce_nchw<1>(N, O, HW, [&](long long at, T (&acc)[1]) { acc[0] += dy[at]; },
                          partials);
}

// Stage 2: dbias[o] = sum over k of partials[o][k], one warp per channel.
template <typename T>
__global__ void conv_bias_grad_finish(const T* __restrict__ partials, int O, int chunks,
                                      T* __restrict__ dbias) {
    gpunet_sum_partials(partials, O, chunks, dbias);
}
