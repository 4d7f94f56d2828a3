/* Linear layers on block-quantized weights with int8 activations, for x86-64 CPUs with AVX2
 * (and, compiled again with QD_DOT_VNNI, AVX-VNNI or AVX512-VNNI's dpbusd).
 *
 * Activations: each row of x is quantized to int8 in blocks of 32 (qd_quantize_q8):
 *     amax = max |x_i|,  dx = amax / 127,  xq_i = round_half_even(x_i * (1 / dx))   (0 when dx = 0)
 * with, per block, sx = dx * float(sum xq) (and per half block of 16, sx16 likewise).
 *
 * Weights: rows of K values in sub-blocks j of BS = 32 (or 16) values q (small integers), a scale
 * d_j and optionally an offset m_j: w = d_j * q + m_j (see quant.py for how each GGUF type maps to
 * this). For output n of row m, over the sub-blocks j in order:
 *     isum_j = sum q * xq                                   (exact, in int32)
 *     acc    = acc + float(isum_j) * (d_j * dx)
 *     acc    = acc + m_j * sx_j                             (formats with an offset)
 * then y = acc + bias, then y = residual + y: every operation is IEEE float32 with one rounding, in
 * an order that depends on nothing else. Integer sums are exact whatever instructions compute
 * them, so a row's result is bit-identical alone or with other rows, on AVX2 or on VNNI, and
 * equal to the reference in quant.py (torch), which computes the same expression.
 *
 * Packed layout: panels of 8 output rows, [ceil(N / 8), K / 32, block]; each 32-column block of a
 * panel holds the 8 rows' scales (and offsets) then their quants, interleaved by groups of 4
 * values (see load_groups_*), so that one thread streams a panel contiguously and every integer
 * dot product yields one sum per row without horizontal reductions. Formats (QD_Q_*), bytes per panel block:
 *     S8H   int8 quants, float16 scale                         16 + 256   (Q8_0)
 *     U4H   4-bit quants, float16 scale and offset           16 + 16 + 128 (Q4_0, Q4_1)
 *     U4F   4-bit quants, float32 scale and offset           32 + 32 + 128 (Q4_K)
 *     U8F   unsigned 8-bit quants, float32 scale and offset  32 + 32 + 256 (Q5_0, Q5_1, Q5_K)
 *     U8F16 as U8F with a scale and offset per 16 values     4 * 32 + 256  (Q6_K)
 * Unsigned quants are at most 63 (sums of products with int8 stay inside maddubs' int16 pairs,
 * see sums_unsigned); int8 quants go through |w| and sign(xq, w), so -128 is exact too.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#ifndef QD_ISA
#define QD_ISA avx2
#endif
#define QD_CAT2(a, b) a##_##b
#define QD_CAT(a, b) QD_CAT2(a, b)
#define QD_FN(name) QD_CAT(name, QD_ISA)

enum { QD_Q_S8H = 1, QD_Q_U4H = 2, QD_Q_U4F = 3, QD_Q_U8F = 4, QD_Q_U8F16 = 5 };
#define QB 32 /* values per block */
#define NRQ 8 /* output rows per panel */

static inline int64_t q_block_bytes(int fmt) {
    switch (fmt) {
    case QD_Q_S8H: return 16 + 256;
    case QD_Q_U4H: return 16 + 16 + 128;
    case QD_Q_U4F: return 32 + 32 + 128;
    case QD_Q_U8F: return 32 + 32 + 256;
    case QD_Q_U8F16: return 4 * 32 + 256;
    default: return 0;
    }
}

/* The quants of a panel block as 8 vectors v[g] (g = 0..7), byte 4 r + j of v[g] = value 4 g + j
 * of row r: one DOT of v[g] with the activation's 4 values 4 g .. 4 g + 3 (broadcast) gives
 * each row's partial sum in its own lane, so no horizontal sums are needed. Groups 0-3 are the
 * first half block (values 0-15), groups 4-7 the second. 4-bit: the 4 vectors of 32 bytes hold
 * groups i (low nibbles) and i + 4 (high nibbles). */
