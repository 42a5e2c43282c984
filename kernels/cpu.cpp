// The CPU device's compiled loops, float32 only (float64 stays NumPy: the reference every
// other device is tested against), and the pool of threads that runs them and the GEMMs.
// Each formula is one pass over its arrays, where NumPy needs one pass per operation and a
// temporary between them. Built on first use by gpunet/backends/native.py with the
// machine's own compiler, for the machine's own ISA (-O3 -march=native); without a compiler
// the CPU device keeps its NumPy code.
//
// Layout: (N, C, HW) C-contiguous ((N, C) data has HW = 1). Each loop below takes a range
// [n0, n1) of samples (or elements, planes, rows; the GEMM kernels panels of columns or
// channels, the correlation pixels); the exported *_mt entry points at the end cut the whole
// range among the pool's threads. Per-channel sums are accumulated in double
// per range and the ranges added in order.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include <immintrin.h>
#include <unistd.h>

#define EXPORT extern "C" __attribute__((visibility("default")))

using i64 = std::int64_t;

// sum[c] = sum over n in [n0, n1) and p of x[n, c, p]
static void channel_sum(const float* x, i64 n0, i64 n1, i64 c, i64 hw, double* sum) {
    for (i64 j = 0; j < c; ++j) sum[j] = 0.0;
    for (i64 n = n0; n < n1; ++n)
        for (i64 j = 0; j < c; ++j) {
            const float* row = x + (n * c + j) * hw;
            float s = 0.0f;  // a row at a time in float (vectorised), rows added in double
#pragma omp simd reduction(+ : s)
            for (i64 p = 0; p < hw; ++p) s += row[p];
            sum[j] += s;
        }
}

// out[c] = sum of (x - mean[c])^2 over n in [n0, n1) and p
static void channel_sq_dev(const float* x, i64 n0, i64 n1, i64 c, i64 hw, const float* mean,
                           double* out) {
    for (i64 j = 0; j < c; ++j) out[j] = 0.0;
    for (i64 n = n0; n < n1; ++n)
        for (i64 j = 0; j < c; ++j) {
            const float* row = x + (n * c + j) * hw;
            const float m = mean[j];
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (i64 p = 0; p < hw; ++p) { const float d = row[p] - m; s += d * d; }
            out[j] += s;
        }
}

// y = (x - mean[c]) scale[c] + shift[c]
static void batchnorm_apply(const float* x, float* y, i64 n0, i64 n1, i64 c, i64 hw,
                            const float* mean, const float* scale, const float* shift) {
    for (i64 n = n0; n < n1; ++n)
        for (i64 j = 0; j < c; ++j) {
            const i64 o = (n * c + j) * hw;
            const float m = mean[j], k = scale[j], b = shift[j];
            for (i64 p = 0; p < hw; ++p) y[o + p] = (x[o + p] - m) * k + b;
        }
}

// sum_dy[c] = sum dy, sum_dyc[c] = sum dy (x - mean[c])
static void batchnorm_sums(const float* dy, const float* x, i64 n0, i64 n1, i64 c, i64 hw,
                           const float* mean, double* sum_dy, double* sum_dyc) {
    for (i64 j = 0; j < c; ++j) sum_dy[j] = sum_dyc[j] = 0.0;
    for (i64 n = n0; n < n1; ++n)
        for (i64 j = 0; j < c; ++j) {
            const i64 o = (n * c + j) * hw;
            const float m = mean[j];
            float a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
            for (i64 p = 0; p < hw; ++p) { a += dy[o + p]; b += dy[o + p] * (x[o + p] - m); }
            sum_dy[j] += a;
            sum_dyc[j] += b;
        }
}

// dx = k[c] dy + coef[c] (x - mean[c]) + shift[c]
static void batchnorm_dx(const float* dy, const float* x, float* dx, i64 n0, i64 n1, i64 c,
                         i64 hw, const float* mean, const float* k, const float* coef,
                         const float* shift) {
    for (i64 n = n0; n < n1; ++n)
        for (i64 j = 0; j < c; ++j) {
            const i64 o = (n * c + j) * hw;
            const float m = mean[j], kj = k[j], cj = coef[j], sj = shift[j];
            for (i64 p = 0; p < hw; ++p)
                dx[o + p] = kj * dy[o + p] + cj * (x[o + p] - m) + sj;
        }
}

// y = max(x, 0) over [i0, i1); NaN stays NaN, as np.maximum keeps it
static void relu(const float* x, float* y, i64 i0, i64 i1) {
    for (i64 i = i0; i < i1; ++i) {
        const float v = x[i];
        y[i] = (v > 0.0f) | (v != v) ? v : 0.0f;
    }
}

// dx = dy where x > 0, else 0
static void relu_backward(const float* dy, const float* x, float* dx, i64 i0, i64 i1) {
    for (i64 i = i0; i < i1; ++i) dx[i] = x[i] > 0.0f ? dy[i] : 0.0f;
}

// tanh as Eigen computes it for float (generic_fast_tanh_float): a 13/6 rational function on
// [-7.9053, 7.9053], where it reaches +-1 in float; a few ulp from tanhf, and a loop of it
// vectorises, where a loop of tanhf calls libm once per element (5x slower here for the
// LSTM's (32, 1024) gates). NaN passes through std::max and std::min.
static inline float tanh_f(float x) {
    const float c = 7.90531110763549805f;
    const float z = std::min(std::max(x, -c), c), z2 = z * z;  // NaN stays NaN (std::max/min)
    float p = -2.76076847742355e-16f;
    p = p * z2 + 2.00018790482477e-13f;
    p = p * z2 + -8.60467152213735e-11f;
    p = p * z2 + 5.12229709037114e-08f;
    p = p * z2 + 1.48572235717979e-05f;
    p = p * z2 + 6.37261928875436e-04f;
    p = p * z2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * z2 + 1.18534705686654e-04f;
    q = q * z2 + 2.26843463243900e-03f;
    q = q * z2 + 4.89352518554385e-03f;
    const float r = z * p / q;
    return std::fabs(z) < 0.0004f ? z : r;  // one select: AVX2 vectorises no && here
}

static inline float sigmoid(float z) { return 0.5f * tanh_f(0.5f * z) + 0.5f; }

// One LSTM step over rows [r0, r1) of (N, 4H) gate pre-activations, gates i, f, g, o:
// acts = [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)] of xg + hg, c = f c_prev + i g,
// h = o tanh(c) (gpunet.backends.Backend.lstm_cell_forward)
static void lstm_cell_forward(const float* xg, const float* hg, const float* c_prev,
                              float* acts, float* c, float* h, i64 r0, i64 r1, i64 hid) {
    for (i64 r = r0; r < r1; ++r) {
        const float *x = xg + r * 4 * hid, *g = hg + r * 4 * hid;
        float* a = acts + r * 4 * hid;
#pragma omp simd
        for (i64 q = 0; q < 2 * hid; ++q) a[q] = sigmoid(x[q] + g[q]);
#pragma omp simd
        for (i64 q = 2 * hid; q < 3 * hid; ++q) a[q] = tanh_f(x[q] + g[q]);
#pragma omp simd
        for (i64 q = 3 * hid; q < 4 * hid; ++q) a[q] = sigmoid(x[q] + g[q]);
#pragma omp simd
        for (i64 q = 0; q < hid; ++q) {
            const float cn = a[hid + q] * c_prev[r * hid + q] + a[q] * a[2 * hid + q];
            c[r * hid + q] = cn;
            h[r * hid + q] = a[3 * hid + q] * tanh_f(cn);
        }
    }
}

