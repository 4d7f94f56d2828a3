/* Batch-invariant float32 linear layer for x86-64 CPUs with AVX2 and FMA.
 *
 * y[m, n] = (sum_k x[m, k] * w[n, k] + bias[n]) + residual[m, n]      x: [M, K], y: [M, N]
 * (bias and residual optional; y may be the residual itself, updated in place)
 *
 * The weight is stored packed in panels of 16 output features, [ceil(N / 16), K, 16] (see
 * qd_pack_f32), so that one pass over a panel streams 64 contiguous bytes per k. Each output
 * element is one lane of one accumulator, updated by a fused multiply-add for k = 0, 1, ..., K-1
 * in that order, then the bias and then the residual are added. That order depends on nothing
 * else: not on M, not on the tile of rows (or pair of panels) an element lands in, not on the
 * thread. A row's result is therefore bit-identical whether it is computed alone (decode) or with
 * other rows (verification of drafted tokens, batches, prefills), which is what keeps greedy
 * speculative decoding exact.
 *
 * Threads split the panels; each thread sweeps every row of x over a panel (a pair of panels for
 * up to SMALL_M rows) while it is in its L2 cache, so the weights are read from memory once per
 * call whatever M is. From 4 to SMALL_M rows (verification of drafts) the sweep goes block of k
 * by block of k, prefetching ahead, so that the extra FMAs overlap the weight stream.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* The panels' element type. Compiled once per type: float32 (qd_linear_f32), and float16 /
 * bfloat16 weights widened to float32 in registers (qd_linear_f16, qd_linear_bf16; -DQD_W16=1 or
 * 2). Widening is exact, so a 16-bit weight gives the bits of the float32 kernel on its float32
 * value. */
#if QD_W16 == 1
typedef uint16_t wtype;
#define LOADW(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p)))
#define QD_LINEAR qd_linear_f16
#elif QD_W16 == 2
typedef uint16_t wtype;
#define LOADW(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p))), 16))
#define QD_LINEAR qd_linear_bf16
#else
typedef float wtype;
#define LOADW(p) _mm256_loadu_ps(p)
#define QD_LINEAR qd_linear_f32
#endif

#define NR 16 /* output features per panel: two 8-lane vectors */
/* Software prefetch distance of the blocked two-panel sweep, in k (64 bytes per panel each);
 * prefetches past a panel's end are harmless hints. */
#ifndef PF_DIST
#define PF_DIST 128
#endif

#ifndef QD_W16
/* w: [N, K] row-major -> packed: [ceil(N / NR), K, NR], zero-padded past N. */
void qd_pack_f32(const float* w, int64_t N, int64_t K, float* packed) {
    const int64_t panels = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        float* dst = packed + p * K * NR;
        for (int64_t k = 0; k < K; ++k)
            for (int64_t c = 0; c < NR; ++c) {
                const int64_t n = p * NR + c;
                dst[k * NR + c] = n < N ? w[n * K + k] : 0.0f;
            }
    }
}
#endif

static inline void store_row(__m256 lo, __m256 hi, float* yr, const float* bias, const float* rr,
                             int64_t n0, int64_t ncols) {
    float out[NR];
    _mm256_storeu_ps(out, lo);
    _mm256_storeu_ps(out + 8, hi);
    if (bias)
        for (int64_t c = 0; c < ncols; ++c) out[c] = out[c] + bias[n0 + c];
    if (rr)
        for (int64_t c = 0; c < ncols; ++c) out[c] = rr[c] + out[c];
    memcpy(yr, out, sizeof(float) * (size_t)ncols);
}

/* Rows [m0, m0 + MR) of x against one panel: MR x 16 outputs in 2 * MR named accumulators
 * (named, not an array, so that they stay in registers). */
#define ACC_DECL(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
#define ACC_STEP(r)                                                                                  \
    {                                                                                                \
        const __m256 xb = _mm256_broadcast_ss(xr + (r) * ldx + k);                                   \
        c##r##0 = _mm256_fmadd_ps(xb, w0, c##r##0);                                                  \
        c##r##1 = _mm256_fmadd_ps(xb, w1, c##r##1);                                                  \
    }
#define ACC_STORE(r)                                                                                 \
    store_row(c##r##0, c##r##1, y + (m0 + (r)) * ldy + n0, bias,                                     \
              res ? res + (m0 + (r)) * ldr + n0 : 0, n0, ncols);
#define REP1(M) M(0)
#define REP2(M) REP1(M) M(1)
#define REP3(M) REP2(M) M(2)
#define REP4(M) REP3(M) M(3)
#define REP5(M) REP4(M) M(4)
#define REP6(M) REP5(M) M(5)

