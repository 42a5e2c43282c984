// 2-D max pooling, both directions.
//
// x is (N, C, H, W) seen as NC = N*C planes of H x W; y, dy and index are (NC, HO, WO), all
// C-contiguous. Windows are KH x KW with stride SH x SW over x padded by PH x PW on each side
// (padding never wins: it acts as -infinity, and PH <= KH/2, PW <= KW/2 keep a real element
// in every window). index[p][ho][wo] = i*KW + j, the kernel offset of the window's FIRST
// maximum in row-major order; the gradient goes there alone, so overlapping windows
// (stride < kernel) may send several gradients to one input element.
#include "common.cuh"

// One thread per output element.
template <typename T>
__global__ void maxpool_forward(const T* __restrict__ x, int NC, int H, int W, int KH, int KW,
                                int SH, int SW, int PH, int PW, int HO, int WO,
                                long long total, T* __restrict__ y, int* __restrict__ index) {
    GPUNET_GRID_STRIDE_LOOP(idx, total) {
        const int wo = (int)(idx % WO);
        const long long t = idx / WO;
        const int ho = (int)(t % HO);
        const long long p = t / HO;
        const T* plane = x + p * H * W;
        const int h0 = ho * SH - PH, w0 = wo * SW - PW;
        T best = 0;
        int arg = -1;
        for (int i = 0; i < KH; ++i) {
            const int h = h0 + i;
            if (h < 0 || h >= H) continue;
            for (int j = 0; j < KW; ++j) {
                const int w = w0 + j;
                if (w < 0 || w >= W) continue;
                const T v = plane[h * W + w];
                if (arg < 0 || v > best) {  // strictly greater: a later tie never wins
                    best = v;
                    arg = i * KW + j;
                }
            }
        }
        y[idx] = best;
        index[idx] = arg;
    }
}

// The input gradient as a gather: one thread per input element adds dy of every window that
// covers it and chose it as its maximum. No atomics; a fixed summation order.
template <typename T>
__global__ void maxpool_backward(const T* __restrict__ dy, const int* __restrict__ index, int NC,
                                 int H, int W, int KH, int KW, int SH, int SW, int PH, int PW,
                                 int HO, int WO, long long total, T* __restrict__ dx) {
    GPUNET_GRID_STRIDE_LOOP(idx, total) {
        const int w = (int)(idx % W);
        const long long t = idx / W;
        const int h = (int)(t % H);
        const long long p = t / H;
        const int hp = h + PH, wp = w + PW;  // position in the padded input
        // windows covering hp: ho*SH <= hp <= ho*SH + KH - 1, and 0 <= ho < HO
        const int ho0 = hp < KH ? 0 : (hp - KH) / SH + 1, ho1 = min(hp / SH + 1, HO);
        const int wo0 = wp < KW ? 0 : (wp - KW) / SW + 1, wo1 = min(wp / SW + 1, WO);
        const long long base = p * HO * WO;
        T sum = 0;
        for (int ho = ho0; ho < ho1; ++ho) {
            const int i = hp - ho * SH;
            for (int wo = wo0; wo < wo1; ++wo) {
                const long long at = base + (long long)ho * WO + wo;
                if (index[at] == i * KW + (wp - wo * SW)) sum += dy[at];
            }
        }
        dx[idx] = sum;
    }
}