// Its backward (Backend.lstm_cell_backward): dh = dy + dh_rec, tc = tanh(c),
// dc = dc_next + dh o (1 - tc^2); dz_i = dc g i (1 - i), dz_f = dc c_prev f (1 - f),
// dz_g = dc i (1 - g^2), dz_o = dh tc o (1 - o); dc_prev = dc f
static void lstm_cell_backward(const float* dy, const float* dh_rec, const float* dc_next,
                               const float* acts, const float* c_prev, const float* c,
                               float* dz, float* dc_prev, i64 r0, i64 r1, i64 hid) {
    for (i64 r = r0; r < r1; ++r) {
        const float* a = acts + r * 4 * hid;
        float* z = dz + r * 4 * hid;
#pragma omp simd
        for (i64 q = 0; q < hid; ++q) {
            const i64 e = r * hid + q;
            const float i = a[q], f = a[hid + q], g = a[2 * hid + q], o = a[3 * hid + q];
            const float dh = dy[e] + dh_rec[e], tc = tanh_f(c[e]);
            const float dc = dc_next[e] + dh * o * (1.0f - tc * tc);
            z[q] = dc * g * i * (1.0f - i);
            z[hid + q] = dc * c_prev[e] * f * (1.0f - f);
            z[2 * hid + q] = dc * i * (1.0f - g * g);
            z[3 * hid + q] = dh * tc * o * (1.0f - o);
            dc_prev[e] = dc * f;
        }
    }
}

// The shifted-GEMM convolution's layout (CpuBackend._channel_major): channels [c0, c1) of
// x (N, C, H, W) into buf (C, N Hp Wp + tail), each image at row top, column left of a
// Hp x Wp frame of zeros, tail zeros after the last image.
static void to_channel_major(const float* x, float* buf, i64 n, i64 c, i64 h, i64 w, i64 top,
                             i64 left, i64 hp, i64 wp, i64 tail, i64 c0, i64 c1) {
    const i64 frame = hp * wp, len = n * frame + tail, right = wp - left - w;
    for (i64 j = c0; j < c1; ++j) {
        float* row = buf + j * len;
        for (i64 s = 0; s < n; ++s) {
            float* img = row + s * frame;
            const float* src = x + (s * c + j) * h * w;
            std::memset(img, 0, sizeof(float) * top * wp);
            for (i64 r = 0; r < h; ++r) {
                float* d = img + (top + r) * wp;
                std::memset(d, 0, sizeof(float) * left);
                std::memcpy(d + left, src + r * w, sizeof(float) * w);
                std::memset(d + left + w, 0, sizeof(float) * right);
            }
            std::memset(img + (top + h) * wp, 0, sizeof(float) * (hp - top - h) * wp);
        }
        std::memset(row + n * frame, 0, sizeof(float) * tail);
    }
}

// Back (CpuBackend._from_channel_major): samples [n0, n1) of y (N, O, Ho, Wo) from the top
// left Ho x Wo of each Hp x Wp frame of src (O, N Hp Wp), plus bias[o] unless bias is null.
static void from_channel_major(const float* src, float* y, i64 n, i64 o, i64 hp, i64 wp,
                               i64 ho, i64 wo, const float* bias, i64 n0, i64 n1) {
    for (i64 s = n0; s < n1; ++s)
        for (i64 k = 0; k < o; ++k) {
            const float* img = src + (k * n + s) * hp * wp;
            float* d = y + (s * o + k) * ho * wo;
            const float b = bias ? bias[k] : 0.0f;
            for (i64 r = 0; r < ho; ++r)
#pragma omp simd
                for (i64 q = 0; q < wo; ++q) d[r * wo + q] = img[r * wp + q] + b;
        }
}

// One SGD step in place (gpunet.optim.SGD, torch.optim.SGD without dampening):
// g' = g + weight_decay w; with a momentum buffer, buf = momentum buf + g' and
// g' = g' + momentum buf (Nesterov) or buf; w -= lr g'. One pass where NumPy makes four.
static void sgd_update(float* w, const float* g, float* buf, i64 n, float lr, float momentum,
                       float weight_decay, i64 nesterov) {
#pragma omp simd
    for (i64 i = 0; i < n; ++i) {
        float d = weight_decay != 0.0f ? g[i] + weight_decay * w[i] : g[i];
        if (buf) {
            const float b = momentum * buf[i] + d;
            buf[i] = b;
            d = nesterov ? d + momentum * b : b;
        }
        w[i] -= lr * d;
    }
}

// 2x2 max pooling with stride 2 and no padding, the common case, over planes [p0, p1) of
// (N C, H, W) (Backend.maxpool2d): each window's maximum and, in index (int32), the offset
// i kw + j of its first maximum in row-major order (a later tie never wins). Written for
// that case alone: a loop over any kernel and stride with bounds checks took 1.3 ms for
// LeNet's first pooling, this one 0.06 (other poolings keep the NumPy code).
static void maxpool2x2_forward(const float* __restrict x, float* __restrict y,
                               std::int32_t* __restrict index, i64 p0, i64 p1, i64 h, i64 w) {
    const i64 ho = h / 2, wo = w / 2;
    for (i64 p = p0; p < p1; ++p)
        for (i64 r = 0; r < ho; ++r)
            for (i64 q = 0; q < wo; ++q) {
                const float* a = x + (p * h + 2 * r) * w + 2 * q;
                float best = a[0];
                std::int32_t at = 0;
                if (a[1] > best) { best = a[1]; at = 1; }
                if (a[w] > best) { best = a[w]; at = 2; }
                if (a[w + 1] > best) { best = a[w + 1]; at = 3; }
                y[(p * ho + r) * wo + q] = best;
                index[(p * ho + r) * wo + q] = at;
            }
}

// Its backward: dx (zeroed here) gets each window's dy at its first maximum; an element that
// is the maximum of several overlapping windows gets their sum; padding gets nothing.
static void maxpool_backward(const float* dy, const std::int32_t* index, float* dx, i64 p0,
                             i64 p1, i64 h, i64 w, i64 kw, i64 sh, i64 sw, i64 ph, i64 pw,
                             i64 ho, i64 wo) {
    for (i64 p = p0; p < p1; ++p) {
        float* img = dx + p * h * w;
        std::memset(img, 0, sizeof(float) * h * w);
        for (i64 r = 0; r < ho; ++r)
            for (i64 q = 0; q < wo; ++q) {
                const i64 o = (p * ho + r) * wo + q;
                const i64 row = r * sh + index[o] / kw - ph, col = q * sw + index[o] % kw - pw;
                if (row >= 0 && row < h && col >= 0 && col < w) img[row * w + col] += dy[o];
            }
    }
}