static inline void load_groups_u4(const uint8_t* q, __m256i* v) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int i = 0; i < 4; ++i) {
        const __m256i b = _mm256_loadu_si256((const __m256i*)(q + 32 * i));
        v[i] = _mm256_and_si256(b, mask);
        v[i + 4] = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
    }
}
static inline void load_groups_8(const uint8_t* q, __m256i* v) {
    for (int g = 0; g < 8; ++g) v[g] = _mm256_loadu_si256((const __m256i*)(q + 32 * g));
}

#if defined(QD_EMULATE_DPBUSD)
/* Tests only: the VNNI code path on an AVX2 CPU, with dpbusd computed by maddubs + madd. Exact
 * for the operands used here (each pair of products stays within int16, see sums_unsigned), so
 * it checks the VNNI variants' accumulation on machines without VNNI; the instruction itself is
 * then the only untested part. */
static inline __m256i emulated_dpbusd(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#define _mm256_dpbusd_avx_epi32 emulated_dpbusd
#endif

static inline __m256i bcast4(const int8_t* x) {
    int32_t v;
    memcpy(&v, x, 4);
    return _mm256_set1_epi32(v);
}

/* Per-row integer sums of one activation block (xb, 32 int8) with a panel block's groups v:
 * lo = values 0-15, hi = values 16-31 (int32 per row), or with whole_block the sum of all 32
 * in lo. Exact: every partial sum is bounded (4-bit quants: 8 pairs of at most 2 * 15 * 127 in
 * int16; 6-bit: 2 pairs of at most 2 * 63 * 127), so AVX2 and VNNI give the same integers. */
static inline void sums_unsigned(const __m256i* v, const int8_t* xb, int four_bit, int whole_block, __m256i* lo,
                                 __m256i* hi) {
#if defined(QD_DOT_VNNI) || defined(QD_DOT_VNNI512)
    (void)four_bit;
    __m256i a = _mm256_setzero_si256(), c = _mm256_setzero_si256();
    for (int g = 0; g < 4; ++g) {
#if defined(QD_DOT_VNNI512)
        a = _mm256_dpbusd_epi32(a, v[g], bcast4(xb + 4 * g));
        c = _mm256_dpbusd_epi32(c, v[g + 4], bcast4(xb + 16 + 4 * g));
#else
        a = _mm256_dpbusd_avx_epi32(a, v[g], bcast4(xb + 4 * g));
        c = _mm256_dpbusd_avx_epi32(c, v[g + 4], bcast4(xb + 16 + 4 * g));
#endif
    }
    if (whole_block) a = _mm256_add_epi32(a, c);
    *lo = a;
    *hi = c;
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p[8];
    for (int g = 0; g < 8; ++g) p[g] = _mm256_maddubs_epi16(v[g], bcast4(xb + 4 * g));
    const __m256i l01 = _mm256_add_epi16(p[0], p[1]), l23 = _mm256_add_epi16(p[2], p[3]);
    const __m256i h01 = _mm256_add_epi16(p[4], p[5]), h23 = _mm256_add_epi16(p[6], p[7]);
    if (four_bit && whole_block) {
        *lo = _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(l01, l23), _mm256_add_epi16(h01, h23)), ones);
    } else if (four_bit) {
        *lo = _mm256_madd_epi16(_mm256_add_epi16(l01, l23), ones);
        *hi = _mm256_madd_epi16(_mm256_add_epi16(h01, h23), ones);
    } else {
        *lo = _mm256_add_epi32(_mm256_madd_epi16(l01, ones), _mm256_madd_epi16(l23, ones));
        *hi = _mm256_add_epi32(_mm256_madd_epi16(h01, ones), _mm256_madd_epi16(h23, ones));
        if (whole_block) *lo = _mm256_add_epi32(*lo, *hi);
    }
#endif
}

