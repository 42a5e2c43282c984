// LSTM: the pointwise work of one time step, forward and backward, each in one fused pass.
//
// The matrix products stay with cuBLAS (through CuPy): the input projection of every time step
// is one GEMM before the loop, the recurrent projection one GEMM per step, the weight
// gradients one GEMM each after the loop. What is left per step is pointwise, and each kernel
// below does all of it in one read and one write of every array.
//
// Layouts (row-major, C-contiguous): gate arrays are (N, 4H) with the gates in PyTorch's
// order i, f, g, o (columns [0, H), [H, 2H), [2H, 3H), [3H, 4H)); state arrays are (N, H).
// One thread takes one (n, j) with j < H, so it reads the four gates of unit j of sample n;
// consecutive threads read consecutive addresses of each gate block.
//
// Forward, with z = xg + hg (xg = W_x x_t + b, hg = W_h h_{t-1}):
//   i = sigmoid(z_i), f = sigmoid(z_f), g = tanh(z_g), o = sigmoid(z_o)
//   c = f * c_prev + i * g,  h = o * tanh(c)
//   acts = [i, f, g, o] is kept for the backward pass (with c_prev and c).
// Backward, with dh = dy_t + dh_rec (dh_rec = dz_{t+1} W_h, or the final state's gradient):
//   tc = tanh(c),  dc = dc_next + dh * o * (1 - tc^2)
//   dz_i = dc * g * i (1 - i),     dz_f = dc * c_prev * f (1 - f)
//   dz_g = dc * i * (1 - g^2),     dz_o = dh * tc * o (1 - o)
//   dc_prev = dc * f
#include "common.cuh"

// 1 / (1 + e^-x): for very negative x, e^-x overflows to inf and the result is a clean 0.
template <typename T>
__device__ __forceinline__ T lstm_sigmoid(T x) {
    return T(1) / (T(1) + exp(-x));
}

template <typename T>
__global__ void lstm_forward(const T* __restrict__ xg, const T* __restrict__ hg,
                             const T* __restrict__ c_prev, int N, int H,
                             T* __restrict__ acts, T* __restrict__ c, T* __restrict__ h) {
    const long long total = (long long)N * H;
    GPUNET_GRID_STRIDE_LOOP(k, total) {
        const long long n = k / H;
        const long long j = k - n * H;
        const long long at = n * 4 * H + j;  // gate i of unit j; f, g, o follow at +H, +2H, +3H
        const T i = lstm_sigmoid(xg[at] + hg[at]);
        const T f = lstm_sigmoid(xg[at + H] + hg[at + H]);
        const T g = tanh(xg[at + 2 * H] + hg[at + 2 * H]);
        const T o = lstm_sigmoid(xg[at + 3 * H] + hg[at + 3 * H]);
        const T cn = f * c_prev[k] + i * g;
        acts[at] = i;
        acts[at + H] = f;
        acts[at + 2 * H] = g;
        acts[at + 3 * H] = o;
        c[k] = cn;
        h[k] = o * tanh(cn);
    }
}

template <typename T>
__global__ void lstm_backward(const T* __restrict__ dy, const T* __restrict__ dh_rec,
                              const T* __restrict__ dc_next, const T* __restrict__ acts,
                              const T* __restrict__ c_prev, const T* __restrict__ c, int N,
                              int H, T* __restrict__ dz, T* __restrict__ dc_prev) {
    const long long total = (long long)N * H;
    GPUNET_GRID_STRIDE_LOOP(k, total) {
        const long long n = k / H;
        const long long j = k - n * H;
        const long long at = n * 4 * H + j;
        const T i = acts[at], f = acts[at + H], g = acts[at + 2 * H], o = acts[at + 3 * H];
        const T tc = tanh(c[k]);
        const T dh = dy[k] + dh_rec[k];
        const T dc = dc_next[k] + dh * o * (T(1) - tc * tc);
        dz[at] = dc * g * i * (T(1) - i);
        dz[at + H] = dc * c_prev[k] * f * (T(1) - f);
        dz[at + 2 * H] = dc * i * (T(1) - g * g);
        dz[at + 3 * H] = dh * tc * o * (T(1) - o);
        dc_prev[k] = dc * f;
    }
}