// Direct stride-1 convolution for few input channels (LeNet's, an RGB input's), where a
// GEMM would multiply by a matrix of a few rows and the column matrix costs more than the
// arithmetic. x (N, C, H, W), weight (O, C, kh, kw), y (N, O, Ho, Wo) with Ho = H + 2 ph -
// kh + 1; samples [n0, n1). Each output row is a sum of C kh kw shifted input rows scaled by
// one weight each, a loop along the row that vectorises. pad: a scratch of C Hp Wp floats.
static void pad_sample(const float* x, float* pad, i64 c, i64 h, i64 w, i64 ph, i64 pw,
                       i64 hp, i64 wp) {
    std::memset(pad, 0, sizeof(float) * c * hp * wp);
    for (i64 k = 0; k < c; ++k)
        for (i64 r = 0; r < h; ++r)
            std::memcpy(pad + (k * hp + r + ph) * wp + pw, x + (k * h + r) * w, sizeof(float) * w);
}

static void conv_direct_forward(const float* x, const float* weight, const float* bias,
                                float* y, float* pad, i64 n0, i64 n1, i64 c, i64 h, i64 w,
                                i64 o, i64 kh, i64 kw, i64 ph, i64 pw) {
    const i64 hp = h + 2 * ph, wp = w + 2 * pw, ho = hp - kh + 1, wo = wp - kw + 1;
    for (i64 n = n0; n < n1; ++n) {
        pad_sample(x + n * c * h * w, pad, c, h, w, ph, pw, hp, wp);
        for (i64 m = 0; m < o; ++m)
            for (i64 r = 0; r < ho; ++r) {
                float* __restrict out = y + ((n * o + m) * ho + r) * wo;
                const float b = bias ? bias[m] : 0.0f;
#pragma omp simd
                for (i64 q = 0; q < wo; ++q) out[q] = b;
                for (i64 k = 0; k < c; ++k)
                    for (i64 i = 0; i < kh; ++i) {
                        const float* __restrict row = pad + (k * hp + r + i) * wp;
                        const float* wt = weight + ((m * c + k) * kh + i) * kw;
                        for (i64 j = 0; j < kw; ++j) {
                            const float v = wt[j];
#pragma omp simd
                            for (i64 q = 0; q < wo; ++q) out[q] += v * row[q + j];
                        }
                    }
            }
    }
}

// Its weight gradient over samples [n0, n1), written (not added) to dweight (O, C, kh, kw):
// dweight[m, k, i, j] = sum over n, r, q of dy[n, m, r, q] xpad[n, k, r + i, q + j].
static void conv_direct_dweight(const float* x, const float* dy, float* dweight, float* pad,
                                i64 n0, i64 n1, i64 c, i64 h, i64 w, i64 o, i64 kh, i64 kw,
                                i64 ph, i64 pw) {
    const i64 hp = h + 2 * ph, wp = w + 2 * pw, ho = hp - kh + 1, wo = wp - kw + 1;
    std::memset(dweight, 0, sizeof(float) * o * c * kh * kw);
    for (i64 n = n0; n < n1; ++n) {
        pad_sample(x + n * c * h * w, pad, c, h, w, ph, pw, hp, wp);
        for (i64 m = 0; m < o; ++m)
            for (i64 k = 0; k < c; ++k)
                for (i64 i = 0; i < kh; ++i)
                    for (i64 j = 0; j < kw; ++j) {
                        float s = 0.0f;
                        for (i64 r = 0; r < ho; ++r) {
                            const float* __restrict g = dy + ((n * o + m) * ho + r) * wo;
                            const float* __restrict row = pad + (k * hp + r + i) * wp + j;
#pragma omp simd reduction(+ : s)
                            for (i64 q = 0; q < wo; ++q) s += g[q] * row[q];
                        }
                        dweight[((m * c + k) * kh + i) * kw + j] += s;
                    }
    }
}


// Stride-1 convolution of few input channels into 8, 16 or 32 output channels, vectorised
// across the output channels: each output pixel is C kh kw multiply-adds of a weight vector
// (all O channels of one tap, wt laid out (C, kh, kw, O)) by one input value, Q pixels of a
// row at a time in registers. Where the column path would copy each input value kh kw times
// and multiply by a matrix of O rows, and loops along a row of 10 outputs (LeNet's second
// convolution) waste most of a vector. pad: C Hp Wp + Q floats of scratch.
template <int O, int Q>
static void conv_vec_sample(const float* pad, const float* wt, const float* bias, float* y,
                            i64 c, i64 hp, i64 wp, i64 kh, i64 kw, i64 ho, i64 wo) {
    for (i64 r = 0; r < ho; ++r)
        for (i64 q0 = 0; q0 < wo; q0 += Q) {
            float acc[Q][O];
            for (int t = 0; t < Q; ++t)
                for (int m = 0; m < O; ++m) acc[t][m] = bias ? bias[m] : 0.0f;
            for (i64 k = 0; k < c; ++k)
                for (i64 i = 0; i < kh; ++i) {
                    const float* row = pad + (k * hp + r + i) * wp + q0;
                    for (i64 j = 0; j < kw; ++j) {
                        const float* wv = wt + ((k * kh + i) * kw + j) * O;
                        for (int t = 0; t < Q; ++t) {
                            const float xv = row[t + j];  // past the row for t >= wo - q0: unused
#pragma omp simd
                            for (int m = 0; m < O; ++m) acc[t][m] += wv[m] * xv;
                        }
                    }
                }
            const i64 nq = wo - q0 < Q ? wo - q0 : Q;
            for (int m = 0; m < O; ++m)
                for (i64 t = 0; t < nq; ++t) y[(m * ho + r) * wo + q0 + t] = acc[t][m];
        }
}

// The weight gradient of one sample, added to dwt (C, kh, kw, O); dyt: its dy as (Ho Wo, O).
template <int O>
static void conv_vec_dweight_sample(const float* pad, const float* dyt, float* dwt, i64 c,
                                    i64 hp, i64 wp, i64 kh, i64 kw, i64 ho, i64 wo) {
    for (i64 k = 0; k < c; ++k)
        for (i64 i = 0; i < kh; ++i)
            for (i64 j = 0; j < kw; ++j) {
                float acc[O];
                float* out = dwt + ((k * kh + i) * kw + j) * O;
                for (int m = 0; m < O; ++m) acc[m] = out[m];
                for (i64 r = 0; r < ho; ++r) {
                    const float* row = pad + (k * hp + r + i) * wp + j;
                    const float* g = dyt + r * wo * O;
                    for (i64 q = 0; q < wo; ++q) {
                        const float xv = row[q];
#pragma omp simd
                        for (int m = 0; m < O; ++m) acc[m] += g[q * O + m] * xv;
                    }
                }
                for (int m = 0; m < O; ++m) out[m] = acc[m];
            }
}

// The adjoint of the stride-1 column matrix over padded rows (CpuBackend._uncolumns): dx of
// planes [p0, p1) of (N, C) from dcols (C, kh, kw, N, Ro Wp), Ro = Hp - kh + 1: each kernel
// offset's run added at offset i Wp + j of the padded plane, whose interior is dx.
static void uncolumns(const float* dcols, float* dx, float* acc, i64 p0, i64 p1, i64 n, i64 c,
                      i64 h, i64 w, i64 kh, i64 kw, i64 ph, i64 pw) {
    const i64 hp = h + 2 * ph, wp = w + 2 * pw, run = (hp - kh + 1) * wp;
    for (i64 p = p0; p < p1; ++p) {
        const i64 s = p / c, k = p % c;
        std::memset(acc, 0, sizeof(float) * (hp + 1) * wp);
        for (i64 i = 0; i < kh; ++i)
            for (i64 j = 0; j < kw; ++j) {
                const float* src = dcols + (((k * kh + i) * kw + j) * n + s) * run;
                float* dst = acc + i * wp + j;
#pragma omp simd
                for (i64 q = 0; q < run; ++q) dst[q] += src[q];
            }
        for (i64 r = 0; r < h; ++r)
            std::memcpy(dx + (p * h + r) * w, acc + (r + ph) * wp + pw, sizeof(float) * w);
    }
}