#define DEFINE_TILE(MR)                                                                              \
    static void tile_##MR(const float* x, int64_t ldx, const wtype* panel, int64_t K,               \
                          const float* bias, const float* res, int64_t ldr, float* y, int64_t ldy,  \
                          int64_t m0, int64_t n0, int64_t ncols) {                                   \
        REP##MR(ACC_DECL)                                                                            \
        const float* xr = x + m0 * ldx;                                                              \
        for (int64_t k = 0; k < K; ++k) {                                                            \
            const __m256 w0 = LOADW(panel + k * NR);                                        \
            const __m256 w1 = LOADW(panel + k * NR + 8);                                    \
            REP##MR(ACC_STEP)                                                                        \
        }                                                                                            \
        REP##MR(ACC_STORE)                                                                           \
    }

DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)
DEFINE_TILE(5)
DEFINE_TILE(6)

/* Rows [m0, m0 + MR) against two adjacent panels at once (MR <= 3, 4 * MR accumulators): twice
 * the independent weight streams in flight, which memory-bound decode and verification steps
 * need. Same per-element order as the tiles above. */
#define ACC2_DECL(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps(),          \
                            d##r##0 = _mm256_setzero_ps(), d##r##1 = _mm256_setzero_ps();
#define ACC2_STEP(r)                                                                                 \
    {                                                                                                \
        const __m256 xb = _mm256_broadcast_ss(xr + (r) * ldx + k);                                   \
        c##r##0 = _mm256_fmadd_ps(xb, w0, c##r##0);                                                  \
        c##r##1 = _mm256_fmadd_ps(xb, w1, c##r##1);                                                  \
        d##r##0 = _mm256_fmadd_ps(xb, v0, d##r##0);                                                  \
        d##r##1 = _mm256_fmadd_ps(xb, v1, d##r##1);                                                  \
    }
#define ACC2_STORE(r)                                                                                \
    store_row(c##r##0, c##r##1, y + (m0 + (r)) * ldy + n0, bias,                                     \
              res ? res + (m0 + (r)) * ldr + n0 : 0, n0, NR);                                        \
    store_row(d##r##0, d##r##1, y + (m0 + (r)) * ldy + n0 + NR, bias,                                \
              res ? res + (m0 + (r)) * ldr + n0 + NR : 0, n0 + NR, ncols2);
/* Row k of both panels: w (this panel), v (the next one). */
#define PAIR_LOAD                                                                                    \
    const __m256 w0 = LOADW(panel + k * NR), w1 = LOADW(panel + k * NR + 8);   \
    const __m256 v0 = LOADW(panel2 + k * NR), v1 = LOADW(panel2 + k * NR + 8);
#define DEFINE_TILE2(MR)                                                                             \
    static void tile2_##MR(const float* x, int64_t ldx, const wtype* panel, int64_t K,              \
                           const float* bias, const float* res, int64_t ldr, float* y, int64_t ldy,  \
                           int64_t m0, int64_t n0, int64_t ncols2) {                                 \
        const wtype* panel2 = panel + K * NR;                                                        \
        REP##MR(ACC2_DECL)                                                                           \
        const float* xr = x + m0 * ldx;                                                              \
        for (int64_t k = 0; k < K; ++k) {                                                            \
            PAIR_LOAD                                                                                \
            REP##MR(ACC2_STEP)                                                                       \
        }                                                                                            \
        REP##MR(ACC2_STORE)                                                                          \
    }

DEFINE_TILE2(1)
DEFINE_TILE2(2)
DEFINE_TILE2(3)

/* The same two-panel tiles over k in [k0, k1) only, with the accumulators carried in acc
 * ([MR][2 * NR] floats) between calls: a verification step's rows are swept over one block of k
 * (a few KB of weights, still in L1) before the next block is read from memory, so the compute
 * for all rows overlaps the weight stream instead of following it. Reloading an accumulator
 * gives back the same bits, so the per-element order is unchanged. */
#define ACC2_LOAD(r) __m256 c##r##0 = _mm256_load_ps(acc + (r) * 2 * NR), c##r##1 = _mm256_load_ps(acc + (r) * 2 * NR + 8), \
                            d##r##0 = _mm256_load_ps(acc + (r) * 2 * NR + 16), d##r##1 = _mm256_load_ps(acc + (r) * 2 * NR + 24);
