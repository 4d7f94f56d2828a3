/* Batch-invariant float32 linear layer for x86-64 CPUs with AVX2 and FMA.
 *
 * y[m, n] = bias[n] + sum_k x[m, k] * w[n, k]      x: [M, K], w: [N, K] (row-major), y: [M, N]
 *
 * Every output element is reduced in one fixed order: eight lane accumulators walk k in steps
 * of 8 with fused multiply-adds, are summed pairwise in a fixed tree, then the k % 8 tail is
 * added in order, then the bias. That order depends on K only, never on M, on the tile a row
 * lands in or on the thread that computes it, so a row's result is bit-identical whether it is
 * computed alone (decode) or with other rows (verification of drafted tokens, batches).
 *
 * Decode and verification read each weight once per call: threads split the output features,
 * and each thread keeps a tile of 4 weight rows in L1 while it sweeps every row of x.
 */
#include <immintrin.h>
#include <stdint.h>

static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);              /* lanes (0+4) (1+5) (2+6) (3+7) */
    __m128 t = _mm_movehl_ps(s, s);             /* (2+6) (3+7) */
    s = _mm_add_ps(s, t);                       /* (0+4)+(2+6), (1+5)+(3+7) */
    t = _mm_shuffle_ps(s, s, 0x55);
    return _mm_cvtss_f32(_mm_add_ss(s, t));
}

static inline float finish(__m256 acc, const float* xr, const float* wr, int64_t k8, int64_t K,
                           const float* bias, int64_t n) {
    float s = hsum8(acc);
    for (int64_t k = k8; k < K; ++k) s += xr[k] * wr[k];
    if (bias) s += bias[n];
    return s;
}

/* Rows [m0, m0 + 2) of x against weight rows [n0, n0 + 4). */
static inline void tile_2x4(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias,
                            float* y, int64_t ldy, int64_t m0, int64_t n0) {
    const int64_t k8 = K & ~(int64_t)7;
    const float *x0 = x + m0 * ldx, *x1 = x0 + ldx;
    const float *w0 = w + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (int64_t k = 0; k < k8; k += 8) {
        __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
        __m256 v2 = _mm256_loadu_ps(w2 + k), v3 = _mm256_loadu_ps(w3 + k);
        __m256 u = _mm256_loadu_ps(x0 + k);
        a00 = _mm256_fmadd_ps(u, v0, a00); a01 = _mm256_fmadd_ps(u, v1, a01);
        a02 = _mm256_fmadd_ps(u, v2, a02); a03 = _mm256_fmadd_ps(u, v3, a03);
        u = _mm256_loadu_ps(x1 + k);
        a10 = _mm256_fmadd_ps(u, v0, a10); a11 = _mm256_fmadd_ps(u, v1, a11);
        a12 = _mm256_fmadd_ps(u, v2, a12); a13 = _mm256_fmadd_ps(u, v3, a13);
    }
    float* y0 = y + m0 * ldy + n0;
    float* y1 = y0 + ldy;
    y0[0] = finish(a00, x0, w0, k8, K, bias, n0);     y0[1] = finish(a01, x0, w1, k8, K, bias, n0 + 1);
    y0[2] = finish(a02, x0, w2, k8, K, bias, n0 + 2); y0[3] = finish(a03, x0, w3, k8, K, bias, n0 + 3);
    y1[0] = finish(a10, x1, w0, k8, K, bias, n0);     y1[1] = finish(a11, x1, w1, k8, K, bias, n0 + 1);
    y1[2] = finish(a12, x1, w2, k8, K, bias, n0 + 2); y1[3] = finish(a13, x1, w3, k8, K, bias, n0 + 3);
}

/* Row m of x against weight rows [n0, n0 + 4). */
static inline void tile_1x4(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias,
                            float* y, int64_t ldy, int64_t m, int64_t n0) {
    const int64_t k8 = K & ~(int64_t)7;
    const float* x0 = x + m * ldx;
    const float *w0 = w + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < k8; k += 8) {
        __m256 u = _mm256_loadu_ps(x0 + k);
        a0 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w0 + k), a0);
        a1 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w1 + k), a1);
        a2 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w2 + k), a2);
        a3 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w3 + k), a3);
    }
    float* y0 = y + m * ldy + n0;
    y0[0] = finish(a0, x0, w0, k8, K, bias, n0);     y0[1] = finish(a1, x0, w1, k8, K, bias, n0 + 1);
    y0[2] = finish(a2, x0, w2, k8, K, bias, n0 + 2); y0[3] = finish(a3, x0, w3, k8, K, bias, n0 + 3);
}

/* Row m of x against the single weight row n. */
static inline void tile_1x1(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias,
                            float* y, int64_t ldy, int64_t m, int64_t n) {
    const int64_t k8 = K & ~(int64_t)7;
    const float* x0 = x + m * ldx;
    const float* w0 = w + n * K;
    __m256 a = _mm256_setzero_ps();
    for (int64_t k = 0; k < k8; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), _mm256_loadu_ps(w0 + k), a);
    y[m * ldy + n] = finish(a, x0, w0, k8, K, bias, n);
}

/* Rows of x are processed in chunks of this many so that a chunk of x stays in L2 while the
 * weight tiles stream past it; the per-element order above does not depend on it. */
#define M_CHUNK 64

void qd_linear_f32(const float* x, int64_t M, int64_t ldx, const float* w, int64_t N, int64_t K,
                   const float* bias, float* y, int64_t ldy, int num_threads) {
    const int64_t n4 = N / 4;
    for (int64_t mc = 0; mc < M; mc += M_CHUNK) {
        const int64_t me = mc + M_CHUNK < M ? mc + M_CHUNK : M;
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t t = 0; t < n4; ++t) {
            const int64_t n0 = 4 * t;
            int64_t m = mc;
            for (; m + 2 <= me; m += 2) tile_2x4(x, ldx, w, K, bias, y, ldy, m, n0);
            for (; m < me; ++m) tile_1x4(x, ldx, w, K, bias, y, ldy, m, n0);
        }
        for (int64_t n = 4 * n4; n < N; ++n)
            for (int64_t m = mc; m < me; ++m) tile_1x1(x, ldx, w, K, bias, y, ldy, m, n);
    }
}