// ---- GEMM with a packed right operand ------------------------------------------------------
// C (M, N) = A (M, K) B (K, N), B packed once and used for many products: the recurrent
// layers multiply every step's (batch, H) state by the same W_h, 50 times per sequence in the
// LSTM benchmark. OpenBLAS packs B anew at every call and took 246 and 224 us for the
// LSTM's (32, 256) x (256, 1024) and (32, 1024) x (1024, 256) on one AVX2 core (Zen 3); this
// kernel, B packed once per sequence, 194 and 194 us. B is cut into panels of NR columns,
// stored k-major (packed[p K NR + k NR + j] = B[k, p NR + j], zeros past N); an MR x NR block
// of C is held in MR x NV vector registers while k runs over a KC-deep slice of the panel
// (KC NR floats, 16 KiB: L1-resident while the row blocks of A pass over it).
// AVX2: 6 x 16 (BLIS's Haswell shape, 12 accumulators of 16); AVX-512: 12 x 32 (24 of 32).
// Unaligned loads and stores: neither A, B nor C is aligned to a vector.
#ifdef __AVX512F__
constexpr int VW = 16, PACK_NV = 2, PACK_MR = 12;
typedef float vfloat __attribute__((vector_size(64)));
static inline vfloat splat(float x) { return (vfloat)_mm512_set1_ps(x); }
static inline vfloat load(const float* p) { return (vfloat)_mm512_loadu_ps(p); }
static inline void store(float* p, vfloat v) { _mm512_storeu_ps(p, (__m512)v); }
#elif defined(__AVX__)
constexpr int VW = 8, PACK_NV = 2, PACK_MR = 6;
typedef float vfloat __attribute__((vector_size(32)));
static inline vfloat splat(float x) { return (vfloat)_mm256_set1_ps(x); }
static inline vfloat load(const float* p) { return (vfloat)_mm256_loadu_ps(p); }
static inline void store(float* p, vfloat v) { _mm256_storeu_ps(p, (__m256)v); }
#else
constexpr int VW = 4, PACK_NV = 2, PACK_MR = 6;
typedef float vfloat __attribute__((vector_size(16)));
static inline vfloat splat(float x) { return (vfloat){x, x, x, x}; }
static inline vfloat load(const float* p) { vfloat v; std::memcpy(&v, p, sizeof v); return v; }
static inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
#endif
// KC: a KC x NR slice of a panel is 16 KiB, half of a 32 KiB L1d, so A's rows and C stay
// there too
constexpr i64 PACK_NR = VW * PACK_NV, PACK_KC = 4096 / PACK_NR;

// op(B) (k, n), rows ldb apart (trans: B is stored (n, k)), into panels [p0, p1) of packed
static void pack_b(const float* b, i64 ldb, bool trans, i64 k, i64 n, float* packed, i64 p0,
                   i64 p1) {
    for (i64 p = p0; p < p1; ++p) {
        float* dst = packed + p * k * PACK_NR;
        const i64 cols = std::min(PACK_NR, n - p * PACK_NR);
        for (i64 kk = 0; kk < k; ++kk, dst += PACK_NR) {
            for (i64 j = 0; j < cols; ++j)
                dst[j] = trans ? b[(p * PACK_NR + j) * ldb + kk] : b[kk * ldb + p * PACK_NR + j];
            for (i64 j = cols; j < PACK_NR; ++j) dst[j] = 0.0f;
        }
    }
}

// f(std::integral_constant<int, rows>{}) for a run-time 1 <= rows <= R: the register blocks
// below are templates on their row count, and a matrix's last block may be short
template <int R, class F>
static inline void with_rows(i64 rows, F f) {
    if constexpr (R > 1) {
        if (rows < R) return with_rows<R - 1>(rows, f);
    }
    f(std::integral_constant<int, R>{});
}

// One R x PACK_NR block of C (its first `cols` columns kept) from R rows of A (a[r]: row r
// at the slice's first k) and a kc-deep slice of a panel; added to C where `add`, else written
template <int R>
static inline void packed_block(const float* const* a, const float* bp, i64 kc, float* c,
                                i64 ldc, i64 cols, bool add) {
    vfloat acc[R][PACK_NV] = {};
    for (i64 kk = 0; kk < kc; ++kk) {
        vfloat bv[PACK_NV];
        for (int v = 0; v < PACK_NV; ++v) bv[v] = load(bp + kk * PACK_NR + v * VW);
        for (int r = 0; r < R; ++r) {
            const vfloat av = splat(a[r][kk]);
            for (int v = 0; v < PACK_NV; ++v) acc[r][v] += av * bv[v];
        }
    }
    for (int r = 0; r < R; ++r) {
        if (cols == PACK_NR) {
            for (int v = 0; v < PACK_NV; ++v) {
                float* dst = c + r * ldc + v * VW;
                store(dst, add ? load(dst) + acc[r][v] : acc[r][v]);
            }
        } else {
            float row[PACK_NR];
            for (int v = 0; v < PACK_NV; ++v) store(row + v * VW, acc[r][v]);
            for (i64 j = 0; j < cols; ++j) c[r * ldc + j] = add ? c[r * ldc + j] + row[j] : row[j];
        }
    }
}

// C[:, panels p0..p1) = A B (+ C where `add`), B packed by pack_b, row i of A at row_of(i)
// (A's rows need not be equally far apart: the convolution's weight gradient reads shifted
// runs of its input as rows)
template <class RowOf>
static void gemm_packed_rows(RowOf row_of, const float* packed, i64 m, i64 n, i64 k, float* c,
                             i64 ldc, bool add, i64 p0, i64 p1) {
    const float* rows[PACK_MR];
    for (i64 p = p0; p < p1; ++p) {
        const i64 cols = std::min(PACK_NR, n - p * PACK_NR);
        if (k == 0 && !add)  // an empty sum: the slices below never run
            for (i64 i = 0; i < m; ++i) std::fill_n(c + i * ldc + p * PACK_NR, cols, 0.0f);
        for (i64 k0 = 0; k0 < k; k0 += PACK_KC) {
            const i64 kc = std::min(PACK_KC, k - k0);
            const float* bp = packed + (p * k + k0) * PACK_NR;
            const bool add_here = add || k0 > 0;
            for (i64 i = 0; i < m; i += PACK_MR) {
                const i64 nr = std::min<i64>(PACK_MR, m - i);
                for (i64 r = 0; r < nr; ++r) rows[r] = row_of(i + r) + k0;
                float* cp = c + i * ldc + p * PACK_NR;
                with_rows<PACK_MR>(nr, [&](auto r) {
                    packed_block<decltype(r)::value>(rows, bp, kc, cp, ldc, cols, add_here); });
            }
        }
    }
}