#define ACC2_SAVE(r)                                                                                 \
    _mm256_store_ps(acc + (r) * 2 * NR, c##r##0); _mm256_store_ps(acc + (r) * 2 * NR + 8, c##r##1);    \
    _mm256_store_ps(acc + (r) * 2 * NR + 16, d##r##0); _mm256_store_ps(acc + (r) * 2 * NR + 24, d##r##1);
#define DEFINE_TILE2K(MR)                                                                            \
    static void tile2k_##MR(const float* xr, int64_t ldx, const wtype* panel, int64_t K, int64_t k0,  \
                            int64_t k1, float* acc) {                                                \
        const wtype* panel2 = panel + K * NR;                                                        \
        REP##MR(ACC2_LOAD)                                                                           \
        for (int64_t k = k0; k < k1; ++k) {                                                          \
            PAIR_LOAD                                                                                \
            _mm_prefetch((const char*)(panel + (k + PF_DIST) * NR), _MM_HINT_T0);                   \
            _mm_prefetch((const char*)(panel2 + (k + PF_DIST) * NR), _MM_HINT_T0);                  \
            REP##MR(ACC2_STEP)                                                                       \
        }                                                                                            \
        REP##MR(ACC2_SAVE)                                                                           \
    }

DEFINE_TILE2K(1)
DEFINE_TILE2K(2)
DEFINE_TILE2K(3)

typedef void (*tile2k_fn)(const float*, int64_t, const wtype*, int64_t, int64_t, int64_t, float*);
static const tile2k_fn TILES2K[4] = {0, tile2k_1, tile2k_2, tile2k_3};

typedef void (*tile_fn)(const float*, int64_t, const wtype*, int64_t, const float*, const float*, int64_t,
                        float*, int64_t, int64_t, int64_t, int64_t);
static const tile_fn TILES[7] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6};
static const tile_fn TILES2[4] = {0, tile2_1, tile2_2, tile2_3};

/* Rows of x are taken in chunks that stay in L2 while a panel streams past them; the
 * per-element order does not depend on the chunking. */
#define M_CHUNK 48
/* Up to this many rows (decode, verification of drafts), the two-panel tiles. */
#define SMALL_M 12
/* k per block in the blocked two-panel sweep (K_BLOCK * 128 bytes of weights per block). */
#ifndef K_BLOCK
#define K_BLOCK 64
#endif

/* packed: from qd_pack_f32. */
void QD_LINEAR(const float* x, int64_t M, int64_t ldx, const wtype* packed, int64_t N, int64_t K,
                   const float* bias, const float* res, int64_t ldr, float* y, int64_t ldy, int num_threads) {
    const int64_t panels = (N + NR - 1) / NR;
    if (M <= SMALL_M) { /* decode / verification: pairs of panels, all rows per pair */
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t pp = 0; pp < (panels + 1) / 2; ++pp) {
            const int64_t p = 2 * pp, n0 = p * NR;
            const wtype* panel = packed + p * K * NR;
            int64_t m = 0;
            if (p + 1 < panels && M > 3) {
                const int64_t ncols2 = N - n0 - NR < NR ? N - n0 - NR : NR;
                float acc[SMALL_M * 2 * NR] __attribute__((aligned(32)));
                memset(acc, 0, sizeof(float) * (size_t)(M * 2 * NR));
                for (int64_t k0 = 0; k0 < K; k0 += K_BLOCK) {
                    const int64_t k1 = k0 + K_BLOCK < K ? k0 + K_BLOCK : K;
                    for (m = 0; m + 3 <= M; m += 3) tile2k_3(x + m * ldx, ldx, panel, K, k0, k1, acc + m * 2 * NR);
                    if (m < M) TILES2K[M - m](x + m * ldx, ldx, panel, K, k0, k1, acc + m * 2 * NR);
                }
                for (m = 0; m < M; ++m) {
                    const float* a = acc + m * 2 * NR;
                    float* yr = y + m * ldy + n0;
                    const float* rr = res ? res + m * ldr + n0 : 0;
                    store_row(_mm256_load_ps(a), _mm256_load_ps(a + 8), yr, bias, rr, n0, NR);
                    store_row(_mm256_load_ps(a + 16), _mm256_load_ps(a + 24), yr + NR, bias, rr ? rr + NR : 0,
                              n0 + NR, ncols2);
                }
            } else if (p + 1 < panels) {
                const int64_t ncols2 = N - n0 - NR < NR ? N - n0 - NR : NR;
                for (; m + 3 <= M; m += 3) tile2_3(x, ldx, panel, K, bias, res, ldr, y, ldy, m, n0, ncols2);
                if (m < M) TILES2[M - m](x, ldx, panel, K, bias, res, ldr, y, ldy, m, n0, ncols2);
            } else {
                const int64_t ncols = N - n0 < NR ? N - n0 : NR;
                for (; m + 6 <= M; m += 6) tile_6(x, ldx, panel, K, bias, res, ldr, y, ldy, m, n0, ncols);
                if (m < M) TILES[M - m](x, ldx, panel, K, bias, res, ldr, y, ldy, m, n0, ncols);
            }
        }
        return;
    }
    for (int64_t mc = 0; mc < M; mc += M_CHUNK) {
        const int64_t me = mc + M_CHUNK < M ? mc + M_CHUNK : M;
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t p = 0; p < panels; ++p) {
            const wtype* panel = packed + p * K * NR;
            const int64_t n0 = p * NR;
            const int64_t ncols = N - n0 < NR ? N - n0 : NR;
            int64_t m = mc;
            for (; m + 6 <= me; m += 6) tile_6(x, ldx, panel, K, bias, res, ldr, y, ldy, m, n0, ncols);
            if (m < me) TILES[me - m](x, ldx, panel, K, bias, res, ldr, y, ldy, m, n0, ncols);
        }
    }
}