/* int8 quants: |w| times sign(x, w), per group. */
static inline __m256i sum_signed(const __m256i* v, const __m256i* av, const int8_t* xb) {
    __m256i acc = _mm256_setzero_si256();
    for (int g = 0; g < 8; ++g) {
        const __m256i sx = _mm256_sign_epi8(bcast4(xb + 4 * g), v[g]);
#if defined(QD_DOT_VNNI512)
        acc = _mm256_dpbusd_epi32(acc, av[g], sx);
#elif defined(QD_DOT_VNNI)
        acc = _mm256_dpbusd_avx_epi32(acc, av[g], sx);
#else
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(av[g], sx), _mm256_set1_epi16(1)));
#endif
    }
    return acc;
}

static inline __m256 load_h8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline __m256 load_f8(const uint8_t* p) { return _mm256_loadu_ps((const float*)p); }

/* One tile of MR activation rows against one panel, over all blocks. xq: row m0's quants (row
 * stride ldq), xd: its block scales [MR][nb], xs32 / xs16: its offset sums [MR][nb] / [MR][2 nb]. */
static inline __attribute__((always_inline)) void panel_tile(
    int fmt, const int MR, const uint8_t* panel, int64_t nb, const int8_t* xq, int64_t ldq,
    const float* xd, const float* xs32, const float* xs16, __m256* acc) {
    const int64_t bb = q_block_bytes(fmt);
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = panel + b * bb;
        __m256i v[8], av[8];
        switch (fmt) {
        case QD_Q_S8H:
            load_groups_8(blk + 16, v);
            for (int g = 0; g < 8; ++g) av[g] = _mm256_abs_epi8(v[g]);
            break;
        case QD_Q_U4H: load_groups_u4(blk + 32, v); break;
        case QD_Q_U4F: load_groups_u4(blk + 64, v); break;
        case QD_Q_U8F: load_groups_8(blk + 64, v); break;
        default: load_groups_8(blk + 128, v); break;
        }
        for (int i = 0; i < MR; ++i) {
            const int8_t* xb = xq + i * ldq + b * QB;
            const __m256 dx = _mm256_set1_ps(xd[i * nb + b]);
            __m256i lo, hi;
            switch (fmt) {
            case QD_Q_S8H: {
                const __m256 s = _mm256_mul_ps(load_h8(blk), dx);
                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_cvtepi32_ps(sum_signed(v, av, xb)), s));
                break;
            }
            case QD_Q_U4H:
            case QD_Q_U4F:
            case QD_Q_U8F: {
                const int f16 = fmt == QD_Q_U4H;
                const int64_t sb = f16 ? 16 : 32;
                sums_unsigned(v, xb, fmt != QD_Q_U8F, 1, &lo, &hi);
                const __m256 d = f16 ? load_h8(blk) : load_f8(blk);
                const __m256 m = f16 ? load_h8(blk + sb) : load_f8(blk + sb);
                const __m256 s = _mm256_mul_ps(d, dx);
                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_cvtepi32_ps(lo), s));
                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(m, _mm256_set1_ps(xs32[i * nb + b])));
                break;
            }
            case QD_Q_U8F16: {
                sums_unsigned(v, xb, 0, 0, &lo, &hi);
                const float* sc = xs16 + i * 2 * nb + 2 * b;
                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(load_f8(blk), dx)));
                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(load_f8(blk + 64), _mm256_set1_ps(sc[0])));
                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(load_f8(blk + 32), dx)));
                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(load_f8(blk + 96), _mm256_set1_ps(sc[1])));
                break;
            }
            }
        }
    }
}

static inline void store_q(__m256 v, float* yr, const float* bias, const float* rr, int64_t n0, int64_t ncols) {
    float out[NRQ];
    _mm256_storeu_ps(out, v);
    if (bias)
        for (int64_t c = 0; c < ncols; ++c) out[c] = out[c] + bias[n0 + c];
    if (rr)
        for (int64_t c = 0; c < ncols; ++c) out[c] = rr[c] + out[c];
    memcpy(yr, out, sizeof(float) * (size_t)ncols);
}