static void gemm_packed(const float* a, i64 lda, const float* packed, i64 m, i64 n, i64 k,
                        float* c, i64 ldc, bool add, i64 p0, i64 p1) {
    gemm_packed_rows([=](i64 i) { return a + i * lda; }, packed, m, n, k, c, ldc, add, p0, p1);
}

// ---- the shifted convolution's correlation --------------------------------------------
// out (O, L) = sum over taps (i, j) and channels c of w[i, j, o, c] x[c, p + i wp + j], x a
// channel-major padded block (CpuBackend._correlate: the forward and the input gradient of
// stride-1 convolutions of 8 and more channels). Nine BLAS GEMMs of (O, C) x (C, L) each read
// and wrote all of out once per tap; here a block of CONV_MR output channels x CONV_NV vectors
// of pixels stays in registers over every tap and channel, its pixels loaded straight from
// x's rows (a shift is an offset, nothing is packed), and out is written once. wt: the
// weights as (kh kw C, O), so that one tap and channel's CONV_MR weights are adjacent.
#ifdef __AVX512F__
constexpr int CONV_MR = 8, CONV_NV = 3;  // 24 accumulators of 32 registers
#else
constexpr int CONV_MR = 6, CONV_NV = 2;  // 12 of 16: with 4 x 3, GCC re-read x's vectors
#endif
constexpr i64 CONV_PIX = CONV_NV * VW;

