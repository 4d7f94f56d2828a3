/* Small float32 operations of a decoder layer, fused so that a decode step is a handful of
 * calls instead of dozens of tensor operations (x86-64, AVX2 + FMA). Each output element is
 * computed in a fixed order that depends only on its own row, so results are batch-invariant.
 */
#include "simd_f32.h"
#include <math.h>
#include <stdint.h>
#include <string.h>

/* out[m] = w * (x[m] / sqrt(mean(x[m]^2) + eps)) for M rows of length H (row strides ldx, ldo).
 * Also used per head (rows of head_dim) for Qwen3's q/k norms. */
void qd_rms_norm_f32(const float* x, int64_t M, int64_t ldx, int64_t H, const float* w, float eps,
                     float* out, int64_t ldo, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M > 16)
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * ldx;
        float* orow = out + m * ldo;
        const int64_t h8 = H & ~(int64_t)7;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < h8; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum8(acc);
        for (int64_t i = h8; i < H; ++i) ss += xr[i] * xr[i];
        const float r = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t i = 0; i < H; ++i) orow[i] = w[i] * (xr[i] * r);
    }
}

/* Rotary embedding (rotate-half form) in place on the first n_rot heads of each row of qkv
 * ([T, ld]; heads of D values, queries then keys), then the keys (heads H .. H + Hkv) and values
 * (the Hkv heads after them) are written to their cache slots ([slots, Hkv, D] each).
 * cos/sin: [max_positions, D] tables indexed by positions[t]. */
void qd_rope_cache_f32(float* qkv, int64_t T, int64_t ld, int64_t H, int64_t Hkv, int64_t D,
                       const float* cos_t, const float* sin_t, const int64_t* positions,
                       const int64_t* slot_mapping, float* k_cache, float* v_cache, int num_threads) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (T > 16)
    for (int64_t t = 0; t < T; ++t) {
        float* row = qkv + t * ld;
        const float* c = cos_t + positions[t] * D;
        const float* s = sin_t + positions[t] * D;
        float tmp[512];
        for (int64_t h = 0; h < H + Hkv; ++h) {
            float* x = row + h * D;
            memcpy(tmp, x, sizeof(float) * (size_t)D);
            for (int64_t i = 0; i < half; ++i) {
                x[i] = tmp[i] * c[i] + (-tmp[i + half]) * s[i];
                x[i + half] = tmp[i + half] * c[i + half] + tmp[i] * s[i + half];
            }
        }
        const int64_t slot = slot_mapping[t];
        memcpy(k_cache + slot * Hkv * D, row + H * D, sizeof(float) * (size_t)(Hkv * D));
        memcpy(v_cache + slot * Hkv * D, row + (H + Hkv) * D, sizeof(float) * (size_t)(Hkv * D));
    }
}

static inline __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
}

/* out[m, i] = silu(gu[m, i]) * gu[m, I + i] with silu(g) = g / (1 + exp(-g)); gu: [M, 2I].
 * Every element goes through the same 8-lane code (the tail through a padded copy). */
void qd_silu_mul_f32(const float* gu, int64_t M, int64_t I, float* out, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M > 16)
    for (int64_t m = 0; m < M; ++m) {
        const float* g = gu + m * 2 * I;
        const float* u = g + I;
        float* o = out + m * I;
        const int64_t i8 = I & ~(int64_t)7;
        for (int64_t i = 0; i < i8; i += 8)
            _mm256_storeu_ps(o + i, silu_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
        if (i8 < I) {
            float gt[8] = {0}, ut[8] = {0}, ot[8];
            memcpy(gt, g + i8, sizeof(float) * (size_t)(I - i8));
            memcpy(ut, u + i8, sizeof(float) * (size_t)(I - i8));
            _mm256_storeu_ps(ot, silu_mul8(_mm256_loadu_ps(gt), _mm256_loadu_ps(ut)));
            memcpy(o + i8, ot, sizeof(float) * (size_t)(I - i8));
        }
    }
}