#define DEFINE_QTILE(FMT, MR)                                                                          \
    static void QD_CAT(qtile_##FMT##_##MR, QD_ISA)(const uint8_t* panel, int64_t nb, const int8_t* xq,  \
                                                   int64_t ldq, const float* xd, const float* xs32,    \
                                                   const float* xs16, __m256* acc) {                   \
        panel_tile(QD_Q_##FMT, MR, panel, nb, xq, ldq, xd, xs32, xs16, acc);                           \
    }
#define DEFINE_QTILES(FMT) DEFINE_QTILE(FMT, 1) DEFINE_QTILE(FMT, 2) DEFINE_QTILE(FMT, 3) DEFINE_QTILE(FMT, 4)
DEFINE_QTILES(S8H)
DEFINE_QTILES(U4H)
DEFINE_QTILES(U4F)
DEFINE_QTILES(U8F)
DEFINE_QTILES(U8F16)

typedef void (*qtile_fn)(const uint8_t*, int64_t, const int8_t*, int64_t, const float*, const float*, const float*,
                         __m256*);
#define QTILE_ROW(FMT) {0, QD_CAT(qtile_##FMT##_1, QD_ISA), QD_CAT(qtile_##FMT##_2, QD_ISA),                 \
                        QD_CAT(qtile_##FMT##_3, QD_ISA), QD_CAT(qtile_##FMT##_4, QD_ISA)}
static const qtile_fn QD_CAT(QTILES, QD_ISA)[6][5] = {
    {0, 0, 0, 0, 0}, QTILE_ROW(S8H), QTILE_ROW(U4H), QTILE_ROW(U4F), QTILE_ROW(U8F), QTILE_ROW(U8F16)};

/* Rows per tile for more than 4 rows; rows are taken in chunks that stay in L2 while a panel
 * streams past them (the per-element order depends on neither). */
#define MR_MAX 4
#define QM_CHUNK 64

/* y [M, N] = x W^T (+ bias) (+ residual), x given quantized by qd_quantize_q8 (xq [M, K] with
 * row stride K, xd [M, K / 32], xs32 [M, K / 32], xs16 [M, K / 16]); packed from pack_q in quant.py. */
void QD_FN(qd_linear_q8)(int fmt, const int8_t* xq, const float* xd, const float* xs32, const float* xs16,
                         int64_t M, const uint8_t* packed, int64_t N, int64_t K, const float* bias,
                         const float* res, int64_t ldr, float* y, int64_t ldy, int num_threads) {
    const int64_t nb = K / QB, panels = (N + NRQ - 1) / NRQ, pb = nb * q_block_bytes(fmt);
    const qtile_fn* tiles = QD_CAT(QTILES, QD_ISA)[fmt];
    for (int64_t mc = 0; mc < M; mc += QM_CHUNK) {
        const int64_t me = mc + QM_CHUNK < M ? mc + QM_CHUNK : M;
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t p = 0; p < panels; ++p) {
            const uint8_t* panel = packed + p * pb;
            const int64_t n0 = p * NRQ, ncols = N - n0 < NRQ ? N - n0 : NRQ;
            for (int64_t m = mc; m < me; m += MR_MAX) {
                const int mr = me - m < MR_MAX ? (int)(me - m) : MR_MAX;
                __m256 acc[MR_MAX];
                tiles[mr](panel, nb, xq + m * K, K, xd + m * nb, xs32 + m * nb, xs16 + m * 2 * nb, acc);
                for (int i = 0; i < mr; ++i)
                    store_q(acc[i], y + (m + i) * ldy + n0, bias, res ? res + (m + i) * ldr + n0 : 0, n0, ncols);
            }
        }
    }
}

#ifdef QD_QUANTIZE_ROWS
/* Byte offset of value j of row c in a panel block's quants (see load_groups_*). */
#define GROUP8(c, j) (32 * ((j) / 4) + 4 * (c) + (j) % 4)
#define GROUP4(c, j) (32 * ((j) / 4 % 4) + 4 * (c) + (j) % 4)
/* x [M, K] (row stride ldx, K a multiple of 32) -> xq [M, K], xd [M, K/32], xs32 [M, K/32],
 * xs16 [M, K/16] as described at the top. Each row is quantized on its own. */
void qd_quantize_q8(const float* x, int64_t M, int64_t ldx, int64_t K, int8_t* xq, float* xd, float* xs32,
                    float* xs16, int num_threads) {
    const int64_t nb = K / QB;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * K >= 32768)
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t b = 0; b < nb; ++b) {
            const float* xb = x + m * ldx + b * QB;
            const __m256 sign = _mm256_set1_ps(-0.0f);
            __m256 v[4], a = _mm256_setzero_ps();
            for (int j = 0; j < 4; ++j) {
                v[j] = _mm256_loadu_ps(xb + 8 * j);
                a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v[j]));
            }
            float lanes[8], amax = 0.0f;
            _mm256_storeu_ps(lanes, a);
            for (int j = 0; j < 8; ++j) amax = lanes[j] > amax ? lanes[j] : amax;
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            int8_t* qb = xq + m * K + b * QB;
            int32_t half[2] = {0, 0};
            for (int j = 0; j < 4; ++j) {
                const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(id)),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                int32_t q[8];
                _mm256_storeu_si256((__m256i*)q, _mm256_cvtps_epi32(r));
                for (int c = 0; c < 8; ++c) {
                    qb[8 * j + c] = (int8_t)q[c];
                    half[j / 2] += q[c];
                }
            }
            xd[m * nb + b] = d;
            xs32[m * nb + b] = d * (float)(half[0] + half[1]);
            xs16[m * 2 * nb + 2 * b] = d * (float)half[0];
            xs16[m * 2 * nb + 2 * b + 1] = d * (float)half[1];
        }
    }
}

