// GELU, y = x * Phi(x) with Phi the standard normal CDF, and its input gradient, each in one
// pass (the generic NumPy/CuPy version takes some fifty array operations for erf alone).
//
//   exact (approx_tanh == 0): y = 0.5 x (1 + erf(x / sqrt(2)))
//                             dy/dx = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//   tanh  (approx_tanh != 0): u = sqrt(2 / pi) (x + 0.044715 x^3),  t = tanh(u)
//                             y = 0.5 x (1 + t)
//                             dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,
//                             du/dx = sqrt(2 / pi) (1 + 3 * 0.044715 x^2)
// PyTorch's formulas (torch.nn.GELU). x, y, dy and dx have `total` elements, C-contiguous.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ T gelu_tanh_of(T x) {
    return tanh(T(0.7978845608028654) * (x + T(0.044715) * x * x * x));
}

template <typename T>
__global__ void gelu_forward(const T* __restrict__ x, long long total, int approx_tanh,
                             T* __restrict__ y) {
    GPUNET_GRID_STRIDE_LOOP(i, total) {
        const T v = x[i];
        const T s = approx_tanh ? gelu_tanh_of(v) : erf(v * T(0.7071067811865476));
        y[i] = T(0.5) * v * (T(1) + s);
    }
}

template <typename T>
__global__ void gelu_backward(const T* __restrict__ dy, const T* __restrict__ x, long long total,
                              int approx_tanh, T* __restrict__ dx) {
    GPUNET_GRID_STRIDE_LOOP(i, total) {
        const T v = x[i];
        T slope;
        if (approx_tanh) {
            const T t = gelu_tanh_of(v);
            const T du = T(0.7978845608028654) * (T(1) + T(3 * 0.044715) * v * v);
            slope = T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * du;
        } else {
            const T cdf = T(0.5) * (T(1) + erf(v * T(0.7071067811865476)));
            slope = cdf + v * exp(T(-0.5) * v * v) * T(0.3989422804014327);
        }
        dx[i] = dy[i] * slope;
    }
}
