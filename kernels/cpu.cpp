// The CPU device's compiled loops, float32 only (float64 stays NumPy: the reference every
// other device is tested against). Each formula is one pass over its arrays, where NumPy
// needs one pass per operation and a temporary between them. Built on first use by
// gpunet/backends/native.py with the machine's own compiler, for the machine's own ISA
// (-O3 -march=native); without a compiler the CPU device keeps its NumPy code.
//
// Layout: (N, C, HW) C-contiguous ((N, C) data has HW = 1). Every function takes the
// sample range [n0, n1), so that threads can share a batch; per-channel sums are written
// for that range alone (the caller adds the ranges' sums) and accumulated in double.
#include <cmath>
#include <cstdint>
#include <cstring>

#define EXPORT extern "C" __attribute__((visibility("default")))

using i64 = std::int64_t;

// sum[c] = sum over n in [n0, n1) and p of x[n, c, p]
EXPORT void channel_sum(const float* x, i64 n0, i64 n1, i64 c, i64 hw, double* sum) {
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
EXPORT void channel_sq_dev(const float* x, i64 n0, i64 n1, i64 c, i64 hw, const float* mean,
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
EXPORT void batchnorm_apply(const float* x, float* y, i64 n0, i64 n1, i64 c, i64 hw,
                            const float* mean, const float* scale, const float* shift) {
    for (i64 n = n0; n < n1; ++n)
        for (i64 j = 0; j < c; ++j) {
            const i64 o = (n * c + j) * hw;
            const float m = mean[j], k = scale[j], b = shift[j];
            for (i64 p = 0; p < hw; ++p) y[o + p] = (x[o + p] - m) * k + b;
        }
}

// sum_dy[c] = sum dy, sum_dyc[c] = sum dy (x - mean[c])
EXPORT void batchnorm_sums(const float* dy, const float* x, i64 n0, i64 n1, i64 c, i64 hw,
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
EXPORT void batchnorm_dx(const float* dy, const float* x, float* dx, i64 n0, i64 n1, i64 c,
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
EXPORT void relu(const float* x, float* y, i64 i0, i64 i1) {
    for (i64 i = i0; i < i1; ++i) y[i] = x[i] > 0.0f ? x[i] : (x[i] != x[i] ? x[i] : 0.0f);
}

// dx = dy where x > 0, else 0
EXPORT void relu_backward(const float* dy, const float* x, float* dx, i64 i0, i64 i1) {
    for (i64 i = i0; i < i1; ++i) dx[i] = x[i] > 0.0f ? dy[i] : 0.0f;
}

// tanh as Eigen computes it for float (generic_fast_tanh_float): a 13/6 rational function on
// [-7.9053, 7.9053], where it reaches +-1 in float; a few ulp from tanhf, and a loop of it
// vectorises, where a loop of tanhf calls libm once per element (5x slower here for the
// LSTM's (32, 1024) gates). NaN passes through: every comparison with it is false.
static inline float tanh_f(float x) {
    const float c = 7.90531110763549805f;
    const float z = x > c ? c : (x < -c ? -c : x), z2 = z * z;
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
    return (z < 0.0004f && z > -0.0004f) ? z : r;
}

static inline float sigmoid(float z) { return 0.5f * tanh_f(0.5f * z) + 0.5f; }

// One LSTM step over rows [r0, r1) of (N, 4H) gate pre-activations, gates i, f, g, o:
// acts = [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)] of xg + hg, c = f c_prev + i g,
// h = o tanh(c) (gpunet.backends.Backend.lstm_cell_forward)
EXPORT void lstm_cell_forward(const float* xg, const float* hg, const float* c_prev,
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
EXPORT void lstm_cell_backward(const float* dy, const float* dh_rec, const float* dc_next,
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
EXPORT void to_channel_major(const float* x, float* buf, i64 n, i64 c, i64 h, i64 w, i64 top,
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
EXPORT void from_channel_major(const float* src, float* y, i64 n, i64 o, i64 hp, i64 wp,
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
EXPORT void sgd_update(float* w, const float* g, float* buf, i64 n, float lr, float momentum,
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
EXPORT void maxpool2x2_forward(const float* __restrict x, float* __restrict y,
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
EXPORT void maxpool_backward(const float* dy, const std::int32_t* index, float* dx, i64 p0,
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

EXPORT void conv_direct_forward(const float* x, const float* weight, const float* bias,
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
EXPORT void conv_direct_dweight(const float* x, const float* dy, float* dweight, float* pad,
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