/* Rows of a packed weight, dequantized: out[r] = d * q + m for rows index[r] (embedding lookups
 * on a tied, quantized LM head); the same float32 values as dequantizing the GGUF block. */
void qd_rows_q8(int fmt, const uint8_t* packed, int64_t K, const int64_t* index, int64_t R, float* out) {
    const int64_t nb = K / QB, bb = q_block_bytes(fmt);
    for (int64_t r = 0; r < R; ++r) {
        const int64_t n = index[r], p = n / NRQ, c = n % NRQ;
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t* blk = packed + (p * nb + b) * bb;
            float* o = out + r * K + b * QB;
            for (int j = 0; j < QB; ++j) {
                float d, m = 0.0f;
                int q;
                uint16_t h;
                switch (fmt) {
                case QD_Q_S8H:
                    memcpy(&h, blk + 2 * c, 2);
                    d = _cvtsh_ss(h);
                    q = (int8_t)blk[16 + GROUP8(c, j)];
                    break;
                case QD_Q_U4H:
                    memcpy(&h, blk + 2 * c, 2);
                    d = _cvtsh_ss(h);
                    memcpy(&h, blk + 16 + 2 * c, 2);
                    m = _cvtsh_ss(h);
                    q = (blk[32 + GROUP4(c, j)] >> (j / 4 < 4 ? 0 : 4)) & 15;
                    break;
                case QD_Q_U4F:
                    memcpy(&d, blk + 4 * c, 4);
                    memcpy(&m, blk + 32 + 4 * c, 4);
                    q = (blk[64 + GROUP4(c, j)] >> (j / 4 < 4 ? 0 : 4)) & 15;
                    break;
                case QD_Q_U8F:
                    memcpy(&d, blk + 4 * c, 4);
                    memcpy(&m, blk + 32 + 4 * c, 4);
                    q = blk[64 + GROUP8(c, j)];
                    break;
                default: /* U8F16 */
                    memcpy(&d, blk + (j < 16 ? 0 : 32) + 4 * c, 4);
                    memcpy(&m, blk + (j < 16 ? 64 : 96) + 4 * c, 4);
                    q = blk[128 + GROUP8(c, j)];
                    break;
                }
                o[j] = fmt == QD_Q_S8H ? d * (float)q : d * (float)q + m;
            }
        }
    }
}
#endif
