/* Batch-invariant float32 attention of short queries (decode, verification of drafted tokens)
 * over the paged KV cache, for x86-64 CPUs with AVX2 and FMA.
 *
 * For query i (row query_token[i] of q, at absolute position query_pos[i], of the sequence whose
 * block table is row query_seq[i]) and head h, with G = H / Hkv query heads per KV head:
 *     s_j = scale * <q[i, h], k[slot(j), h / G]>          for the keys j in [lo, pos]
 *     out[i, h] = sum_j exp(s_j - max s) v[slot(j), h / G] / sum_j exp(s_j - max s)
 * where slot(j) = block_table[j / block_size] * block_size + j % block_size and lo = 0, or
 * pos - window + 1 with a sliding window. Every sum runs in one fixed order (eight lane
 * accumulators over the head dimension then a fixed tree; keys in increasing j) and exp is
 * simd_f32.h's exp8, so a query's result never depends on which other queries, sequences or
 * threads share the call.
 */
#include "simd_f32.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Dot product of q and k over D (multiple of 8) in a fixed order: 8 lane accumulators walk d,
 * then hsum8. Four keys at a time only to overlap their independent chains. */
static inline float dot_d(const float* q, const float* k, int64_t nd) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < nd; ++d) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * d), _mm256_loadu_ps(k + 8 * d), acc);
    return hsum8(acc);
}

static inline void dot4_d(const float* q, const float* k0, const float* k1, const float* k2, const float* k3,
                          int64_t nd, float* out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < nd; ++d) {
        const __m256 qv = _mm256_loadu_ps(q + 8 * d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 8 * d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + 8 * d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + 8 * d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + 8 * d), a3);
    }
    out[0] = hsum8(a0); out[1] = hsum8(a1); out[2] = hsum8(a2); out[3] = hsum8(a3);
}

/* Requires D % 8 == 0 and D <= 256. */
void qd_paged_attention_f32(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                            const int64_t* query_token, const int64_t* query_pos, const int64_t* query_seq,
                            int64_t num_queries, const int64_t* block_tables, int64_t max_blocks,
                            int64_t block_size, int64_t H, int64_t Hkv, int64_t D, float scale,
                            int64_t window, int64_t max_context, float* out, int64_t out_stride,
                            int num_threads) {
    const int64_t G = H / Hkv;
    const int64_t nd = D / 8;
#pragma omp parallel num_threads(num_threads)
    {
        /* scores, padded to a multiple of 8 for the vector exp */
        float* scores = (float*)malloc(sizeof(float) * (size_t)((max_context > 0 ? max_context : 1) + 8));
        int64_t* slots = (int64_t*)malloc(sizeof(int64_t) * (size_t)(max_context > 0 ? max_context : 1));
#pragma omp for schedule(static, 1)
        for (int64_t item = 0; item < num_queries * H; ++item) {
            const int64_t i = item / H, h = item % H, kvh = h / G;
            const int64_t pos = query_pos[i];
            const int64_t lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
            const int64_t n = pos + 1 - lo;
            const int64_t* table = block_tables + query_seq[i] * max_blocks;
            const float* qv = q + query_token[i] * q_stride + h * D;
            for (int64_t j = 0, blk = lo / block_size, off = lo % block_size; j < n; ++j) {
                slots[j] = table[blk] * block_size + off;
                if (++off == block_size) off = 0, ++blk;
            }
#define KEY(j) (k_cache + (slots[j] * Hkv + kvh) * D)
            int64_t j = 0;
            for (; j + 4 <= n; j += 4) dot4_d(qv, KEY(j), KEY(j + 1), KEY(j + 2), KEY(j + 3), nd, scores + j);
            for (; j < n; ++j) scores[j] = dot_d(qv, KEY(j), nd);
#undef KEY
            float smax = -INFINITY;
            for (j = 0; j < n; ++j) {
                scores[j] *= scale;
                if (scores[j] > smax) smax = scores[j];
            }
            for (j = n; j < ((n + 7) & ~(int64_t)7); ++j) scores[j] = smax; /* padding lanes, unused */
            const __m256 mx = _mm256_set1_ps(smax);
            for (j = 0; j < n; j += 8)
                _mm256_storeu_ps(scores + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), mx)));
            float denom = 0.0f;
            __m256 o[32];
            for (int64_t d = 0; d < nd; ++d) o[d] = _mm256_setzero_ps();
            for (j = 0; j < n; ++j) {
                const float e = scores[j];
                denom += e;
                const float* vv = v_cache + (slots[j] * Hkv + kvh) * D;
                const __m256 eb = _mm256_set1_ps(e);
                for (int64_t d = 0; d < nd; ++d) o[d] = _mm256_fmadd_ps(eb, _mm256_loadu_ps(vv + 8 * d), o[d]);
            }
            const __m256 inv = _mm256_set1_ps(1.0f / denom);
            float* ov = out + query_token[i] * out_stride + h * D;
            for (int64_t d = 0; d < nd; ++d) _mm256_storeu_ps(ov + 8 * d, _mm256_mul_ps(o[d], inv));
        }
        free(scores);
        free(slots);
    }
}