template <int R>
static inline void correlate_block(const float* x, i64 ldx, const float* wt, i64 o,
                                   const i64* offsets, i64 taps, i64 c, float* out, i64 ldo) {
    vfloat acc[R][CONV_NV] = {};
    for (i64 t = 0; t < taps; ++t) {
        const float* xt = x + offsets[t];
        const float* wtt = wt + t * c * o;
        for (i64 k = 0; k < c; ++k) {
            vfloat xv[CONV_NV];
            for (int v = 0; v < CONV_NV; ++v) xv[v] = load(xt + k * ldx + v * VW);
            for (int r = 0; r < R; ++r) {
                const vfloat wv = splat(wtt[k * o + r]);
                for (int v = 0; v < CONV_NV; ++v) acc[r][v] += wv * xv[v];
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < CONV_NV; ++v) store(out + r * ldo + v * VW, acc[r][v]);
}

// Pixels [p0, p1) of out; x's rows readable CONV_PIX columns past L - 1 + the largest offset
// (the last block of pixels is computed whole, into a scratch block)
static void correlate(const float* x, i64 ldx, const float* wt, i64 o, i64 c, i64 kh, i64 kw,
                      i64 wp, float* out, i64 length, i64 p0, i64 p1) {
    std::vector<i64> offsets(kh * kw);
    for (i64 i = 0; i < kh; ++i)
        for (i64 j = 0; j < kw; ++j) offsets[i * kw + j] = i * wp + j;
    const i64 taps = kh * kw;
    float part[CONV_MR * CONV_PIX];
    for (i64 p = p0; p < p1; p += CONV_PIX) {
        const i64 cols = std::min(CONV_PIX, p1 - p);
        for (i64 m = 0; m < o; m += CONV_MR) {
            const i64 rows = std::min<i64>(CONV_MR, o - m);
            const bool whole = cols == CONV_PIX;
            float* dst = whole ? out + m * length + p : part;
            const i64 ld = whole ? length : CONV_PIX;
            with_rows<CONV_MR>(rows, [&](auto r) {
                correlate_block<decltype(r)::value>(x + p, ldx, wt + m, o, offsets.data(), taps,
                                                    c, dst, ld); });
            if (!whole)
                for (i64 r = 0; r < rows; ++r)
                    std::memcpy(out + (m + r) * length + p, part + r * CONV_PIX,
                                cols * sizeof(float));
        }
    }
}

// The weight gradient of the same convolutions, transposed: dwt[k taps + t, m] = sum over
// p in [0, L) of x[k, p + off_t] dy[m, p] (t = i kw + j, off_t = i wp + j; CpuBackend.
// _backprop_shifted), where a column matrix was copied out for a BLAS GEMM. It is the packed
// GEMM (dwt = A dy^T) with A's rows the shifted runs of x, read in place, and dy^T packed
// (by pack_b, transposing); channels [k0, k1) here.
static void conv_dweight(const float* x, i64 ldx, const float* packed, i64 o, i64 kh, i64 kw,
                         i64 wp, i64 length, float* dwt, i64 k0, i64 k1) {
    const i64 taps = kh * kw;
    gemm_packed_rows([=](i64 row) {
        const i64 k = k0 + row / taps, t = row % taps;
        return x + k * ldx + (t / kw) * wp + t % kw;
    }, packed, (k1 - k0) * taps, o, length, dwt + k0 * taps * o, o, false, 0,
       (o + PACK_NR - 1) / PACK_NR);
}

// ---- gpunet's CPU threads ------------------------------------------------------------------
// One pool of worker threads for every loop above and for GEMMs (gemm_mt), the BLAS set to
// one thread when the pool starts (openblas_set_num_threads_local, which in the OpenBLAS
// NumPy ships sets the whole process's count: gpunet.backends.native). A worker spins SPIN_US after its last job before it sleeps:
// a dispatch then costs about a microsecond where Python's ThreadPoolExecutor took 88 us on
// this VM, and no BLAS worker spins on the cores that the loops need (OpenBLAS's spun after
// every threaded GEMM, and the loops next to them ran at a quarter of their speed).
namespace {

using Body = void (*)(void* ctx, i64 part, i64 parts);
constexpr i64 SPIN_US = 50;

struct Pool {
    std::vector<std::thread> workers;
    std::atomic<std::uint64_t> generation{0};
    std::atomic<i64> pending{0};
    Body body = nullptr;
    void* ctx = nullptr;
    i64 parts = 1;
    std::mutex mutex;
    std::condition_variable wake;
    std::mutex dispatch;  // one parallel region at a time (calls from several Python threads)
    pid_t pid = 0;
};

Pool* pool = nullptr;
int (*blas_local_threads)(int) = nullptr;

void work(Pool* p, i64 id) {
    if (blas_local_threads) blas_local_threads(1);
    std::uint64_t seen = 0;
    for (;;) {
        auto start = std::chrono::steady_clock::now();
        while (p->generation.load(std::memory_order_acquire) == seen) {
            if (std::chrono::steady_clock::now() - start > std::chrono::microseconds(SPIN_US)) {
                std::unique_lock<std::mutex> lock(p->mutex);
                p->wake.wait(lock, [&] {
                    return p->generation.load(std::memory_order_acquire) != seen; });
                break;
            }
            __builtin_ia32_pause();
        }
        seen = p->generation.load(std::memory_order_acquire);
        if (id < p->parts) p->body(p->ctx, id, p->parts);
        p->pending.fetch_sub(1, std::memory_order_acq_rel);
    }
}

// body(ctx, part, parts) for part in [0, parts), parts <= the pool's threads + 1, the calling
// thread taking part 0; returns when all are done
void run_parts(i64 parts, Body body, void* ctx) {
    if (parts <= 1 || pool == nullptr || pool->pid != getpid()) {  // a forked child: no workers
        body(ctx, 0, 1);
        return;
    }
    std::lock_guard<std::mutex> one(pool->dispatch);
    const i64 workers = static_cast<i64>(pool->workers.size());
    parts = parts > workers + 1 ? workers + 1 : parts;
    pool->body = body;
    pool->ctx = ctx;
    pool->parts = parts;
    pool->pending.store(workers, std::memory_order_release);
    {
        std::lock_guard<std::mutex> lock(pool->mutex);
        pool->generation.fetch_add(1, std::memory_order_acq_rel);
    }
    pool->wake.notify_all();
    body(ctx, 0, parts);
    while (pool->pending.load(std::memory_order_acquire) > 0) __builtin_ia32_pause();
}

// f(a, b) over [0, n) cut into up to `threads` ranges
template <class F>
void parallel_for(i64 n, i64 threads, F f) {
    struct Ctx { F* f; i64 n; } ctx{&f, n};
    run_parts(threads < n ? threads : n, [](void* c, i64 part, i64 parts) {
        auto* x = static_cast<Ctx*>(c);
        (*x->f)(x->n * part / parts, x->n * (part + 1) / parts);
    }, &ctx);
}

}  // namespace

// Start the pool with threads - 1 workers (a no-op once started in this process);
// blas_local: OpenBLAS's openblas_set_num_threads_local, or null.
EXPORT void pool_start(i64 threads, void* blas_local) {
    if (pool != nullptr && pool->pid == getpid()) return;
    blas_local_threads = reinterpret_cast<int (*)(int)>(blas_local);
    pool = new Pool();  // never freed: the workers live as long as the process
    pool->pid = getpid();
    for (i64 id = 1; id < threads; ++id) pool->workers.emplace_back(work, pool, id);
    for (auto& t : pool->workers) t.detach();
}

// The loops above over the whole batch, `threads` ways (the CPU device's entry points).
EXPORT void relu_mt(const float* x, float* y, i64 n, i64 threads) {
    parallel_for(n, threads, [=](i64 a, i64 b) { relu(x, y, a, b); });
}

EXPORT void relu_backward_mt(const float* dy, const float* x, float* dx, i64 n, i64 threads) {
    parallel_for(n, threads, [=](i64 a, i64 b) { relu_backward(dy, x, dx, a, b); });
}

// out[j] = the sum over k of partial[k size + j], k in order: the parts' sums added the same
// way whichever part finished first
template <class T, class U>
static void add_parts(const std::vector<T>& partial, i64 parts, i64 size, U* out) {
    for (i64 j = 0; j < size; ++j) {
        T s = 0;
        for (i64 k = 0; k < parts; ++k) s += partial[k * size + j];
        out[j] = s;
    }
}

// per-channel sums of each range, added in range order (the same result for the same
// threads, whatever finishes first)
template <class F>
static void channel_sums_mt(i64 n, i64 c, i64 outputs, double* out, i64 threads, F f) {
    const i64 parts = threads < n ? (threads < 1 ? 1 : threads) : (n < 1 ? 1 : n);
    std::vector<double> partial(parts * outputs * c, 0.0);
    double* base = partial.data();
    parallel_for(parts, parts, [=](i64 a, i64 b) {
        for (i64 k = a; k < b; ++k) f(n * k / parts, n * (k + 1) / parts, base + k * outputs * c);
    });
    add_parts(partial, parts, outputs * c, out);
}

EXPORT void channel_sum_mt(const float* x, i64 n, i64 c, i64 hw, double* sum, i64 threads) {
    channel_sums_mt(n, c, 1, sum, threads,
                    [=](i64 a, i64 b, double* o) { channel_sum(x, a, b, c, hw, o); });
}

EXPORT void channel_sq_dev_mt(const float* x, i64 n, i64 c, i64 hw, const float* mean,
                              double* out, i64 threads) {
    channel_sums_mt(n, c, 1, out, threads,
                    [=](i64 a, i64 b, double* o) { channel_sq_dev(x, a, b, c, hw, mean, o); });
}

// out: sum(dy) for the c channels, then sum(dy (x - mean))
EXPORT void batchnorm_sums_mt(const float* dy, const float* x, i64 n, i64 c, i64 hw,
                              const float* mean, double* out, i64 threads) {
    channel_sums_mt(n, c, 2, out, threads, [=](i64 a, i64 b, double* o) {
        batchnorm_sums(dy, x, a, b, c, hw, mean, o, o + c); });
}

EXPORT void batchnorm_apply_mt(const float* x, float* y, i64 n, i64 c, i64 hw,
                               const float* mean, const float* scale, const float* shift,
                               i64 threads) {
    parallel_for(n, threads, [=](i64 a, i64 b) {
        batchnorm_apply(x, y, a, b, c, hw, mean, scale, shift); });
}

EXPORT void batchnorm_dx_mt(const float* dy, const float* x, float* dx, i64 n, i64 c, i64 hw,
                            const float* mean, const float* k, const float* coef,
                            const float* shift, i64 threads) {
    parallel_for(n, threads, [=](i64 a, i64 b) {
        batchnorm_dx(dy, x, dx, a, b, c, hw, mean, k, coef, shift); });
}

EXPORT void maxpool2x2_forward_mt(const float* x, float* y, std::int32_t* index, i64 planes,
                                  i64 h, i64 w, i64 threads) {
    parallel_for(planes, threads, [=](i64 a, i64 b) { maxpool2x2_forward(x, y, index, a, b, h, w); });
}

EXPORT void maxpool_backward_mt(const float* dy, const std::int32_t* index, float* dx,
                                i64 planes, i64 h, i64 w, i64 kw, i64 sh, i64 sw, i64 ph,
                                i64 pw, i64 ho, i64 wo, i64 threads) {
    parallel_for(planes, threads, [=](i64 a, i64 b) {
        maxpool_backward(dy, index, dx, a, b, h, w, kw, sh, sw, ph, pw, ho, wo); });
}

EXPORT void to_channel_major_mt(const float* x, float* buf, i64 n, i64 c, i64 h, i64 w, i64 top,
                                i64 left, i64 hp, i64 wp, i64 tail, i64 threads) {
    parallel_for(c, threads, [=](i64 a, i64 b) {
        to_channel_major(x, buf, n, c, h, w, top, left, hp, wp, tail, a, b); });
}

EXPORT void from_channel_major_mt(const float* src, float* y, i64 n, i64 o, i64 hp, i64 wp,
                                  i64 ho, i64 wo, const float* bias, i64 threads) {
    parallel_for(n, threads, [=](i64 a, i64 b) {
        from_channel_major(src, y, n, o, hp, wp, ho, wo, bias, a, b); });
}

EXPORT void conv_direct_forward_mt(const float* x, const float* weight, const float* bias,
                                   float* y, i64 n, i64 c, i64 h, i64 w, i64 o, i64 kh, i64 kw,
                                   i64 ph, i64 pw, i64 threads) {
    parallel_for(n, threads, [=](i64 a, i64 b) {
        std::vector<float> pad(c * (h + 2 * ph) * (w + 2 * pw));
        conv_direct_forward(x, weight, bias, y, pad.data(), a, b, c, h, w, o, kh, kw, ph, pw);
    });
}

EXPORT void conv_direct_dweight_mt(const float* x, const float* dy, float* dweight, i64 n, i64 c,
                                   i64 h, i64 w, i64 o, i64 kh, i64 kw, i64 ph, i64 pw,
                                   i64 threads) {
    const i64 parts = threads < n ? (threads < 1 ? 1 : threads) : n, size = o * c * kh * kw;
    std::vector<float> partial(parts * size);
    float* base = partial.data();
    parallel_for(parts, parts, [=](i64 a, i64 b) {
        std::vector<float> pad(c * (h + 2 * ph) * (w + 2 * pw));
        for (i64 k = a; k < b; ++k)
            conv_direct_dweight(x, dy, base + k * size, pad.data(), n * k / parts,
                                n * (k + 1) / parts, c, h, w, o, kh, kw, ph, pw);
    });
    add_parts(partial, parts, size, dweight);
}

EXPORT void sgd_update_mt(float* w, const float* g, float* buf, i64 n, float lr, float momentum,
                          float weight_decay, i64 nesterov, i64 threads) {
    parallel_for(n, threads, [=](i64 a, i64 b) {
        sgd_update(w + a, g + a, buf ? buf + a : nullptr, b - a, lr, momentum, weight_decay,
                   nesterov); });
}

EXPORT void lstm_cell_forward_mt(const float* xg, const float* hg, const float* c_prev,
                                 float* acts, float* c, float* h, i64 rows, i64 hid,
                                 i64 threads) {
    parallel_for(rows, threads, [=](i64 a, i64 b) {
        lstm_cell_forward(xg, hg, c_prev, acts, c, h, a, b, hid); });
}

EXPORT void lstm_cell_backward_mt(const float* dy, const float* dh_rec, const float* dc_next,
                                  const float* acts, const float* c_prev, const float* c,
                                  float* dz, float* dc_prev, i64 rows, i64 hid, i64 threads) {
    parallel_for(rows, threads, [=](i64 a, i64 b) {
        lstm_cell_backward(dy, dh_rec, dc_next, acts, c_prev, c, dz, dc_prev, a, b, hid); });
}

// The LSTM's recurrence over a whole sequence in one call (Backend.lstm_sequence_forward):
// per step, hg = h_{t-1} W_h^T by the packed GEMM, then the cell; where Python looped over
// the steps, each of its 100 calls per step pair cost 10-20 us of argument handling alone.
// xg, acts (T, N, 4H); hs, cs (T + 1, N, H) with entry 0 the initial state; w: W_h^T packed.
EXPORT void lstm_sequence_forward_mt(const float* xg, const float* w, float* hs, float* cs,
                                     float* acts, i64 steps, i64 n, i64 hid, i64 gemm_threads,
                                     i64 cell_threads) {
    const i64 g = 4 * hid, s = n * hid, panels = (g + PACK_NR - 1) / PACK_NR;
    std::vector<float> hg_buf(n * g);
    float* hg = hg_buf.data();
    for (i64 t = 0; t < steps; ++t) {
        const float* h = hs + t * s;
        parallel_for(panels, gemm_threads, [=](i64 lo, i64 hi) {
            gemm_packed(h, hid, w, n, g, hid, hg, g, false, lo, hi); });
        parallel_for(n, cell_threads, [=](i64 a, i64 b) {
            lstm_cell_forward(xg + t * n * g, hg, cs + t * s, acts + t * n * g, cs + (t + 1) * s,
                              hs + (t + 1) * s, a, b, hid); });
    }
}

// Its backward from the last step (Backend.lstm_sequence_backward): the cell's backward into
// dz[t], then dh for step t - 1 = dz[t] W_h (w: W_h packed). dy (T, N, H); dh_T, dc_T the
// final state's gradients (only read); dh0, dc0 receive the initial state's.
EXPORT void lstm_sequence_backward_mt(const float* dy, const float* dh_T, const float* dc_T,
                                      const float* acts, const float* cs, const float* w,
                                      float* dz, float* dh0, float* dc0, i64 steps, i64 n,
                                      i64 hid, i64 gemm_threads, i64 cell_threads) {
    const i64 g = 4 * hid, s = n * hid, panels = (hid + PACK_NR - 1) / PACK_NR;
    std::vector<float> bufs(3 * s);
    float* dh_buf = bufs.data();
    float* dc_bufs[2] = {bufs.data() + s, bufs.data() + 2 * s};
    const float* dh = dh_T;
    const float* dc = dc_T;
    for (i64 k = 0; k < steps; ++k) {
        const i64 t = steps - 1 - k;
        float* dc_prev = dc_bufs[k % 2];  // not the one the cell reads as dc
        parallel_for(n, cell_threads, [=](i64 a, i64 b) {
            lstm_cell_backward(dy + t * s, dh, dc, acts + t * n * g, cs + t * s,
                               cs + (t + 1) * s, dz + t * n * g, dc_prev, a, b, hid); });
        parallel_for(panels, gemm_threads, [=](i64 lo, i64 hi) {  // the cell has read dh_buf
            gemm_packed(dz + t * n * g, g, w, n, hid, g, dh_buf, hid, false, lo, hi); });
        dh = dh_buf;
        dc = dc_prev;
    }
    std::memcpy(dh0, dh, s * sizeof(float));
    std::memcpy(dc0, dc, s * sizeof(float));
}

// C (M, N) = op(A) op(B) + beta C, row-major, through the CBLAS ILP64 GEMM `gemm`
// (sgemm or dgemm as `is_double` says), its columns (or rows, when M > N) cut `threads`
// ways, each piece a single-threaded BLAS call on one of the pool's threads.
using Sgemm = void (*)(int, int, int, i64, i64, i64, float, const float*, i64, const float*,
                       i64, float, float*, i64);
using Dgemm = void (*)(int, int, int, i64, i64, i64, double, const double*, i64,
                       const double*, i64, double, double*, i64);

EXPORT void gemm_mt(void* gemm, i64 is_double, i64 trans_a, i64 trans_b, i64 m, i64 n, i64 k,
                    const void* a, i64 lda, const void* b, i64 ldb, double beta, void* c,
                    i64 ldc, i64 threads) {
    const int ta = trans_a ? 112 : 111, tb = trans_b ? 112 : 111;
    const i64 size = is_double ? 8 : 4;
    const bool by_rows = m > n;
    parallel_for(by_rows ? m : n, threads, [=](i64 lo, i64 hi) {
        if (hi <= lo) return;
        // rows of op(A) and C, or columns of op(B) and C
        const char* pa = static_cast<const char*>(a);
        const char* pb = static_cast<const char*>(b);
        char* pc = static_cast<char*>(c);
        i64 mm = m, nn = n;
        if (by_rows) {
            pa += (trans_a ? lo : lo * lda) * size;
            pc += lo * ldc * size;
            mm = hi - lo;
        } else {
            pb += (trans_b ? lo * ldb : lo) * size;
            pc += lo * size;
            nn = hi - lo;
        }
        if (is_double)
            reinterpret_cast<Dgemm>(gemm)(101, ta, tb, mm, nn, k, 1.0,
                                          reinterpret_cast<const double*>(pa), lda,
                                          reinterpret_cast<const double*>(pb), ldb, beta,
                                          reinterpret_cast<double*>(pc), ldc);
        else
            reinterpret_cast<Sgemm>(gemm)(101, ta, tb, mm, nn, k, 1.0f,
                                          reinterpret_cast<const float*>(pa), lda,
                                          reinterpret_cast<const float*>(pb), ldb,
                                          static_cast<float>(beta), reinterpret_cast<float*>(pc),
                                          ldc);
    });
}

// The packed layout's panel width: op(B) (k, n) takes ceil(n / NR) NR k floats
EXPORT i64 packed_panel() { return PACK_NR; }

EXPORT void pack_b_mt(const float* b, i64 ldb, i64 trans, i64 k, i64 n, float* packed,
                      i64 threads) {
    parallel_for((n + PACK_NR - 1) / PACK_NR, threads, [=](i64 lo, i64 hi) {
        pack_b(b, ldb, trans, k, n, packed, lo, hi); });
}

// C = A B (+ C where add), its panels cut `threads` ways
EXPORT void gemm_packed_mt(const float* a, i64 lda, const float* packed, i64 m, i64 n, i64 k,
                           float* c, i64 ldc, i64 add, i64 threads) {
    parallel_for((n + PACK_NR - 1) / PACK_NR, threads, [=](i64 lo, i64 hi) {
        gemm_packed(a, lda, packed, m, n, k, c, ldc, add, lo, hi); });
}

// The correlation above over all L pixels, cut into blocks of pixels among `threads`;
// correlate_spare(): the columns x must have past L - 1 + the largest offset
EXPORT i64 correlate_spare() { return CONV_PIX; }

EXPORT void correlate_mt(const float* x, i64 ldx, const float* wt, i64 o, i64 c, i64 kh, i64 kw,
                         i64 wp, float* out, i64 length, i64 threads) {
    const i64 blocks = (length + CONV_PIX - 1) / CONV_PIX;
    parallel_for(blocks, threads, [=](i64 lo, i64 hi) {
        correlate(x, ldx, wt, o, c, kh, kw, wp, out, length, lo * CONV_PIX,
                  std::min(length, hi * CONV_PIX)); });
}

// The weight gradient above, written (not added) to dwt (C kh kw, O)
EXPORT void conv_dweight_mt(const float* x, i64 ldx, const float* dy, i64 ldy, i64 o, i64 c,
                            i64 kh, i64 kw, i64 wp, i64 length, float* dwt, i64 threads) {
    // dy^T packed once, its panels cut among the threads, then the channels (dwt's rows)
    const i64 panels = (o + PACK_NR - 1) / PACK_NR;
    std::unique_ptr<float[]> buf(new float[panels * PACK_NR * length]);  // no zero fill
    float* packed = buf.get();
    parallel_for(panels, threads, [=](i64 lo, i64 hi) {
        pack_b(dy, ldy, true, length, o, packed, lo, hi); });
    parallel_for(c, threads, [=](i64 lo, i64 hi) {
        conv_dweight(x, ldx, packed, o, kh, kw, wp, length, dwt, lo, hi); });
}

template <int O>
static void conv_vec_forward_o(const float* x, const float* wt, const float* bias, float* y,
                               i64 n, i64 c, i64 h, i64 w, i64 kh, i64 kw, i64 ph, i64 pw,
                               i64 threads) {
    constexpr int Q = O >= 32 ? 8 : 12;
    const i64 hp = h + 2 * ph, wp = w + 2 * pw, ho = hp - kh + 1, wo = wp - kw + 1;
    parallel_for(n, threads, [=](i64 a, i64 b) {
        std::vector<float> pad(c * hp * wp + Q + kw);
        for (i64 s = a; s < b; ++s) {
            pad_sample(x + s * c * h * w, pad.data(), c, h, w, ph, pw, hp, wp);
            conv_vec_sample<O, Q>(pad.data(), wt, bias, y + s * O * ho * wo, c, hp, wp, kh, kw,
                                  ho, wo);
        }
    });
}

template <int O>
static void conv_vec_dweight_o(const float* x, const float* dy, float* dwt, i64 n, i64 c,
                               i64 h, i64 w, i64 kh, i64 kw, i64 ph, i64 pw, i64 threads) {
    const i64 hp = h + 2 * ph, wp = w + 2 * pw, ho = hp - kh + 1, wo = wp - kw + 1;
    const i64 parts = threads < n ? (threads < 1 ? 1 : threads) : n, size = c * kh * kw * O;
    std::vector<float> partial(parts * size, 0.0f);
    float* base = partial.data();
    parallel_for(parts, parts, [=](i64 a, i64 b) {
        std::vector<float> pad(c * hp * wp + kw), dyt(ho * wo * O);
        for (i64 k = a; k < b; ++k)
            for (i64 s = n * k / parts; s < n * (k + 1) / parts; ++s) {
                pad_sample(x + s * c * h * w, pad.data(), c, h, w, ph, pw, hp, wp);
                const float* g = dy + s * O * ho * wo;
                for (int m = 0; m < O; ++m)
                    for (i64 p = 0; p < ho * wo; ++p) dyt[p * O + m] = g[m * ho * wo + p];
                conv_vec_dweight_sample<O>(pad.data(), dyt.data(), base + k * size, c, hp, wp,
                                           kh, kw, ho, wo);
            }
    });
    add_parts(partial, parts, size, dwt);
}

// The vectorised convolution (conv_vec_sample) for O in {6, 8, 16, 32}; weight as
// (C, kh, kw, O).
EXPORT void conv_vec_forward_mt(const float* x, const float* wt, const float* bias, float* y,
                                i64 n, i64 c, i64 h, i64 w, i64 o, i64 kh, i64 kw, i64 ph,
                                i64 pw, i64 threads) {
    if (o == 6) conv_vec_forward_o<6>(x, wt, bias, y, n, c, h, w, kh, kw, ph, pw, threads);
    if (o == 8) conv_vec_forward_o<8>(x, wt, bias, y, n, c, h, w, kh, kw, ph, pw, threads);
    if (o == 16) conv_vec_forward_o<16>(x, wt, bias, y, n, c, h, w, kh, kw, ph, pw, threads);
    if (o == 32) conv_vec_forward_o<32>(x, wt, bias, y, n, c, h, w, kh, kw, ph, pw, threads);
}

// Its weight gradient, written as (C, kh, kw, O).
EXPORT void conv_vec_dweight_mt(const float* x, const float* dy, float* dwt, i64 n, i64 c, i64 h,
                                i64 w, i64 o, i64 kh, i64 kw, i64 ph, i64 pw, i64 threads) {
    if (o == 6) conv_vec_dweight_o<6>(x, dy, dwt, n, c, h, w, kh, kw, ph, pw, threads);
    if (o == 8) conv_vec_dweight_o<8>(x, dy, dwt, n, c, h, w, kh, kw, ph, pw, threads);
    if (o == 16) conv_vec_dweight_o<16>(x, dy, dwt, n, c, h, w, kh, kw, ph, pw, threads);
    if (o == 32) conv_vec_dweight_o<32>(x, dy, dwt, n, c, h, w, kh, kw, ph, pw, threads);
}

EXPORT void uncolumns_mt(const float* dcols, float* dx, i64 n, i64 c, i64 h, i64 w, i64 kh,
                         i64 kw, i64 ph, i64 pw, i64 threads) {
    parallel_for(n * c, threads, [=](i64 a, i64 b) {
        std::vector<float> acc((h + 2 * ph + 1) * (w + 2 * pw));
        uncolumns(dcols, dx, acc.data(), a, b, n, c, h, w, kh, kw, ph, pw);
    });
}
